"""The etcd backend: the store contract on etcd v3 itself, so several API servers share one store.

The contract *is* etcd's model, so every operation maps onto one etcd request, spoken as JSON to
etcd's gRPC gateway (``/v3/...``, served on the client port since etcd 3.4) over aiohttp: no gRPC
stack, no generated code. Keys and values travel base64-encoded; int64 fields come back as
strings and zero values are omitted (proto3 JSON), which `_int` and the ``.get`` defaults absorb.

=============================  ==============================================================
contract                       etcd
=============================  ==============================================================
revision / resourceVersion     the cluster's revision; a key's ``mod_revision``
create                         txn: compare ``create_revision(key) == 0`` -> put
update / delete with CAS       txn: compare ``version > 0`` and ``mod_revision == expected``;
                               on failure the txn reads the key, which tells NotFound from
                               Conflict (and gives ConflictError its current value) in the
                               same round trip
list / count                   range ``[prefix, prefix_end)`` with ``limit`` / ``count_only``;
                               ``start_after`` starts the range at ``start_after + "\\0"``, the
                               smallest key after it
current_revision               the header of a one-key range (linearizable)
watch                          streaming ``POST /v3/watch`` from ``after_revision + 1``, with
                               ``prev_kv`` (a DELETE's value comes from it); watches that need
                               the same events share one stream (`_Feed`)
compact                        ``/v3/kv/compaction`` (physical: it returns once done)
=============================  ==============================================================

Keys are stored as ``prefix + key`` (``?prefix=``, default ``/virtplane``), so one etcd can
hold several deployments, or other tenants, side by side; as with kube-apiserver's
``--etcd-prefix``, no prefix may be a string prefix of another deployment's.

Off-by-one to know: etcd's ``compact(C)`` drops revisions *below* C and still serves a watch
from C; the contract says revisions *at or below* the compact revision are gone. This backend
reports etcd's C as its compact revision and refuses, on its own, watches with
``after_revision < C``; a compaction made by another client is only learnt when etcd refuses a
watch (it names C) or at start (`_probe_compact_revision`), so until then etcd may serve one
revision more than the contract promises, never less.

Failure handling: a request that never reached an endpoint (connection refused, connect
timeout) goes to the next endpoint of the URL, in order, and the endpoint that answered last is
tried first next time. Reads and compactions are also retried on the next endpoint after a
failure mid-request; a write is not, because it may have been applied (etcd's own clients
don't retry those either): the caller gets a StoreError saying so. Watches reconnect from the
last revision they delivered, through the same failover, for up to `reconnect_timeout`.

Watch streams are shared: the API server opens a store watch per client watch, often
hundreds on one resource, and a stream each would cost etcd a sender and this process a JSON
decode per event per watch (bench/store_etcd.py, 100 watchers, a write every 2 ms, on a busy
2-core machine: p99 delivery 239 ms with a stream each, 15-31 ms shared). A watch joins a
stream on its prefix that has not yet delivered anything it needs and is not replaying history;
otherwise it gets a stream of its own, which merges into the shared one once both stand at the
same revision.

Auto-compaction is time based as in the SQLite backend (default: keep 5 minutes). It compacts
the whole etcd keyspace (etcd has one revision history), as kube-apiserver does. Several API
servers each run it; the one behind finds the work done (etcd answers "already compacted",
a no-op). kube-apiserver elects one compactor per interval with a CAS on a key; with
a handful of servers the duplicate no-op request is cheaper than a key outside the prefix.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import collections
import json
import logging
import math
import socket
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp

from virtplane.store import interface

logger = logging.getLogger(__name__)

JSON = dict[str, Any]

DEFAULT_PORT = 2379
DEFAULT_PREFIX = "/virtplane"

# gRPC status codes, as the gateway passes them through in {"error": ..., "code": N}.
GRPC_OUT_OF_RANGE = 11  # mvcc: compacted / future revision
GRPC_UNAVAILABLE = 14  # no leader, member stopping, ...

# A compaction with physical=true answers once etcd has deleted the history: on a large
# history that takes longer than an ordinary request may.
COMPACT_TIMEOUT = 300.0

# Watch reconnect backoff, seconds: first retry almost at once (a member restarting or a
# leader change), then at most every MAX.
RECONNECT_BACKOFF_MIN = 0.05
RECONNECT_BACKOFF_MAX = 2.0


class EtcdError(Exception):
    """An error etcd (or its gateway) answered with; chained as the cause of a StoreError."""

    def __init__(self, endpoint: str, path: str, http_status: int, code: int, message: str) -> None:
        super().__init__(f"{endpoint}{path}: {message} (HTTP {http_status}, gRPC code {code})")
        self.endpoint = endpoint
        self.path = path
        self.http_status = http_status
        self.code = code
        self.message = message


class TxnFailed(Exception):
    """A transaction's compare failed; chained as the cause of KeyExists/KeyNotFound/Conflict."""

    def __init__(self, key: str, compare: builtins.list[JSON], revision: int) -> None:
        conditions = ", ".join(f"{c['target'].lower()} {c['result'].lower()} {_compare_value(c)}" for c in compare)
        super().__init__(f"etcd txn on {key!r} failed at revision {revision}: {conditions}")
        self.key = key
        self.compare = compare
        self.revision = revision


