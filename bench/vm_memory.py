"""Host memory per idle VM, beyond guest RAM: a virtplane VM, then the same argv as bare QEMU per TCG tb-size.

    .venv/bin/python bench/vm_memory.py [--memory 128Mi] [--settle 20] [--tb-sizes default,256,64,32,16]

1. One VMI through `virtplane up --nodes 1` (containerDisk from a real registry, masquerade, cloud-init), booted
   to the guest's `ready` line, then left idle `--settle` seconds. Every process of the VM is found by its
   runtime dir on the command line (today: only QEMU — slirp, the masquerade stand-in, is inside it) and
   measured from /proc/<pid>/smaps: PSS split into guest RAM (the anonymous mapping of the guest's size),
   the TCG translation cache (QEMU's anonymous executable mappings) and the rest.
   overhead = PSS - PSS of the guest-RAM mapping; target ≤ 64 MiB under TCG (KubeVirt reserves 240 MiB).
2. The identical argv started bare (runtime dir rewritten only), once as is and once per `-accel tcg,tb-size=N`
   (MiB; "default" = QEMU 7.2's own: 1 GiB for system emulation), alternating, each to `ready` + settle:
   boot time, QEMU CPU to `ready`, and the same split. This is the before/after of capping the cache.

Helpers here are also used by bench/density.py (average over the density set).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vm_start import (  # bench/ is not a package: the sibling script's helpers
    BOOTED,
    BareTemplate,
    Env,
    VMIWatch,
    bare_start,
    bench_env,
    cpu_seconds,
    delete_and_wait,
    loadavg,
    platform_run,
    vmi_manifest,
    wait_line_in_file,
)

from virtplane.hypervisor.quantity import parse_bytes

READY = b"virtplane-guest: ready"
MiB = 1 << 20
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


@dataclass
class MemSplit:
    """One process's memory from /proc/<pid>/smaps, in bytes."""

    rss: int
    pss: int
    guest_ram: int  # PSS of the guest RAM mapping
    tcg: int  # PSS of the TCG translation cache (anonymous executable mappings)
    anon_huge: int  # transparent huge pages among all of it

    @property
    def overhead(self) -> int:
        return self.pss - self.guest_ram

    @property
    def rest(self) -> int:
        return self.pss - self.guest_ram - self.tcg

    def __add__(self, other: MemSplit) -> MemSplit:
        return MemSplit(self.rss + other.rss, self.pss + other.pss, self.guest_ram + other.guest_ram,
                        self.tcg + other.tcg, self.anon_huge + other.anon_huge)


def smaps_split(pid: int, guest_bytes: int) -> MemSplit:
    """Walk /proc/<pid>/smaps: the guest RAM is the anonymous rw mapping closest to the guest size (QEMU maps
    each RAM block separately; a q35 guest under 2 GiB has one), the TCG cache its anonymous rwx mappings."""
    maps: list[dict[str, int | str]] = []
    cur: dict[str, int | str] = {}
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if m := _MAPPING.match(line):
            cur = {"size": int(m[2], 16) - int(m[1], 16), "perm": m[3], "name": m[4], "rss": 0, "pss": 0, "ahp": 0}
            maps.append(cur)
        elif line.startswith(("Rss:", "Pss:", "AnonHugePages:")):
            key = {"Rss:": "rss", "Pss:": "pss", "AnonHugePages:": "ahp"}[line.split()[0]]
            cur[key] = int(line.split()[1]) * 1024
    anon = [m for m in maps if not m["name"]]
    ram = min((m for m in anon if m["perm"].startswith("rw")),  # type: ignore[union-attr]
              key=lambda m: abs(int(m["size"]) - guest_bytes))
    if abs(int(ram["size"]) - guest_bytes) > 4 * MiB:
        raise RuntimeError(f"no guest RAM mapping of {guest_bytes} bytes in pid {pid}")
    total = {k: sum(int(m[k]) for m in maps) for k in ("rss", "pss", "ahp")}
    tcg = sum(int(m["pss"]) for m in anon if "x" in str(m["perm"]))
    return MemSplit(total["rss"], total["pss"], int(ram["pss"]), tcg, total["ahp"])


def vm_pids(runtime_dir: Path) -> list[int]:
    """Every process whose command line names this VM's runtime dir: all the host processes of that VM."""
    needle = str(runtime_dir).encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def vm_memory(runtime_dir: Path, guest_bytes: int) -> tuple[list[str], MemSplit]:
    """(process names, summed split) over all processes of the VM with this runtime dir."""
    pids = vm_pids(runtime_dir)
    comms = [Path(f"/proc/{p}/comm").read_text().strip() for p in pids]
    splits = [smaps_split(p, guest_bytes) for p in pids]
    total = splits[0]
    for s in splits[1:]:
        total = total + s
    return comms, total


