"""SqliteStore watches: live fan-out, replay from retained history, compaction, overflow, close."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest

from virtplane.store import interface, sqlite

PUT, DELETE = interface.EventType.PUT, interface.EventType.DELETE


async def take(watch: interface.Watch, n: int) -> list[interface.WatchEvent]:
    events: list[interface.WatchEvent] = []
    it = aiter(watch)
    async with asyncio.timeout(5):
        while len(events) < n:
            events.append(await anext(it))
    return events


async def assert_quiet(watch: interface.Watch) -> None:
    """Nothing more is pending on the watch."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await anext(aiter(watch))


async def test_live_events(store: sqlite.SqliteStore) -> None:
    listed = await store.list("/a/")
    watch = store.watch("/a/", after_revision=listed.revision)
    one = await store.create("/a/x", b"one")
    two = await store.update("/a/x", b"two", expected_revision=one.mod_revision)
    gone = await store.delete("/a/x")
    events = await take(watch, 3)
    assert events == [
        interface.WatchEvent(PUT, one),
        interface.WatchEvent(PUT, two, prev_kv=one),
        # DELETE carries the last value; prev_kv is that value at its own revision.
        interface.WatchEvent(DELETE, interface.KeyValue("/a/x", b"two", 1, 3), prev_kv=two),
    ]
    assert gone == events[2].kv and events[2].revision == 3
    await watch.close()


async def test_watch_sees_only_its_prefix(store: sqlite.SqliteStore) -> None:
    watch_dir = store.watch("/a/b/", after_revision=0)
    watch_bare = store.watch("/a/b", after_revision=0)
    for key in ["/a/bc", "/a/b/1", "/a/c", "/a/bc/1", "/a/b/2"]:
        await store.create(key, b"v")
    assert [e.kv.key for e in await take(watch_dir, 2)] == ["/a/b/1", "/a/b/2"]
    await assert_quiet(watch_dir)
    assert [e.kv.key for e in await take(watch_bare, 4)] == ["/a/bc", "/a/b/1", "/a/bc/1", "/a/b/2"]
    for w in (watch_dir, watch_bare):
        await w.close()


async def test_replay_from_retained_revision_carries_deletes_and_prev(store: sqlite.SqliteStore) -> None:
    one = await store.create("/a/x", b"one")
    await store.create("/b/y", b"elsewhere")
    two = await store.update("/a/x", b"two", expected_revision=one.mod_revision)
    await store.delete("/a/x")
    watch = store.watch("/a/", after_revision=0)
    events = await take(watch, 3)
    assert [(e.type, e.revision, e.kv.value) for e in events] == [
        (PUT, 1, b"one"),
        (PUT, 3, b"two"),
        (DELETE, 4, b"two"),
    ]
    assert events[0].prev_kv is None
    assert events[1].prev_kv == one
    assert events[2].prev_kv == two
    assert events[2].kv == interface.KeyValue("/a/x", b"two", 1, 4)
    # ...and then it is live.
    three = await store.create("/a/x", b"three")
    assert (await take(watch, 1))[0] == interface.WatchEvent(PUT, three)
    await assert_quiet(watch)
    # A replay from a revision in the middle starts right after it.
    middle = store.watch("/a/", after_revision=3)
    assert [e.revision for e in await take(middle, 2)] == [4, 5]
    await watch.close()
    await middle.close()


async def test_replay_of_a_sparse_prefix_reads_the_log_in_windows(
    store: sqlite.SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "REPLAY_SCAN", 10)
    expected = []
    for i in range(100):
        kv = await store.create(f"/busy/{i}", b"v")
        if i % 33 == 0:
            expected.append((await store.create(f"/rare/{i}", b"v")).mod_revision)
    watch = store.watch("/rare/", after_revision=0)
    assert [e.revision for e in await take(watch, len(expected))] == expected
    assert watch._synced  # type: ignore[attr-defined]
    await assert_quiet(watch)
    kv = await store.create("/rare/live", b"v")
    assert (await take(watch, 1))[0].kv == kv
    await watch.close()


async def test_watch_from_a_future_revision_skips_up_to_it(store: sqlite.SqliteStore) -> None:
    watch = store.watch("/a/", after_revision=3)
    for i in range(5):
        await store.create(f"/a/{i}", b"v")
    assert [e.revision for e in await take(watch, 2)] == [4, 5]
    await watch.close()


