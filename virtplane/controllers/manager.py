"""Runs every controller against one API server (`virtplane controller`, and inside `up`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from virtplane.client import rest
from virtplane.controllers import (
    datavolume,
    garbage_collector,
    namespace,
    pvc,
    scheduler,
    storage_profiles,
    virtualmachine,
    vmi,
)


class Controller(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class ControllerManager:
    def __init__(self, config: rest.ClientConfig) -> None:
        self.client = rest.Client(config, user_agent="virtplane-controller-manager")
        self.controllers: list[Controller] = [
            garbage_collector.GarbageCollector(self.client),
            namespace.NamespaceController(self.client),
            virtualmachine.VMController(self.client),
            vmi.VMIController(self.client),
            scheduler.Scheduler(self.client),
            storage_profiles.StorageProfileController(self.client),
            pvc.PVCController(self.client),
            datavolume.DataVolumeController(self.client),
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
