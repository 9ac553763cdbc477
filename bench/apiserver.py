"""API server benchmark: virtplane's API against the bare HTTP framework, measured in one run.

    .venv/bin/python bench/apiserver.py [--creates 3000] [--rounds 6] [--list-size 10000] [--watchers 100]

Prints creates/s and gets/s (32 concurrent HTTPS clients), the time to list 10,000 VMs, watch
delivery latency p50/p99 with 100 watchers, and a bare aiohttp server's trivial-POST rate over the
same TLS and the same client. Bare POSTs and API creates run in alternating rounds and the ratio is
taken round by round, so it holds whatever the machine's speed does meanwhile; each side's server CPU
per request (from /proc) is printed too, a figure other load on the machine cannot inflate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from virtplane.testing.cluster import Cluster, free_port

CONCURRENCY = 32
VMS = "/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines"


def vm(name: str) -> dict:
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": {"app": "bench"}},
        "spec": {"runStrategy": "Halted", "template": {"metadata": {"labels": {"kubevirt.io/vm": name}}, "spec": {
            "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}],
                                   "interfaces": [{"name": "default", "masquerade": {}}]},
                       "resources": {"requests": {"memory": "128Mi"}}},
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [{"name": "root", "containerDisk": {"image": "registry.local/tiny:latest"}}]}}},
    }


async def run_concurrent(n: int, make_request) -> float:  # type: ignore[no-untyped-def]
    """n requests over CONCURRENCY workers; returns requests/s."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await make_request(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return n / (time.perf_counter() - start)


def session(server: str, token: str, ssl_ctx) -> aiohttp.ClientSession:  # type: ignore[no-untyped-def]
    return aiohttp.ClientSession(
        server, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=CONCURRENCY + 200),
    )


BARE_SERVER = textwrap.dedent("""
    import ssl, sys
    from aiohttp import web
    async def post(request):
        body = await request.read()
        return web.Response(body=body, status=201, content_type="application/json")
    app = web.Application()
    app.router.add_post("/post", post)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), ssl_context=ctx, access_log=None, print=None)
""")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (its own accounting, immune to other load)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Round:
    rate: float  # requests/s, wall clock
    cpu_us: float  # server CPU microseconds per request


async def measured(pid: int, n: int, make_request) -> Round:  # type: ignore[no-untyped-def]
    cpu0 = process_cpu(pid)
    rate = await run_concurrent(n, make_request)
    return Round(rate, (process_cpu(pid) - cpu0) / n * 1e6)


@contextlib.asynccontextmanager
async def bare_server(cluster: Cluster) -> AsyncIterator[tuple[int, aiohttp.ClientSession]]:
    """The bare framework: aiohttp answering a POST with its body, same TLS cert, same client settings."""
    port = free_port()
    pki = cluster.data_dir / "pki"
    # started once, before the timed part: a blocking spawn is fine here
    proc = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(port), str(pki / "apiserver.crt"),  # noqa: ASYNC220
                             str(pki / "apiserver.key")], start_new_session=True)
    try:
        _, token, _ = cluster.config()
        async with session(f"https://127.0.0.1:{port}", token, cluster.ssl_context()) as s:
            for _ in range(200):
                try:
                    async with s.post("/post", data=b"{}") as r:
                        await r.read()
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            yield proc.pid, s
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


