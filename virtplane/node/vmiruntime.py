"""One VMI's life on this node: its runtime directory, its `Machine`, and what the guest agent last said.

The runtime directory `DATA/runtime/<namespace>_<name>/` holds QEMU's sockets and logs (console.log is the
serial console, guest.log the virtio console), the per-VMI disks (overlays, cloud-init ISOs, empty disks) and
`vmi.json` (uid, start time, who paused it, volume status extras). Everything needed to pick the VM up again
after an agent restart is in there; removing the directory is the last step of deleting a VMI.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virtplane.hypervisor.errors import HypervisorError
from virtplane.hypervisor.machine import Machine, RunState
from virtplane.hypervisor.runtime import RuntimeDir

from .status import GuestInterface

log = logging.getLogger(__name__)

JSON = dict[str, Any]
META_FILE = "vmi.json"
DISKS_DIR = "disks"


def runtime_dir_name(namespace: str, name: str) -> str:
    # "_" cannot occur in namespace or VMI names (DNS labels/subdomains), so the mapping is unambiguous.
    return f"{namespace}_{name}"


@dataclasses.dataclass(slots=True)
class GuestAgentView:
    """The guest agent's last answers (None/empty until it answered)."""

    connected: bool = False
    info: JSON | None = None
    osinfo: JSON | None = None
    interfaces: list[GuestInterface] = dataclasses.field(default_factory=list)
    hostname: str = ""
    timezone: JSON | None = None

    def key(self) -> tuple[Any, ...]:
        """What status is built from: a change here means the VMI status needs a refresh."""
        return (self.connected, json.dumps(self.osinfo, sort_keys=True), tuple(self.interfaces))


@dataclasses.dataclass(slots=True)
class RuntimeMeta:
    """vmi.json: which VMI incarnation this directory belongs to and what status needs across restarts."""

    uid: str
    namespace: str
    name: str
    started_at: str = ""
    paused_by_user: bool = False
    frozen: bool = False
    volume_extra: dict[str, JSON] = dataclasses.field(default_factory=dict)
    reported_final: str = ""  # the final phase already written, so a restart does not repeat events
    # Hotpluggable volumes QEMU has (or is getting): name → {phase, reason, message} (virtplane.node.hotplug)
    hotplug: dict[str, JSON] = dataclasses.field(default_factory=dict)
    # CD-ROM drives QEMU has: name → the volume inserted as their medium (canonical JSON; "" when empty)
    cdroms: dict[str, str] = dataclasses.field(default_factory=dict)
    # multus NICs QEMU has: interface name → its pod interface in the launcher netns (net1, ...), so hotplug
    # and unplug (virtplane.node.network.reconcile_nics) know what is plugged across agent restarts
    nics: dict[str, str] = dataclasses.field(default_factory=dict)
    # the last `backup` action: KubeVirt's VirtualMachineInstanceBackupStatus (status.changedBlockTracking)
    backup: JSON = dataclasses.field(default_factory=dict)

    def to_json(self) -> JSON:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: JSON) -> RuntimeMeta:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


class VMIRuntime:
    def __init__(self, path: Path, meta: RuntimeMeta) -> None:
        self.path = path
        self.runtime = RuntimeDir(path)
        self.meta = meta
        self.machine: Machine | None = None
        self.agent = GuestAgentView()
        self.deletion_started: float | None = None  # loop time of the first graceful-shutdown signal
        self.last_powerdown: float = 0.0
        self.dead_at_adoption = False  # QEMU had already exited when this agent started
        self._poller: asyncio.Task[None] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.meta.namespace, self.meta.name)

    @property
    def disks_dir(self) -> Path:
        return self.path / DISKS_DIR

    @property
    def alive(self) -> bool:
        return self.machine is not None and self.machine.state.alive

    # -- persistence ------------------------------------------------------------------------------------
    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path / f".{META_FILE}.tmp"
        tmp.write_text(json.dumps(self.meta.to_json(), indent=1))
        os.replace(tmp, self.path / META_FILE)

    @classmethod
    def load(cls, path: Path) -> VMIRuntime | None:
        try:
            meta = RuntimeMeta.from_json(json.loads((path / META_FILE).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None
        return cls(path, meta)

    def remove_files(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # -- guest agent polling ------------------------------------------------------------------------------
    def start_polling(self, notify: Callable[[], None], interval: float = 5.0) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(notify, interval), name=f"qga-{self.meta.name}")

    async def _poll(self, notify: Callable[[], None], interval: float) -> None:
        """Ping the guest agent; on (re)connect and every few rounds read OS info and interfaces.

        Runs beside the reconcile loop so a guest without an agent (each call waits for its timeout) never
        delays status updates; `notify` asks for a reconcile when something status-relevant changed."""
        rounds = 0
        while True:
            machine = self.machine
            if machine is None or not machine.state.alive:
                return
            before = self.agent.key()
            if machine.state == RunState.RUNNING:
                try:
                    await machine.guest_ping(timeout=2.0)
                    fresh = not self.agent.connected
                    self.agent.connected = True
                    if fresh or rounds % 6 == 0:
                        self.agent.info = await machine.guest_info(timeout=5.0)
                        self.agent.osinfo = await machine.guest_osinfo(timeout=5.0)
                        with contextlib.suppress(HypervisorError):
                            self.agent.hostname = str((await machine.guest_command("guest-get-host-name"))
                                                      .get("host-name") or "")  # fmt: skip
                        with contextlib.suppress(HypervisorError):
                            self.agent.timezone = await machine.guest_command("guest-get-timezone")
                    self.agent.interfaces = GuestInterface.parse(await machine.guest_network_interfaces(timeout=5.0))
                except HypervisorError as err:
                    if self.agent.connected:
                        log.info("guest agent of %s/%s stopped answering: %s", *self.key, err)
                    self.agent.connected = False
            if self.agent.key() != before:
                notify()
            rounds += 1
            await asyncio.sleep(interval if self.agent.connected else 2.0)

    async def stop_polling(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    async def close(self) -> None:
        """Stop watching; QEMU keeps running (agent shutdown or restart)."""
        await self.stop_polling()
        if self.machine is not None:
            await self.machine.detach()
