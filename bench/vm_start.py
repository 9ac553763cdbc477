"""Single-VM start: virtplane (create → Running → `booted`) against bare QEMU with the identical command line.

    .venv/bin/python bench/vm_start.py [--runs 5] [--memory 128Mi]

One `virtplane up --nodes 1` and a real docker-registry holding the tiny containerDisk. A first platform run
pulls the image (warm-up, not counted) and gives the command line: its runtime dir's `cmdline.json` is the
exact argv the node agent launched. Then `--runs` rounds, alternating which side goes first:

- platform: POST the VMI (REST client) → `status.phase` Running (time of the watch event) → the guest's first
  serial line `virtplane-guest: booted`, read two ways: the console.log file in the runtime dir polled every
  10 ms (the same observer as the bare side, so the ratio compares the platforms, not the observers) and the
  `consolelog?follow=1` subresource (what a user sees; the node agent polls the file at 4 Hz).
- bare: the same argv with only the runtime dir rewritten to a temp dir (fresh qcow2 overlay on the same cached
  image, a copy of the cloud-init ISO, made before the clock starts), started directly; the clock runs from
  process start, through QMP `cont` (the argv has -S, as the node agent starts every VM paused) to `booted`.

Prints min/median/max of each and the ratio platform/bare on create→booted (target: overhead ≤ 10 %).
Other modules import the setup helpers from here (bench/density.py, bench/vm_memory.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from virtplane.client import rest
from virtplane.storage.volumes import create_overlay
from virtplane.testing import guest
from virtplane.testing.cluster import Cluster

BOOTED = b"virtplane-guest: booted"
NS = "default"
VMIS = rest.GVR("kubevirt.io", "v1", "virtualmachineinstances")
SUB = "/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances/{name}/consolelog"
FILE_POLL = 0.01  # s: how often the console.log observers look (same for both sides)
USER_DATA = "#!/bin/sh\necho bench\n"


# ------------------------------------------------------------------------------------------------ setup


@dataclass
class Env:
    """A cluster and a registry with the containerDisk, for the lifetime of a benchmark."""

    tmp: Path
    cluster: Cluster
    image: str

    def client(self) -> rest.Client:
        return rest.Client(rest.ClientConfig.from_kubeconfig(self.cluster.kubeconfig), user_agent="bench")

    def runtime_dir(self, node: str, name: str, namespace: str = NS) -> Path:
        # DATA/nodes/<node>/runtime/<ns>_<name>/ (virtplane.node.vmiruntime.runtime_dir_name)
        return self.cluster.data_dir / "nodes" / node / "runtime" / f"{namespace}_{name}"


@contextlib.contextmanager
def bench_env(nodes: int = 1, log_level: str = "warning") -> Iterator[Env]:
    """Temp dir (short: unix socket paths must stay under 108 bytes), registry, `virtplane up --nodes N`.
    Everything is stopped by pid / process group and removed on exit."""
    guest.ensure_images()
    with tempfile.TemporaryDirectory(prefix="vpb-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        with guest.registry_with_containerdisk(tmp / "registry") as (_, image):
            # --no-node-netns: the agents reach the bench registry on 127.0.0.1
            cluster = Cluster(tmp / "c", extra_args=("--nodes", str(nodes), "--no-node-netns",
                                                     "--log-level", log_level))  # fmt: skip
            cluster.start(timeout=120)
            try:
                yield Env(tmp, cluster, image)
            finally:
                cluster.stop(timeout=60)
                # QEMUs run in their own sessions (they outlive agent restarts by design): a stop of `up`
                # must not leave any behind, so check and kill the ones this cluster started, by pid.
                for pid_file in (tmp / "c" / "nodes").glob("*/runtime/*/pid"):
                    with contextlib.suppress(ValueError, OSError):
                        pid = int(pid_file.read_text())
                        if str(tmp) in Path(f"/proc/{pid}/cmdline").read_text():
                            os.kill(pid, signal.SIGKILL)


def vmi_manifest(name: str, image: str, *, memory: str = "128Mi", cpu: str | None = None,
                 cloud_init: bool = True, grace: int | None = None) -> dict[str, Any]:
    """A KubeVirt-shaped VMI: containerDisk, masquerade on the pod network, optionally cloudInitNoCloud."""
    disks: list[dict[str, Any]] = [{"name": "containerdisk", "disk": {"bus": "virtio"}}]
    volumes: list[dict[str, Any]] = [{"name": "containerdisk", "containerDisk": {"image": image}}]
    if cloud_init:
        disks.append({"name": "cloudinitdisk", "disk": {"bus": "virtio"}})
        volumes.append({"name": "cloudinitdisk", "cloudInitNoCloud": {"userData": USER_DATA}})
    requests = {"memory": memory} | ({"cpu": cpu} if cpu else {})
    spec: dict[str, Any] = {
        "domain": {"devices": {"disks": disks, "interfaces": [{"name": "default", "masquerade": {}}]},
                   "resources": {"requests": requests}},
        "networks": [{"name": "default", "pod": {}}],
        "volumes": volumes,
    }
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "namespace": NS, "labels": {"bench": "vm-start"}}, "spec": spec}


# ------------------------------------------------------------------------------------------------ watching


@dataclass
class Seen:
    phases: dict[str, float] = field(default_factory=dict)  # phase → monotonic time of the first event with it
    deleted: float | None = None
    node: str = ""


class VMIWatch:
    """One watch on the namespace's VMIs; records when each VMI was first seen in each phase, by event time."""

    def __init__(self, client: rest.Client, namespace: str = NS) -> None:
        self.client = client
        self.namespace = namespace
        self.seen: dict[str, Seen] = {}
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        listing = await self.client.list(VMIS, self.namespace)
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._run(listing["metadata"]["resourceVersion"], ready))
        await ready.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, rv: str, ready: asyncio.Event) -> None:
        while True:  # a server-side timeout ends the stream: resume from the last revision seen
            stream = self.client.watch(VMIS, self.namespace, resource_version=rv)
            ready.set()
            async for ev in stream:
                now = time.monotonic()
                obj = ev.get("object") or {}
                meta = obj.get("metadata") or {}
                rv = meta.get("resourceVersion") or rv
                if ev.get("type") not in ("ADDED", "MODIFIED", "DELETED"):
                    continue
                s = self.seen.setdefault(meta["name"], Seen())
                status = obj.get("status") or {}
                s.node = status.get("nodeName") or s.node
                phase = status.get("phase") or "Pending"
                s.phases.setdefault(phase, now)
                if ev["type"] == "DELETED":
                    s.deleted = now
                async with self._changed:
                    self._changed.notify_all()

    async def wait(self, name: str, phase: str | None = None, *, deleted: bool = False,
                   timeout: float = 300) -> float:  # noqa: ASYNC109
        """Monotonic time of the event that put `name` in `phase` (or deleted it)."""
        def hit() -> float | None:
            s = self.seen.get(name)
            if s is None:
                return None
            return s.deleted if deleted else s.phases.get(phase or "")

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: hit() is not None)
        t = hit()
        assert t is not None
        return t


