"""EtcdStore watches against a real etcd: live, replay from a revision, replay then live without gaps
or duplicates under concurrent writers (in two stores), compaction, overflow, close."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable

import pytest

from virtplane.store import etcd, interface

PUT, DELETE = interface.EventType.PUT, interface.EventType.DELETE
MakeStore = Callable[..., Awaitable[etcd.EtcdStore]]  # the make_store fixture


async def take(watch: interface.Watch, n: int) -> list[interface.WatchEvent]:
    events: list[interface.WatchEvent] = []
    it = aiter(watch)
    async with asyncio.timeout(5):
        while len(events) < n:
            events.append(await anext(it))
    return events


async def assert_quiet(watch: interface.Watch) -> None:
    """Nothing more is pending on the watch (etcd is given time to send anything it has)."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await anext(aiter(watch))


async def test_live_events(store: etcd.EtcdStore) -> None:
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
        interface.WatchEvent(DELETE, interface.KeyValue("/a/x", b"two", one.mod_revision, two.mod_revision + 1),
                             prev_kv=two),
    ]
    assert gone == events[2].kv
    await watch.close()


async def test_watch_sees_only_its_prefix(store: etcd.EtcdStore, base: int) -> None:
    watch_dir = store.watch("/a/b/", after_revision=base)
    watch_bare = store.watch("/a/b", after_revision=base)
    for key in ["/a/bc", "/a/b/1", "/a/c", "/a/bc/1", "/a/b/2"]:
        await store.create(key, b"v")
    assert [e.kv.key for e in await take(watch_dir, 2)] == ["/a/b/1", "/a/b/2"]
    await assert_quiet(watch_dir)
    assert [e.kv.key for e in await take(watch_bare, 4)] == ["/a/bc", "/a/b/1", "/a/bc/1", "/a/b/2"]
    for w in (watch_dir, watch_bare):
        await w.close()


async def test_replay_from_retained_revision_carries_deletes_and_prev(store: etcd.EtcdStore, base: int) -> None:
    one = await store.create("/a/x", b"one")
    await store.create("/b/y", b"elsewhere")
    two = await store.update("/a/x", b"two", expected_revision=one.mod_revision)
    await store.delete("/a/x")
    watch = store.watch("/a/", after_revision=base)
    events = await take(watch, 3)
    assert [(e.type, e.revision - base, e.kv.value) for e in events] == [
        (PUT, 1, b"one"),
        (PUT, 3, b"two"),
        (DELETE, 4, b"two"),
    ]
    assert events[0].prev_kv is None
    assert events[1].prev_kv == one
    assert events[2].prev_kv == two
    assert events[2].kv == interface.KeyValue("/a/x", b"two", base + 1, base + 4)
    # ...and then it is live.
    three = await store.create("/a/x", b"three")
    assert (await take(watch, 1))[0] == interface.WatchEvent(PUT, three)
    await assert_quiet(watch)
    # A replay from a revision in the middle starts right after it.
    middle = store.watch("/a/", after_revision=base + 3)
    assert [e.revision - base for e in await take(middle, 2)] == [4, 5]
    await watch.close()
    await middle.close()


async def test_watch_from_a_future_revision_skips_up_to_it(store: etcd.EtcdStore, base: int) -> None:
    watch = store.watch("/a/", after_revision=base + 3)
    for i in range(5):
        await store.create(f"/a/{i}", b"v")
    assert [e.revision - base for e in await take(watch, 2)] == [4, 5]
    await watch.close()


async def test_large_values_cross_the_stream(store: etcd.EtcdStore, base: int) -> None:
    """Messages far longer than aiohttp's 64 KiB line limit, and several in one read."""
    watch = store.watch("/a/", after_revision=base)
    values = [os.urandom(size) for size in (1 << 20, 100_000, 10, 700_000)]
    for i, value in enumerate(values):
        await store.create(f"/a/{i}", value)
    assert [e.kv.value for e in await take(watch, 4)] == values
    await watch.close()


