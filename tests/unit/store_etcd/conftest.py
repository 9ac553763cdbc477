"""Fixtures for the etcd store tests: one real etcd for the session, a fresh key prefix per test.

Revisions are etcd's and global to the session's etcd, so tests compare them to `base` (the
revision when their store started) rather than to absolute numbers; nothing else writes while a
test runs, so a test's n-th write takes revision base + n. Compactions are global too: a test
only ever watches from its own revisions, which no earlier test's compaction reaches.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from virtplane.store import etcd
from virtplane.testing.etcd import EtcdCluster, etcd_binary


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (Debian package: etcd-server)")
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}"


MakeStore = Callable[..., Awaitable[etcd.EtcdStore]]


@pytest.fixture
async def make_store(etcd_server: EtcdCluster, prefix: str) -> AsyncIterator[MakeStore]:
    """Start more stores on the session's etcd (the test's prefix unless given): a second API
    server, say. Whatever is still open at the end is closed."""
    made: list[etcd.EtcdStore] = []

    async def make(**options: Any) -> etcd.EtcdStore:
        options.setdefault("prefix", prefix)
        options.setdefault("retain_seconds", None)  # no auto-compaction unless a test asks
        s = etcd.EtcdStore(options.pop("endpoints", etcd_server.endpoints), **options)
        await s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


@pytest.fixture
async def store(etcd_server: EtcdCluster, prefix: str) -> AsyncIterator[etcd.EtcdStore]:
    s = etcd.EtcdStore(etcd_server.endpoints, prefix=prefix, retain_seconds=None)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def base(store: etcd.EtcdStore) -> int:
    return await store.current_revision()


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """An etcd of the test's own, which it may kill and restart."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (Debian package: etcd-server)")
    with EtcdCluster(tmp_path / "etcd") as cluster:
        yield cluster
