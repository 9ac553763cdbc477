"""The KVM probe's verdicts with stand-in "QEMU" binaries (the real one runs in tests/e2e/hypervisor)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from virtplane.hypervisor.accel import build_probe_firmware, probe_command, run_probe


def fake_qemu(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-qemu"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def test_firmware_layout() -> None:
    fw = build_probe_firmware()
    assert len(fw) == 64 * 1024  # QEMU wants BIOS images in 64 KiB units
    assert fw[0xFFF0:0xFFF5] == bytes([0xEA, 0x00, 0x00, 0x00, 0xF0])  # reset vector: jmp far F000:0000
    assert fw[0] == 0xFA  # cli
    # GDT with flat 32-bit code/data and a 64-bit code segment
    assert (0x00AF9B000000FFFF).to_bytes(8, "little") in fw


def test_probe_command(tmp_path: Path) -> None:
    cmd = probe_command(tmp_path / "fw.bin", "kvm", "host")
    assert cmd[:3] == ["qemu-system-x86_64", "-accel", "kvm"]
    assert "-bios" in cmd and "isa-debug-exit,iobase=0xf4,iosize=0x04" in cmd


async def test_hanging_guest_times_out_and_is_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    qemu = fake_qemu(tmp_path, f"echo $$ > {pidfile}; printf RP; exec sleep 60")
    start = time.monotonic()
    result = await run_probe("kvm", 0.5, qemu=qemu)
    assert time.monotonic() - start < 3
    assert not result.kvm_usable and result.accel == "tcg"
    assert "did not finish within 0.5s" in result.reason and "RP" in result.reason
    assert not _alive(int(pidfile.read_text()))  # killed by pid and reaped


async def test_failing_qemu_reports_stderr(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, "echo 'error: failed to set MSR 0x10a' >&2; exit 1")
    result = await run_probe("kvm", 5, qemu=qemu)
    assert not result.kvm_usable
    assert "exit 1" in result.reason and "failed to set MSR" in result.reason


async def test_completed_guest(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, "printf RPLK; exit 85")  # isa-debug-exit: (0x2a << 1) | 1
    result = await run_probe("kvm", 5, qemu=qemu)
    assert result.kvm_usable, result.reason


async def test_missing_binary(tmp_path: Path) -> None:
    result = await run_probe("kvm", 5, qemu=str(tmp_path / "nope"))
    assert not result.kvm_usable and "cannot run" in result.reason