@pytest.mark.parametrize("seed", [1, 2])
async def test_replay_then_live_without_gap_or_duplicate(make_store: MakeStore, seed: int) -> None:
    """Watches started all over the retained history while concurrent writers, through two stores
    (two API servers), keep writing, see exactly the writes, in revision order."""
    a, b = await make_store(), await make_store()
    base = await a.current_revision()
    rng = random.Random(seed)
    history: list[interface.WatchEvent] = []  # every write, as the store reported it

    async def writer(s: etcd.EtcdStore, name: str, n: int) -> None:
        live: dict[str, interface.KeyValue] = {}  # this writer's own keys: it knows every prev
        for i in range(n):
            key = f"/{rng.choice('ab')}/{name}-{rng.randrange(6)}"
            current = live.get(key)
            if current is None:
                kv = await s.create(key, f"{i}".encode())
                history.append(interface.WatchEvent(PUT, kv))
            elif rng.random() < 0.3:
                kv = await s.delete(key, expected_revision=current.mod_revision)
                history.append(interface.WatchEvent(DELETE, kv, current))
                del live[key]
                continue
            else:
                kv = await s.update(key, f"{i}".encode(), expected_revision=current.mod_revision)
                history.append(interface.WatchEvent(PUT, kv, current))
            live[key] = kv

    await asyncio.gather(writer(a, "w1", 60), writer(b, "w2", 60))

    async def consume(s: etcd.EtcdStore, after: int) -> tuple[int, list[interface.WatchEvent]]:
        watch = s.watch("/a/", after_revision=after)
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

    head = await a.current_revision()
    starts = [*range(base, head, 9), head - 1, head]
    consumers = [asyncio.create_task(consume(a if i % 2 else b, after)) for i, after in enumerate(starts)]
    await asyncio.gather(writer(a, "w3", 120), writer(b, "w4", 120), writer(a, "w5", 60))
    history.append(interface.WatchEvent(PUT, await b.create("/a/final", b"end")))
    history.sort(key=lambda e: e.revision)
    assert [e.revision for e in history] == list(range(base + 1, base + len(history) + 1))
    async with asyncio.timeout(30):
        results = await asyncio.gather(*consumers)
    for after, got in results:
        expected = [e for e in history if e.revision > after and e.kv.key.startswith("/a/")]
        assert got == expected, f"watch after {after}"


async def test_compaction_makes_watch_creation_fail(store: etcd.EtcdStore, base: int) -> None:
    for i in range(10):
        await store.create(f"/a/{i}", b"v")
    await store.compact(base + 6)
    with pytest.raises(interface.CompactedError) as info:
        store.watch("/a/", after_revision=base + 5)
    assert (info.value.requested, info.value.compact_revision) == (base + 5, base + 6)
    w = store.watch("/a/", after_revision=base + 6)
    assert [e.revision - base for e in await take(w, 4)] == [7, 8, 9, 10]
    await w.close()


async def test_compaction_by_another_server_ends_the_watch_on_first_iteration(make_store: MakeStore) -> None:
    """The store did not know of the compaction, so watch() succeeds; etcd then refuses the
    history and names its compact revision, which the store learns."""
    a, b = await make_store(), await make_store()
    base = await a.current_revision()
    for i in range(10):
        await a.create(f"/a/{i}", b"v")
    await a.compact(base + 8)
    assert b.compact_revision < base + 8
    watch = b.watch("/a/", after_revision=base + 2)
    with pytest.raises(interface.CompactedError) as info:
        await take(watch, 1)
    assert (info.value.requested, info.value.compact_revision) == (base + 2, base + 8)
    assert b.compact_revision == base + 8
    with pytest.raises(interface.CompactedError):  # and it stays ended
        await take(watch, 1)
    assert not b._feeds
    await watch.close()


async def test_compaction_does_not_disturb_live_watches(store: etcd.EtcdStore, base: int) -> None:
    await store.create("/a/0", b"v")
    watch = store.watch("/a/", after_revision=base + 1)
    for i in range(1, 5):
        await store.create(f"/a/{i}", b"v")
    await asyncio.sleep(0.1)  # let etcd deliver to it
    await store.compact(base + 5)
    assert [e.revision - base for e in await take(watch, 4)] == [2, 3, 4, 5]
    kv = await store.create("/a/5", b"v")
    assert (await take(watch, 1))[0].kv == kv
    await watch.close()


