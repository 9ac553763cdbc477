"""SqliteStore: etcd semantics of get/list/count/create/update/delete, compaction, persistence."""

from __future__ import annotations

import os
import pathlib
import sqlite3

import pytest

import virtplane.store
from virtplane.store import interface, sqlite


async def test_create_then_get(store: sqlite.SqliteStore) -> None:
    kv = await store.create("/a/x", b"one")
    assert kv == interface.KeyValue("/a/x", b"one", create_revision=1, mod_revision=1)
    assert await store.get("/a/x") == kv
    assert await store.get("/a/missing") is None
    assert await store.current_revision() == 1


async def test_create_existing_key_raises_and_keeps_revision(store: sqlite.SqliteStore) -> None:
    await store.create("/a/x", b"one")
    with pytest.raises(interface.KeyExistsError) as info:
        await store.create("/a/x", b"two")
    assert info.value.key == "/a/x"
    assert isinstance(info.value.__cause__, sqlite3.IntegrityError)  # the root cause is chained
    assert await store.current_revision() == 1
    assert (await store.get("/a/x")).value == b"one"  # type: ignore[union-attr]


async def test_update_compare_and_swap(store: sqlite.SqliteStore) -> None:
    created = await store.create("/a/x", b"one")
    await store.create("/a/y", b"other")  # revisions are global: the next write on x is 3
    updated = await store.update("/a/x", b"two", expected_revision=created.mod_revision)
    assert updated == interface.KeyValue("/a/x", b"two", create_revision=1, mod_revision=3)
    with pytest.raises(interface.ConflictError) as info:
        await store.update("/a/x", b"stale", expected_revision=created.mod_revision)
    assert info.value.expected == 1
    assert info.value.current == updated
    with pytest.raises(interface.KeyNotFoundError):
        await store.update("/a/missing", b"v", expected_revision=1)
    assert await store.get("/a/x") == updated
    assert await store.current_revision() == 3  # failed writes take no revision


async def test_delete_returns_last_value_at_delete_revision(store: sqlite.SqliteStore) -> None:
    created = await store.create("/a/x", b"one")
    updated = await store.update("/a/x", b"two", expected_revision=created.mod_revision)
    with pytest.raises(interface.ConflictError):
        await store.delete("/a/x", expected_revision=created.mod_revision)
    deleted = await store.delete("/a/x", expected_revision=updated.mod_revision)
    assert deleted == interface.KeyValue("/a/x", b"two", create_revision=1, mod_revision=3)
    assert await store.get("/a/x") is None
    with pytest.raises(interface.KeyNotFoundError):
        await store.delete("/a/x")
    # A key created again is a new object: new create_revision.
    again = await store.create("/a/x", b"three")
    assert again.create_revision == again.mod_revision == 4


async def test_unconditional_delete(store: sqlite.SqliteStore) -> None:
    await store.create("/a/x", b"one")
    assert (await store.delete("/a/x")).mod_revision == 2


async def test_revisions_strictly_increase_across_keys(store: sqlite.SqliteStore) -> None:
    seen: list[int] = []
    for i in range(20):
        kv = await store.create(f"/k/{i % 5}/{i}", b"v")
        seen.append(kv.mod_revision)
        if i % 3 == 0:
            seen.append((await store.update(kv.key, b"w", expected_revision=kv.mod_revision)).mod_revision)
        if i % 4 == 0:
            seen.append((await store.delete(kv.key)).mod_revision)
    assert seen == list(range(1, len(seen) + 1))