def mib(n: float) -> str:
    return f"{n / MiB:6.1f}"


def split_row(label: str, s: MemSplit, extra: str = "") -> str:
    return (f"{label:<26} PSS {mib(s.pss)}  RSS {mib(s.rss)}  guest RAM {mib(s.guest_ram)}  TCG cache {mib(s.tcg)}  "
            f"rest {mib(s.rest)}  => overhead {mib(s.overhead)} MiB{extra}")


def with_tb_size(argv: list[str], tb: str) -> list[str]:
    """The argv with only `-accel tcg` changed (tb-size in MiB; "default": QEMU's own, i.e. no tb-size)."""
    out = list(argv)
    i = out.index("-accel") + 1
    accel = out[i].split(",")[0]
    out[i] = accel if tb == "default" else f"{accel},tb-size={tb}"
    return out


@dataclass
class BareMem:
    tb: str
    booted: float
    ready: float
    cpu_ready: float
    split: MemSplit


async def bare_memory(template: BareTemplate, workdir: Path, tb: str, guest_bytes: int, settle: float) -> BareMem:
    argv = with_tb_size(await template.prepare(workdir), tb)
    vm = await bare_start(argv, workdir)
    try:
        booted = await wait_line_in_file(workdir / "console.log", BOOTED) - vm.t0
        ready = await wait_line_in_file(workdir / "console.log", READY) - vm.t0
        cpu = cpu_seconds(vm.proc.pid)
        await asyncio.sleep(settle)
        return BareMem(tb, booted, ready, cpu, smaps_split(vm.proc.pid, guest_bytes))
    finally:
        await vm.stop()


async def measure(env: Env, memory: str, settle: float, tb_sizes: list[str], rounds: int) -> None:
    guest_bytes = parse_bytes(memory)
    async with env.client() as client:
        watch = VMIWatch(client)
        await watch.start()
        try:
            run = await platform_run(env, client, watch, vmi_manifest("mem", env.image, memory=memory), keep=True)
            await wait_line_in_file(run.runtime_dir / "console.log", READY)
            await asyncio.sleep(settle)
            comms, total = vm_memory(run.runtime_dir, guest_bytes)
            template = BareTemplate.capture(run.runtime_dir, env.tmp / "template")
            await delete_and_wait(client, watch, "mem", run.pid)
        finally:
            await watch.stop()
    print(f"virtplane VM ({memory}), idle {settle:.0f} s after `ready`: processes {', '.join(comms)}")
    print(split_row("  platform (as launched)", total, f"; AnonHugePages {mib(total.anon_huge)} MiB"))
    print(f"  PSS - configured guest memory: {mib(total.pss - guest_bytes)} MiB (target overhead ≤ 64 MiB: "
          f"{'met' if total.overhead <= 64 * MiB else 'not met'})")
    results: dict[str, list[BareMem]] = {tb: [] for tb in tb_sizes}
    n = 0
    for r in range(rounds):
        for tb in tb_sizes if r % 2 == 0 else list(reversed(tb_sizes)):
            n += 1
            m = await bare_memory(template, env.tmp / f"bare-{n}", tb, guest_bytes, settle)
            results[tb].append(m)
            print(split_row(f"  bare tb-size={tb}", m.split,
                            f"; booted {m.booted:.2f} s, ready {m.ready:.2f} s, CPU to ready {m.cpu_ready:.2f} s, "
                            f"load {loadavg()}"), flush=True)
    print()
    print("bare QEMU, identical argv but -accel tcg[,tb-size=N], medians over rounds:")
    for tb, ms in results.items():
        def med(f, ms: list[BareMem] = ms):  # type: ignore[no-untyped-def]
            return statistics.median(f(m) for m in ms)

        print(f"  tb-size={tb:<8} booted {med(lambda m: m.booted):5.2f} s  ready {med(lambda m: m.ready):5.2f} s  "
              f"CPU to ready {med(lambda m: m.cpu_ready):5.2f} s  PSS {mib(med(lambda m: m.split.pss))}  "
              f"TCG cache {mib(med(lambda m: m.split.tcg))}  overhead {mib(med(lambda m: m.split.overhead))} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", default="128Mi")
    p.add_argument("--settle", type=float, default=20.0, help="idle seconds after `ready` before measuring")
    p.add_argument("--tb-sizes", default="default,256,64,32,16", help="comma-separated MiB or 'default'")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    t0 = time.monotonic()
    with bench_env(nodes=1) as env:
        asyncio.run(measure(env, args.memory, args.settle, args.tb_sizes.split(","), args.rounds))
    print(f"({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