async def test_overflow_ends_the_watch(make_store: MakeStore) -> None:
    s = await make_store(watch_buffer=10)
    base = await s.current_revision()
    slow = s.watch("/a/", after_revision=base)
    fast = s.watch("/a/", after_revision=base)
    fast_events: list[interface.WatchEvent] = []
    for i in range(25):
        await s.create(f"/a/{i}", b"v")
        fast_events += await take(fast, 1)
    await asyncio.sleep(0.1)  # etcd has sent slow everything by now
    with pytest.raises(interface.WatchClosedError, match="behind"):
        await take(slow, 1)
    assert [e.revision - base for e in fast_events] == list(range(1, 26))
    # Opened together, they shared one stream; the overflowed watch left it, fast goes on.
    assert [feed.watches for feed in s._feeds['/a/']] == [{fast}]
    await slow.close()  # closing an ended watch is fine
    await fast.close()


async def test_long_replay_does_not_overflow(make_store: MakeStore) -> None:
    """History is replayed at the consumer's pace (etcd holds what does not fit); only a live
    backlog counts as overflow."""
    s = await make_store(watch_buffer=10)
    base = await s.current_revision()
    for i in range(100):
        await s.create(f"/a/{i}", b"v")
    watch = s.watch("/a/", after_revision=base)
    got = await take(watch, 50)
    await asyncio.sleep(0.1)  # the reader, ahead of the consumer, waits for room
    assert len(watch._buffer) <= 5  # type: ignore[attr-defined]
    for i in range(100, 105):  # live writes while it is still replaying
        await s.create(f"/a/{i}", b"v")
    got += await take(watch, 55)
    assert [e.revision - base for e in got] == list(range(1, 106))
    await s.create("/a/live", b"v")
    assert (await take(watch, 1))[0].revision == base + 106
    await watch.close()


async def test_close_is_idempotent_and_ends_iteration(store: etcd.EtcdStore, base: int) -> None:
    watch = store.watch("/a/", after_revision=base)

    async def consume() -> list[interface.WatchEvent]:
        return [event async for event in watch]

    consumer = asyncio.create_task(consume())
    feed = watch._feed  # type: ignore[attr-defined]
    await store.create("/a/x", b"v")
    async with asyncio.timeout(5):
        while not consumer.done() and not watch._received > base:  # type: ignore[attr-defined]  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)
    await watch.close()
    await watch.close()
    async with asyncio.timeout(1):
        events = await consumer  # a consumer blocked in the iteration returns normally
    assert [e.revision for e in events] == [base + 1]
    assert [e async for e in watch] == []
    assert not store._feeds
    assert feed.task.done()  # its stream is closed by the time close() returns


async def test_closing_the_store_ends_watches(make_store: MakeStore) -> None:
    s = await make_store()
    base = await s.current_revision()
    waiting = s.watch("/a/", after_revision=base)
    idle = s.watch("/b/", after_revision=base)
    consumer = asyncio.create_task(take(waiting, 1))
    feeds = [w._feed for w in (waiting, idle)]  # type: ignore[attr-defined]
    await asyncio.sleep(0.05)
    await s.close()
    with pytest.raises(interface.WatchClosedError, match="closed"):
        await consumer
    with pytest.raises(interface.WatchClosedError):
        await take(idle, 1)
    await idle.close()
    assert all(feed.task.done() for feed in feeds) and not s._feeds