async def test_values_are_bytes(store: sqlite.SqliteStore) -> None:
    kv = await store.create("/a/x", bytearray(b"abc"))
    assert type(kv.value) is bytes and type((await store.get("/a/x")).value) is bytes  # type: ignore[union-attr]
    with pytest.raises(TypeError):
        await store.create("/a/y", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.create("", b"v")
    big = os.urandom(1 << 20)
    await store.create("/a/big", big)
    assert (await store.get("/a/big")).value == big  # type: ignore[union-attr]


async def test_list_prefix_order_and_revision(store: sqlite.SqliteStore) -> None:
    for key in ["/r/ns2/b", "/r/ns1/b", "/r/ns1/a", "/other/x", "/r/ns1/c"]:
        await store.create(key, key.encode())
    result = await store.list("/r/ns1/")
    assert [kv.key for kv in result.kvs] == ["/r/ns1/a", "/r/ns1/b", "/r/ns1/c"]
    assert result.revision == 5 and result.more is False
    assert [kv.key for kv in (await store.list("/r/")).kvs] == [
        "/r/ns1/a",
        "/r/ns1/b",
        "/r/ns1/c",
        "/r/ns2/b",
    ]
    assert len((await store.list("")).kvs) == 5
    assert (await store.list("/nothing/")).kvs == []


async def test_list_pagination_with_limit_and_start_after(store: sqlite.SqliteStore) -> None:
    keys = [f"/p/{i:03d}" for i in range(25)]
    for key in keys:
        await store.create(key, b"v")
    await store.create("/q/after", b"v")  # just past the prefix: must never leak into a page
    page = await store.list("/p/", limit=10)
    assert [kv.key for kv in page.kvs] == keys[:10] and page.more
    collected: list[str] = []
    start_after: str | None = None
    while True:
        page = await store.list("/p/", start_after=start_after, limit=10)
        collected += [kv.key for kv in page.kvs]
        if not page.more:
            break
        start_after = page.kvs[-1].key
    assert collected == keys
    exact = await store.list("/p/", limit=25)
    assert len(exact.kvs) == 25 and not exact.more
    # start_after before the prefix is just the prefix; after everything is empty.
    assert len((await store.list("/p/", start_after="/a")).kvs) == 25
    assert (await store.list("/p/", start_after="/p/999")).kvs == []
    with pytest.raises(ValueError):
        await store.list("/p/", limit=-1)


async def test_count(store: sqlite.SqliteStore) -> None:
    for i in range(7):
        await store.create(f"/c/ns{i % 2}/{i}", b"v")
    assert await store.count("/c/") == 7
    assert await store.count("/c/ns0/") == 4
    assert await store.count("/d/") == 0
    await store.delete("/c/ns0/0")
    assert await store.count("/c/ns0/") == 3


async def test_prefix_isolation(store: sqlite.SqliteStore) -> None:
    for key in ["/a/b", "/a/b/1", "/a/bc", "/a/bc/1", "/a/b0", "/a/b.", "/a/c"]:
        await store.create(key, b"v")
    # Callers pass prefixes ending in "/": only that directory.
    assert [kv.key for kv in (await store.list("/a/b/")).kvs] == ["/a/b/1"]
    assert await store.count("/a/b/") == 1
    # A bare prefix is a plain string prefix, as in etcd.
    assert [kv.key for kv in (await store.list("/a/b")).kvs] == [
        "/a/b",
        "/a/b.",
        "/a/b/1",
        "/a/b0",
        "/a/bc",
        "/a/bc/1",
    ]


async def test_unicode_and_edge_prefixes(store: sqlite.SqliteStore) -> None:
    keys = ["/u/é", "/u/é/x", "/u/\U0010ffff", "/u/\U0010ffff/x", "/u/\ud7ff", "/u/\ue000", "/u0"]
    for key in keys:
        await store.create(key, b"v")
    assert [kv.key for kv in (await store.list("/u/é")).kvs] == ["/u/é", "/u/é/x"]
    assert [kv.key for kv in (await store.list("/u/\U0010ffff")).kvs] == ["/u/\U0010ffff", "/u/\U0010ffff/x"]
    assert [kv.key for kv in (await store.list("/u/\ud7ff")).kvs] == ["/u/\ud7ff"]
    assert await store.count("/u/") == 6


def test_prefix_end() -> None:
    assert sqlite.prefix_end("/a/") == "/a0"
    assert sqlite.prefix_end("") is None
    assert sqlite.prefix_end("\U0010ffff") is None
    assert sqlite.prefix_end("/a\U0010ffff") == "/b"
    assert sqlite.prefix_end("/\ud7ff") == "/\ue000"


async def test_reopen_keeps_data_revision_and_compaction(db_path: str) -> None:
    first = sqlite.SqliteStore(db_path, retain_seconds=None)
    await first.start()
    a = await first.create("/a/x", b"one")
    await first.update("/a/x", b"two", expected_revision=a.mod_revision)
    await first.create("/a/y", b"y")
    await first.delete("/a/y")
    await first.compact(2)
    await first.close()

    second = sqlite.SqliteStore(db_path, retain_seconds=None)
    await second.start()
    try:
        assert await second.current_revision() == 4
        assert second.compact_revision == 2
        assert await second.get("/a/x") == interface.KeyValue("/a/x", b"two", 1, 2)
        assert await second.get("/a/y") is None
        assert (await second.create("/a/z", b"z")).mod_revision == 5
        with pytest.raises(interface.CompactedError):
            second.watch("/a/", after_revision=1)
    finally:
        await second.close()


async def test_revision_survives_compacting_everything(db_path: str) -> None:
    first = sqlite.SqliteStore(db_path, retain_seconds=None)
    await first.start()
    kv = await first.create("/a/x", b"one")
    await first.delete("/a/x", expected_revision=kv.mod_revision)
    await first.compact(2)  # the log is now empty
    await first.close()
    second = sqlite.SqliteStore(db_path, retain_seconds=None)
    await second.start()
    try:
        assert await second.current_revision() == 2
        assert (await second.create("/a/x", b"again")).mod_revision == 3
    finally:
        await second.close()


async def test_second_opener_is_refused(store: sqlite.SqliteStore, db_path: str) -> None:
    await store.create("/a/x", b"v")
    other = sqlite.SqliteStore(db_path, busy_timeout=0.1)
    with pytest.raises(interface.StoreError, match="locked") as info:
        await other.start()
    assert isinstance(info.value.__cause__, BlockingIOError)
    await other.close()
    with open(f"{db_path}.lock") as lock:  # noqa: ASYNC230 (a tiny local file)
        assert lock.read() == f"{os.getpid()}\n"  # who holds it
    await store.close()
    # Released on close (and by the kernel if the process dies): the next opener gets it.
    again = sqlite.SqliteStore(db_path, busy_timeout=0.1)
    await again.start()
    assert (await again.get("/a/x")) is not None
    await again.close()


async def test_waits_for_the_lock_up_to_busy_timeout(store: sqlite.SqliteStore, db_path: str) -> None:
    import asyncio

    other = sqlite.SqliteStore(db_path, busy_timeout=5)
    opening = asyncio.create_task(other.start())
    await asyncio.sleep(0.1)
    assert not opening.done()
    await store.close()
    async with asyncio.timeout(2):
        await opening
    await other.close()


async def test_disk_full_is_a_store_error_with_cause(store: sqlite.SqliteStore) -> None:
    await store.create("/a/x", b"small")
    conn = store._conn
    assert conn is not None
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count={pages + 2}")  # what SQLite reports on a full disk
    with pytest.raises(interface.StoreError) as info:
        for i in range(10):
            await store.create(f"/a/big{i}", os.urandom(64 * 1024))
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert "full" in str(info.value)
    assert not conn.in_transaction  # rolled back
    revision = await store.current_revision()
    assert await store.count("/a/") == revision  # nothing half-written: every revision is a create
    conn.execute("PRAGMA max_page_count=1073741823")
    assert (await store.create("/a/after", b"v")).mod_revision == revision + 1


async def test_use_before_start_and_after_close(db_path: str) -> None:
    s = sqlite.SqliteStore(db_path)
    with pytest.raises(interface.StoreError, match="not started"):
        await s.get("/a")
    await s.start()
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(interface.StoreError, match="closed"):
        await s.create("/a", b"v")
    with pytest.raises(interface.StoreError, match="closed"):
        s.watch("/a/", after_revision=0)


async def test_open_failure_is_a_store_error(tmp_path: pathlib.Path) -> None:
    s = sqlite.SqliteStore(str(tmp_path / "no" / "such" / "dir" / "state.db"))
    with pytest.raises(interface.StoreError) as info:
        await s.start()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 500)
    s = sqlite.SqliteStore(str(tmp_path / "garbage.db"))
    with pytest.raises(interface.StoreError) as info:
        await s.start()
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert s._lock_fd is None  # the lock was given back


