"""The etcd backend against the SQLite backend, measured in one run on the same machine.

    .venv/bin/python bench/store_etcd.py                  # store figures, then API server figures
    .venv/bin/python bench/store_etcd.py --only store --keys 5000
    .venv/bin/python bench/store_etcd.py --only api --creates 3000 --list-size 10000 --watchers 100

Store: each backend alone on one event loop (as in the API server): creates one at a time and 32
concurrent, gets, a list of every key, count, watch fan-out latency and replay.
API: `virtplane apiserver` on each backend through bench/apiserver.py's client (32 concurrent
HTTPS clients), and scale-out: two API servers on one etcd, the clients split between them.
etcd runs from a temp dir with its defaults (an fsync per write batch, as in production).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from virtplane.store import etcd, interface, sqlite
from virtplane.testing.cluster import Cluster
from virtplane.testing.etcd import EtcdCluster

CONCURRENCY = 32


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def concurrently(n: int, op: Callable[[int], Awaitable[object]]) -> float:
    """n operations over CONCURRENCY workers; returns operations/s."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await op(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return n / (time.perf_counter() - start)


async def store_figures(store: interface.Store, keys: int, watchers: int) -> dict[str, float]:
    out: dict[str, float] = {}
    value = os.urandom(1024).hex().encode()  # 2 KB, like a serialized VM
    names = [f"/bench/ns{i % 20:02d}/vm-{i:06d}" for i in range(keys)]
    half = keys // 2
    begin = await store.current_revision()

    latencies = []
    t = time.perf_counter()
    for key in names[:half]:
        t0 = time.perf_counter()
        await store.create(key, value)
        latencies.append(time.perf_counter() - t0)
    out["create_one_at_a_time_per_s"] = round(half / (time.perf_counter() - t))
    out["create_p50_ms"] = ms(percentile(latencies, 50))
    out["create_p99_ms"] = ms(percentile(latencies, 99))
    out["create_32_concurrent_per_s"] = round(
        await concurrently(keys - half, lambda i: store.create(names[half + i], value)))

    current = {kv.key: kv for kv in (await store.list("/bench/")).kvs}

    async def update(i: int) -> None:
        key = names[i]
        current[key] = await store.update(key, value, expected_revision=current[key].mod_revision)

    out["update_32_concurrent_per_s"] = round(await concurrently(keys, update))
    out["get_32_concurrent_per_s"] = round(await concurrently(keys, lambda i: store.get(names[i])))
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        listed = await store.list("/bench/")
        runs.append(time.perf_counter() - t)
        assert len(listed.kvs) == keys
    out[f"list_{keys}_ms"] = ms(statistics.median(runs))
    t = time.perf_counter()
    page = await store.list("/bench/ns03/", limit=500)
    out["list_page_500_ms"] = ms(time.perf_counter() - t)
    assert page.kvs
    t = time.perf_counter()
    assert await store.count("/bench/") == keys
    out["count_ms"] = ms(time.perf_counter() - t)

    # watch fan-out: `watchers` watches, 200 updates 2 ms apart; latency from just before the
    # write to each watcher holding the event
    start = await store.current_revision()
    sent: dict[str, float] = {}
    got: list[float] = []
    writes = 200
    last_key = names[writes - 1]

    async def watcher(w: interface.Watch) -> None:
        async for event in w:
            got.append(time.perf_counter() - sent[event.kv.key])
            if event.kv.key == last_key:
                break
        await w.close()

    tasks = [asyncio.create_task(watcher(store.watch("/bench/", after_revision=start))) for _ in range(watchers)]
    await asyncio.sleep(1.0)  # every watch is connected
    for key in names[:writes]:
        sent[key] = time.perf_counter()
        current[key] = await store.update(key, value, expected_revision=current[key].mod_revision)
        await asyncio.sleep(0.002)
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    out["watchers"] = watchers
    out["watch_p50_ms"] = ms(percentile(got, 50))
    out["watch_p99_ms"] = ms(percentile(got, 99))

    head = await store.current_revision()
    t = time.perf_counter()
    replayed = 0
    w = store.watch("/bench/", after_revision=begin)  # every create and update above
    async for event in w:
        replayed += 1
        if event.revision >= head:
            break
    await w.close()
    out["replay_events_per_s"] = round(replayed / (time.perf_counter() - t))
    return out


