"""core/v1 Events from the node agent (source.component `virt-handler`, as KubeVirt's node daemon reports).

Events are best effort, as in client-go's recorder: a failed write is logged, never raised, so reporting
can never break reconciling. docs/vm-runtime.md plans one shared helper `virtplane.client.events`; until it
exists this module is the node agent's own (same object shape, so switching is a one-line change).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

from virtplane.client import rest

from .status import now_rfc3339

log = logging.getLogger(__name__)

EVENTS = rest.GVR("", "v1", "events")
COMPONENT = "virt-handler"


def involved_object(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    ref = {"apiVersion": obj.get("apiVersion", ""), "kind": obj.get("kind", ""), "name": meta.get("name", ""),
           "uid": meta.get("uid", ""), "resourceVersion": meta.get("resourceVersion", "")}  # fmt: skip
    if meta.get("namespace"):
        ref["namespace"] = meta["namespace"]
    return ref


def build_event(obj: Mapping[str, Any], event_type: str, reason: str, message: str, *, host: str) -> dict[str, Any]:
    ref = involved_object(obj)
    namespace = ref.get("namespace") or "default"  # events about cluster-scoped objects (Nodes) live in default
    now = now_rfc3339()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{ref['name']}.{secrets.token_hex(8)}", "namespace": namespace},
        "involvedObject": ref,
        "reason": reason,
        "message": message,
        "type": event_type,
        "source": {"component": COMPONENT, "host": host},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "reportingComponent": COMPONENT,
        "reportingInstance": host,
    }


class EventRecorder:
    def __init__(self, client: rest.Client, host: str) -> None:
        self.client = client
        self.host = host

    async def event(self, obj: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
        body = build_event(obj, event_type, reason, message, host=self.host)
        try:
            await self.client.create(EVENTS, body, body["metadata"]["namespace"])
        except Exception as err:  # best effort by design (see module doc)
            log.warning("cannot record event %s for %s: %s", reason, body["involvedObject"].get("name"), err)

    async def normal(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self.event(obj, "Normal", reason, message)

    async def warning(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self.event(obj, "Warning", reason, message)
