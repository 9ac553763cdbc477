"""NamespaceStates: the namespace create check's cache stays exactly as current as the store says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from virtplane.apiserver import nslifecycle
from virtplane.store import sqlite

PREFIX = "/registry/namespaces/"


async def wait_for_async(predicate: Callable[[], bool]) -> None:
    """Gives the loop turns (the watch task runs in them) until `predicate` holds, for up to 5 s."""
    async with asyncio.timeout(5):
        for _ in iter(predicate, True):  # the watch task has no event to wait on from here
            await asyncio.sleep(0.001)


def ns(name: str, terminating: bool = False) -> bytes:
    meta: dict[str, object] = {"name": name}
    if terminating:
        meta["deletionTimestamp"] = "2026-12-08T00:00:00Z"
    return json.dumps({"kind": "Namespace", "metadata": meta}).encode()


@pytest.fixture
async def store() -> AsyncIterator[sqlite.SqliteStore]:
    s = sqlite.SqliteStore(":memory:", retain_revisions=None, retain_seconds=None)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def states(store: sqlite.SqliteStore) -> AsyncIterator[nslifecycle.NamespaceStates]:
    st = nslifecycle.NamespaceStates(store, PREFIX)
    task = asyncio.create_task(st.run())
    await wait_for_async(lambda: st._live)
    yield st
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_not_running_means_read_the_store(store: sqlite.SqliteStore) -> None:
    st = nslifecycle.NamespaceStates(store, PREFIX)
    kv = await store.create(PREFIX + "a", ns("a"))
    st.remember(kv)
    assert st.lookup(kv.key) is None


async def test_follows_terminating_and_deleted(store: sqlite.SqliteStore, states: nslifecycle.NamespaceStates) -> None:
    key = PREFIX + "a"
    kv = await store.create(key, ns("a"))
    states.remember(kv)
    assert states.lookup(key) == nslifecycle.OPEN
    kv = await store.update(key, ns("a", terminating=True), expected_revision=kv.mod_revision)
    await wait_for_async(lambda: states.lookup(key) == nslifecycle.TERMINATING)
    await store.delete(key)
    await wait_for_async(lambda: states.lookup(key) == nslifecycle.GONE)


async def test_a_stale_read_does_not_undo_a_newer_event(store: sqlite.SqliteStore,
                                                        states: nslifecycle.NamespaceStates) -> None:  # fmt: skip
    key = PREFIX + "a"
    old = await store.create(key, ns("a"))
    await store.update(key, ns("a", terminating=True), expected_revision=old.mod_revision)
    await wait_for_async(lambda: states.lookup(key) == nslifecycle.TERMINATING)
    states.remember(old)  # a read that started before the update and returned after the event
    assert states.lookup(key) == nslifecycle.TERMINATING


async def test_own_writes_are_read_until_the_watch_catches_up(store: sqlite.SqliteStore,
                                                              states: nslifecycle.NamespaceStates) -> None:  # fmt: skip
    key = PREFIX + "a"
    kv = await store.create(key, ns("a"))
    states.remember(kv)
    newer = await store.update(key, ns("a", terminating=True), expected_revision=kv.mod_revision)
    states.written(newer)
    assert states.lookup(key) in (None, nslifecycle.TERMINATING)  # never the stale OPEN
    states.remember(kv)  # the older read cannot fill it
    assert states.lookup(key) in (None, nslifecycle.TERMINATING)
    await wait_for_async(lambda: states.lookup(key) == nslifecycle.TERMINATING)


async def test_absent_namespaces_are_not_cached(store: sqlite.SqliteStore, states: nslifecycle.NamespaceStates) -> None:
    states.remember(None)
    assert states.lookup(PREFIX + "later") is None
    await store.create(PREFIX + "later", ns("later"))
    await wait_for_async(lambda: states.lookup(PREFIX + "later") == nslifecycle.OPEN)
