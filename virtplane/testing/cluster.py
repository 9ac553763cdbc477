"""Start a real `virtplane up` (or `apiserver`) process for tests and benchmarks.

The process runs in its own process group and is stopped by that group, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

import yaml

from virtplane.hypervisor import cgroups

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, data_dir: Path, *, command: str = "up", extra_args: tuple[str, ...] = (),
                 log_path: Path | None = None, nodes: int | None = None) -> None:
        """`nodes`: run that many node agents, each in its own network namespace (`--node-netns`, root);
        stop() removes the cluster's namespaces, veths and bridge."""
        self.data_dir = data_dir
        self.command = command
        self.nodes = nodes
        if nodes is not None:
            extra_args = ("--nodes", str(nodes), "--node-netns", *extra_args)
        self.extra_args = extra_args
        self.log_path = log_path or data_dir / f"{command}.log"
        self.port = free_port()  # fixed across restarts, so clients and kubeconfigs stay valid
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def kubeconfig(self) -> Path:
        return self.data_dir / "kubeconfig"

    def start(self, timeout: float = 60.0) -> Cluster:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.kubeconfig.unlink()  # the new process writes it once it listens
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtplane.cli.main", self.command, "--data-dir", str(self.data_dir),
             "--port", str(self.port), *self._default_args(), *self.extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
        )
        self.wait_ready(timeout)
        return self

    def _default_args(self) -> tuple[str, ...]:
        # tests run their own registries: the cluster's fixed-port one would clash between clusters
        if self.command == "up" and "--registry-port" not in self.extra_args:
            return ("--registry-port", "0")
        return ()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"virtplane exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            if self.kubeconfig.exists():
                try:
                    if self.get_raw("/readyz") == b"ok":
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"virtplane not ready after {timeout}s; log:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def config(self) -> tuple[str, str, bytes]:
        import base64

        data = yaml.safe_load(self.kubeconfig.read_text())
        server = data["clusters"][0]["cluster"]["server"]
        ca = base64.b64decode(data["clusters"][0]["cluster"]["certificate-authority-data"])
        token = data["users"][0]["user"]["token"]
        return server, token, ca

    @property
    def server(self) -> str:
        return self.config()[0]

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.config()[2].decode())

    def get_raw(self, path: str) -> bytes:
        server, token, _ = self.config()
        req = urllib.request.Request(server + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, context=self.ssl_context(), timeout=5) as resp:
            return resp.read()

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KUBECACHEDIR": str(self.data_dir / "kcache")}
        proc = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, env=env,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Stop the cluster process; for `up`, also the VMs its node agents started (they outlive agents
        by design, and a test run must not leave QEMUs running into the next test)."""
        code = self._stop_process(sig, timeout)
        if self.command == "up":
            self.stop_vms()
        if self.nodes is not None:
            self.remove_node_network()
        return code

    def node_network(self) -> dict[str, str]:
        """DATA/nodenet.json: tag, subnet, bridge, gateway (the host's address on the cluster bridge)."""
        import json

        return dict(json.loads((self.data_dir / "nodenet.json").read_text()))

    def remove_node_network(self) -> None:
        import asyncio
        import ipaddress

        from virtplane.network.nodenet import ClusterNetwork

        try:
            saved = self.node_network()
        except FileNotFoundError:
            return
        net = ClusterNetwork(saved["tag"], ipaddress.IPv4Network(saved["subnet"]))
        asyncio.run(net.teardown(max_nodes=max(self.nodes or 0, 8)))

    def _stop_process(self, sig: int, timeout: float) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def stop_vms(self) -> int:
        """Kill every QEMU this cluster's node agents started (VMs outlive their agents by design).

        Each VM's runtime dir holds its pid; the pid is only trusted while that process's command
        line still names the runtime dir, so a recycled pid is never hit. Returns how many were killed.
        """
        killed = 0
        groups: list[Path] = []
        for pid_file in self.data_dir.glob("nodes/*/runtime/*/pid"):
            try:
                pid = int(pid_file.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError):
                continue
            if str(pid_file.parent) in cmdline:
                group = cgroups.cgroup_of(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                if group is not None:
                    groups.append(group)
        # The agents are gone, so nobody else removes the VMs' CPU cgroups (and then their node scopes).
        deadline = time.monotonic() + 5
        for group in groups:
            while group.exists() and time.monotonic() < deadline:
                cgroups.release(group)
                if group.exists():
                    time.sleep(0.05)  # the killed QEMU leaves its cgroup as it exits
            cgroups.release(group.parent)
            cgroups.release(group.parent.parent)
        return killed