async def store_bench(args: argparse.Namespace, tmp: pathlib.Path) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    lite = sqlite.SqliteStore(str(tmp / "state.db"), retain_seconds=None)
    await lite.start()
    try:
        results["sqlite"] = await store_figures(lite, args.keys, args.watchers)
    finally:
        await lite.close()
    cluster = await asyncio.to_thread(EtcdCluster(tmp / "etcd-store").start)
    try:
        store = etcd.EtcdStore(cluster.endpoints, retain_seconds=None)
        await store.start()
        try:
            results["etcd"] = await store_figures(store, args.keys, args.watchers)
        finally:
            await store.close()
    finally:
        await asyncio.to_thread(cluster.stop)
    return results


def load_api_bench() -> Any:
    path = pathlib.Path(__file__).resolve().parent / "apiserver.py"
    spec = importlib.util.spec_from_file_location("bench_apiserver", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def scale_out_creates(api: Any, servers: list[Cluster], n: int, tag: str) -> float:
    """Creates/s with the 32 clients split evenly between the servers."""
    sessions = []
    for server in servers:
        url, token, _ = server.config()
        sessions.append(api.session(url, token, server.ssl_context()))
    try:
        path = api.VMS.format(ns="bench-scale")
        async with sessions[0].post("/api/v1/namespaces", data=json.dumps({"metadata": {"name": "bench-scale"}})) as r:
            assert r.status in (201, 409)

        async def create(i: int) -> None:
            async with sessions[i % len(sessions)].post(path, data=json.dumps(api.vm(f"{tag}-{i}"))) as r:
                await r.read()
                assert r.status == 201, r.status

        return await concurrently(n, create)
    finally:
        for s in sessions:
            await s.close()


async def api_bench(args: argparse.Namespace, tmp: pathlib.Path) -> dict[str, dict[str, float]]:
    api = load_api_bench()
    results: dict[str, dict[str, float]] = {}
    quiet = ("--log-level", "warning")
    server = Cluster(tmp / "api-sqlite", command="apiserver", extra_args=quiet)
    await asyncio.to_thread(server.start)
    try:
        results["sqlite"] = await api.api_figures(server, args.creates, args.list_size, args.watchers)
    finally:
        await asyncio.to_thread(server.stop)
    cluster = await asyncio.to_thread(EtcdCluster(tmp / "etcd-api").start)
    servers: list[Cluster] = []
    try:
        url = cluster.url + "?retain_seconds=none"
        first = Cluster(tmp / "api-etcd-a", command="apiserver", extra_args=(*quiet, "--store", url))
        servers.append(first)
        await asyncio.to_thread(first.start)
        results["etcd"] = await api.api_figures(first, args.creates, args.list_size, args.watchers)
        second_dir = tmp / "api-etcd-b"
        second_dir.mkdir()
        shutil.copytree(first.data_dir / "pki", second_dir / "pki")
        shutil.copy2(first.data_dir / "tokens.csv", second_dir / "tokens.csv")
        second = Cluster(second_dir, command="apiserver", extra_args=(*quiet, "--store", url))
        servers.append(second)
        await asyncio.to_thread(second.start)
        results["etcd"]["creates_per_s_one_server"] = await scale_out_creates(api, [first], args.creates, "one")
        results["etcd"]["creates_per_s_two_servers"] = await scale_out_creates(api, servers, args.creates, "two")
    finally:
        for s in servers:
            await asyncio.to_thread(s.stop)
        await asyncio.to_thread(cluster.stop)
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    names = list(dict.fromkeys(k for r in results.values() for k in r))
    backends = list(results)
    width = max(len(n) for n in names)
    lines = [f"{'':{width}}  " + "  ".join(f"{b:>12}" for b in backends)]
    for name in names:
        cells = []
        for backend in backends:
            value = results[backend].get(name)
            cells.append(f"{value:>12,.1f}" if isinstance(value, float) and value < 100 else
                         f"{value:>12,.0f}" if value is not None else f"{'-':>12}")
        lines.append(f"{name:{width}}  " + "  ".join(cells))
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="vp-bench-etcd-", dir=args.dir) as tmp:
        out: dict[str, dict[str, dict[str, float]]] = {}
        if args.only in (None, "store"):
            out["store"] = await store_bench(args, pathlib.Path(tmp))
        if args.only in (None, "api"):
            out["api"] = await api_bench(args, pathlib.Path(tmp))
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for part, results in out.items():
        print(f"\n== {part}\n{table(results)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["store", "api"])
    p.add_argument("--keys", type=int, default=5000, help="store part: keys of 2 KB")
    p.add_argument("--watchers", type=int, default=100)
    p.add_argument("--creates", type=int, default=3000, help="API part")
    p.add_argument("--list-size", type=int, default=10000, help="API part")
    p.add_argument("--dir", default=None, help="where the temp dirs go (default: the system's)")
    p.add_argument("--json", action="store_true")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
