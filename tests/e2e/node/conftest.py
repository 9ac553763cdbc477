"""Fixtures for the node agent e2e tests: a real `virtplane up --nodes 0`, one `virtplane node` process of our
own (own process group, stopped by pgid), and Debian's docker-registry holding the tiny containerDisk.

Where a VM's files are: `<agent data dir>/runtime/<namespace>_<name>/` — console.log (serial console),
guest.log (virtio console: the guest's `tick` heartbeat), qemu.log, pid, disks/.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from virtplane.client import rest
from virtplane.testing import guest
from virtplane.testing.cluster import REPO, Cluster

NODE = "node-e2e-1"
COMPONENT_USER = "system:virtplane:controller"
T = TypeVar("T")

VMIS = rest.GVR("kubevirt.io", "v1", "virtualmachineinstances")
PODS = rest.GVR("", "v1", "pods")
NODES = rest.GVR("", "v1", "nodes", namespaced=False)
LEASES = rest.GVR("coordination.k8s.io", "v1", "leases")
EVENTS = rest.GVR("", "v1", "events")
SECRETS = rest.GVR("", "v1", "secrets")


def requirements() -> None:
    for tool in ("qemu-system-x86_64", "qemu-img", "xorriso"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    if not Path("/usr/bin/docker-registry").exists():
        pytest.skip("docker-registry not installed")
    if not (guest.IMAGES_OUT / "containerdisk-oci" / "index.json").exists():
        pytest.skip("guest images missing (run `make images`)")


class NodeAgentProc:
    """`virtplane node` as a child in its own process group; stopped (or SIGKILLed) by that group."""

    def __init__(self, kubeconfig: Path, data_dir: Path, log_path: Path) -> None:
        self.kubeconfig = kubeconfig
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "virtplane.cli.main", "node", "--kubeconfig", str(self.kubeconfig),
                 "--name", NODE, "--data-dir", str(self.data_dir), "--address", "127.0.0.1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
            )  # fmt: skip

    def signal_group(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the agent's process group. QEMU is not in it (it runs in its own session)."""
        self.signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        self.signal_group(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except FileNotFoundError:
            return ""


def component_kubeconfig(cluster: Cluster, dest: Path) -> Path:
    """A kubeconfig with the controller's components token (DATA/tokens.csv): the node agent writes VMI
    status and reserved labels, which only `system:virtplane-components` may."""
    rows = csv.reader(io.StringIO((cluster.data_dir / "tokens.csv").read_text()))
    token = next(r[0] for r in rows if len(r) > 1 and r[1] == COMPONENT_USER)
    kc = yaml.safe_load(cluster.kubeconfig.read_text())
    kc["users"][0]["user"]["token"] = token
    dest.write_text(yaml.safe_dump(kc))
    return dest


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    requirements()
    root = tmp_path_factory.mktemp("nodee2e")
    cluster = Cluster(root / "cluster", extra_args=("--nodes", "0"))
    cluster.start()
    agent: NodeAgentProc | None = None
    qemu_pids: list[int] = []
    try:
        with guest.registry_with_containerdisk(root / "registry") as (_reg, image):
            kubeconfig = component_kubeconfig(cluster, root / "node.kubeconfig")
            agent = NodeAgentProc(kubeconfig, root / "node", root / "node-agent.log")
            agent.start()
            yield {"cluster": cluster, "agent": agent, "image": image, "root": root, "qemu_pids": qemu_pids,
                   "component_kubeconfig": kubeconfig}  # fmt: skip
    finally:
        if agent is not None:
            agent.stop()
        # VMs the test left behind: by pid from their runtime dirs, never by name.
        for pidfile in (root / "node" / "runtime").glob("*/pid"):
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        cluster.stop()


@pytest.fixture
async def admin(env: dict[str, Any]) -> AsyncIterator[rest.Client]:
    client = rest.Client(rest.ClientConfig.from_kubeconfig(env["cluster"].kubeconfig))
    yield client
    await client.close()


@pytest.fixture
async def component(env: dict[str, Any]) -> AsyncIterator[rest.Client]:
    client = rest.Client(rest.ClientConfig.from_kubeconfig(env["component_kubeconfig"]))
    yield client
    await client.close()


async def wait_until(fn: Callable[[], Awaitable[T | None]], timeout: float, what: str,  # noqa: ASYNC109
                     interval: float = 0.2) -> T:  # fmt: skip
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while True:
        try:
            value = await fn()
            if value:
                return value
        except rest.APIError as err:
            last_err = err
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}" + (f" ({last_err})" if last_err
                                                                                   else ""))
        await asyncio.sleep(interval)


def proxy_token(secret: dict[str, Any]) -> str:
    return base64.b64decode(secret["data"]["token"]).decode()


TICK = re.compile(r"virtplane-guest: tick (\d+) ([0-9.]+)")


def ticks(path: Path) -> list[tuple[int, float]]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [(int(n), float(up)) for n, up in TICK.findall(text)]


def read(path: Path) -> str:
    return path.read_text(errors="replace")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"