async def wait_line_in_file(path: Path, needle: bytes, timeout: float = 300) -> float:  # noqa: ASYNC109
    """Monotonic time at which `needle` was first seen in the file (polled every FILE_POLL)."""
    deadline = time.monotonic() + timeout
    offset, tail = 0, b""
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:  # noqa: ASYNC230 - a small local file; a thread hop costs more
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            now = time.monotonic()
            offset += len(chunk)
            buf = tail + chunk
            if needle in buf:
                return now
            tail = buf[-len(needle):]
        await asyncio.sleep(FILE_POLL)
    raise TimeoutError(f"{needle!r} not in {path} after {timeout}s")


async def wait_consolelog(client: rest.Client, name: str, needle: bytes, timeout: float = 300) -> float:  # noqa: ASYNC109
    """Monotonic time at which the `consolelog?follow=1` subresource delivered `needle`."""
    buf = b""
    async with asyncio.timeout(timeout), client.session.get(
            SUB.format(ns=NS, name=name), params={"follow": "1"},
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"consolelog {name}: {resp.status} {await resp.text()}")
        async for chunk in resp.content.iter_any():
            buf += chunk
            if needle in buf:
                return time.monotonic()
    raise RuntimeError(f"consolelog of {name} ended without {needle!r}")


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in task.read_text().split()]
    return out