class CompactionPolicy:
    """How far the background task may compact: the last `retain_revisions` revisions and the
    revisions written in the last `retain_seconds` are kept (either rule keeps what it keeps).

    The same rules as the SQLite backend's policy: time is sampled as (time, revision) on each
    tick, as kube-apiserver's compactor does, and a revision is old enough once a sample taken at
    least `retain_seconds` ago had reached it.
    """

    def __init__(self, *, retain_revisions: int | None = None, retain_seconds: float | None = None) -> None:
        if retain_revisions is not None and retain_revisions < 0:
            raise ValueError(f"retain_revisions must be >= 0, not {retain_revisions}")
        if retain_seconds is not None and retain_seconds < 0:
            raise ValueError(f"retain_seconds must be >= 0, not {retain_seconds}")
        self.retain_revisions = retain_revisions
        self.retain_seconds = retain_seconds
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    @property
    def enabled(self) -> bool:
        return self.retain_revisions is not None or self.retain_seconds is not None

    def target(self, *, now: float, revision: int) -> int:
        """Record a sample and return the revision it is safe to compact to (0: nothing)."""
        targets: builtins.list[int] = []
        if self.retain_revisions is not None:
            targets.append(revision - self.retain_revisions)
        if self.retain_seconds is not None:
            self._samples.append((now, revision))
            old_enough = 0
            while self._samples and self._samples[0][0] <= now - self.retain_seconds:
                old_enough = self._samples.popleft()[1]
            targets.append(old_enough)
        return max(0, min(targets)) if targets else 0


