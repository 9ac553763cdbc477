"""`virtplane up` runs its node agents as child processes, restarting one that dies.

Each agent is its own process (and process group) so that killing or restarting it is what it
would be on a real node: the VMs it runs keep running and are re-adopted when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from virtplane.apiserver import auth, pki

log = logging.getLogger(__name__)


def node_name(index: int) -> str:
    return f"virtplane-node-{index}"


def use_node_netns(count: int, requested: bool | None) -> bool:
    """`up --nodes N`: each agent in its own network namespace unless told otherwise, when there is more than
    one node (so that traffic between nodes, a migration stream, crosses a network) and we may create
    namespaces (root); an explicit --node-netns / --no-node-netns wins."""
    if requested is not None:
        return requested
    return count > 1 and os.geteuid() == 0


def pod_network_args(mode: str, index: int) -> tuple[str, ...]:
    """`virtplane node` flags for node `index` of `up`: with the CNI pod network, its own pod subnet
    (10.244.<index>.0/24, the one published as Node.spec.podCIDR and routed to by the other nodes)."""
    if mode == "user":
        return ()
    return ("--pod-network", mode, "--pod-cidr", f"10.244.{index}.0/24")


class NodeAgentProcess:
    def __init__(self, name: str, data_dir: Path, kubeconfig: Path, extra_args: tuple[str, ...] = (),
                 netns: str | None = None) -> None:  # fmt: skip
        self.name = name
        self.netns = netns
        self.data_dir = data_dir
        self.kubeconfig = kubeconfig
        self.extra_args = extra_args
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def argv(self) -> list[str]:
        # nsenter execs the agent (no intermediate process): the pid we record is the agent's
        prefix = ["nsenter", f"--net=/var/run/netns/{self.netns}"] if self.netns else []
        return [*prefix, sys.executable, "-m", "virtplane.cli.main", "node", "--kubeconfig", str(self.kubeconfig),
                "--name", self.name, "--data-dir", str(self.data_dir), *self.extra_args]

    async def _spawn(self) -> None:
        # a local file opened once per (re)start: not worth a thread
        log_file = open(self.data_dir / "agent.log", "ab")  # noqa: ASYNC230
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv(), stdout=log_file, stderr=log_file, start_new_session=True)
        finally:
            log_file.close()
        # the pid, for operators and tests that kill an agent as a node failure would
        (self.data_dir / "agent.pid").write_text(f"{self.proc.pid}\n")
        log.info("node agent started", extra={"node": self.name, "pid": self.proc.pid})

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping:
            await self._spawn()
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            log.warning("node agent exited; restarting", extra={"node": self.name, "code": code})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30)

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._supervise(), name=f"node-{self.name}")

    async def stop(self, grace: float = 20.0) -> None:
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


def prepare_node_token(data: Path, index: int) -> str:
    """A node's identity: a token in the components group (created before the API server reads tokens)."""
    name = node_name(index)
    return auth.ensure_token(data / "tokens.csv", f"system:node:{name}", (auth.COMPONENTS_GROUP, "system:nodes"))


def prepare_node(data: Path, index: int, server_url: str, ca_cert: Path) -> tuple[str, Path, Path]:
    """The node's state dir DATA/nodes/NAME and its own kubeconfig there."""
    name = node_name(index)
    node_dir = data / "nodes" / name
    node_dir.mkdir(parents=True, exist_ok=True)
    token = prepare_node_token(data, index)
    kubeconfig = node_dir / "kubeconfig"
    pki.write_kubeconfig(kubeconfig, server_url, ca_cert, token)
    return name, node_dir, kubeconfig
