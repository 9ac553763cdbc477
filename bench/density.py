"""KubeVirt's density test shape on virtplane: N VMIs created at a fixed rate, creation → Running, API writes per
VMI, idle memory per VM, teardown.

    .venv/bin/python bench/density.py [--count 100] [--interval 0.1] [--memory 90Mi] [--cpu 100m]
                                      [--nodes auto] [--grace 0] [--margin-gib 4] [--overhead-mib 128]

- `virtplane up --nodes N`: the scheduler counts the launchers' cpu requests (100m each) against each node's
  allocatable (this host's core count), so 100 VMIs need ceil(100 x 100m / cores) node agents; all of them run
  on this one host (auto = that number).
- Each node pulls the containerDisk once first (a warm-up VMI pinned to it, deleted before the clock starts):
  KubeVirt's density runs also start from nodes that hold the image.
- VMIs (containerDisk, masquerade on the pod network, 90Mi, 100m, terminationGracePeriodSeconds 0 as in KubeVirt's
  perf-scale templates) are POSTed `--interval` apart without waiting for answers. creation → Running is the
  time between the POST and the first watch event showing `status.phase: Running` (one watch, event times).
- API writes: `apiserver_request_total` on /metrics before the first create and when the last VMI is Running,
  POST/PUT/PATCH/DELETE (incl. subresources such as pods/binding), per resource, ÷ count. The benchmark's own
  create is one POST per VMI; leases and nodes are the node agents' heartbeats, not per VMI.
- Memory: no swap here, and other people's work shares the host, so the count is capped up front to what
  MemAvailable - `--margin-gib` holds at guest + `--overhead-mib` per VM (the script says what it could hold), and
  a watchdog stops creating and tears everything down if MemAvailable drops under 1.5 GiB. Once every guest
  printed `ready` (or after `--boot-timeout`), the average idle VM's PSS split (bench/vm_memory.py) and the
  control plane's RSS growth per VM are reported, with the CPU the idle guests draw.
- Teardown: every VMI DELETEd at once; time until every VMI is gone (watch) and every QEMU has exited.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vm_memory import MemSplit, MiB, mib, vm_memory  # bench/ is not a package: the sibling scripts' helpers
from vm_start import (
    NS,
    VMIS,
    Env,
    VMIWatch,
    bench_env,
    cpu_seconds,
    descendants,
    loadavg,
    pid_gone,
    vmi_manifest,
)

from virtplane.client import rest
from virtplane.hypervisor.quantity import parse_bytes

READY = b"virtplane-guest: ready"
NODES = rest.GVR("", "v1", "nodes", namespaced=False)
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")
_METRIC = re.compile(r'^apiserver_request_total\{verb="([^"]+)",group="[^"]*",resource="([^"]*)",code="\d+"\} (\d+)$')
_LATENCY = re.compile(r'^apiserver_request_duration_seconds_(sum|count)\{verb="([^"]+)",resource="([^"]*)"\} (\S+)$')
WATCHDOG_FLOOR = 3 << 29  # 1.5 GiB MemAvailable: below this, stop and tear down


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


@dataclass
class APIStats:
    """From the API server's /metrics: write requests and server-side seconds spent, by (verb, resource)."""

    writes: Counter[tuple[str, str]]
    seconds: Counter[tuple[str, str]]
    requests: Counter[tuple[str, str]]

    def __sub__(self, other: APIStats) -> APIStats:
        return APIStats(self.writes - other.writes, self.seconds - other.seconds, self.requests - other.requests)


async def api_stats(client: rest.Client) -> APIStats:
    text = str(await client.request("GET", "/metrics"))
    out = APIStats(Counter(), Counter(), Counter())
    for line in text.splitlines():
        if (m := _METRIC.match(line)) and m[1].split(":")[0] in WRITE_VERBS:
            out.writes[(m[1], m[2])] += int(m[3])
        elif m := _LATENCY.match(line):
            target = out.seconds if m[1] == "sum" else out.requests
            target[(m[2], m[3])] += float(m[4])  # type: ignore[assignment]
    return out


