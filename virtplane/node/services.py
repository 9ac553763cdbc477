"""The node's Service proxy (kube-proxy's part of this node agent): Services and EndpointSlices from the API,
nftables DNAT and cluster DNS names on the node (virtplane.network.services). Runs on CNI pod-network nodes
only: on the interim user-mode network a VM has no address another VM or this node could route to."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from virtplane.client import informer, rest
from virtplane.network.services import ServiceRules

log = logging.getLogger(__name__)

SERVICES = rest.GVR("", "v1", "services")
ENDPOINT_SLICES = rest.GVR("discovery.k8s.io", "v1", "endpointslices")
RETRY_SECONDS = 2.0


class ServiceProxy:
    def __init__(self, client: rest.Client, rules: ServiceRules) -> None:
        self.rules = rules
        self.services = informer.Informer(client, SERVICES)
        self.slices = informer.Informer(client, ENDPOINT_SLICES)
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        for inf in (self.services, self.slices):
            inf.add_handler(lambda *_: self._dirty.set())

    def start(self) -> None:
        self.services.start()
        self.slices.start()
        self._task = asyncio.create_task(self._run(), name="service-proxy")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self.services.stop()
        await self.slices.stop()
        # Rules are the node's, not the VMs': unlike QEMU they go with the agent (host-global state must not
        # outlive the process that owns it; the next agent writes them again once its informers sync).
        await self.rules.remove()

    async def _run(self) -> None:
        await asyncio.gather(self.services.synced.wait(), self.slices.synced.wait())
        self._dirty.set()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await asyncio.sleep(0.05)  # one write for a burst of events (a Service and its slice together)
            try:
                await self.rules.apply(self.services.list(), self.slices.list())
            except Exception as err:  # nft refused: keep the old table, try again
                log.warning("service rules not applied: %s", err)
                await asyncio.sleep(RETRY_SECONDS)
                self._dirty.set()