@pytest.mark.parametrize(("batch", "scan"), [(1, 5000), (7, 11), (500, 3), (500, 5000)])
async def test_replay_then_live_without_gap_or_duplicate(
    store: sqlite.SqliteStore, monkeypatch: pytest.MonkeyPatch, batch: int, scan: int
) -> None:
    """Watches started at every retained revision while writers keep writing see exactly the log."""
    monkeypatch.setattr(sqlite, "REPLAY_BATCH", batch)
    monkeypatch.setattr(sqlite, "REPLAY_SCAN", scan)
    rng = random.Random(batch * scan)
    history: list[interface.WatchEvent] = []  # every write, in revision order, as the store reported it
    live: dict[str, interface.KeyValue] = {}

    async def writer(n: int) -> None:
        for i in range(n):
            key = f"/{rng.choice('ab')}/{rng.randrange(8)}"
            current = live.get(key)
            if current is None:
                kv = await store.create(key, f"{i}".encode())
                history.append(interface.WatchEvent(PUT, kv))
            elif rng.random() < 0.3:
                kv = await store.delete(key, expected_revision=current.mod_revision)
                history.append(interface.WatchEvent(DELETE, kv, current))
                del live[key]
                continue
            else:
                kv = await store.update(key, f"{i}".encode(), expected_revision=current.mod_revision)
                history.append(interface.WatchEvent(PUT, kv, current))
            live[key] = kv
            if rng.random() < 0.5:
                await asyncio.sleep(0)  # let watchers run in the middle of their replay

    await writer(200)

    async def consume(after: int) -> tuple[int, list[interface.WatchEvent]]:
        watch = store.watch("/a/", after_revision=after)
        got: list[interface.WatchEvent] = []
        try:
            async for event in watch:
                got.append(event)
                if event.kv.key == "/a/final":  # the writers' last word
                    break
                if rng.random() < 0.2:
                    await asyncio.sleep(0)
        finally:
            await watch.close()
        return after, got

    # Watches from all over the retained history, replaying while the writer keeps writing.
    consumers = [asyncio.create_task(consume(after)) for after in [*range(0, 200, 13), 199, 200]]
    await writer(400)
    history.append(interface.WatchEvent(PUT, await store.create("/a/final", b"end")))
    async with asyncio.timeout(10):
        results = await asyncio.gather(*consumers)
    for after, got in results:
        expected = [e for e in history if e.revision > after and e.kv.key.startswith("/a/")]
        # Replayed prev_kv of an update equals the live one while nothing is compacted.
        assert got == expected, f"watch after {after}"


async def test_compaction_makes_watch_creation_fail(store: sqlite.SqliteStore) -> None:
    for i in range(10):
        await store.create(f"/a/{i}", b"v")
    await store.compact(6)
    with pytest.raises(interface.CompactedError) as info:
        store.watch("/a/", after_revision=5)
    assert (info.value.requested, info.value.compact_revision) == (5, 6)
    assert [e.revision for e in await take(store.watch("/a/", after_revision=6), 4)] == [7, 8, 9, 10]


async def test_compaction_during_replay_ends_the_watch(
    store: sqlite.SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "REPLAY_BATCH", 3)
    for i in range(10):
        await store.create(f"/a/{i}", b"v")
    watch = store.watch("/a/", after_revision=0)
    assert [e.revision for e in await take(watch, 3)] == [1, 2, 3]  # the first batch
    await store.compact(8)  # the rest of the replay is gone
    with pytest.raises(interface.CompactedError):
        await take(watch, 1)
    with pytest.raises(interface.CompactedError):  # and it stays ended
        await take(watch, 1)
    assert not store._watches


async def test_compaction_does_not_disturb_live_watches(store: sqlite.SqliteStore) -> None:
    await store.create("/a/0", b"v")
    watch = store.watch("/a/", after_revision=1)
    for i in range(1, 5):
        await store.create(f"/a/{i}", b"v")
    await store.compact(5)  # everything it has not consumed yet is already in its buffer
    assert [e.revision for e in await take(watch, 4)] == [2, 3, 4, 5]
    await watch.close()


