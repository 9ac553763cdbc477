"""Fixtures for the hypervisor e2e tests: real qemu-system-x86_64 under TCG with virtplane's tiny guest.

The guest images come from images/ (`make images`); they are copied into the test's tmp dir first, so a
concurrent image rebuild cannot change them under a running VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from virtplane.hypervisor.machine import Machine

REPO = Path(__file__).resolve().parents[3]
IMAGES = REPO / "images" / "out"
GUEST = "virtplane-guest: "


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    names = ("tiny.qcow2", "vmlinuz", "initrd.img")
    missing = [n for n in names if not (IMAGES / n).exists()]
    if missing:
        pytest.skip(f"guest images missing in {IMAGES}: {missing} (run `make images`)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    dest = tmp_path_factory.mktemp("images")
    out = {}
    for name in names:
        shutil.copyfile(IMAGES / name, dest / name)
        out[name] = dest / name
    return out


class LogWatch:
    """Waits for lines in a file QEMU appends to (console.log, guest.log), by polling its size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0  # where the next wait starts looking

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:  # noqa: ASYNC109
        """The first match of `pattern` after the previous match; moves the offset past it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.text(), self.offset)
            if m:
                self.offset = m.end()
                return m
            if time.monotonic() > deadline:
                tail = self.text()[-2000:]
                raise TimeoutError(f"{pattern!r} not in {self.path.name} after {timeout:g}s; tail:\n{tail}")
            await asyncio.sleep(0.05)

    def skip_to_end(self) -> None:
        self.offset = len(self.text())


@pytest.fixture
async def machines() -> AsyncIterator[list[Machine]]:
    """Machines registered here are killed (by pid) at the end of the test if still alive."""
    created: list[Machine] = []
    yield created
    for m in created:
        if m.state.alive and m.pid:
            # By pid, never by name. A detached Machine no longer watches its pid, so signal directly.
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.pid, signal.SIGKILL)
        await m.detach()
    for m in created:
        if m.pid:
            _reap(m.pid)


def _reap(pid: int) -> None:
    """Collect a killed QEMU nobody watches any more (the test process is its parent)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def vmi(name: str, *, disks: list[dict[str, Any]], volumes: list[dict[str, Any]],
        domain: dict[str, Any] | None = None, interfaces: bool = True) -> dict[str, Any]:  # fmt: skip
    spec_domain: dict[str, Any] = {
        "resources": {"requests": {"memory": "256Mi"}},
        "devices": {"disks": disks, "rng": {}},
    }
    spec: dict[str, Any] = {"domain": spec_domain, "volumes": volumes}
    if interfaces:
        spec_domain["devices"]["interfaces"] = [{"name": "default", "masquerade": {}}]
        spec["networks"] = [{"name": "default", "pod": {}}]
    for key, value in (domain or {}).items():
        spec_domain[key] = value
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": "e2e", "uid": str(uuid.UUID(hashlib.md5(name.encode()).hexdigest()))},
        "spec": spec,
    }