class EtcdStore(interface.Store):
    """`interface.Store` on an etcd v3 cluster (3.4+), through its JSON gateway."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = DEFAULT_PREFIX,
        retain_revisions: int | None = None,
        retain_seconds: float | None = 300.0,
        compact_interval: float = 60.0,
        watch_buffer: int = 10_000,
        request_timeout: float = 15.0,
        connect_timeout: float = 3.0,
        reconnect_timeout: float = 30.0,
        max_connections: int = 64,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        """
        endpoints: base URLs of etcd members' client ports (``http://host:2379``, or
            ``https://`` with TLS), tried in order.
        prefix: prepended to every key (see the module docstring).
        retain_revisions / retain_seconds / compact_interval: auto-compaction, as in the SQLite
            backend; None for both leaves compaction to `compact()` (or to etcd's own
            ``--auto-compaction-retention``).
        watch_buffer: events a watch may fall behind live writes before it ends with
            WatchClosedError (the consumer re-lists); history replayed on a stream of its
            own never overflows (see `_Feed`).
        request_timeout / connect_timeout: per request, seconds.
        reconnect_timeout: how long a broken watch keeps trying to reconnect before it ends
            with WatchClosedError.
        max_connections: pooled connections for requests (each watch has its own besides).
        ca_file / cert_file / key_file: TLS to etcd: the CA that signed its serving
            certificate (None: the system's) and a client certificate when etcd asks for one.
        """
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        for endpoint in endpoints:
            if urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
                raise ValueError(f"an etcd endpoint is an http(s):// URL, not {endpoint!r}")
        if compact_interval <= 0:
            raise ValueError(f"compact_interval must be > 0, not {compact_interval}")
        if watch_buffer < 1:
            raise ValueError(f"watch_buffer must be >= 1, not {watch_buffer}")
        for name, value in (("request_timeout", request_timeout), ("connect_timeout", connect_timeout),
                            ("reconnect_timeout", reconnect_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value}")
        if (cert_file is None) != (key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        self.endpoints = [endpoint.rstrip("/") for endpoint in endpoints]
        self.prefix = prefix
        self._prefix = prefix.encode()
        self.policy = CompactionPolicy(retain_revisions=retain_revisions, retain_seconds=retain_seconds)
        self.compact_interval = compact_interval
        self.watch_buffer = watch_buffer
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.max_connections = max_connections
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None
        self._preferred = 0  # index of the endpoint that answered last: tried first
        self._started = False
        self._closed = False
        self._compact_revision = 0
        # prefix -> the etcd watch streams on it; watches needing the same events share one.
        self._feeds: dict[str, builtins.list[_Feed]] = {}
        self._compactor: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<EtcdStore {','.join(self.endpoints)} prefix={self.prefix!r}>"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started or self._closed:
            raise interface.StoreError("EtcdStore.start() may be called once")
        self._started = True
        try:
            ssl_context = self._ssl_context()
        except (OSError, ssl.SSLError) as exc:  # ssl names neither the file nor which one
            files = ", ".join(f"{n}={f}" for n, f in (("cacert", self.ca_file), ("cert", self.cert_file),
                                                       ("key", self.key_file)) if f)
            raise interface.StoreError(f"etcd TLS files ({files}): {exc}") from exc
        # Two pools: requests share a bounded set of keep-alive connections; every watch holds
        # one connection for its lifetime, so watches get their own pool with no bound (the
        # API server runs hundreds) and can never starve requests of connections.
        self._session = _session(ssl_context, self.max_connections)
        self._watch_session = _session(ssl_context, 0)
        try:
            revision = await self.current_revision()
            self._compact_revision = await self._probe_compact_revision(revision)
        except BaseException:
            await self._close_sessions()
            self._closed = True
            raise
        if self.policy.enabled:
            self._compactor = asyncio.create_task(self._auto_compact(), name=f"compactor {self!r}")
        logger.debug("%r: revision %d, compacted %d", self, revision, self._compact_revision)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not any(urllib.parse.urlsplit(e).scheme == "https" for e in self.endpoints):
            return None
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._compactor is not None:
            self._compactor.cancel()
            await asyncio.wait([self._compactor])
            self._compactor = None
        feeds = [feed for feeds in self._feeds.values() for feed in feeds]
        for feed in feeds:
            feed.fail_all(lambda watch: interface.WatchClosedError("the store is closed"))
            feed.close()
        tasks = [feed.task for feed in feeds]
        if tasks:
            await asyncio.wait(tasks)
        await self._close_sessions()

    async def _close_sessions(self) -> None:
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()
        self._session = self._watch_session = None

    async def _probe_compact_revision(self, revision: int) -> int:
        """etcd's compact revision, which it does not report directly: the oldest revision a
        range may still read at (older ones answer "compacted"), found by bisection in about
        log2(revision) one-key reads, once at start."""
        low, high = 1, revision  # `high` is readable (the current revision always is)
        while low < high:
            middle = (low + high) // 2
            try:
                await self._range_at(middle)
            except interface.StoreError as exc:
                if not _is_compacted(exc):
                    raise
                low = middle + 1
            else:
                high = middle
        return high if high > 1 else 0  # reading at 1 means nothing was ever compacted away

    async def _range_at(self, revision: int) -> None:
        await self._call("/v3/kv/range", {"key": _b64(self._prefix or b"\0"), "revision": revision,
                                          "count_only": True}, idempotent=True)

    # -- requests ----------------------------------------------------------------------------

    def _sessions(self) -> tuple[aiohttp.ClientSession, aiohttp.ClientSession]:
        if self._session is None or self._watch_session is None:
            raise interface.StoreError("the store is closed" if self._closed else "the store is not started")
        return self._session, self._watch_session

    def _endpoint_order(self) -> builtins.list[tuple[int, str]]:
        n = len(self.endpoints)
        return [((self._preferred + i) % n, self.endpoints[(self._preferred + i) % n]) for i in range(n)]

    async def _call(self, path: str, body: JSON, *, idempotent: bool, deadline: float | None = None) -> JSON:
        """POST one request to the first endpoint that takes it; the decoded response.

        Raises StoreError; etcd's own errors are chained as EtcdError. `deadline`: seconds
        for this request instead of request_timeout.
        """
        self._sessions()
        payload = json.dumps(body, separators=(",", ":")).encode()
        client_timeout = aiohttp.ClientTimeout(total=deadline or self.request_timeout,
                                               sock_connect=self.connect_timeout)
        failures: builtins.list[str] = []
        last: BaseException | None = None
        for index, endpoint in self._endpoint_order():
            session, _ = self._sessions()  # closed meanwhile: say so, not "session is closed"
            try:
                async with session.post(endpoint + path, data=payload, timeout=client_timeout,
                                        headers={"Content-Type": "application/json"}) as resp:
                    status = resp.status
                    raw = await resp.read()
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if self._closed and task is not None and not task.cancelling():
                    # Closing the session cancels requests waiting for a connection: to the
                    # caller that is the store closing under it, not its own cancellation.
                    raise interface.StoreError("the store is closed") from exc
                raise
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Never reached the endpoint: nothing was applied, the next one may take it.
                failures.append(f"{endpoint}: {exc}")
                last = exc
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                if idempotent:
                    failures.append(f"{endpoint}: {exc!r}")
                    last = exc
                    continue
                raise interface.StoreError(
                    f"etcd {endpoint}{path}: {exc!r}; the write may or may not have been applied"
                ) from exc
            error = _response_error(endpoint, path, status, raw)
            if error is not None:
                if idempotent and error.code == GRPC_UNAVAILABLE:  # e.g. a member without a leader
                    failures.append(str(error))
                    last = error
                    continue
                raise interface.StoreError(f"etcd: {error.message}") from error
            self._preferred = index
            try:
                decoded: JSON = json.loads(raw)
            except ValueError as exc:
                raise interface.StoreError(f"etcd {endpoint}{path}: undecodable response {raw[:200]!r}") from exc
            return decoded
        raise interface.StoreError(f"no etcd endpoint answered {path}: {'; '.join(failures)}") from last

    async def _txn(self, compare: builtins.list[JSON], success: builtins.list[JSON],
                   failure: builtins.list[JSON]) -> JSON:
        return await self._call("/v3/kv/txn", {"compare": compare, "success": success, "failure": failure},
                                idempotent=False)

    # -- keys --------------------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        try:
            return self._prefix + key.encode()
        except UnicodeEncodeError as exc:
            raise ValueError(f"a key is valid Unicode, not {key!r}") from exc

    def _kv(self, data: JSON) -> interface.KeyValue:
        return interface.KeyValue(
            self._user_key(data["key"]),
            base64.b64decode(data.get("value", "")),
            _int(data.get("create_revision")),
            _int(data.get("mod_revision")),
        )

    def _user_key(self, encoded: str) -> str:
        raw = base64.b64decode(encoded)
        if not raw.startswith(self._prefix):  # etcd answered a range we did not ask for
            raise interface.StoreError(f"etcd returned key {raw!r} outside prefix {self.prefix!r}")
        try:
            return raw[len(self._prefix):].decode()
        except UnicodeDecodeError as exc:
            raise interface.StoreError(f"etcd key {raw!r} under {self.prefix!r} is not UTF-8") from exc

    def _range(self, prefix: str, start_after: str | None) -> tuple[bytes, bytes]:
        """[key, range_end) for the live keys under `prefix`, after `start_after` when given."""
        full = self._key(prefix)
        end = _prefix_end(full)
        if start_after is not None and start_after >= prefix:
            # The smallest key greater than start_after. (Past the end of the prefix, etcd
            # answers a range whose start is above its end with nothing, which is right.)
            return self._key(start_after) + b"\0", end
        return full or b"\0", end

    # -- reads -------------------------------------------------------------------------------

    async def current_revision(self) -> int:
        resp = await self._call("/v3/kv/range", {"key": _b64(self._prefix or b"\0"), "count_only": True},
                                idempotent=True)
        return _revision(resp)

    @property
    def compact_revision(self) -> int:
        return self._compact_revision

    async def get(self, key: str) -> interface.KeyValue | None:
        resp = await self._call("/v3/kv/range", {"key": _b64(self._key(_check_key(key)))}, idempotent=True)
        kvs = resp.get("kvs")
        return self._kv(kvs[0]) if kvs else None

    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 0) -> interface.ListResult:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        start, end = self._range(prefix, start_after)
        body: JSON = {"key": _b64(start), "range_end": _b64(end)}
        if limit:
            body["limit"] = limit
        resp = await self._call("/v3/kv/range", body, idempotent=True)
        return interface.ListResult(
            kvs=[self._kv(kv) for kv in resp.get("kvs", ())],
            revision=_revision(resp),
            more=bool(resp.get("more", False)),
        )

    async def count(self, prefix: str) -> int:
        start, end = self._range(prefix, None)
        resp = await self._call("/v3/kv/range", {"key": _b64(start), "range_end": _b64(end), "count_only": True},
                                idempotent=True)
        return _int(resp.get("count"))

    # -- writes ------------------------------------------------------------------------------

    async def create(self, key: str, value: bytes) -> interface.KeyValue:
        key, value = _check(key, value)
        k = _b64(self._key(key))
        compare = [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": 0}]
        resp = await self._txn(compare, [{"request_put": {"key": k, "value": _b64(value)}}], [])
        revision = _revision(resp)
        if not resp.get("succeeded"):
            raise interface.KeyExistsError(key) from TxnFailed(key, compare, revision)
        return interface.KeyValue(key, value, revision, revision)

    async def update(self, key: str, value: bytes, *, expected_revision: int) -> interface.KeyValue:
        key, value = _check(key, value)
        k = _b64(self._key(key))
        compare = self._cas(k, expected_revision)
        resp = await self._txn(
            compare,
            [{"request_put": {"key": k, "value": _b64(value), "prev_kv": True}}],
            [{"request_range": {"key": k}}],
        )
        prev = self._outcome(key, resp, compare, expected_revision, "response_put")
        return interface.KeyValue(key, value, prev.create_revision, _revision(resp))

    async def delete(self, key: str, *, expected_revision: int | None = None) -> interface.KeyValue:
        key = _check_key(key)
        k = _b64(self._key(key))
        compare = self._cas(k, expected_revision)
        resp = await self._txn(
            compare,
            [{"request_delete_range": {"key": k, "prev_kv": True}}],
            [{"request_range": {"key": k}}],
        )
        prev = self._outcome(key, resp, compare, expected_revision, "response_delete_range")
        return interface.KeyValue(key, prev.value, prev.create_revision, _revision(resp))

    @staticmethod
    def _cas(k: str, expected_revision: int | None) -> builtins.list[JSON]:
        # version > 0: the key is live. Without it, expected_revision=0 would match a missing key
        # (whose mod_revision reads as 0) and an "update" would create it.
        compare: builtins.list[JSON] = [{"key": k, "target": "VERSION", "result": "GREATER", "version": 0}]
        if expected_revision is not None:
            compare.append({"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": expected_revision})
        return compare

    def _outcome(self, key: str, resp: JSON, compare: builtins.list[JSON], expected: int | None,
                 response: str) -> interface.KeyValue:
        """The replaced value of a successful CAS txn, or the error a failed one means."""
        revision = _revision(resp)
        responses = resp.get("responses") or [{}]
        if not resp.get("succeeded"):
            kvs = responses[0].get("response_range", {}).get("kvs")
            cause = TxnFailed(key, compare, revision)
            if not kvs:
                raise interface.KeyNotFoundError(key) from cause
            raise interface.ConflictError(key, expected if expected is not None else 0, self._kv(kvs[0])) from cause
        reply = responses[0].get(response, {})
        prev = reply.get("prev_kv") or (reply.get("prev_kvs") or [None])[0]
        if prev is None:  # etcd always sends it when asked and the compare saw the key live
            raise interface.StoreError(f"etcd txn on {key!r} at {revision}: no previous value in {resp!r}")
        return self._kv(prev)

    # -- watch -------------------------------------------------------------------------------

    def watch(self, prefix: str, *, after_revision: int) -> interface.Watch:
        """See `interface.Store.watch`. after_revision=0 is every retained event, as on a fresh
        etcd; a compaction etcd reports while the watch starts ends it with CompactedError."""
        self._sessions()
        if after_revision < 0:
            raise ValueError(f"after_revision must be >= 0, not {after_revision}")
        if after_revision < self._compact_revision:
            raise interface.CompactedError(after_revision, self._compact_revision)
        watch = _EtcdWatch(self, prefix, after_revision)
        self._feed_for(prefix, after_revision).add(watch)
        return watch

    def _feed_for(self, prefix: str, after_revision: int) -> _Feed:
        """A stream that will deliver every event after `after_revision`: a shared one when one
        can, else a new one that starts right after it.

        A stream can take a watch when it has delivered nothing the watch needs yet (its
        position is at or below after_revision) and it will not hold the watch back: it is
        live (history replayed), or it has not started and starts exactly where the watch does
        (watches opened together after one list). Joining a stream that is still replaying
        would tie the newcomer to the pace of whoever is replaying.
        """
        feeds = self._feeds.setdefault(prefix, [])
        fits = [f for f in feeds if f.position <= after_revision and (f.live or (
            f.history_end is None and f.position == after_revision))]
        if fits:
            return max(fits, key=lambda f: f.position)
        feed = _Feed(self, prefix, after_revision)
        feeds.append(feed)
        return feed

    def _merge(self, feed: _Feed) -> None:
        """Two live streams on one prefix at the same position will deliver the same events from
        here on: hand this one's watches to the other and close it. Streams started at
        different revisions (a watch resuming from an older list) so converge onto one once
        they caught up, and N watches cost one etcd stream and one decode per event."""
        if not feed.live:
            return
        for other in self._feeds.get(feed.prefix, ()):
            if other is not feed and other.live and other.position == feed.position:
                for watch in tuple(feed.watches):
                    feed.watches.discard(watch)
                    other.add(watch)
                feed.close()
                return

    def _drop_feed(self, feed: _Feed) -> None:
        feeds = self._feeds.get(feed.prefix)
        if feeds is not None and feed in feeds:
            feeds.remove(feed)
            if not feeds:
                del self._feeds[feed.prefix]

    def _watch_request(self, prefix: str, start_revision: int) -> bytes:
        start, end = self._range(prefix, None)
        request = {"create_request": {"key": _b64(start), "range_end": _b64(end),
                                      "start_revision": start_revision, "prev_kv": True}}
        return json.dumps(request, separators=(",", ":")).encode()

    async def _open_watch(self, prefix: str, start_revision: int) -> aiohttp.ClientResponse:
        """A streaming watch response from the first endpoint that takes it (the caller
        releases it). Watches are reads: any failure moves on to the next endpoint."""
        _, session = self._sessions()
        payload = self._watch_request(prefix, start_revision)
        # No read timeout: an idle watch is silent; TCP keepalive (see _session) notices a peer
        # that vanished.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout,
                                        connect=self.request_timeout, sock_read=None)
        failures: builtins.list[str] = []
        last: BaseException | None = None
        for index, endpoint in self._endpoint_order():
            try:
                resp = await session.post(endpoint + "/v3/watch", data=payload, timeout=timeout,
                                          headers={"Content-Type": "application/json"})
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(f"{endpoint}: {exc!r}")
                last = exc
                continue
            if resp.status != 200:
                raw = await resp.read()
                resp.release()
                error = _response_error(endpoint, "/v3/watch", resp.status, raw) or EtcdError(
                    endpoint, "/v3/watch", resp.status, -1, raw[:200].decode(errors="replace"))
                failures.append(str(error))
                last = error
                continue
            self._preferred = index
            return resp
        raise interface.StoreError(f"no etcd endpoint took a watch: {'; '.join(failures)}") from last

    def _event(self, data: JSON) -> interface.WatchEvent:
        prev_data = data.get("prev_kv")
        prev = self._kv(prev_data) if prev_data else None
        if data.get("type") == "DELETE":
            # etcd's tombstone holds only the key and the delete's revision; the contract's
            # DELETE carries the last value, which is prev_kv (asked for on every watch).
            kv = interface.KeyValue(
                self._user_key(data["kv"]["key"]),
                prev.value if prev else b"",
                prev.create_revision if prev else 0,
                _int(data["kv"].get("mod_revision")),
            )
            return interface.WatchEvent(interface.EventType.DELETE, kv, prev)
        return interface.WatchEvent(interface.EventType.PUT, self._kv(data["kv"]), prev)

    def _learnt_compaction(self, compact_revision: int) -> None:
        self._compact_revision = max(self._compact_revision, compact_revision)

    # -- compaction --------------------------------------------------------------------------

    async def compact(self, revision: int) -> None:
        """Forget history below `revision` in etcd (see the module docstring for the off-by-one).
        A revision already compacted is a no-op; one above the current revision raises ValueError.
        """
        if revision <= self._compact_revision:
            return
        try:
            await self._call("/v3/kv/compaction", {"revision": revision, "physical": True}, idempotent=True,
                             deadline=max(COMPACT_TIMEOUT, self.request_timeout))
        except interface.StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, EtcdError) and "future revision" in cause.message:
                raise ValueError(f"cannot compact to {revision}: {cause.message}") from exc
            if not _is_compacted(exc):  # compacted further already, by another server: done
                raise
        self._learnt_compaction(revision)
        logger.debug("%r: compacted to revision %d", self, revision)

    async def _auto_compact(self) -> None:
        while True:
            await asyncio.sleep(self.compact_interval)
            try:
                target = self.policy.target(now=time.monotonic(), revision=await self.current_revision())
                if target > self._compact_revision:
                    await self.compact(target)
            except interface.StoreError as exc:
                # etcd unreachable for now: the store reports that to its callers; try next tick.
                logger.warning("%r: auto-compaction failed: %s", self, exc)


class _Ended(Exception):
    """Unwinds a stream's reader once the stream has closed (no watch left, merged, failed)."""


class _Feed:
    """One etcd watch stream on a prefix, delivering to every watch subscribed to it.

    Invariant: every event at or below `position` has been delivered to the subscribers, and
    every later one will be, in order. A reconnect after a break resumes at position + 1, so
    events are neither lost nor repeated; all events of one revision (a multi-key txn by
    another client) arrive in one message, which is delivered whole before position moves on.

    Events at or below `history_end` (the revision etcd reported when the stream was created)
    are history being replayed. With one watch on the stream, the reader waits for its
    consumer rather than overflow, and etcd holds the rest (its "unsynced" watchers), so a long
    replay needs no large buffer. Live events, and history shared by several watches (a
    reconnect's catch-up), never wait for one consumer: a watch that falls `watch_buffer`
    events behind is ended with WatchClosedError, as with the SQLite backend, and re-lists.
    """

    def __init__(self, store: EtcdStore, prefix: str, after_revision: int) -> None:
        self._store = store
        self.prefix = prefix
        self.position = after_revision
        self.history_end: int | None = None  # unknown until etcd has created the stream
        self.watches: set[_EtcdWatch] = set()
        self.room = asyncio.Event()  # set by a consumer that drained below its replay limit
        self.closed = False
        self._connected = False  # the current stream was created: a break after it is a new outage
        self.task: asyncio.Task[None] = asyncio.create_task(
            self._run(), name=f"etcd watch {prefix!r} after {after_revision}"
        )

    @property
    def live(self) -> bool:
        return not self.closed and self.history_end is not None and self.position >= self.history_end

    def add(self, watch: _EtcdWatch) -> None:
        self.watches.add(watch)
        watch._feed = self

    def remove(self, watch: _EtcdWatch) -> None:
        self.watches.discard(watch)
        if not self.watches:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.room.set()  # a reader waiting for room finds the stream closed
        self._store._drop_feed(self)
        if self.task is not asyncio.current_task():
            self.task.cancel()  # closes its HTTP stream, which ends etcd's side of the watch

    def fail_all(self, error: Callable[[_EtcdWatch], interface.StoreError]) -> None:
        # One exception object per watch: each is raised in its consumer's task, which
        # writes its own traceback into it.
        for watch in tuple(self.watches):
            watch._fail(error(watch))

    # -- the reader --------------------------------------------------------------------------

    async def _run(self) -> None:
        store = self._store
        backoff = RECONNECT_BACKOFF_MIN
        broken_since: float | None = None
        try:
            while not self.closed:
                self._connected = False
                cause: BaseException
                try:
                    resp = await store._open_watch(self.prefix, self.position + 1)
                except interface.StoreError as exc:  # no endpoint took it
                    cause = exc
                else:
                    try:
                        await self._read(resp)
                        cause = ConnectionResetError("etcd ended the watch stream")
                    except (aiohttp.ClientError, OSError) as exc:  # the stream broke
                        cause = exc
                    finally:
                        resp.close()  # mid-stream: the connection is not reusable, drop it
                if self.closed:
                    return
                # Until the new stream is created, it is not known how much it will replay.
                self.history_end = None
                now = time.monotonic()
                if self._connected or broken_since is None:
                    # A first failure, or the last stream had worked: a new outage starts now.
                    backoff, broken_since = RECONNECT_BACKOFF_MIN, now
                if now - broken_since > store.reconnect_timeout:
                    message = (f"watch on {self.prefix!r}: no etcd stream for {now - broken_since:.0f}s "
                               f"(after revision {self.position}); re-list")
                    self.fail_all(lambda w, m=message, c=cause: _chained(interface.WatchClosedError(m), c))
                    return
                logger.info("watch on %r after %d broke (%s); reconnecting", self.prefix, self.position, cause)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX)
        except _Ended:
            return
        except interface.CompactedError as exc:
            self.fail_all(lambda w, c=exc.compact_revision: interface.CompactedError(w._received, c))
        except Exception as exc:
            # Something etcd sent that this code cannot read: reconnecting would read it again.
            # End the watches so their consumers hear of it instead of waiting forever.
            message = f"watch on {self.prefix!r} after {self.position}: {exc!r}"
            self.fail_all(lambda w, m=message, c=exc: _chained(interface.StoreError(m), c))
        finally:
            self.close()

    async def _read(self, resp: aiohttp.ClientResponse) -> None:
        """Read newline-delimited JSON messages off the stream until it ends.

        Lines are split here rather than with readline(): aiohttp refuses a line longer than its
        read buffer (64 KiB), and one watch message can carry several large objects.
        """
        buffer = bytearray()
        async for chunk in resp.content.iter_any():
            scan = len(buffer)
            buffer += chunk
            while (newline := buffer.find(b"\n", scan)) >= 0:
                line = bytes(buffer[:newline])
                del buffer[: newline + 1]
                scan = 0
                if line.strip():
                    await self._message(json.loads(line))
        # The gateway ends every message with a newline: anything left is a message cut off by
        # the break, and the next stream sends it again.

    async def _message(self, message: JSON) -> None:
        if "error" in message:
            error = message["error"]
            detail = error.get("message", error) if isinstance(error, dict) else error
            raise ConnectionResetError(f"etcd watch stream error: {detail}")
        result = message.get("result", {})
        compact_revision = _int(result.get("compact_revision"))
        if compact_revision:
            # History this stream needs is gone (etcd cancels the watch and says how far).
            self._store._learnt_compaction(compact_revision)
            raise interface.CompactedError(self.position, compact_revision)
        if result.get("created"):
            self.history_end = _revision(result)
            self._connected = True
        if result.get("canceled"):
            raise ConnectionResetError(f"etcd canceled the watch: {result.get('cancel_reason', 'no reason given')}")
        for data in result.get("events", ()):
            await self._deliver(self._store._event(data))
        self._store._merge(self)
        if self.closed:
            raise _Ended

    async def _deliver(self, event: interface.WatchEvent) -> None:
        history = self.history_end is not None and event.revision <= self.history_end
        if history and len(self.watches) == 1:
            (watch,) = self.watches
            while len(watch._buffer) >= watch._replay_limit:
                self.room.clear()
                await self.room.wait()
                if self.closed:
                    raise _Ended
        for watch in tuple(self.watches):
            watch._push(event)  # a watch that overflows leaves the stream
        if self.closed:
            raise _Ended
        self.position = event.revision


