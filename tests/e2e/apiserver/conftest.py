"""An API server with no controllers, for tests of pure API semantics that controllers would race with."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from virtplane.testing.cluster import Cluster


@pytest.fixture(scope="module")
def bare_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("bare-api"), command="apiserver").start()
    yield c
    c.stop()
