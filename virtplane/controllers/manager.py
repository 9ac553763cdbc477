"""Runs every controller against one API server (`virtplane controller`, and inside `up`)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, Protocol

from virtplane.client import rest
from virtplane.controllers import (
    datavolume,
    endpoints,
    garbage_collector,
    migration,
    namespace,
    pvc,
    scheduler,
    storage_profiles,
    virtualmachine,
    vmclone,
    vmi,
    workloads,
)
from virtplane.storage import provisioner


class Controller(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class ControllerManager:
    def __init__(self, config: rest.ClientConfig, *, storage_root: Path | None = None) -> None:
        """storage_root: where the built-in provisioners keep volumes (default: provisioner.default_root())."""
        self.client = rest.Client(config, user_agent="virtplane-controller-manager")
        root = provisioner.StorageRoot(storage_root) if storage_root is not None else None
        self.controllers: list[Controller] = [
            garbage_collector.GarbageCollector(self.client),
            namespace.NamespaceController(self.client),
            virtualmachine.VMController(self.client),
            vmi.VMIController(self.client),
            migration.MigrationController(self.client),
            scheduler.Scheduler(self.client),
            endpoints.EndpointsController(self.client),
            storage_profiles.StorageProfileController(self.client, root),
            pvc.PVCController(self.client, root),
            datavolume.DataVolumeController(self.client, root),
            vmclone.VMCloneController(self.client),
            workloads.ReplicaSetController(self.client),  # apps/v1: pods beside VMs
            workloads.DeploymentController(self.client),
        ]

    async def start(self) -> None:
        for c in self.controllers:
            await c.start()

    async def stop(self) -> None:
        for c in reversed(self.controllers):
            with contextlib.suppress(Exception):
                await c.stop()
        await self.client.close()

    async def run_forever(self, stop: asyncio.Event) -> Any:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
