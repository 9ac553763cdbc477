"""Informers (list + watch into a local cache) and a keyed work queue with per-key serialization.

As in client-go: a controller reads from the cache, reacts to keys, and writes through the API.
One key is never processed by two workers at once, and a key queued again while it is being
processed runs once more afterwards (so no change is lost and no object blocks another).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from virtplane.client import rest

log = logging.getLogger(__name__)
JSON = dict[str, Any]
Key = tuple[str, str]  # (namespace or "", name)


def key_of(obj: JSON) -> Key:
    meta = obj.get("metadata", {})
    return (meta.get("namespace") or "", meta["name"])


class Informer:
    def __init__(
        self,
        client: rest.Client,
        gvr: rest.GVR,
        *,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> None:
        self.client = client
        self.gvr = gvr
        self.namespace = namespace
        self._params = {k: v for k, v in (("labelSelector", label_selector),
                                          ("fieldSelector", field_selector)) if v}
        self.cache: dict[Key, JSON] = {}
        self._handlers: list[Callable[[str, JSON, JSON | None], None]] = []
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add_handler(self, handler: Callable[[str, JSON, JSON | None], None]) -> None:
        """handler(event_type, obj, old_obj) with ADDED/MODIFIED/DELETED; called in the loop."""
        self._handlers.append(handler)

    def get(self, namespace: str | None, name: str) -> JSON | None:
        return self.cache.get((namespace or "", name))

    def list(self, namespace: str | None = None) -> list[JSON]:
        if namespace is None:
            return list(self.cache.values())
        return [o for (ns, _), o in self.cache.items() if ns == namespace]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"informer-{self.gvr.plural}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def _emit(self, kind: str, obj: JSON, old: JSON | None) -> None:
        for h in self._handlers:
            try:
                h(kind, obj, old)
            except Exception:
                log.exception("informer handler failed for %s", self.gvr.plural)

    async def _relist(self) -> str:
        result = await self.client.list(self.gvr, self.namespace, **self._params)
        fresh = {key_of(o): o for o in result.get("items", [])}
        for k, old in list(self.cache.items()):
            if k not in fresh:
                del self.cache[k]
                self._emit("DELETED", old, old)
        for k, obj in fresh.items():
            old = self.cache.get(k)
            self.cache[k] = obj
            if old is None:
                self._emit("ADDED", obj, None)
            elif old["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self._emit("MODIFIED", obj, old)
        self.synced.set()
        return str(result.get("metadata", {}).get("resourceVersion", ""))

    async def _run(self) -> None:
        backoff = 0.2
        rv = ""
        while True:
            try:
                if not rv:
                    rv = await self._relist()
                async for ev in self.client.watch(self.gvr, self.namespace, resource_version=rv,
                                                  timeout_seconds=300 + random.randint(0, 60), **self._params):
                    etype, obj = ev["type"], ev["object"]
                    if etype == "ERROR":
                        rv = ""  # 410 Gone: the history we asked for is compacted; re-list
                        break
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if etype == "BOOKMARK":
                        continue
                    k = key_of(obj)
                    old = self.cache.get(k)
                    if etype == "DELETED":
                        self.cache.pop(k, None)
                    else:
                        self.cache[k] = obj
                    self._emit(etype, obj, old)
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except rest.APIError as exc:
                if exc.code == 410:
                    rv = ""
                    continue
                log.warning("watch %s failed: %s", self.gvr.plural, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)
            except Exception as exc:
                log.warning("watch %s interrupted: %s", self.gvr.plural, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)
                rv = ""


class WorkQueue:
    """Keys to reconcile; `workers` tasks run `reconcile(key)`, one key at a time per key."""

    def __init__(self, reconcile: Callable[[Key], Awaitable[float | None]], *, workers: int = 4,
                 name: str = "queue") -> None:
        self._reconcile = reconcile
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._active: set[Key] = set()
        self._dirty: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._workers = workers
        self._name = name
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()

    def add(self, key: Key) -> None:
        if key in self._active:
            self._dirty.add(key)  # re-run after the current pass finishes
            return
        if key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: Key, delay: float) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._timers.discard(handle)
            self.add(key)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def start(self) -> None:
        for i in range(self._workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"{self._name}-worker-{i}"))

    async def stop(self) -> None:
        for h in self._timers:
            h.cancel()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t

    async def _worker(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            try:
                requeue_after = await self._reconcile(key)
                self._failures.pop(key, None)
                if requeue_after is not None:
                    self.add_after(key, requeue_after)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                n = self._failures.get(key, 0) + 1
                self._failures[key] = n
                delay = min(0.05 * (2 ** n), 30.0)
                log.warning("%s: reconcile %s failed (attempt %d, retry in %.2fs): %s",
                            self._name, key, n, delay, exc)
                self.add_after(key, delay)
            finally:
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)