# -- compaction --------------------------------------------------------------------------------


async def test_compact_forgets_history_not_values(store: sqlite.SqliteStore) -> None:
    kv = await store.create("/a/x", b"one")
    for i in range(5):
        kv = await store.update("/a/x", f"v{i}".encode(), expected_revision=kv.mod_revision)
    await store.compact(4)
    assert store.compact_revision == 4
    assert await store.get("/a/x") == kv  # the live value stays
    assert (await store.list("/a/")).kvs == [kv]
    assert store._conn is not None
    assert [r for (r,) in store._conn.execute("SELECT revision FROM log")] == [5, 6]
    with pytest.raises(interface.CompactedError) as info:
        store.watch("/a/", after_revision=3)
    assert info.value.requested == 3 and info.value.compact_revision == 4
    store.watch("/a/", after_revision=4)  # the compact revision itself is still a valid start
    await store.compact(2)  # already compacted further: no-op
    assert store.compact_revision == 4
    with pytest.raises(ValueError):
        await store.compact(99)


async def test_compact_in_batches(store: sqlite.SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite, "COMPACT_BATCH", 7)
    for i in range(50):
        await store.create(f"/a/{i}", b"v")
    await store.compact(45)
    assert store._conn is not None
    assert [r for (r,) in store._conn.execute("SELECT revision FROM log")] == [46, 47, 48, 49, 50]
    assert await store.count("/a/") == 50