class _EtcdWatch(interface.Watch, AsyncIterator[interface.WatchEvent]):
    """One watch: a buffer filled by the stream (`_Feed`) it is subscribed to, drained by its
    consumer."""

    def __init__(self, store: EtcdStore, prefix: str, after_revision: int) -> None:
        self._store = store
        self.prefix = prefix
        self._after_revision = after_revision  # its stream may be behind: events up to here are not its
        self._received = after_revision  # the last revision buffered
        self._buffer: collections.deque[interface.WatchEvent] = collections.deque()
        # Replay fills the buffer only halfway: when it turns live, a consumer keeping up has
        # room for a burst of live events without overflowing.
        self._replay_limit = max(1, store.watch_buffer // 2)
        self._feed: _Feed | None = None
        self._stream_task: asyncio.Task[None] | None = None  # set when leaving closed the stream
        self._waiter: asyncio.Future[None] | None = None
        self._error: interface.StoreError | None = None
        self._closed = False

    def __aiter__(self) -> AsyncIterator[interface.WatchEvent]:
        return self

    async def __anext__(self) -> interface.WatchEvent:
        while True:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise StopAsyncIteration
            if self._buffer:
                event = self._buffer.popleft()
                if len(self._buffer) < self._replay_limit and self._feed is not None:
                    self._feed.room.set()
                return event
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _push(self, event: interface.WatchEvent) -> None:
        if event.revision <= self._after_revision:
            return
        if len(self._buffer) >= self._store.watch_buffer:
            self._fail(interface.WatchClosedError(
                f"watch on {self.prefix!r} fell {len(self._buffer)} events behind; re-list"))
            return
        self._buffer.append(event)
        self._received = event.revision
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: interface.StoreError) -> None:
        if self._closed:
            return
        self._error = error
        self._end()

    def _end(self) -> None:
        self._closed = True
        self._buffer.clear()
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.remove(self)
            if feed.closed:  # it was the stream's last watch: close() waits for the stream to end
                self._stream_task = feed.task
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def close(self) -> None:
        if not self._closed:
            self._end()
        task = self._stream_task
        if task is not None and task is not asyncio.current_task():
            # asyncio.wait, not `await task`: it neither raises the task's CancelledError nor
            # swallows a cancellation of the caller.
            await asyncio.wait([task])