def control_plane_cpu(cluster: Cluster) -> float:
    """CPU seconds used so far by `virtplane up` and its node agents (QEMUs, their children, excluded).
    Exited helpers (qemu-img, xorriso) are not counted: their time lands in cutime only when reaped."""
    assert cluster.proc is not None
    total = 0.0
    for pid in descendants(cluster.proc.pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().startswith("qemu"):
                continue
            total += cpu_seconds(pid)
    return total


def pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


async def wait_pid_gone(pid: int, timeout: float = 120) -> float:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not pid_gone(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} still running after {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic()


# ------------------------------------------------------------------------------------------------ platform


@dataclass
class PlatformRun:
    running: float  # create → VMI Running (watch event)
    spawned: float  # create → QEMU spawned (cmdline.json started_at, wall clock)
    booted: float  # create → `booted` in console.log
    booted_api: float  # create → `booted` through the consolelog subresource
    qemu_cpu: float  # QEMU's CPU seconds when `booted` appeared
    cp_cpu: float  # control plane (up + node agents) CPU seconds from create to `booted`
    teardown: float  # DELETE → VMI gone (watch) and QEMU exited
    phases: dict[str, float]  # phase → seconds after create
    runtime_dir: Path
    pid: int


async def platform_run(env: Env, client: rest.Client, watch: VMIWatch, manifest: dict[str, Any],
                       *, keep: bool = False) -> PlatformRun:
    name = manifest["metadata"]["name"]
    cp0 = control_plane_cpu(env.cluster)
    wall0, t0 = time.time(), time.monotonic()
    await client.create(VMIS, manifest, NS)
    t_running = await watch.wait(name, "Running")
    rdir = env.runtime_dir(watch.seen[name].node, name)
    api_task = asyncio.create_task(wait_consolelog(client, name, BOOTED))
    pid = int((rdir / "pid").read_text())  # written before Running
    t_booted = await wait_line_in_file(rdir / "console.log", BOOTED)
    qemu_cpu, cp_cpu = cpu_seconds(pid), control_plane_cpu(env.cluster) - cp0
    t_booted_api = await api_task
    record = json.loads((rdir / "cmdline.json").read_text())
    phases = {p: t - t0 for p, t in watch.seen[name].phases.items()}
    run = PlatformRun(t_running - t0, record["started_at"] - wall0, t_booted - t0, t_booted_api - t0,
                      qemu_cpu, cp_cpu, 0.0, phases, rdir, pid)
    if not keep:
        run.teardown = await delete_and_wait(client, watch, name, pid)
    return run


async def delete_and_wait(client: rest.Client, watch: VMIWatch, name: str, pid: int) -> float:
    t0 = time.monotonic()
    await client.delete(VMIS, name, NS)
    t_gone = await watch.wait(name, deleted=True)
    t_exit = await wait_pid_gone(pid)
    return max(t_gone, t_exit) - t0


# ------------------------------------------------------------------------------------------------ bare QEMU


@dataclass
class BareTemplate:
    """The platform's argv and what its runtime dir held, to replay with bare QEMU in another directory."""

    argv: list[str]
    runtime_dir: str
    overlays: dict[str, tuple[Path, str]]  # file name under disks/ → (backing file, backing format)
    copies: Path  # a directory with copies of the other files under disks/ (cloud-init ISO)

    @classmethod
    def capture(cls, rdir: Path, into: Path) -> BareTemplate:
        """Read cmdline.json and the disks of a running platform VM (the ISO is copied now: the VMI goes away)."""
        record = json.loads((rdir / "cmdline.json").read_text())
        overlays: dict[str, tuple[Path, str]] = {}
        into.mkdir(parents=True, exist_ok=True)
        for f in sorted((rdir / "disks").iterdir()):
            info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(f)], check=True,
                                             capture_output=True, text=True).stdout)
            if info.get("format") == "qcow2" and info.get("backing-filename"):
                backing = Path(info.get("full-backing-filename") or info["backing-filename"])
                overlays[f.name] = (backing, info.get("backing-filename-format") or "qcow2")
            else:
                shutil.copy2(f, into / f.name)
        return cls(list(record["argv"]), str(rdir), overlays, into)

    async def prepare(self, workdir: Path) -> list[str]:
        """A fresh runtime dir for one bare run; returns the argv rewritten to it (nothing else changes)."""
        disks = workdir / "disks"
        disks.mkdir(parents=True, mode=0o700)
        for fname, (backing, fmt) in self.overlays.items():
            await create_overlay(backing, disks / fname, fmt)  # type: ignore[arg-type]
        for f in self.copies.iterdir():
            shutil.copy2(f, disks / f.name)
        return [a.replace(self.runtime_dir, str(workdir)) for a in self.argv]


