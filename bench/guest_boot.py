#!/usr/bin/env python3
"""Boot-to-"booted" time of the tiny guest per image format, under QEMU TCG.

Wall time from starting qemu-system-x86_64 to the guest's first console line
("virtplane-guest: booted", printed by /init before anything else), min and median
of N runs, and the median CPU time QEMU used until then (steadier on a shared
host), plus a direct-kernel boot on -M microvm as the floor (no firmware, no PCI).
Minimal devices: the boot medium and the serial console, no NIC.

    .venv/bin/python bench/guest_boot.py [--runs 5] [--only disk-bios,kernel-microvm]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from virtplane.testing import guest

BOOTED = "virtplane-guest: booted"


@dataclass
class Case:
    name: str
    what: str
    kwargs: dict[str, Any]


def cases(p: guest.ImagePaths, raw: Path, initrd: Path) -> list[Case]:
    base: dict[str, Any] = {"nic": None, "virtio_console": False, "qga": False}
    return [
        Case("disk-bios", "tiny.qcow2, SeaBIOS + syslinux, virtio-blk", {**base, "image": p.qcow2}),
        Case("disk-uefi", "tiny.qcow2, OVMF + systemd-boot, virtio-blk",
             {**base, "image": p.qcow2, "firmware": "uefi"}),
        Case("raw-bios", "tiny.raw (from .raw.xz), SeaBIOS", {**base, "image": raw}),
        Case("vmdk-bios", "tiny.vmdk, SeaBIOS", {**base, "image": p.vmdk}),
        Case("vhdx-bios", "tiny.vhdx, SeaBIOS", {**base, "image": p.vhdx}),
        Case("iso-bios", "tiny.iso, SeaBIOS + isolinux, SATA cdrom", {**base, "image": p.iso, "boot": "cdrom"}),
        Case("iso-uefi", "tiny.iso, OVMF El Torito, SATA cdrom",
             {**base, "image": p.iso, "boot": "cdrom", "firmware": "uefi"}),
        Case("kernel-q35", "vmlinuz + initrd.img, -M q35 (SeaBIOS linuxboot)",
             {**base, "boot": "kernel", "kernel": p.vmlinuz, "initrd": initrd, "cmdline": p.kernel_cmdline}),
    ]


def microvm_argv(p: guest.ImagePaths, initrd: Path) -> list[str]:
    # microvm has no HPET/PM timer: under TCG the kernel's calibrations against the
    # PIT are unreliable and the local APIC timer setup hung 2 boots in 3, so the PIT
    # is forced on, delay calibration skipped (lpj) and the APIC timer left out.
    return [guest.QEMU, "-accel", "tcg", "-M", "microvm,pit=on,pic=on,rtc=on", "-m", "512", "-nodefaults",
            "-no-user-config", "-display", "none", "-chardev", "stdio,id=con0,signal=off",
            "-serial", "chardev:con0", "-kernel", str(p.vmlinuz), "-initrd", str(initrd),
            "-append", f"{p.kernel_cmdline} lpj=5000000 noapictimer"]


def cpu_seconds(pid: int) -> float:
    """user+system CPU time of a process: on a shared machine this moves far less
    with other load than wall time does (TCG runs the guest on one thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_boot(argv: list[str], workdir: Path, timeout: float = 30.0) -> tuple[float, float] | None:
    """(wall seconds, QEMU CPU seconds) until the guest printed BOOTED."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=workdir, start_new_session=True)
    try:
        console = guest.ConsoleLog(proc.stdout)
        try:
            console.wait_for(BOOTED, timeout)
        except TimeoutError:
            return None  # counted as a failed run, not a time
        return time.monotonic() - t0, cpu_seconds(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--initrd", type=Path, help="try another initrd for the kernel boots")
    args = ap.parse_args()

    p = guest.ensure_images()
    initrd = args.initrd or p.initrd
    only = set(filter(None, args.only.split(",")))
    with tempfile.TemporaryDirectory(prefix="guest-boot-") as tmp:
        tmpdir = Path(tmp)
        raw = tmpdir / "tiny.raw"
        with raw.open("wb") as f:
            subprocess.run(["xz", "-dc", str(p.raw_xz)], stdout=f, check=True)
        plan: list[tuple[str, str, Any]] = [(c.name, c.what, c.kwargs) for c in cases(p, raw, initrd)]
        plan.append(("kernel-microvm", "vmlinuz + initrd.img, -M microvm (floor)", None))
        rows = []
        failed: dict[str, int] = {}
        for name, what, kwargs in plan:
            if only and name not in only:
                continue
            times: list[float] = []
            cpus: list[float] = []
            for i in range(args.runs):
                work = tmpdir / f"{name}-{i}"
                work.mkdir()
                if kwargs is None:
                    argv = microvm_argv(p, initrd)
                else:
                    argv, _ = guest.qemu_argv(work, **kwargs)
                res = time_boot(argv, work)
                if res is None:
                    failed[name] = failed.get(name, 0) + 1
                else:
                    times.append(res[0])
                    cpus.append(res[1])
                shutil.rmtree(work, ignore_errors=True)
            if times:
                rows.append((name, min(times), statistics.median(times), statistics.median(cpus), what))
            print(f"  {name}: {' '.join(f'{t:.2f}' for t in times)} ({failed.get(name, 0)} failed)",
                  file=sys.stderr, flush=True)

    print(f"\nboot to '{BOOTED}' under TCG, {args.runs} runs, {os.cpu_count()} host cores")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (wall times grow with it; CPU times barely)")
    print(f"{'case':<16} {'min s':>6} {'median s':>9} {'cpu s':>6}  what")
    for name, tmin, tmed, cmed, what in rows:
        print(f"{name:<16} {tmin:>6.2f} {tmed:>9.2f} {cmed:>6.2f}  {what}")
    for name, n in failed.items():
        print(f"{name}: {n} of {args.runs} runs did not reach '{BOOTED}' within 30 s")
    sizes = {n: a["size"] for n, a in p.manifest["artifacts"].items() if "size" in a}
    print("\nartifact sizes (MiB): " + ", ".join(f"{n} {s / 2**20:.1f}" for n, s in sorted(sizes.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