async def wait_nodes_ready(client: rest.Client, n: int, timeout: float = 180) -> list[str]:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while True:
        items = (await client.list(NODES))["items"]
        ready = [o["metadata"]["name"] for o in items if any(
            c["type"] == "Ready" and c["status"] == "True" for c in o.get("status", {}).get("conditions", []))]
        if len(ready) >= n:
            return sorted(ready)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ready)}/{n} nodes Ready after {timeout}s")
        await asyncio.sleep(0.5)  # nodes register once; nothing to watch for in the meantime


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def control_plane_rss(env: Env) -> int:
    """RSS of `virtplane up` (API server + controllers) and its node agents; QEMUs excluded."""
    assert env.cluster.proc is not None
    total = 0
    for pid in descendants(env.cluster.proc.pid):
        with contextlib.suppress(OSError):
            if not Path(f"/proc/{pid}/comm").read_text().startswith("qemu"):
                total += rss(pid)
    return total


@dataclass
class Run:
    created: dict[str, float] = field(default_factory=dict)  # name → monotonic time of its POST
    created_wall: dict[str, float] = field(default_factory=dict)  # the same, wall clock (cmdline.json's started_at)
    aborted: str = ""
    min_available: int = 1 << 62


async def watchdog(run: Run, stop: asyncio.Event) -> None:
    while not stop.is_set():
        avail = mem_available()
        run.min_available = min(run.min_available, avail)
        if avail < WATCHDOG_FLOOR and not run.aborted:
            run.aborted = f"MemAvailable fell to {avail / MiB:.0f} MiB"
            print(f"watchdog: {run.aborted}: no more creates, tearing down", flush=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await stop.wait()


async def warm_nodes(env: Env, client: rest.Client, watch: VMIWatch, nodes: list[str], memory: str) -> None:
    """One VMI pinned to each node pulls the image into that node's cache; all deleted before the clock starts."""
    names = []
    for i, node in enumerate(nodes):
        m = vmi_manifest(f"warm-{i}", env.image, memory=memory, cloud_init=False, grace=0)
        m["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
        await client.create(VMIS, m, NS)
        names.append(m["metadata"]["name"])
    for name in names:
        await watch.wait(name, "Running", timeout=600)
    for name in names:
        await client.delete(VMIS, name, NS)
    for name in names:
        await watch.wait(name, deleted=True, timeout=300)


async def create_paced(client: rest.Client, env: Env, run: Run, count: int, interval: float, memory: str,
                       cpu: str, grace: int, paused: bool) -> None:
    """POST one VMI every `interval` s on a fixed schedule (a slow answer does not delay the next POST)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(count):
        delay = start + i * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if run.aborted:
            break
        m = vmi_manifest(f"density-{i:03d}", env.image, memory=memory, cpu=cpu, cloud_init=False, grace=grace)
        m["metadata"]["labels"] = {"bench": "density"}
        if paused:
            m["spec"]["startStrategy"] = "Paused"
        run.created_wall[m["metadata"]["name"]] = time.time()
        run.created[m["metadata"]["name"]] = time.monotonic()
        tasks.append(asyncio.create_task(client.create(VMIS, m, NS)))
    await asyncio.gather(*tasks)


async def wait_all_running(watch: VMIWatch, run: Run, timeout: float) -> dict[str, float]:  # noqa: ASYNC109
    """name → seconds from POST to the Running event, for every VMI that got there within timeout. A VMI that
    went Failed first is not waited for (it never becomes Running); the report names it."""
    async def one(name: str) -> tuple[str, float | None]:
        waits = [asyncio.create_task(watch.wait(name, phase, timeout=timeout)) for phase in ("Running", "Failed")]
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        if waits[0] in done and not waits[0].exception():
            return name, waits[0].result() - run.created[name]
        return name, None

    got = await asyncio.gather(*(one(n) for n in run.created))
    return {n: t for n, t in got if t is not None}


async def wait_all_ready(paths: dict[str, Path], run: Run, timeout: float) -> dict[str, float]:  # noqa: ASYNC109
    """name → monotonic time its guest printed `ready` in console.log. One pass over the pending files a second:
    100 pollers at bench/vm_start.py's 10 ms would cost the guests CPU."""
    pending, done = dict(paths), {}
    deadline = time.monotonic() + timeout
    while pending and not run.aborted and time.monotonic() < deadline:
        for name, p in list(pending.items()):
            with contextlib.suppress(FileNotFoundError):
                if READY in p.read_bytes():
                    done[name] = time.monotonic()
                    del pending[name]
        await asyncio.sleep(1.0)
    return done


def spawned_at(runtime_dir: Path) -> float | None:
    """Wall-clock time the node agent spawned the VM's QEMU (cmdline.json's started_at)."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        return float(json.loads((runtime_dir / "cmdline.json").read_text())["started_at"])
    return None


def cpu_split(env: Env) -> dict[str, float]:
    """CPU seconds so far: `virtplane up` (API server, controllers, scheduler), its node agents, the QEMUs (their
    children: helpers that exited are counted once reaped)."""
    assert env.cluster.proc is not None
    up = env.cluster.proc.pid
    out = {"up": 0.0, "node agents": 0.0, "QEMUs": 0.0}
    for pid in descendants(up):
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/comm").read_text()
            key = "up" if pid == up else "QEMUs" if comm.startswith("qemu") else "node agents"
            out[key] += cpu_seconds(pid)
    return out


def summary(label: str, xs: list[float]) -> str:
    return (f"{label}: p50 {pct(xs, 50):.2f} s  p95 {pct(xs, 95):.2f} s  max {max(xs):.2f} s  "
            f"mean {statistics.mean(xs):.2f} s  (n={len(xs)})")


async def measure(env: Env, args: argparse.Namespace, n_nodes: int) -> None:
    guest_bytes = parse_bytes(args.memory)
    run = Run()
    async with env.client() as client:
        nodes = await wait_nodes_ready(client, n_nodes)
        watch = VMIWatch(client)
        await watch.start()
        stop_dog = asyncio.Event()
        dog = asyncio.create_task(watchdog(run, stop_dog))
        try:
            t = time.monotonic()
            await warm_nodes(env, client, watch, nodes, args.memory)
            print(f"{n_nodes} nodes Ready, image pulled on each ({time.monotonic() - t:.1f} s); load {loadavg()}",
                  flush=True)
            cp_rss0 = control_plane_rss(env)
            writes0 = await api_stats(client)
            cpu0 = cpu_split(env)
            t_first = time.monotonic()
            await create_paced(client, env, run, args.count, args.interval, args.memory, args.cpu, args.grace,
                               args.paused)
            t_posted = time.monotonic()
            running = await wait_all_running(watch, run, args.running_timeout)
            writes1 = await api_stats(client)
            t_all_running = time.monotonic()
            cpu1 = cpu_split(env)
            n = len(run.created)
            print(f"created {n} VMIs in {t_posted - t_first:.1f} s; {len(running)} Running, the last "
                  f"{t_all_running - t_first:.1f} s after the first POST; load {loadavg()}", flush=True)
            failed = sorted(name for name, s in watch.seen.items() if name in run.created and "Failed" in s.phases)
            if failed:
                print(f"  {len(failed)} Failed instead: {', '.join(failed[:10])}")
            lat = list(running.values())
            report_latency(watch, run, lat)
            report_writes(writes1 - writes0, n)
            print("CPU seconds from the first POST to the last Running: " + ", ".join(
                f"{k} {cpu1[k] - cpu0.get(k, 0.0):.1f}" for k in cpu1) + f" (wall {t_all_running - t_first:.1f} s)")

            # idle memory once the guests have booted
            paths = {name: env.runtime_dir(watch.seen[name].node, name) for name in running}
            spawned = [started - run.created_wall[name] for name, path in paths.items()
                       if (started := spawned_at(path)) is not None]
            if spawned:
                print("  " + summary("creation → QEMU spawned", spawned) + " (cmdline.json started_at)")
                to_running = [running[name] - (started - run.created_wall[name]) for name, started in (
                    (name, spawned_at(paths[name])) for name in running) if started is not None]
                if to_running:
                    print("  " + summary("QEMU spawned → Running", to_running))
            if args.skip_boot:
                print("--skip-boot: no boot, memory or idle figures")
            ready: dict[str, float] = {}
            if not args.paused and not args.skip_boot:  # paused guests never boot
                t_boot = time.monotonic()
                ready = await wait_all_ready({k: p / "console.log" for k, p in paths.items()}, run, args.boot_timeout)
                last = f", the last {max(ready.values()) - t_first:.0f} s after the first POST" if ready else ""
                print(f"{len(ready)}/{len(paths)} guests printed `ready`{last} ({time.monotonic() - t_boot:.0f} s "
                      f"waited); load {loadavg()}", flush=True)
                for name in sorted(set(paths) - set(ready))[:5]:  # why not: the guest's last words and CPU
                    tail = (paths[name] / "console.log").read_bytes()[-300:].decode(errors="replace")
                    pid = int((paths[name] / "pid").read_text())
                    print(f"  {name} not ready (QEMU CPU {cpu_seconds(pid):.0f} s); console.log ends: {tail!r}")
            if not run.aborted and ready:
                await asyncio.sleep(args.settle)
                report_memory(env, {k: v for k, v in paths.items() if k in ready}, guest_bytes, cp_rss0)
                pids = [int((p / "pid").read_text()) for p in paths.values()]
                c0 = sum(cpu_seconds(p) for p in pids)
                await asyncio.sleep(10)
                print(f"idle guests' CPU draw: {(sum(cpu_seconds(p) for p in pids) - c0) / 10:.2f} cores for "
                      f"{len(pids)} VMs ({len(ready)} booted); load {loadavg()}")
            print(f"lowest MemAvailable during the run: {run.min_available / MiB:.0f} MiB")

            # teardown
            pids = {}
            for name, p in paths.items():
                with contextlib.suppress(OSError, ValueError):
                    pids[name] = int((p / "pid").read_text())
            writes2 = await api_stats(client)
            t0 = time.monotonic()
            await asyncio.gather(*(client.delete(VMIS, name, NS) for name in run.created))
            gone = await asyncio.gather(*(watch.wait(name, deleted=True, timeout=600) for name in run.created))
            while any(not pid_gone(p) for p in pids.values()):  # noqa: ASYNC110 - nothing signals an exit to us
                await asyncio.sleep(0.05)
            t_end = time.monotonic()
            writes3 = await api_stats(client)
            print(f"teardown: DELETE all {n} → every VMI gone and every QEMU exited: {t_end - t0:.1f} s "
                  f"(last VMI gone after {max(gone) - t0:.1f} s); writes per VMI "
                  f"{sum((writes3 - writes2).writes.values()) / n:.1f}")
        finally:
            stop_dog.set()
            await dog
            await watch.stop()


def report_latency(watch: VMIWatch, run: Run, lat: list[float]) -> None:
    if not lat:
        print("no VMI reached Running")
        return
    print(summary("creation → Running", lat)
          + "   (target p50 ≤ 1 s: " + ("met" if pct(lat, 50) <= 1 else "not met")
          + ", p95 ≤ 3 s: " + ("met" if pct(lat, 95) <= 3 else "not met") + "; KubeVirt p50 16-25 s, p95 26-30 s)")
    for phase in ("Pending", "Scheduling", "Scheduled", "Running"):
        xs = [s.phases[phase] - run.created[n] for n, s in watch.seen.items() if n in run.created and phase in s.phases]
        if xs:
            print("  " + summary(f"creation → {phase:<10}", xs))


def report_writes(diff: APIStats, n: int) -> None:
    total = sum(diff.writes.values())
    per_vmi = {k: v for k, v in diff.writes.items() if k[1] not in ("leases", "nodes")}
    print(f"API writes while creating and starting: {total} = {total / n:.1f} per VMI; without node heartbeats "
          f"(leases, nodes) {sum(per_vmi.values()) / n:.1f} per VMI (server-side mean latency of each):")
    for (verb, res), v in sorted(diff.writes.items(), key=lambda kv: -kv[1]):
        k = (verb, res)
        mean = f"{diff.seconds[k] / diff.requests[k] * 1000:6.1f} ms" if diff.requests[k] else ""
        print(f"    {verb:<14} {res:<28} {v:5d}  ({v / n:.2f}/VMI)  {mean}")


def report_memory(env: Env, paths: dict[str, Path], guest_bytes: int, cp_rss0: int) -> None:
    splits: list[MemSplit] = []
    for p in paths.values():
        with contextlib.suppress(OSError, RuntimeError, IndexError):
            splits.append(vm_memory(p, guest_bytes)[1])
    if not splits:
        return

    def avg(f: Any) -> float:
        return statistics.mean(f(s) for s in splits)

    cp = control_plane_rss(env) - cp_rss0
    print(f"idle memory, average of the {len(splits)} booted VMs: PSS {mib(avg(lambda s: s.pss))}  guest RAM "
          f"{mib(avg(lambda s: s.guest_ram))}  TCG cache {mib(avg(lambda s: s.tcg))}  rest {mib(avg(lambda s: s.rest))}"
          f"  => overhead {mib(avg(lambda s: s.overhead))} MiB/VM (target ≤ 64; max "
          f"{mib(max(s.overhead for s in splits))})")
    print(f"control plane (up + node agents) RSS growth: {cp / MiB:.0f} MiB = {cp / len(splits) / MiB:.2f} MiB/VM; "
          f"all QEMUs' PSS {sum(s.pss for s in splits) / MiB / 1024:.1f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--interval", type=float, default=0.1, help="seconds between creates")
    p.add_argument("--memory", default="90Mi")
    p.add_argument("--cpu", default="100m")
    p.add_argument("--nodes", default="auto", help="node agents; auto = enough for count x cpu on this host")
    p.add_argument("--grace", type=int, default=0, help="terminationGracePeriodSeconds of the VMIs")
    p.add_argument("--margin-gib", type=float, default=4.0, help="MemAvailable to leave to everyone else")
    p.add_argument("--overhead-mib", type=float, default=128.0,
                   help="host memory per VM beyond guest RAM, for the capacity cap (bench/vm_memory.py)")
    p.add_argument("--paused", action="store_true",
                   help="startStrategy Paused: QEMU starts, the vCPUs never run (phase Running, condition Paused), "
                        "so the control plane is measured without the guests' TCG load; no memory figures")
    p.add_argument("--skip-boot", action="store_true",
                   help="tear down once every VMI is Running: latency, writes and CPU only (no boot or memory)")
    p.add_argument("--running-timeout", type=float, default=600.0)
    p.add_argument("--boot-timeout", type=float, default=900.0, help="how long to wait for every guest's `ready`")
    p.add_argument("--settle", type=float, default=20.0, help="idle seconds after boot before measuring memory")
    args = p.parse_args()

    # A paused guest's RAM is never touched (not resident): only QEMU's own memory counts.
    per_vm = (0 if args.paused else parse_bytes(args.memory)) + args.overhead_mib * MiB
    avail = mem_available()
    fits = int(max(0, avail - args.margin_gib * (1 << 30)) // per_vm)
    print(f"MemAvailable {avail / (1 << 30):.1f} GiB - margin {args.margin_gib:g} GiB holds {fits} VMs of "
          f"{per_vm / MiB:.0f} MiB ({args.memory} guest + {args.overhead_mib:g} MiB overhead)")
    if args.count > fits:
        print(f"capping --count {args.count} → {fits}: this machine cannot hold {args.count} now")
        args.count = fits
    cpus = len(os.sched_getaffinity(0))
    milli = parse_bytes(args.cpu.removesuffix("m")) if args.cpu.endswith("m") else int(float(args.cpu) * 1000)
    n_nodes = math.ceil(args.count * milli / (cpus * 1000)) if args.nodes == "auto" else int(args.nodes)
    print(f"{args.count} VMIs ({args.memory}, {args.cpu}) {args.interval * 1000:.0f} ms apart on {n_nodes} node "
          f"agents ({cpus} cores each by the scheduler's count); load {loadavg()}"
          + ("; startStrategy Paused" if args.paused else ""), flush=True)
    with bench_env(nodes=n_nodes) as env:
        asyncio.run(measure(env, args, n_nodes))


if __name__ == "__main__":
    main()
