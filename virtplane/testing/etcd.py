"""Start a real etcd (one member or a small cluster) for tests and benchmarks.

Each member listens on 127.0.0.1 ports picked free at construction, keeps its data in a directory
the caller owns, runs in its own process group and is stopped by that group, never by name.
Needs the `etcd` binary (Debian: ``apt-get install etcd-server``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from virtplane.testing.cluster import free_port


def etcd_binary() -> str | None:
    """The etcd executable, or None when it is not installed."""
    return shutil.which("etcd") or (("/usr/bin/etcd") if os.access("/usr/bin/etcd", os.X_OK) else None)


@dataclass(frozen=True)
class ClientTLS:
    """Server-side TLS for the client port: etcd serves https and, with client_ca, wants client certs."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class EtcdMember:
    """One etcd process. Use `EtcdCluster` to start several that form one cluster."""

    def __init__(self, name: str, data_dir: Path, *, tls: ClientTLS | None = None) -> None:
        self.name = name
        self.data_dir = data_dir
        self.tls = tls
        # Fixed for the member's lifetime, so a restart keeps its place in the cluster and clients
        # can reconnect to the same endpoint.
        self.client_port = free_port()
        self.peer_port = free_port()
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, *, state: str = "new") -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed (Debian: apt-get install etcd-server)")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop()
        args = [
            binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", f"virtplane-test-{os.getpid()}",
            "--logger", "zap",
            "--log-level", "warn",
            # Tests run on small tmpfs/disks: no multi-GB quota alarms, small snapshots.
            "--quota-backend-bytes", str(1 << 30),
            "--snapshot-count", "10000",
        ]
        if self.tls is not None:
            args += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key)]
            if self.tls.client_ca is not None:
                args += ["--trusted-ca-file", str(self.tls.client_ca), "--client-cert-auth"]
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def healthy(self, ssl_context: ssl.SSLContext | None = None) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1, context=ssl_context) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the member's process group and reap it (SIGKILL after `timeout`)."""
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


class EtcdCluster:
    """`size` etcd members on 127.0.0.1, data under `base_dir`; a context manager.

    ``EtcdCluster(tmp).start().url`` is the store URL (``etcd://127.0.0.1:P1,127.0.0.1:P2...``).
    """

    def __init__(self, base_dir: Path, *, size: int = 1, tls: ClientTLS | None = None,
                 client_ssl: ssl.SSLContext | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, not {size}")
        self.base_dir = base_dir
        self.members = [EtcdMember(f"m{i}", base_dir / f"m{i}", tls=tls) for i in range(size)]
        # How this helper itself reaches /health when the members serve TLS (with client auth).
        self.client_ssl = client_ssl

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        return store_url(self.members)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for member in self.members:
            member.start(self.initial_cluster)
        try:
            self.wait_healthy(self.members, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, member: EtcdMember, timeout: float = 30.0) -> None:
        """Start a stopped member again on its data dir (it rejoins with its old identity)."""
        member.stop()
        member.start(self.initial_cluster, state="existing")
        self.wait_healthy([member], timeout)

    def wait_healthy(self, members: Sequence[EtcdMember], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(members)
        while pending:
            for member in list(pending):
                if not member.running():
                    raise RuntimeError(f"etcd {member.name} exited; log:\n{member.log_tail()}")
                if member.healthy(self.client_ssl):
                    pending.remove(member)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd not healthy after {timeout}s; log:\n{pending[0].log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def store_url(members: Sequence[EtcdMember], **options: str) -> str:
    """The ``etcd://`` store URL for members (their client endpoints, in order) and options."""
    import urllib.parse

    hosts = ",".join(f"127.0.0.1:{m.client_port}" for m in members)
    query = urllib.parse.urlencode(options)
    return f"etcd://{hosts}" + (f"?{query}" if query else "")
