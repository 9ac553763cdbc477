"""Fixtures for the guest image tests: the images (built on demand) and an SSH key."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtplane.testing import guest


@pytest.fixture(scope="session")
def images() -> guest.ImagePaths:
    # A clean clone after `make setup` has them; otherwise this builds them once
    # (images/build.py is a hash check when they are current).
    return guest.ensure_images()


@pytest.fixture(scope="session")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return guest.make_ssh_key(tmp_path_factory.mktemp("ssh"))
