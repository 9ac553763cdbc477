"""EtcdStore against a real etcd: the contract's get/list/count/create/update/delete, compaction,
several stores (API servers) on one etcd, and URLs. The same checks as the SQLite backend's
tests/unit/store, with revisions relative to where the test started."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

import virtplane.store
from virtplane.store import etcd, interface
from virtplane.testing.cluster import free_port
from virtplane.testing.etcd import EtcdCluster

MakeStore = Callable[..., Awaitable[etcd.EtcdStore]]  # the make_store fixture


async def test_create_then_get(store: etcd.EtcdStore, base: int) -> None:
    kv = await store.create("/a/x", b"one")
    assert kv == interface.KeyValue("/a/x", b"one", create_revision=base + 1, mod_revision=base + 1)
    assert await store.get("/a/x") == kv
    assert await store.get("/a/missing") is None
    assert await store.current_revision() == base + 1


async def test_create_existing_key_raises_and_keeps_revision(store: etcd.EtcdStore, base: int) -> None:
    await store.create("/a/x", b"one")
    with pytest.raises(interface.KeyExistsError) as info:
        await store.create("/a/x", b"two")
    assert info.value.key == "/a/x"
    assert isinstance(info.value.__cause__, etcd.TxnFailed)  # the root cause is chained
    assert "create equal 0" in str(info.value.__cause__)
    assert await store.current_revision() == base + 1
    assert (await store.get("/a/x")).value == b"one"  # type: ignore[union-attr]


async def test_update_compare_and_swap(store: etcd.EtcdStore, base: int) -> None:
    created = await store.create("/a/x", b"one")
    await store.create("/a/y", b"other")  # revisions are global: the next write on x is base+3
    updated = await store.update("/a/x", b"two", expected_revision=created.mod_revision)
    assert updated == interface.KeyValue("/a/x", b"two", create_revision=base + 1, mod_revision=base + 3)
    with pytest.raises(interface.ConflictError) as info:
        await store.update("/a/x", b"stale", expected_revision=created.mod_revision)
    assert info.value.expected == base + 1
    assert info.value.current == updated
    assert isinstance(info.value.__cause__, etcd.TxnFailed)
    with pytest.raises(interface.KeyNotFoundError):
        await store.update("/a/missing", b"v", expected_revision=1)
    # A missing key's mod_revision reads 0 in etcd: expected 0 must not create it.
    with pytest.raises(interface.KeyNotFoundError):
        await store.update("/a/missing", b"v", expected_revision=0)
    assert await store.get("/a/missing") is None
    assert await store.get("/a/x") == updated
    assert await store.current_revision() == base + 3  # failed writes take no revision


async def test_delete_returns_last_value_at_delete_revision(store: etcd.EtcdStore, base: int) -> None:
    created = await store.create("/a/x", b"one")
    updated = await store.update("/a/x", b"two", expected_revision=created.mod_revision)
    with pytest.raises(interface.ConflictError):
        await store.delete("/a/x", expected_revision=created.mod_revision)
    deleted = await store.delete("/a/x", expected_revision=updated.mod_revision)
    assert deleted == interface.KeyValue("/a/x", b"two", create_revision=base + 1, mod_revision=base + 3)
    assert await store.get("/a/x") is None
    with pytest.raises(interface.KeyNotFoundError):
        await store.delete("/a/x")
    with pytest.raises(interface.KeyNotFoundError):
        await store.delete("/a/x", expected_revision=0)
    # A key created again is a new object: new create_revision.
    again = await store.create("/a/x", b"three")
    assert again.create_revision == again.mod_revision == base + 4


async def test_unconditional_delete(store: etcd.EtcdStore, base: int) -> None:
    await store.create("/a/x", b"one")
    assert (await store.delete("/a/x")).mod_revision == base + 2


async def test_revisions_strictly_increase_across_keys(store: etcd.EtcdStore, base: int) -> None:
    seen: list[int] = []
    for i in range(20):
        kv = await store.create(f"/k/{i % 5}/{i}", b"v")
        seen.append(kv.mod_revision)
        if i % 3 == 0:
            seen.append((await store.update(kv.key, b"w", expected_revision=kv.mod_revision)).mod_revision)
        if i % 4 == 0:
            seen.append((await store.delete(kv.key)).mod_revision)
    assert seen == list(range(base + 1, base + len(seen) + 1))


async def test_concurrent_cas_has_one_winner(make_store: MakeStore) -> None:
    """Two API servers racing on one object: exactly one update per revision wins."""
    a, b = await make_store(), await make_store()
    kv = await a.create("/race/x", b"0")
    outcomes = await asyncio.gather(
        *(s.update("/race/x", f"{i}".encode(), expected_revision=kv.mod_revision) for i, s in enumerate([a, b] * 5)),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if isinstance(o, interface.KeyValue)]
    assert len(winners) == 1
    assert all(isinstance(o, interface.ConflictError) and o.current == winners[0] for o in outcomes if o not in winners)
    assert await b.get("/race/x") == winners[0]


async def test_values_are_bytes(store: etcd.EtcdStore) -> None:
    kv = await store.create("/a/x", bytearray(b"abc"))
    assert type(kv.value) is bytes and type((await store.get("/a/x")).value) is bytes  # type: ignore[union-attr]
    with pytest.raises(TypeError):
        await store.create("/a/y", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.create("", b"v")
    with pytest.raises(ValueError):
        await store.create("/a/\ud800", b"v")  # a lone surrogate has no UTF-8 form
    big = os.urandom(1 << 20)  # etcd's default request limit is 1.5 MiB
    await store.create("/a/big", big)
    assert (await store.get("/a/big")).value == big  # type: ignore[union-attr]
    empty = await store.create("/a/empty", b"")  # proto3 JSON omits an empty value
    assert await store.get("/a/empty") == empty


async def test_too_big_a_value_is_a_store_error(store: etcd.EtcdStore) -> None:
    with pytest.raises(interface.StoreError, match=r"too large|larger than max") as info:
        await store.create("/a/huge", os.urandom(2 << 20))
    assert isinstance(info.value.__cause__, etcd.EtcdError)


async def test_list_prefix_order_and_revision(store: etcd.EtcdStore, base: int) -> None:
    for key in ["/r/ns2/b", "/r/ns1/b", "/r/ns1/a", "/other/x", "/r/ns1/c"]:
        await store.create(key, key.encode())
    result = await store.list("/r/ns1/")
    assert [kv.key for kv in result.kvs] == ["/r/ns1/a", "/r/ns1/b", "/r/ns1/c"]
    assert [kv.value for kv in result.kvs] == [b"/r/ns1/a", b"/r/ns1/b", b"/r/ns1/c"]
    assert result.revision == base + 5 and result.more is False
    assert [kv.key for kv in (await store.list("/r/")).kvs] == ["/r/ns1/a", "/r/ns1/b", "/r/ns1/c", "/r/ns2/b"]
    assert len((await store.list("")).kvs) == 5  # everything under the store's prefix, nothing else
    assert (await store.list("/nothing/")).kvs == []
    assert (await store.list("/nothing/")).revision == base + 5


async def test_list_pagination_with_limit_and_start_after(store: etcd.EtcdStore) -> None:
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
    assert (await store.list("/p/", start_after="/z")).kvs == []  # beyond the prefix's end
    assert [kv.key for kv in (await store.list("/p/", start_after="/p/023")).kvs] == ["/p/024"]
    # start_after is exclusive even for a key that is a prefix of others.
    await store.create("/p/024/sub", b"v")
    assert [kv.key for kv in (await store.list("/p/", start_after="/p/024")).kvs] == ["/p/024/sub"]
    with pytest.raises(ValueError):
        await store.list("/p/", limit=-1)


async def test_count(store: etcd.EtcdStore) -> None:
    for i in range(7):
        await store.create(f"/c/ns{i % 2}/{i}", b"v")
    assert await store.count("/c/") == 7
    assert await store.count("/c/ns0/") == 4
    assert await store.count("/d/") == 0
    assert await store.count("") == 7
    await store.delete("/c/ns0/0")
    assert await store.count("/c/ns0/") == 3


async def test_prefix_isolation(store: etcd.EtcdStore) -> None:
    for key in ["/a/b", "/a/b/1", "/a/bc", "/a/bc/1", "/a/b0", "/a/b.", "/a/c"]:
        await store.create(key, b"v")
    assert [kv.key for kv in (await store.list("/a/b/")).kvs] == ["/a/b/1"]
    assert await store.count("/a/b/") == 1
    # A bare prefix is a plain string prefix, as in etcd.
    assert [kv.key for kv in (await store.list("/a/b")).kvs] == ["/a/b", "/a/b.", "/a/b/1", "/a/b0", "/a/bc", "/a/bc/1"]


async def test_unicode_and_edge_prefixes(store: etcd.EtcdStore) -> None:
    keys = ["/u/é", "/u/é/x", "/u/\U0010ffff", "/u/\U0010ffff/x", "/u/\ud7ff", "/u/\ue000", "/u0"]
    for key in keys:
        await store.create(key, b"v")
    assert [kv.key for kv in (await store.list("/u/é")).kvs] == ["/u/é", "/u/é/x"]
    assert [kv.key for kv in (await store.list("/u/\U0010ffff")).kvs] == ["/u/\U0010ffff", "/u/\U0010ffff/x"]
    assert [kv.key for kv in (await store.list("/u/\ud7ff")).kvs] == ["/u/\ud7ff"]
    assert await store.count("/u/") == 6
    # Ordered as str compares, as the SQLite backend orders them.
    assert [kv.key for kv in (await store.list("/u/")).kvs] == sorted(k for k in keys if k.startswith("/u/"))


def test_prefix_end() -> None:
    assert etcd._prefix_end(b"/a/") == b"/a0"
    assert etcd._prefix_end(b"") == b"\0"  # etcd's "no upper bound"
    assert etcd._prefix_end(b"\xff\xff") == b"\0"
    assert etcd._prefix_end(b"/a\xff") == b"/b"


async def test_stores_with_other_prefixes_do_not_see_each_other(make_store: MakeStore, prefix: str) -> None:
    mine = await make_store()
    # A prefix that string-extends mine is someone else's problem only if they share a parent;
    # here: a sibling that shares no key.
    other = await make_store(prefix=prefix + "-other")
    await mine.create("/a/x", b"mine")
    await other.create("/a/x", b"theirs")
    assert [kv.value for kv in (await mine.list("/a/")).kvs] == [b"mine"]
    assert [kv.value for kv in (await other.list("/a/")).kvs] == [b"theirs"]
    assert await mine.count("/") == 1


async def test_two_stores_on_one_prefix_are_one_store(make_store: MakeStore) -> None:
    """What two API servers on one etcd rely on: one store, whichever process writes."""
    a, b = await make_store(), await make_store()
    kv = await a.create("/a/x", b"from a")
    assert await b.get("/a/x") == kv
    updated = await b.update("/a/x", b"from b", expected_revision=kv.mod_revision)
    with pytest.raises(interface.ConflictError):
        await a.update("/a/x", b"stale", expected_revision=kv.mod_revision)
    assert await a.get("/a/x") == updated
    assert await a.current_revision() == await b.current_revision() == updated.mod_revision


# -- compaction --------------------------------------------------------------------------------


async def test_compact_forgets_history_not_values(store: etcd.EtcdStore, base: int) -> None:
    kv = await store.create("/a/x", b"one")
    for i in range(5):
        kv = await store.update("/a/x", f"v{i}".encode(), expected_revision=kv.mod_revision)
    await store.compact(base + 4)
    assert store.compact_revision == base + 4
    assert await store.get("/a/x") == kv  # the live value stays
    assert (await store.list("/a/")).kvs == [kv]
    with pytest.raises(interface.CompactedError) as info:
        store.watch("/a/", after_revision=base + 3)
    assert info.value.requested == base + 3 and info.value.compact_revision == base + 4
    w = store.watch("/a/", after_revision=base + 4)  # the compact revision itself is still a valid start
    await w.close()
    await store.compact(base + 2)  # already compacted further: no-op
    assert store.compact_revision == base + 4
    with pytest.raises(ValueError, match="future"):
        await store.compact(base + 99)


async def test_compaction_by_another_server_is_a_no_op_here_and_learnt_at_start(make_store: MakeStore) -> None:
    a, b = await make_store(), await make_store()
    base = await a.current_revision()
    for i in range(5):
        await a.create(f"/a/{i}", b"v")
    await a.compact(base + 4)
    await b.compact(base + 2)  # b did not know; etcd says "already compacted": fine
    assert b.compact_revision == base + 2
    c = await make_store()  # a server starting now finds etcd's compact revision
    assert c.compact_revision == base + 4
    with pytest.raises(interface.CompactedError):
        c.watch("/a/", after_revision=base + 3)


async def test_auto_compaction_runs_in_the_background(make_store: MakeStore) -> None:
    s = await make_store(retain_revisions=3, compact_interval=0.02)
    for i in range(20):
        await s.create(f"/a/{i}", b"v")
    head = await s.current_revision()
    async with asyncio.timeout(5):
        while s.compact_revision < head - 3:  # noqa: ASYNC110 (the compactor's turn)
            await asyncio.sleep(0.01)
    assert s.compact_revision == head - 3
    await s.close()
    assert s._compactor is None


# -- lifecycle and errors --------------------------------------------------------------------------


async def test_use_before_start_and_after_close(etcd_server: EtcdCluster, prefix: str) -> None:
    s = etcd.EtcdStore(etcd_server.endpoints, prefix=prefix)
    with pytest.raises(interface.StoreError, match="not started"):
        await s.get("/a")
    with pytest.raises(interface.StoreError, match="not started"):
        s.watch("/a/", after_revision=0)
    await s.start()
    with pytest.raises(interface.StoreError, match="once"):
        await s.start()
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(interface.StoreError, match="closed"):
        await s.create("/a", b"v")
    with pytest.raises(interface.StoreError, match="closed"):
        s.watch("/a/", after_revision=0)


async def test_unreachable_etcd_fails_start_with_the_cause() -> None:
    s = etcd.EtcdStore([f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"], connect_timeout=1)
    with pytest.raises(interface.StoreError, match="no etcd endpoint answered") as info:
        await s.start()
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)
    assert s._session is None  # nothing left open


async def test_something_else_on_the_port_is_a_store_error(etcd_server: EtcdCluster) -> None:
    # etcd's peer port speaks HTTP but is not the v3 gateway.
    s = etcd.EtcdStore([etcd_server.members[0].peer_url])
    with pytest.raises(interface.StoreError) as info:
        await s.start()
    assert isinstance(info.value.__cause__, etcd.EtcdError)


async def test_fails_over_to_the_next_endpoint(etcd_server: EtcdCluster, prefix: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    s = etcd.EtcdStore([dead, *etcd_server.endpoints], prefix=prefix, retain_seconds=None)
    await s.start()
    try:
        kv = await s.create("/a/x", b"v")  # a write that never reached `dead` is safe to send on
        assert s._preferred == 1  # and the endpoint that answered is tried first from now on
        w = s.watch("/a/", after_revision=kv.mod_revision - 1)
        async with asyncio.timeout(5):
            assert (await anext(aiter(w))).kv == kv
        await w.close()
    finally:
        await s.close()


# -- open_store ----------------------------------------------------------------------------------


def test_open_store_url_forms() -> None:
    s = virtplane.store.open_store("etcd://127.0.0.1:2379")
    assert isinstance(s, etcd.EtcdStore)
    assert s.endpoints == ["http://127.0.0.1:2379"] and s.prefix == "/virtplane"
    assert s.policy.retain_seconds == 300
    s = virtplane.store.open_store(
        "ETCD://10.0.0.1,10.0.0.2:2400,[::1]:2401/?prefix=/vp/one&retain_seconds=none&watch_buffer=50"
        "&request_timeout=2.5&connect_timeout=1&reconnect_timeout=9&compact_interval=5&retain_revisions=7"
    )
    assert isinstance(s, etcd.EtcdStore)
    assert s.endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2400", "http://[::1]:2401"]
    assert s.prefix == "/vp/one" and s.watch_buffer == 50
    assert s.policy.retain_seconds is None and s.policy.retain_revisions == 7
    assert (s.request_timeout, s.connect_timeout, s.reconnect_timeout, s.compact_interval) == (2.5, 1, 9, 5)
    s = virtplane.store.open_store("etcd://h:1?tls=true&prefix=")
    assert s.endpoints == ["https://h:1"] and s.prefix == ""  # type: ignore[attr-defined]
    s = virtplane.store.open_store("etcd://h?cacert=/ca.pem&cert=/c.pem&key=/k.pem")
    assert s.endpoints == ["https://h:2379"]  # type: ignore[attr-defined]
    assert (s.ca_file, s.cert_file, s.key_file) == ("/ca.pem", "/c.pem", "/k.pem")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("etcd://", "no etcd endpoint"),
        ("etcd://h:2379/virtplane", "not a path"),
        ("etcd://user:pw@h:2379", "credentials"),
        ("etcd://h:0", "bad port"),
        ("etcd://h:99999", "bad port"),
        ("etcd://h:x", "bad port"),
        ("etcd://h,,g", "empty host"),
        ("etcd://h?retention=5", "unknown option 'retention'"),
        ("etcd://h?tls=maybe", "bad value 'maybe' for tls"),
        ("etcd://h?watch_buffer=0", "watch_buffer must be >= 1"),
        ("etcd://h?request_timeout=inf", "bad value 'inf'"),
        ("etcd://h?cert=/c.pem", "both cert_file and key_file"),
        ("etcd://h?cacert=", "bad value '' for cacert"),
    ],
)
def test_open_store_rejects(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        virtplane.store.open_store(url)


async def test_close_under_load_gives_store_errors(make_store: MakeStore) -> None:
    s = await make_store()
    await s.create("/a/x", b"v")
    calls = [asyncio.create_task(s.get("/a/x")) for _ in range(50)]
    calls += [asyncio.create_task(s.create(f"/a/{i}", b"v")) for i in range(50)]
    await asyncio.sleep(0.005)
    await s.close()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    # Done before the close, or a StoreError: never aiohttp's "Session is closed".
    assert all(isinstance(o, interface.KeyValue | interface.StoreError) for o in outcomes), [
        repr(o) for o in outcomes if not isinstance(o, interface.KeyValue | interface.StoreError)]