async def create_rounds(cluster: Cluster, n: int, rounds: int) -> tuple[list[Round], list[Round]]:
    """Bare POSTs and API creates in alternating rounds (bare, API, bare, API, ...), so a drift in the
    machine's speed hits both sides alike; each round also records the server's own CPU per request."""
    server, token, _ = cluster.config()
    assert cluster.proc is not None
    api_pid = cluster.proc.pid
    body = orjson.dumps(vm("bare"))
    bare_rounds: list[Round] = []
    api_rounds: list[Round] = []
    per_round = max(1, n // rounds)
    async with bare_server(cluster) as (bare_pid, bs), session(server, token, cluster.ssl_context()) as s:
        async with s.post("/api/v1/namespaces", data=orjson.dumps({"metadata": {"name": "bench-create"}})) as r:
            assert r.status in (201, 409), await r.text()

        async def bare_post(i: int) -> None:
            async with bs.post("/post", data=body) as r:
                await r.read()
                assert r.status == 201

        async def create(i: int) -> None:
            async with s.post(VMS.format(ns="bench-create"), data=orjson.dumps(vm(f"vm-{i}"))) as r:
                await r.read()
                assert r.status == 201, r.status

        offset = 0
        for _ in range(rounds):
            bare_rounds.append(await measured(bare_pid, per_round, bare_post))
            api_rounds.append(await measured(api_pid, per_round, lambda i, o=offset: create(i + o)))
            offset += per_round
    return bare_rounds, api_rounds


async def api_figures(cluster: Cluster, n_creates: int, list_size: int, n_watchers: int) -> dict[str, float]:
    server, token, _ = cluster.config()
    out: dict[str, float] = {}
    async with session(server, token, cluster.ssl_context()) as s:
        async def ns(name: str) -> None:
            async with s.post("/api/v1/namespaces", data=orjson.dumps({"metadata": {"name": name}})) as r:
                assert r.status in (201, 409), await r.text()

        for name in ("bench-list", "bench-watch"):
            await ns(name)

        async def get(i: int) -> None:
            async with s.get(VMS.format(ns="bench-create") + f"/vm-{i % n_creates}") as r:
                await r.read()
                assert r.status == 200

        out["gets_per_s"] = await run_concurrent(n_creates, get)

        async def create_list(i: int) -> None:
            async with s.post(VMS.format(ns="bench-list"), data=orjson.dumps(vm(f"vm-{i}"))) as r:
                await r.read()
                assert r.status == 201

        await run_concurrent(list_size, create_list)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            async with s.get(VMS.format(ns="bench-list")) as r:
                data = await r.read()
            times.append(time.perf_counter() - t0)
            assert len(orjson.loads(data)["items"]) == list_size
        out["list_ms"] = statistics.median(times) * 1000

        # watch latency: n_watchers streams; each write carries its send time in an annotation
        async with s.get(VMS.format(ns="bench-watch")) as r:
            rv = orjson.loads(await r.read())["metadata"]["resourceVersion"]
        latencies: list[float] = []
        n_writes = 100
        done = asyncio.Event()
        received = 0

        async def watcher() -> None:
            nonlocal received
            timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
            async with s.get(VMS.format(ns="bench-watch"), params={"watch": "1", "resourceVersion": rv},
                             timeout=timeout) as r:
                buf = b""
                async for chunk in r.content.iter_any():
                    now = time.perf_counter()
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        ev = orjson.loads(line)
                        sent = float(ev["object"]["metadata"]["annotations"]["sent"])
                        latencies.append(now - sent)
                        received += 1
                        if received >= n_watchers * n_writes:
                            done.set()
                    if done.is_set():
                        return

        tasks = [asyncio.create_task(watcher()) for _ in range(n_watchers)]
        await asyncio.sleep(1.0)  # let every watch connect
        for i in range(n_writes):
            obj = vm(f"w-{i}")
            obj["metadata"]["annotations"] = {"sent": repr(time.perf_counter())}
            async with s.post(VMS.format(ns="bench-watch"), data=orjson.dumps(obj)) as r:
                await r.read()
            await asyncio.sleep(0.02)
        try:
            await asyncio.wait_for(done.wait(), 60)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        latencies.sort()
        out["watch_events"] = len(latencies)
        out["watch_p50_ms"] = latencies[len(latencies) // 2] * 1000
        out["watch_p99_ms"] = latencies[int(len(latencies) * 0.99)] * 1000
    return out


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="vp-bench-") as tmp:
        cluster = Cluster(Path(tmp), command="apiserver", extra_args=("--log-level", "warning")).start()
        try:
            bare, creates = await create_rounds(cluster, args.creates, args.rounds)
            api = await api_figures(cluster, args.creates, args.list_size, args.watchers)
        finally:
            cluster.stop()
    med = statistics.median
    ratios = [a.rate / b.rate for a, b in zip(creates, bare, strict=True)]
    cpu_ratio = med(b.cpu_us for b in bare) / med(a.cpu_us for a in creates)
    print(f"{args.rounds} alternating rounds of {args.creates // args.rounds} requests each, "
          f"{CONCURRENCY} concurrent, HTTPS")
    print(f"bare aiohttp trivial POST:  median {med(b.rate for b in bare):6.0f} req/s  "
          f"(min {min(b.rate for b in bare):.0f}, max {max(b.rate for b in bare):.0f}); "
          f"server CPU {med(b.cpu_us for b in bare):5.0f} us/request")
    print(f"API create VirtualMachine:  median {med(a.rate for a in creates):6.0f} req/s  "
          f"(min {min(a.rate for a in creates):.0f}, max {max(a.rate for a in creates):.0f}); "
          f"server CPU {med(a.cpu_us for a in creates):5.0f} us/request")
    print(f"API creates / bare POSTs, round by round: {' '.join(f'{r:.0%}' for r in ratios)}; "
          f"median {med(ratios):.0%} (target >= 50%)")
    print(f"server CPU per request, bare / API: {cpu_ratio:.0%} (the rate ratio if the server alone were the limit)")
    print(f"API get VirtualMachine:                         {api['gets_per_s']:8.0f} req/s")
    print(f"API list {args.list_size} VirtualMachines:                  {api['list_ms']:8.1f} ms (target < 1000)")
    print(f"watch latency, {args.watchers} watchers x 100 writes:      p50 {api['watch_p50_ms']:.1f} ms, "
          f"p99 {api['watch_p99_ms']:.1f} ms (target p99 < 100; {int(api['watch_events'])} events)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--creates", type=int, default=3000)
    p.add_argument("--list-size", type=int, default=10000)
    p.add_argument("--watchers", type=int, default=100)
    p.add_argument("--rounds", type=int, default=6, help="alternating bare/API create rounds")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
