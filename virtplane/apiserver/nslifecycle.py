"""Which namespaces exist and which are terminating, for the check every namespaced create makes.

kube-apiserver's NamespaceLifecycle admission answers it from an informer; reading the namespace from the store
on each create cost about a tenth of a create here. `NamespaceStates` is that informer over the raw store: a
watch on the namespaces' key prefix keeps the entries current, and a miss (a namespace not seen since the watch
started) is read from the store and remembered.

Every entry carries the revision it was learnt at, and nothing older replaces it: a read that raced a later
event cannot bring back a state the watch has already moved past. Writes through this API server record their
revision with no state ("read the store"), so this server never admits into a namespace it has itself just
marked for deletion, whatever its watch has processed yet. While the watch is not running (not started, or
restarting after an error) every check reads the store.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from virtplane.store import interface as store_api

log = logging.getLogger(__name__)

OPEN, TERMINATING, GONE = "open", "terminating", "gone"


def namespace_state(kv: store_api.KeyValue) -> str:
    """A namespace being deleted has metadata.deletionTimestamp set (the byte test spares the decode)."""
    if b'"deletionTimestamp"' in kv.value and (orjson.loads(kv.value).get("metadata") or {}).get("deletionTimestamp"):
        return TERMINATING
    return OPEN


class NamespaceStates:
    def __init__(self, store: store_api.Store, prefix: str) -> None:
        self._store = store
        self._prefix = prefix
        # key -> (revision learnt at, state or None: must be read from the store)
        self._known: dict[str, tuple[int, str | None]] = {}
        self._live = False

    def lookup(self, key: str) -> str | None:
        """OPEN, TERMINATING or GONE when known for certain; None: read the store (then `remember`)."""
        if not self._live:
            return None
        entry = self._known.get(key)
        return entry[1] if entry is not None else None

    def remember(self, kv: store_api.KeyValue | None) -> None:
        """What a store read found (None: no such namespace). A key's events carry its mod_revision, so the two
        compare exactly: an entry at a higher revision is newer than this read."""
        if not self._live or kv is None:
            return  # an absent namespace is not cached: it may be created any moment by another server
        entry = self._known.get(kv.key)
        if entry is None or entry[0] <= kv.mod_revision:
            self._known[kv.key] = (kv.mod_revision, namespace_state(kv))

    def written(self, kv: store_api.KeyValue) -> None:
        """This server wrote a namespace at kv.mod_revision: read it from the store until the watch is past it."""
        if kv.key.startswith(self._prefix):
            entry = self._known.get(kv.key)
            if entry is None or entry[0] < kv.mod_revision:
                self._known[kv.key] = (kv.mod_revision, None)

    def _apply(self, event: store_api.WatchEvent) -> None:
        key = event.kv.key
        entry = self._known.get(key)
        if entry is not None and entry[0] > event.revision:
            return
        deleted = event.type is store_api.EventType.DELETE
        self._known[key] = (event.revision, GONE if deleted else namespace_state(event.kv))

    async def run(self) -> None:
        """Keeps the entries current until cancelled; restarts its watch after any failure."""
        while True:
            watch: store_api.Watch | None = None
            try:
                revision = await self._store.current_revision()
                watch = self._store.watch(self._prefix, after_revision=revision)
                self._known.clear()
                self._live = True
                async for event in watch:
                    self._apply(event)
                raise store_api.WatchClosedError("the namespaces watch ended")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("namespace watch failed; namespace checks read the store until it restarts",
                            exc_info=True)
                await asyncio.sleep(1)
            finally:
                self._live = False
                self._known.clear()
                if watch is not None:
                    await watch.close()