# -- helpers ---------------------------------------------------------------------------------


def _chained(error: interface.StoreError, cause: BaseException) -> interface.StoreError:
    error.__cause__ = cause
    return error


def _session(ssl_context: ssl.SSLContext | None, limit: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=limit, ssl=ssl_context if ssl_context is not None else True, socket_factory=_keepalive_socket,
    )
    # A 1 MiB value is ~1.4 MB of base64 in a response; the default 64 KiB read buffer works
    # but a larger one takes fewer wakeups per large read.
    # etcd sets no cookies; a jar would only cost a lookup per response.
    return aiohttp.ClientSession(connector=connector, read_bufsize=1 << 18, cookie_jar=aiohttp.DummyCookieJar())


def _keepalive_socket(addr_info: Any) -> socket.socket:
    """A client socket with TCP keepalive: a watch idles for as long as nothing is written, and
    without probes a member that vanished without a FIN/RST (host down, partition) would leave
    it waiting forever. Here the kernel gives up after ~20 + 3 * 5 seconds."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 20), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return sock


def _response_error(endpoint: str, path: str, status: int, raw: bytes) -> EtcdError | None:
    """The error in a gateway response, if any: {"error": ..., "code": N, "message": ...}."""
    if status == 200 and not raw.startswith(b'{"error"'):
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict) and "error" in data:
        message = data.get("message") or str(data["error"])
        return EtcdError(endpoint, path, status, _int(data.get("code")), message)
    # Not the gateway: a proxy, an etcd without the v3 gateway, http spoken to https, ...
    return EtcdError(endpoint, path, status, -1, raw[:200].decode(errors="replace") or f"HTTP {status}")


def _is_compacted(exc: interface.StoreError) -> bool:
    cause = exc.__cause__
    return isinstance(cause, EtcdError) and cause.code == GRPC_OUT_OF_RANGE and "compacted" in cause.message


def _int(value: Any) -> int:
    """An int64 field: a string in proto3 JSON, absent when 0."""
    return int(value) if value is not None else 0


def _revision(response: JSON) -> int:
    return _int(response.get("header", {}).get("revision"))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _compare_value(compare: JSON) -> Any:
    for field in ("create_revision", "mod_revision", "version", "value"):
        if field in compare:
            return compare[field]
    return None


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with prefix": the prefix with its last byte
    incremented (0xff bytes dropped); b"\\0" means "no upper bound". UTF-8 orders like code
    points, so byte ranges are exactly the str ranges of the other backends."""
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\0"


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"a key is a non-empty str, not {key!r}")
    return key