async def test_hundred_watchers_see_a_write_promptly(store: etcd.EtcdStore, base: int) -> None:
    watches = [store.watch("/pods/", after_revision=base) for _ in range(100)]
    arrived: list[float] = []

    async def one(watch: interface.Watch) -> None:
        async for _ in watch:
            arrived.append(time.perf_counter())
            return

    tasks = [asyncio.create_task(one(w)) for w in watches]
    # Opened together from one revision: one etcd stream for all of them.
    assert len(store._feeds["/pods/"]) == 1
    feed = store._feeds["/pods/"][0]
    async with asyncio.timeout(10):
        while not feed.live:  # noqa: ASYNC110 (etcd has created the stream)
            await asyncio.sleep(0.01)
    start = time.perf_counter()
    await store.create("/pods/p", b"v")
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks)
    assert len(arrived) == 100
    assert max(arrived) - start < 1.0  # typically a few milliseconds
    for w in watches:
        await w.close()


async def test_watch_rejects_negative_revision(store: etcd.EtcdStore) -> None:
    with pytest.raises(ValueError):
        store.watch("/a/", after_revision=-1)


async def test_list_then_watch_from_its_revision(store: etcd.EtcdStore) -> None:
    for i in range(5):
        await store.create(f"/a/{i}", b"v")
    listed = await store.list("/a/")
    watch = store.watch("/a/", after_revision=listed.revision)
    await store.create("/a/new", b"v")
    events = await take(watch, 1)
    assert events[0].kv.key == "/a/new" and events[0].revision == listed.revision + 1
    await assert_quiet(watch)
    await watch.close()


async def test_a_watch_in_another_store_sees_this_stores_writes(make_store: MakeStore) -> None:
    """The scale-out promise: a watch through one API server sees writes through another."""
    a, b = await make_store(), await make_store()
    listed = await b.list("/vms/")
    watch = b.watch("/vms/", after_revision=listed.revision)
    kv = await a.create("/vms/default/x", b"spec")
    updated = await a.update("/vms/default/x", b"spec2", expected_revision=kv.mod_revision)
    assert await take(watch, 2) == [interface.WatchEvent(PUT, kv), interface.WatchEvent(PUT, updated, kv)]
    await watch.close()


async def test_watches_share_streams(store: etcd.EtcdStore, base: int) -> None:
    """Watches that need the same events share one etcd stream: one connection, one decode."""
    first = store.watch("/a/", after_revision=base)
    await store.create("/a/0", b"v")
    assert [e.revision for e in await take(first, 1)] == [base + 1]
    feed = store._feeds["/a/"][0]
    assert feed.live and feed.position == base + 1
    # Writes elsewhere move the revision on; a watch from a later revision joins the live stream.
    await store.create("/b/0", b"v")
    joined = store.watch("/a/", after_revision=base + 2)
    assert store._feeds["/a/"] == [feed] and joined._feed is feed  # type: ignore[attr-defined]
    # A write the stream has not delivered yet when a watch joins after it: not the joiner's.
    early = await store.create("/a/1", b"v")
    late_joiner = store.watch("/a/", after_revision=early.mod_revision)
    assert late_joiner._feed is feed  # type: ignore[attr-defined]
    last = await store.create("/a/2", b"v")
    assert [e.kv for e in await take(first, 2)] == [early, last]
    assert [e.kv for e in await take(joined, 2)] == [early, last]
    assert [e.kv for e in await take(late_joiner, 1)] == [last]
    await assert_quiet(late_joiner)

    # A watch from further back replays on a stream of its own, then merges into the shared one.
    replaying = store.watch("/a/", after_revision=base)
    assert len(store._feeds["/a/"]) == 2
    assert [e.revision - base for e in await take(replaying, 3)] == [1, 3, 4]
    async with asyncio.timeout(5):
        while len(store._feeds["/a/"]) > 1:  # noqa: ASYNC110 (merged once caught up)
            await asyncio.sleep(0.01)
    assert replaying._feed is feed  # type: ignore[attr-defined]
    kv = await store.create("/a/3", b"v")
    for w in (first, joined, late_joiner, replaying):
        assert [e.kv for e in await take(w, 1)] == [kv]
        await assert_quiet(w)

    # The last watch to leave closes the stream.
    for w in (first, joined, late_joiner):
        await w.close()
    assert store._feeds["/a/"] == [feed] and not feed.closed
    await replaying.close()
    assert feed.closed and feed.task.done() and not store._feeds
