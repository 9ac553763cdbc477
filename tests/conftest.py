"""Shared fixtures: a real all-in-one cluster process for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from virtplane.testing import cluster as cluster_mod

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster_mod.Cluster]:
    c = cluster_mod.Cluster(tmp_path_factory.mktemp("cluster"))
    c.start()
    yield c
    c.stop()