def _check(key: str, value: bytes) -> tuple[str, bytes]:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"a value is bytes, not {type(value).__name__}")
    return _check_key(key), bytes(value)


# -- URL ---------------------------------------------------------------------------------------


def from_url(url: str) -> EtcdStore:
    """An EtcdStore for an ``etcd:`` URL (not started). See `virtplane.store.open_store`.

    ``etcd://host[:port][,host[:port]...][?option=value&...]``, port 2379 by default, IPv6 hosts
    in brackets. Options: ``prefix`` (default ``/virtplane``), ``tls`` (``true``: https with
    the system CAs), ``cacert`` / ``cert`` / ``key`` (file paths; any of them implies tls),
    ``retain_revisions`` / ``retain_seconds`` (int/float or ``none``), ``compact_interval``,
    ``watch_buffer``, ``request_timeout``, ``connect_timeout``, ``reconnect_timeout``.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "etcd":
        raise ValueError(f"not an etcd URL: {url!r}")
    if parts.path not in ("", "/"):
        raise ValueError(f"{url!r}: an etcd URL names endpoints, not a path; use ?prefix={parts.path}")
    if "@" in parts.netloc:
        raise ValueError(f"{url!r}: credentials in the URL are not supported (use a client certificate)")
    hosts = [_host_port(url, item) for item in parts.netloc.split(",")] if parts.netloc else []
    if not hosts:
        raise ValueError(f"{url!r}: no etcd endpoint")
    options: dict[str, Any] = {}
    tls = False
    for name, raw in urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        try:
            if name == "prefix":
                options["prefix"] = raw
            elif name == "tls":
                tls = _bool(raw)
            elif name in _FILE_OPTIONS:
                if not raw:
                    raise ValueError(raw)
                options[_FILE_OPTIONS[name]] = raw
                tls = True
            elif name in _NUMBER_OPTIONS:
                options[name] = _NUMBER_OPTIONS[name](raw)
            else:
                known = ", ".join(["prefix", "tls", *_FILE_OPTIONS, *_NUMBER_OPTIONS])
                raise ValueError(f"{url!r}: unknown option {name!r} (known: {known})")
        except ValueError as exc:
            if "unknown option" in str(exc):
                raise
            raise ValueError(f"{url!r}: bad value {raw!r} for {name}") from exc
    scheme = "https" if tls else "http"
    return EtcdStore([f"{scheme}://{host}:{port}" for host, port in hosts], **options)


def _host_port(url: str, item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [v6]:port
        host, _, rest = item[1:].partition("]")
        host = f"[{host}]"
        port_text = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port_text = item.partition(":")
    if not host or host == "[]":
        raise ValueError(f"{url!r}: empty host in {item!r}")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{url!r}: bad port in {item!r}")
    return host, int(port_text)


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


def _optional(parse: Callable[[str], float]) -> Callable[[str], float | None]:
    return lambda raw: None if raw.lower() == "none" else parse(raw)


def _finite(raw: str) -> float:
    number = float(raw)
    if not math.isfinite(number):
        raise ValueError(raw)
    return number


_FILE_OPTIONS = {"cacert": "ca_file", "cert": "cert_file", "key": "key_file"}
_NUMBER_OPTIONS: dict[str, Callable[[str], float | None]] = {
    "retain_revisions": _optional(int),
    "retain_seconds": _optional(_finite),
    "compact_interval": _finite,
    "watch_buffer": int,
    "request_timeout": _finite,
    "connect_timeout": _finite,
    "reconnect_timeout": _finite,
}
