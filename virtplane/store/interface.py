"""The storage contract every backend implements: etcd semantics, in the manner of kine.

One global revision counter; every successful write (create, update, delete) takes the next
revision, and that revision is the object's `resourceVersion`. Values are opaque bytes (the
API server stores JSON without `metadata.resourceVersion`; it injects the revision on read).

Watch delivers every write with revision > `after_revision` on keys under a prefix, in
revision order, first from the retained history, then live. History older than the compact
revision is gone: a watch that asks for it gets `CompactedError` (the API server turns it into
`410 Gone`).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import AsyncIterator


@dataclasses.dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int


class EventType(enum.Enum):
    PUT = "PUT"  # a create (kv.create_revision == kv.mod_revision) or an update
    DELETE = "DELETE"  # kv holds the last value; kv.mod_revision is the revision of the delete


@dataclasses.dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclasses.dataclass(frozen=True, slots=True)
class ListResult:
    kvs: list[KeyValue]
    revision: int  # the store revision the list was read at
    more: bool  # True when `limit` cut the result short


class StoreError(Exception):
    """Base of every store error; `__cause__` carries the backend's root cause."""


class KeyExistsError(StoreError):
    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} already exists")
        self.key = key


class KeyNotFoundError(StoreError):
    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} not found")
        self.key = key


class ConflictError(StoreError):
    """Compare-and-swap failed: the key's mod_revision is not the expected one."""

    def __init__(self, key: str, expected: int, current: KeyValue | None) -> None:
        super().__init__(
            f"key {key!r}: expected revision {expected}, "
            f"found {current.mod_revision if current else 'no key'}"
        )
        self.key = key
        self.expected = expected
        self.current = current


class CompactedError(StoreError):
    def __init__(self, requested: int, compact_revision: int) -> None:
        super().__init__(f"revision {requested} is compacted (oldest retained: {compact_revision + 1})")
        self.requested = requested
        self.compact_revision = compact_revision


class WatchClosedError(StoreError):
    """The watch fell too far behind (its buffer overflowed) or the store closed; re-list."""


class Watch(abc.ABC):
    """An async iterator of events; `close()` ends it (idempotent)."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[WatchEvent]: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class Store(abc.ABC):
    """A key-value store with etcd's revision semantics. Keys are `/`-separated strings."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Open files/connections, create schema, recover. Called once before use."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and release everything; open watches end with WatchClosedError."""

    @abc.abstractmethod
    async def current_revision(self) -> int: ...

    @property
    @abc.abstractmethod
    def compact_revision(self) -> int:
        """Revisions <= this are no longer retained for watch."""

    @abc.abstractmethod
    async def get(self, key: str) -> KeyValue | None: ...

    @abc.abstractmethod
    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 0) -> ListResult:
        """Live keys starting with `prefix`, ordered by key, after `start_after` when given.

        limit=0 means no limit. `more` tells whether keys remain after the last one returned.
        """

    @abc.abstractmethod
    async def count(self, prefix: str) -> int: ...

    @abc.abstractmethod
    async def create(self, key: str, value: bytes) -> KeyValue:
        """Raises KeyExistsError when the key is live."""

    @abc.abstractmethod
    async def update(self, key: str, value: bytes, *, expected_revision: int) -> KeyValue:
        """Compare-and-swap on mod_revision. Raises KeyNotFoundError or ConflictError."""

    @abc.abstractmethod
    async def delete(self, key: str, *, expected_revision: int | None = None) -> KeyValue:
        """Delete; returns the deleted value with mod_revision = the delete's revision.

        With expected_revision, compare-and-swap as update. Raises KeyNotFoundError / ConflictError.
        """

    @abc.abstractmethod
    def watch(self, prefix: str, *, after_revision: int) -> Watch:
        """Events on keys under `prefix` with revision > after_revision.

        Raises CompactedError (at creation or on first iteration) when after_revision <
        compact_revision. after_revision=0 is not allowed to mean "all history"; callers pass
        the revision of a list they just did.
        """

    @abc.abstractmethod
    async def compact(self, revision: int) -> None:
        """Forget history at or below `revision` (never the live values)."""
