"""Kubernetes Events (core/v1) as client-go's EventRecorder writes them, for every component.

    recorder = events.EventRecorder(client, "virt-controller")
    await recorder.event(vm, "Normal", "SuccessfulCreate", "Started the virtual machine ...")

Repeats of the same (object, type, reason, message) within `AGGREGATION_WINDOW` bump `count` and
`lastTimestamp` of the existing Event with a PATCH instead of creating another one, as client-go's
EventCorrelator does, so `kubectl get events` shows `3x` rather than three rows. Recording never raises:
an Event is a courtesy to humans and must never fail the reconcile that emits it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Any

from virtplane.api import clock
from virtplane.client import rest

log = logging.getLogger(__name__)
JSON = dict[str, Any]

EVENTS = rest.GVR("", "v1", "events")
# client-go aggregates similar events over 10 minutes; identical ones are deduplicated while cached.
AGGREGATION_WINDOW = 600.0
# client-go's LRU holds 4096 entries; enough to remember every object a controller touches recently.
MAX_PENDING = 10_000  # a bound on memory if the API server is unreachable for long
CACHE_SIZE = 4096

_Key = tuple[str, str, str, str, str, str, str]


@dataclasses.dataclass(slots=True)
class _Seen:
    name: str
    namespace: str
    count: int
    first_timestamp: str
    last_monotonic: float


def now_rfc3339() -> str:
    return clock.now_rfc3339()


def object_reference(obj: JSON) -> JSON:
    """The involvedObject of an Event: what `kubectl describe` matches events by (uid, kind, name)."""
    meta = obj.get("metadata") or {}
    ref: JSON = {
        "kind": obj.get("kind", ""),
        "namespace": meta.get("namespace", ""),
        "name": meta.get("name", ""),
        "uid": meta.get("uid", ""),
        "apiVersion": obj.get("apiVersion", ""),
        "resourceVersion": meta.get("resourceVersion", ""),
    }
    return {k: v for k, v in ref.items() if v}


class EventRecorder:
    def __init__(self, client: rest.Client, component: str, host: str = "") -> None:
        self.client = client
        self.component = component
        self.host = host
        self._seen: collections.OrderedDict[_Key, _Seen] = collections.OrderedDict()
        # Events are written by one background sink, in order (so two reconciles reporting the same thing
        # bump one Event), as client-go's broadcaster does: a controller never waits on its own Events.
        # Before, every reconcile queued on one lock for each Event write: with 100 VMIs starting at once
        # the Events, not the work, set the pace.
        self._pending: collections.deque[tuple[JSON, str, str, str]] = collections.deque()
        self._sink: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def _source(self) -> JSON:
        return {"component": self.component, **({"host": self.host} if self.host else {})}

    async def event(self, obj: JSON, type: str, reason: str, message: str) -> None:
        """Records an Event about `obj` (a full object with kind/apiVersion/metadata) in the background;
        never raises. `flush()` waits for what was recorded so far."""
        if len(self._pending) >= MAX_PENDING:
            log.warning("event queue full, dropping %s %s on %s", type, reason, (obj.get("metadata") or {}).get("name"))
            return
        # The reference is taken now: the caller may change its object before the sink gets to it.
        self._pending.append((object_reference(obj), type, reason, message))
        self._idle.clear()
        if self._sink is None or self._sink.done():
            self._sink = asyncio.create_task(self._drain(), name=f"events {self.component}")

    async def flush(self) -> None:
        """Wait until every Event recorded so far has been written (or given up on)."""
        await self._idle.wait()

    async def _drain(self) -> None:
        try:
            while self._pending:
                ref, type, reason, message = self._pending.popleft()
                try:
                    await self._record(ref, type, reason, message)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("could not record event %s %s on %s/%s: %s", type, reason, ref.get("kind"),
                                ref.get("name"), exc)
        finally:
            if not self._pending:
                self._idle.set()

    async def _record(self, ref: JSON, type: str, reason: str, message: str) -> None:
        # Events about cluster-scoped objects (nodes) live in "default", as Kubernetes puts them.
        namespace = ref.get("namespace") or "default"
        key: _Key = (ref.get("kind", ""), namespace, ref.get("name", ""), ref.get("uid", ""), type, reason,
                     message)
        now = now_rfc3339()
        seen = self._seen.get(key)
        if seen is not None and time.monotonic() - seen.last_monotonic < AGGREGATION_WINDOW:
            patch = {"count": seen.count + 1, "lastTimestamp": now}
            try:
                await self.client.patch(EVENTS, seen.name, patch, seen.namespace)
                seen.count += 1
                seen.last_monotonic = time.monotonic()
                self._seen.move_to_end(key)
                return
            except rest.NotFound:
                pass  # someone deleted it (or it expired): start a new series
        ts = time.time_ns()
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Event",
            # client-go's naming: the object's name and the nanosecond timestamp in hex.
            "metadata": {"name": f"{ref.get('name', 'unknown')}.{ts:x}", "namespace": namespace},
            "involvedObject": ref,
            "reason": reason,
            "message": message,
            "source": self._source(),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "type": type,
            "reportingComponent": self.component,
            "reportingInstance": self.host,
        }
        created = await self.client.create(EVENTS, body, namespace)
        self._seen[key] = _Seen(created["metadata"]["name"], namespace, 1, now, time.monotonic())
        self._seen.move_to_end(key)
        while len(self._seen) > CACHE_SIZE:
            self._seen.popitem(last=False)