async def test_overflow_ends_the_watch(db_path: str) -> None:
    s = sqlite.SqliteStore(db_path, retain_seconds=None, watch_buffer=10)
    await s.start()
    try:
        slow = s.watch("/a/", after_revision=0)
        fast = s.watch("/a/", after_revision=0)
        fast_events: list[interface.WatchEvent] = []
        for i in range(25):
            await s.create(f"/a/{i}", b"v")
            fast_events += await take(fast, 1)
        with pytest.raises(interface.WatchClosedError, match="behind"):
            await take(slow, 1)
        assert [e.revision for e in fast_events] == list(range(1, 26))
        assert s._watches["/a/"] == {fast}  # the overflowed watch is no longer fed
        await slow.close()  # closing an ended watch is fine
    finally:
        await s.close()


async def test_long_replay_does_not_overflow(db_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A watch catching up reads the log in batches; only a live backlog counts as overflow."""
    s = sqlite.SqliteStore(db_path, retain_seconds=None, watch_buffer=10)
    await s.start()
    try:
        for i in range(100):
            await s.create(f"/a/{i}", b"v")
        watch = s.watch("/a/", after_revision=0)
        got = await take(watch, 50)
        for i in range(100, 105):  # writes while it is still replaying: read from the log
            await s.create(f"/a/{i}", b"v")
        got += await take(watch, 55)
        assert [e.revision for e in got] == list(range(1, 106))
        await s.create("/a/live", b"v")
        assert (await take(watch, 1))[0].revision == 106
    finally:
        await s.close()


async def test_close_is_idempotent_and_ends_iteration(store: sqlite.SqliteStore) -> None:
    watch = store.watch("/a/", after_revision=0)

    async def consume() -> list[interface.WatchEvent]:
        return [event async for event in watch]

    consumer = asyncio.create_task(consume())
    await store.create("/a/x", b"v")
    await asyncio.sleep(0.01)
    await watch.close()
    await watch.close()
    async with asyncio.timeout(1):
        events = await consumer  # a consumer blocked in the iteration returns normally
    assert [e.revision for e in events] == [1]
    assert [e async for e in watch] == []
    assert not store._watches
    await store.create("/a/y", b"v")  # writes after close don't reach it


async def test_closing_the_store_ends_watches(db_path: str) -> None:
    s = sqlite.SqliteStore(db_path, retain_seconds=None)
    await s.start()
    waiting = s.watch("/a/", after_revision=0)
    idle = s.watch("/b/", after_revision=0)
    consumer = asyncio.create_task(take(waiting, 1))
    await asyncio.sleep(0.01)
    await s.close()
    with pytest.raises(interface.WatchClosedError, match="closed"):
        await consumer
    with pytest.raises(interface.WatchClosedError):
        await take(idle, 1)
    await idle.close()


async def test_hundred_watchers_see_a_write_within_milliseconds(store: sqlite.SqliteStore) -> None:
    watches = [store.watch("/pods/", after_revision=0) for _ in range(100)]
    arrived: list[float] = []

    async def one(watch: interface.Watch) -> None:
        async for _ in watch:
            arrived.append(time.perf_counter())
            return

    tasks = [asyncio.create_task(one(w)) for w in watches]
    await asyncio.sleep(0.01)  # all are waiting
    start = time.perf_counter()
    await store.create("/pods/p", b"v")
    async with asyncio.timeout(1):
        await asyncio.gather(*tasks)
    assert len(arrived) == 100
    assert max(arrived) - start < 0.1  # typically well under a millisecond
    for w in watches:
        await w.close()


async def test_watch_rejects_negative_revision(store: sqlite.SqliteStore) -> None:
    with pytest.raises(ValueError):
        store.watch("/a/", after_revision=-1)


@pytest.fixture
async def chatty(store: sqlite.SqliteStore) -> AsyncIterator[sqlite.SqliteStore]:
    for i in range(5):
        await store.create(f"/a/{i}", b"v")
    yield store


async def test_list_then_watch_from_its_revision(chatty: sqlite.SqliteStore) -> None:
    listed = await chatty.list("/a/")
    watch = chatty.watch("/a/", after_revision=listed.revision)
    await chatty.create("/a/new", b"v")
    events = await take(watch, 1)
    assert events[0].kv.key == "/a/new" and events[0].revision == listed.revision + 1
    await assert_quiet(watch)
    await watch.close()
