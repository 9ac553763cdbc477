"""Store benchmark: write/read throughput, list latency and watch fan-out latency of SqliteStore.

    .venv/bin/python bench/store.py                    # temp dir, 10,000 keys of 2 KB, 100 watchers
    .venv/bin/python bench/store.py --dir /var/tmp --keys 20000 --json

Everything runs on one event loop, as in the API server: the store's statements run
synchronously on it, so a figure here is also how long the loop is held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from virtplane.store import interface, sqlite


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def fan_out(
    store: sqlite.SqliteStore, keys: list[str], value: bytes, *, watchers: int, writes: int, gap: float
) -> list[float]:
    """Latency from just before each write to each watcher having the event (seconds).

    With gap > 0 the writer pauses between writes (steady load); with gap == 0 it writes
    back to back without yielding, so the watchers wake only after the whole burst (worst case).
    """
    start_revision = await store.current_revision()
    sent: dict[int, float] = {}
    latencies: list[float] = []
    last = start_revision + writes

    async def watcher(watch: interface.Watch) -> None:
        async for event in watch:
            latencies.append(time.perf_counter() - sent[event.revision])
            if event.revision >= last:
                break
        await watch.close()

    tasks = [
        asyncio.create_task(watcher(store.watch("/bench/", after_revision=start_revision))) for _ in range(watchers)
    ]
    await asyncio.sleep(0.01)  # every watcher is waiting
    current = {kv.key: kv for kv in (await store.list("/bench/")).kvs}
    for i in range(writes):
        key = keys[i % len(keys)]
        t0 = time.perf_counter()
        sent[(await store.current_revision()) + 1] = t0
        kv = await store.update(key, value, expected_revision=current[key].mod_revision)
        current[key] = kv
        if gap:
            await asyncio.sleep(gap)
    await asyncio.gather(*tasks)
    return latencies


async def loop_lag_under_writes(
    store: sqlite.SqliteStore, keys: list[str], value: bytes, *, rate: float, seconds: float
) -> tuple[list[float], list[float]]:
    """Event-loop lag (how late a 1 ms timer fires) and write latency at a steady write rate.

    This is what other coroutines (HTTP handlers, watch fan-out) feel while the store writes,
    checkpoints included: the figure that matters for the API server's watch latency.
    """
    lags: list[float] = []
    latencies: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t0 - 0.001)

    task = asyncio.create_task(ticker())
    current = {kv.key: kv for kv in (await store.list("/bench/")).kvs}
    start = time.perf_counter()
    i = 0
    while (now := time.perf_counter()) < start + seconds:
        due = start + i / rate
        if now < due:
            await asyncio.sleep(due - now)
            continue
        key = keys[i % len(keys)]
        t0 = time.perf_counter()
        current[key] = await store.update(key, value, expected_revision=current[key].mod_revision)
        latencies.append(time.perf_counter() - t0)
        i += 1
    done = True
    await task
    return lags, latencies


async def run(args: argparse.Namespace, path: pathlib.Path) -> dict[str, float]:
    store = sqlite.SqliteStore(str(path), retain_revisions=None, retain_seconds=None)
    await store.start()
    results: dict[str, float] = {}
    rng = random.Random(1)
    value = os.urandom(args.value_size // 2).hex().encode()
    keys = [f"/bench/ns{i % 20:02d}/vm-{i:06d}" for i in range(args.keys)]
    try:
        # creates
        latencies = []
        t = time.perf_counter()
        for key in keys:
            t0 = time.perf_counter()
            await store.create(key, value)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - t
        results["creates_per_s"] = round(len(keys) / elapsed)
        results["create_p99_ms"] = ms(percentile(latencies, 99))
        results["create_max_ms"] = ms(max(latencies))  # a WAL checkpoint lands on some write

        # updates (compare-and-swap)
        current = {kv.key: kv for kv in (await store.list("/bench/")).kvs}
        order = rng.sample(keys, len(keys))
        t = time.perf_counter()
        for key in order:
            current[key] = await store.update(key, value, expected_revision=current[key].mod_revision)
        results["updates_per_s"] = round(len(keys) / (time.perf_counter() - t))

        # gets: right after the 20,000-write burst (the checkpointer is still copying a large
        # WAL, which reads have to search), then in steady state once it has caught up
        t = time.perf_counter()
        for key in order:
            await store.get(key)
        results["get_us_right_after_burst"] = round((time.perf_counter() - t) / len(keys) * 1e6, 2)
        await asyncio.sleep(args.settle)
        t = time.perf_counter()
        for key in order:
            await store.get(key)
        elapsed = time.perf_counter() - t
        results["gets_per_s"] = round(len(keys) / elapsed)
        results["get_us"] = round(elapsed / len(keys) * 1e6, 2)

        # list of every key, and one namespace; count
        runs = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            listed = await store.list("/bench/")
            runs.append(time.perf_counter() - t)
            assert len(listed.kvs) == len(keys)
        results[f"list_{len(keys)}_ms_median"] = ms(statistics.median(runs))
        results[f"list_{len(keys)}_ms_max"] = ms(max(runs))
        t = time.perf_counter()
        page = await store.list("/bench/ns03/", limit=500)
        results["list_page_500_ms"] = ms(time.perf_counter() - t)
        assert page.kvs
        t = time.perf_counter()
        n = await store.count("/bench/")
        results[f"count_{n}_ms"] = ms(time.perf_counter() - t)

        # watch fan-out: steady load (a write every millisecond) and a back-to-back burst
        steady = await fan_out(store, keys, value, watchers=args.watchers, writes=args.writes, gap=0.001)
        results["watch_fanout_watchers"] = args.watchers
        results["watch_steady_p50_ms"] = ms(percentile(steady, 50))
        results["watch_steady_p99_ms"] = ms(percentile(steady, 99))
        results["watch_steady_max_ms"] = ms(max(steady))
        burst = await fan_out(store, keys, value, watchers=args.watchers, writes=100, gap=0)
        results["watch_burst100_p50_ms"] = ms(percentile(burst, 50))
        results["watch_burst100_p99_ms"] = ms(percentile(burst, 99))

        # what the rest of the loop feels during steady writes (checkpoints run in their thread)
        lags, write_latencies = await loop_lag_under_writes(
            store, keys, value, rate=args.write_rate, seconds=args.write_seconds
        )
        results["steady_writes_per_s"] = args.write_rate
        results["steady_write_p99_ms"] = ms(percentile(write_latencies, 99))
        results["steady_write_max_ms"] = ms(max(write_latencies))
        results["loop_lag_p99_ms"] = ms(percentile(lags, 99))
        results["loop_lag_max_ms"] = ms(max(lags))

        # replay of retained history to one watch
        head = await store.current_revision()
        t = time.perf_counter()
        watch = store.watch("/bench/", after_revision=0)
        replayed = 0
        async for event in watch:
            replayed += 1
            if event.revision >= head:
                break
        await watch.close()
        results["replay_events_per_s"] = round(replayed / (time.perf_counter() - t))

        # compaction of everything but the last 1,000 revisions
        t = time.perf_counter()
        await store.compact(head - 1000)
        results[f"compact_{head - 1000}_revisions_ms"] = ms(time.perf_counter() - t)
    finally:
        await store.close()
    return results


def remove_database(path: pathlib.Path) -> None:
    for suffix in ("", "-wal", "-shm", ".lock"):
        pathlib.Path(f"{path}{suffix}").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="directory for state.db (default: a new temp dir)")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--value-size", type=int, default=2048)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--writes", type=int, default=500, help="writes in the steady fan-out run")
    parser.add_argument("--repeat", type=int, default=10, help="list runs")
    parser.add_argument("--write-rate", type=float, default=1000, help="writes/s in the loop-lag run")
    parser.add_argument("--write-seconds", type=float, default=5)
    parser.add_argument("--settle", type=float, default=1.5, help="seconds for the checkpointer after the burst")
    parser.add_argument("--keep", action="store_true", help="keep the database file")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    directory = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="virtplane-bench-store-"))
    path = directory / "state.db"
    remove_database(path)
    try:
        results = asyncio.run(run(args, path))
    finally:
        if not args.keep:
            remove_database(path)
            if not args.dir:
                directory.rmdir()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        width = max(map(len, results))
        for name, figure in results.items():
            print(f"{name:<{width}}  {figure}")


if __name__ == "__main__":
    main()