def test_compaction_policy_by_revisions() -> None:
    policy = sqlite.CompactionPolicy(retain_revisions=100)
    assert policy.target(now=0, revision=50) == 0
    assert policy.target(now=1, revision=1000) == 900


def test_compaction_policy_by_time() -> None:
    policy = sqlite.CompactionPolicy(retain_seconds=300)
    assert policy.target(now=0, revision=10) == 0
    assert policy.target(now=60, revision=20) == 0
    assert policy.target(now=300, revision=30) == 10  # the sample taken 300 s ago
    assert policy.target(now=330, revision=40) == 0  # nothing newly old enough
    assert policy.target(now=360, revision=50) == 20


def test_compaction_policy_keeps_what_either_rule_keeps() -> None:
    policy = sqlite.CompactionPolicy(retain_revisions=5, retain_seconds=10)
    assert policy.target(now=0, revision=100) == 0
    assert policy.target(now=10, revision=200) == 100  # time keeps more than revisions here
    policy = sqlite.CompactionPolicy(retain_revisions=150, retain_seconds=10)
    assert policy.target(now=0, revision=100) == 0
    assert policy.target(now=10, revision=200) == 50  # revisions keep more
    assert not sqlite.CompactionPolicy().enabled
    with pytest.raises(ValueError):
        sqlite.CompactionPolicy(retain_revisions=-1)


async def test_auto_compaction_runs_in_the_background(db_path: str) -> None:
    import asyncio

    s = sqlite.SqliteStore(db_path, retain_revisions=3, retain_seconds=None, compact_interval=0.01)
    await s.start()
    try:
        for i in range(20):
            await s.create(f"/a/{i}", b"v")
        for _ in range(200):
            if s.compact_revision == 17:
                break
            await asyncio.sleep(0.01)
        assert s.compact_revision == 17
    finally:
        await s.close()
    assert s._compactor is None


# -- open_store ----------------------------------------------------------------------------


async def test_open_store_absolute_path(tmp_path: pathlib.Path) -> None:
    s = virtplane.store.open_store(f"sqlite://{tmp_path}/state.db?retain_revisions=5&compact_interval=2")
    assert isinstance(s, sqlite.SqliteStore)
    assert s.path == f"{tmp_path}/state.db"
    assert s.policy.retain_revisions == 5 and s.compact_interval == 2.0
    await s.start()
    await s.create("/a", b"v")
    await s.close()
    assert (tmp_path / "state.db").exists()


