"""SqliteStore group commit: concurrent writes share a transaction, yet each behaves as if alone."""

from __future__ import annotations

import asyncio
import os
import sqlite3

import pytest

from virtplane.store import interface, sqlite


def _commits(store: sqlite.SqliteStore) -> list[int]:
    """Counts COMMIT statements on the store's connection (a trace callback: what SQLite itself runs)."""
    seen: list[int] = []
    assert store._conn is not None
    store._conn.set_trace_callback(lambda sql: seen.append(1) if sql == "COMMIT" else None)
    return seen


async def test_concurrent_creates_commit_together_with_dense_revisions(store: sqlite.SqliteStore) -> None:
    commits = _commits(store)
    kvs = await asyncio.gather(*(store.create(f"/a/{i:02d}", b"v") for i in range(20)))
    assert [kv.mod_revision for kv in kvs] == list(range(1, 21))
    assert len(commits) < 20  # written in fewer transactions than writes
    assert await store.current_revision() == 20
    assert await store.count("/a/") == 20


async def test_writers_return_only_after_commit_and_watchers_see_order(store: sqlite.SqliteStore) -> None:
    watch = store.watch("/a/", after_revision=0)
    events: list[int] = []

    async def collect() -> None:
        async for ev in watch:
            events.append(ev.revision)
            if len(events) == 10:
                return

    collector = asyncio.create_task(collect())
    kvs = await asyncio.gather(*(store.create(f"/a/{i}", b"v") for i in range(10)))
    # each write is visible to a read by the time its writer returns
    for kv in kvs:
        assert await store.get(kv.key) == kv
    await asyncio.wait_for(collector, 5)
    await watch.close()
    assert events == list(range(1, 11))


async def test_conflicts_inside_a_batch_are_seen(store: sqlite.SqliteStore) -> None:
    base = await store.create("/a/x", b"one")
    results = await asyncio.gather(
        store.create("/a/y", b"first"),
        store.create("/a/y", b"second"),
        store.update("/a/x", b"two", expected_revision=base.mod_revision),
        store.update("/a/x", b"stale", expected_revision=base.mod_revision),
        return_exceptions=True,
    )
    assert isinstance(results[0], interface.KeyValue)
    assert isinstance(results[1], interface.KeyExistsError)
    assert isinstance(results[2], interface.KeyValue) and results[2].value == b"two"
    assert isinstance(results[3], interface.ConflictError)
    assert (await store.get("/a/y")).value == b"first"  # type: ignore[union-attr]
    assert (await store.get("/a/x")).value == b"two"  # type: ignore[union-attr]
    assert await store.current_revision() == 3  # the failed writes took no revision


async def test_a_read_never_sees_an_uncommitted_write(store: sqlite.SqliteStore) -> None:
    observed: list[interface.KeyValue | None] = []

    async def reader() -> None:
        observed.append(await store.get("/a/x"))

    writer = asyncio.create_task(store.create("/a/x", b"v"))
    await asyncio.sleep(0)  # the write's statements ran; its batch is open
    await reader()  # the read commits the batch first, so what it sees is durable
    kv = await writer
    assert observed == [kv]
    assert store._batch is None


async def test_a_failing_batch_fails_every_writer_and_keeps_state(store: sqlite.SqliteStore) -> None:
    await store.create("/a/small", b"v")
    conn = store._conn
    assert conn is not None
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count={pages + 2}")  # a full disk, as SQLite reports it
    results = await asyncio.gather(*(store.create(f"/a/big{i}", os.urandom(64 * 1024)) for i in range(6)),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, interface.StoreError)]
    assert errors, results
    assert all(isinstance(e.__cause__, sqlite3.Error) for e in errors)
    assert not conn.in_transaction
    # what the store reports is what it holds: no revision without its write, none half-written
    revision = await store.current_revision()
    assert await store.count("/a/") == revision
    assert revision == 1 + sum(isinstance(r, interface.KeyValue) for r in results)
    conn.execute("PRAGMA max_page_count=1073741823")
    assert (await store.create("/a/after", b"v")).mod_revision == revision + 1


@pytest.mark.parametrize("op", ["update", "delete"])
async def test_update_and_delete_batch_too(store: sqlite.SqliteStore, op: str) -> None:
    kvs = [await store.create(f"/a/{i}", b"v") for i in range(5)]
    commits = _commits(store)
    if op == "update":
        done = await asyncio.gather(*(store.update(kv.key, b"w", expected_revision=kv.mod_revision) for kv in kvs))
    else:
        done = await asyncio.gather(*(store.delete(kv.key, expected_revision=kv.mod_revision) for kv in kvs))
    assert [kv.mod_revision for kv in done] == list(range(6, 11))
    assert len(commits) < 5
    assert await store.count("/a/") == (5 if op == "update" else 0)