async def qmp_cont(sock: Path, proc: asyncio.subprocess.Process, timeout: float = 30) -> None:  # noqa: ASYNC109
    """Connect to QEMU's monitor as soon as it listens, negotiate, `cont` (what the node agent does too)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU monitor {sock} never came up (exit {proc.returncode})") from None
            await asyncio.sleep(0.002)
    try:
        await reader.readline()  # greeting
        for cmd in ("qmp_capabilities", "cont"):
            writer.write(orjson.dumps({"execute": cmd}) + b"\n")
            await writer.drain()
            while True:  # skip events (RESUME) until the command's answer
                msg = orjson.loads(await reader.readline())
                if "return" in msg:
                    break
                if "error" in msg:
                    raise RuntimeError(f"QMP {cmd}: {msg['error']}")
    finally:
        writer.close()


@dataclass
class BareVM:
    proc: asyncio.subprocess.Process
    workdir: Path
    t0: float

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        self.kill()
        await self.proc.wait()


async def bare_start(argv: list[str], workdir: Path) -> BareVM:
    """Start bare QEMU (own session, like the node agent's spawn) and let the guest run."""
    log = open(workdir / "qemu.log", "ab")  # noqa: ASYNC230 - a local file, before the clock starts
    try:
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=log,
                                                    stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()
    vm = BareVM(proc, workdir, t0)
    try:
        await qmp_cont(workdir / "qmp.sock", proc)
    except BaseException:
        await vm.stop()
        raise
    return vm


async def bare_run(template: BareTemplate, workdir: Path) -> tuple[float, float]:
    """Process start → `booted` on the serial console log: (seconds, QEMU CPU seconds by then)."""
    argv = await template.prepare(workdir)
    vm = await bare_start(argv, workdir)
    try:
        t = await wait_line_in_file(workdir / "console.log", BOOTED) - vm.t0
        return t, cpu_seconds(vm.proc.pid)
    finally:
        await vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ report


def mmm(xs: list[float]) -> str:
    return f"min {min(xs):6.2f}  median {statistics.median(xs):6.2f}  max {max(xs):6.2f} s"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def measure(env: Env, runs: int, memory: str) -> None:
    async with env.client() as client:
        watch = VMIWatch(client)
        await watch.start()
        try:
            load_before = loadavg()
            warm = await platform_run(env, client, watch, vmi_manifest("start-warm", env.image, memory=memory),
                                      keep=True)
            template = BareTemplate.capture(warm.runtime_dir, env.tmp / "template")
            await delete_and_wait(client, watch, "start-warm", warm.pid)
            print(f"warm-up (image pull): create→Running {warm.running:.2f} s, create→booted {warm.booted:.2f} s",
                  flush=True)
            plat: list[PlatformRun] = []
            bare: list[float] = []
            bare_cpu: list[float] = []
            for i in range(runs):
                order = ("platform", "bare") if i % 2 == 0 else ("bare", "platform")
                for side in order:
                    await asyncio.sleep(1.0)  # let the previous VM's exit settle
                    if side == "platform":
                        r = await platform_run(env, client, watch,
                                               vmi_manifest(f"start-{i}", env.image, memory=memory))
                        plat.append(r)
                        print(f"run {i} platform: Running {r.running:.2f}  spawned {r.spawned:.2f}  "
                              f"booted {r.booted:.2f}  (consolelog {r.booted_api:.2f})  QEMU CPU {r.qemu_cpu:.2f}  "
                              f"control plane CPU {r.cp_cpu:.2f}  teardown {r.teardown:.2f}  load {loadavg()}",
                              flush=True)
                    else:
                        b, c = await bare_run(template, env.tmp / f"bare-{i}")
                        bare.append(b)
                        bare_cpu.append(c)
                        print(f"run {i} bare:     booted {b:.2f}  QEMU CPU {c:.2f}  load {loadavg()}", flush=True)
        finally:
            await watch.stop()
    report(plat, bare, bare_cpu, template.argv, load_before)


def report(plat: list[PlatformRun], bare: list[float], bare_cpu: list[float], argv: list[str],
           load_before: str) -> None:
    def col(attr: str) -> list[float]:
        return [getattr(r, attr) for r in plat]

    print()
    print(f"QEMU argv: {len(argv)} words (accel {argv[argv.index('-accel') + 1]}); load average before "
          f"{load_before}, after {loadavg()}")
    phases = sorted({p for r in plat for p in r.phases}, key=lambda p: statistics.median(
        r.phases[p] for r in plat if p in r.phases))
    print("platform phase (watch event after create), medians: " + ", ".join(
        f"{p} {statistics.median(r.phases[p] for r in plat if p in r.phases):.3f}" for p in phases))
    print(f"platform create → VMI Running:               {mmm(col('running'))}")
    print(f"platform create → QEMU spawned:              {mmm(col('spawned'))}")
    print(f"platform create → booted (console.log):      {mmm(col('booted'))}")
    print(f"platform create → booted (consolelog API):   {mmm(col('booted_api'))}")
    print(f"platform QEMU spawn → booted:                {mmm([r.booted - r.spawned for r in plat])}")
    print(f"bare QEMU start → booted (same argv):        {mmm(bare)}")
    print(f"platform delete → VMI gone, QEMU exited:     {mmm(col('teardown'))}")
    print(f"QEMU CPU to booted: platform                 {mmm(col('qemu_cpu'))}")
    print(f"QEMU CPU to booted: bare                     {mmm(bare_cpu)}")
    print(f"control plane CPU, create → booted:          {mmm(col('cp_cpu'))}")
    ratio = statistics.median(col("booted")) / statistics.median(bare)
    ratio_api = statistics.median(col("booted_api")) / statistics.median(bare)
    # Runs i of both sides ran back to back: their ratio cancels slow drifts in the machine's load.
    pairs = statistics.median(r.booted / b for r, b in zip(plat, bare, strict=True))
    print(f"ratio create→booted platform/bare (medians): {ratio:.3f} = {ratio - 1:+.1%} overhead "
          f"(target ≤ +10%: {'met' if ratio <= 1.10 else 'not met'}); median of back-to-back pairs {pairs:.3f}; "
          f"via the consolelog API {ratio_api:.3f}")
    spawn = statistics.median(col("spawned"))
    print(f"control plane's share: create → QEMU spawned {spawn:.2f} s = {spawn / statistics.median(bare):.1%} of "
          f"the bare boot (Scheduled → spawned {statistics.median(r.spawned - r.phases['Scheduled'] for r in plat):.2f}"
          f" s on the node agent; spawned → Running "
          f"{statistics.median(r.running - r.spawned for r in plat):.2f} s)")
    # The machine is shared: wall times swing with other people's load, CPU seconds much less so.
    cpu_ratio = (statistics.median(col("qemu_cpu")) + statistics.median(col("cp_cpu"))) / statistics.median(bare_cpu)
    print(f"ratio CPU to booted (platform QEMU + control plane)/(bare QEMU), medians: {cpu_ratio:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--memory", default="128Mi", help="the VMI's memory request")
    args = p.parse_args()
    with bench_env(nodes=1) as env:
        asyncio.run(measure(env, args.runs, args.memory))


if __name__ == "__main__":
    main()