def test_open_store_url_forms(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert virtplane.store.open_store("sqlite:data/state.db").path == "data/state.db"  # type: ignore[attr-defined]
    assert virtplane.store.open_store("SQLITE::memory:").path == ":memory:"  # type: ignore[attr-defined]
    assert virtplane.store.open_store("sqlite:///a%20b/s.db").path == "/a b/s.db"  # type: ignore[attr-defined]
    off = virtplane.store.open_store("sqlite:///s.db?retain_seconds=none&retain_revisions=None")
    assert not off.policy.enabled  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://db/x", "supported schemes are sqlite://"),
        ("/just/a/path.db", "supported schemes are sqlite://"),
        ("sqlite://host/state.db", "names a file, not a host"),
        ("sqlite://", "no database path"),
        ("sqlite:///s.db?retention=5", "unknown option 'retention'"),
        ("sqlite:///s.db?retain_revisions=many", "bad value 'many'"),
        ("sqlite:///s.db?compact_interval=inf", "bad value 'inf'"),
        ("sqlite:///s.db?compact_interval=0", "compact_interval must be > 0"),
    ],
)
def test_open_store_rejects(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        virtplane.store.open_store(url)


async def test_memory_store_works() -> None:
    s = virtplane.store.open_store("sqlite::memory:")
    await s.start()
    await s.create("/a", b"v")
    assert (await s.get("/a")) is not None
    await s.close()


# -- checkpoints -------------------------------------------------------------------------------


def checkpoints(store: sqlite.SqliteStore) -> int:
    assert store._conn is not None
    row = store._conn.execute("SELECT value FROM meta WHERE name = 'checkpoints'").fetchone()
    return row[0] if row else 0


def wal_frames(path: str) -> int:
    """Frames in the WAL file, from its size (32-byte header, 24-byte frame header + page)."""
    size = os.path.getsize(f"{path}-wal") if os.path.exists(f"{path}-wal") else 0
    return max(0, (size - 32) // (24 + 4096))


async def test_checkpoints_run_in_the_background_and_reuse_the_wal(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    monkeypatch.setattr(sqlite, "CHECKPOINT_DELAY", 0.01)
    s = sqlite.SqliteStore(db_path, retain_seconds=None)
    await s.start()
    try:
        value = os.urandom(2048)
        sizes = []
        for round_ in range(4):
            for i in range(300):
                await s.create(f"/a/{round_}/{i}", value)
            # A checkpoint may have run in the middle of the round: wait for one that started after all of it
            # (the marker write makes sure there is one), so the next round starts the WAL over.
            before = checkpoints(s)
            await s.create(f"/marker/{round_}", b"m")
            async with asyncio.timeout(5):
                while checkpoints(s) == before:  # noqa: ASYNC110 (the checkpointer's turn)
                    await asyncio.sleep(0.01)
            sizes.append(wal_frames(db_path))
        # Started over after each round: the file holds at most one round (a 2 KB write is 3 to 6 WAL frames,
        # fewer when a checkpoint fell inside the round), where four rounds without reuse would be 3,600 or more.
        assert max(sizes) < 300 * 8, sizes
        assert await s.count("/a/") == 1200
    finally:
        await s.close()
    assert not os.path.exists(f"{db_path}-wal")  # noqa: ASYNC240 (the last close removed it)


async def test_writers_wait_at_the_gate_readers_do_not(store: sqlite.SqliteStore) -> None:
    import asyncio

    kv = await store.create("/a/x", b"one")
    store._writable.clear()  # as while a RESTART checkpoint runs
    try:
        writing = asyncio.create_task(store.update("/a/x", b"two", expected_revision=kv.mod_revision))
        await asyncio.sleep(0.02)
        assert not writing.done()
        assert await store.get("/a/x") == kv  # reads go on
        assert (await store.list("/a/")).kvs == [kv]
    finally:
        store._writable.set()
    assert (await writing).mod_revision == 2


async def test_a_writer_that_never_yields_gets_checkpointed(db_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes in a loop that never suspends would starve the checkpointer: after WAL_MAX_WRITES
    writes the gate holds writers for a checkpoint round, without waiting CHECKPOINT_DELAY."""
    import asyncio

    monkeypatch.setattr(sqlite, "WAL_MAX_WRITES", 50)
    monkeypatch.setattr(sqlite, "CHECKPOINT_DELAY", 30.0)
    s = sqlite.SqliteStore(db_path, retain_seconds=None)
    await s.start()
    try:
        async with asyncio.timeout(10):
            for i in range(400):
                await s.create(f"/a/{i}", b"v" * 2048)
        assert checkpoints(s) >= 7
        assert s._writes_since_checkpoint <= 50  # the next write would wait
    finally:
        await s.close()


async def test_a_failing_checkpoint_does_not_stop_writers(db_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    monkeypatch.setattr(sqlite, "WAL_MAX_WRITES", 20)
    s = sqlite.SqliteStore(db_path, retain_seconds=None)

    def broken() -> bool:
        raise sqlite3.OperationalError("disk I/O error")

    s._restart_wal = broken  # type: ignore[method-assign]
    await s.start()
    try:
        async with asyncio.timeout(10):
            for i in range(100):
                await s.create(f"/a/{i}", b"v")
        assert await s.count("/a/") == 100
        assert s._checkpointer is not None and not s._checkpointer.done()  # still on duty
    finally:
        await s.close()


async def test_close_releases_writers_waiting_at_the_gate(store: sqlite.SqliteStore) -> None:
    import asyncio

    store._writable.clear()
    writing = asyncio.create_task(store.create("/a/x", b"v"))
    await asyncio.sleep(0.01)
    await store.close()
    with pytest.raises(interface.StoreError, match="closed"):
        async with asyncio.timeout(1):
            await writing
