"""The SQLite backend: etcd semantics on an MVCC log, in the manner of kine.

Tables (one file, WAL mode):

* ``log``: one row per write, ``revision INTEGER PRIMARY KEY`` is the global revision (the
  object's resourceVersion). A delete is a row with ``deleted = 1`` that carries the last value,
  so a watch replaying history can emit DELETE events with the object in them. ``prev_revision``
  points at the row this write replaced (0 for a create), which gives replayed events a
  ``prev_kv`` for as long as that row is retained.
* ``current``: the live value of every key, so get/list/count never scan history.
* ``meta``: ``compact_revision`` (history at or below it is gone) and the schema version.

Each write puts its ``log`` row and its ``current`` change in one transaction, so the two can
never disagree. Compaction deletes ``log`` rows only; ``current`` is never touched by it.

Concurrency model: one connection for reads and writes, used synchronously from the event loop.
Every statement is microseconds (an indexed lookup, a single-row insert into a cached page),
less than a thread hop (measured: a create ~45 us inline vs ~100 us through a thread; a get
4-10 us vs 45 us), and running a write and its watch fan-out without an await in between makes
them atomic with respect to other coroutines: compare-and-swap needs no lock, the revision
counter lives in memory, and a watch turns from replay to live without a window in between.

The one slow operation is the WAL checkpoint, which fsyncs: under I/O load (VM disks on the same
device) SQLite's automatic checkpoint, run inside a commit, held the loop for 90-140 ms. So it
is off, and a second connection checkpoints from a dedicated thread shortly after writes. At
the end of each round writers (only writers: reads, lists and watches go on) wait a few ms at an
async gate while the thread starts the WAL over, and after WAL_MAX_WRITES writes without a round
they wait for one (see `_checkpoint_loop`). After start() the event loop never fsyncs.

One process owns the file: start() takes an exclusive flock on ``<path>.lock`` (released by
the kernel when the process dies), so a second virtplane on the same file fails fast instead of
forking the revision counter. ``sqlite3 state.db`` can still read the file while it runs.

Group commit: writes that arrive in the same turn of the event loop share one transaction. Each runs its
statements at once (so key existence and compare-and-swap see the writes before it) and all commit together when
the turn ends. A commit and its WAL frames are most of a write's cost (measured with checkpointing: 49 us a
write alone, 31 in fours, 28 in eights). Nothing uncommitted is ever seen: every read, and every other
transaction, commits the open batch first; a writer returns, and watches hear of its write, only after the
COMMIT. If the COMMIT fails (or a statement, for a reason other than the write's own precondition), the whole
batch is rolled back and every writer in it gets the error.

Durability: WAL with ``synchronous=NORMAL``. A commit returns once its frames are written to
the WAL file, i.e. they are in the kernel's page cache, which survives the process being
killed (kill -9, OOM, a crash): an acknowledged write is never lost to a process death. It is
*not* fsynced per commit (only at checkpoints), so a power loss or kernel crash can lose the
last moments of acknowledged writes, though never corrupt the file. That is the trade chosen
here: an fsync per write costs milliseconds and would cap writes at a few hundred per second,
and a single-node control plane that loses power loses its VMs anyway; a deployment that must
survive power loss of the control plane uses the etcd backend.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import concurrent.futures
import contextlib
import fcntl
import logging
import math
import os
import sqlite3
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator

from virtplane.store import interface

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# Rows per statement when replaying history to a watch or deleting compacted history. Both run
# between awaits on the event loop, so a batch bounds how long one of them holds the loop.
# Deleting a log row with a ~2 KB value costs ~17 us whatever the batch (it frees a page), so
# 500 rows hold the loop ~10-17 ms; reading 500 rows for a replay takes ~3 ms.
REPLAY_BATCH = 500
COMPACT_BATCH = 500
# Revisions one replay statement scans at most: a watch on a rarely written prefix resuming from
# far back must not scan all retained history in one go while it holds the loop.
REPLAY_SCAN = 5000
# Seconds from the first write after a checkpoint to the next checkpoint: writes in between are
# checkpointed together.
CHECKPOINT_DELAY = 0.2
# Writes after which writers wait for the checkpointer to start the WAL over. Normally it does so
# every CHECKPOINT_DELAY; but a coroutine writing in a loop that never suspends starves the
# checkpointer task, and a WAL of hundreds of MB makes every read slow (measured: gets 15x
# slower, a 10,000-key list 6x) until it is checkpointed. ~4 frames a write: ~80 MB at most.
WAL_MAX_WRITES = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    revision INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,
    deleted INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS current (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with `prefix` (None: no bound).

    Keys under a prefix are then the index range [prefix, prefix_end), which SQLite answers
    with a B-tree seek; LIKE/GLOB would need escaping and would not use the index reliably.
    SQLite compares TEXT as UTF-8 bytes, and UTF-8 byte order is code point order, which is
    also how Python compares str, so incrementing the last code point is exact.
    """
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if code <= 0x10FFFF:
            if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be encoded, so no key holds one
                code = 0xE000
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()  # U+10FFFF cannot be incremented: bound on the shorter prefix instead
    return None


class CompactionPolicy:
    """Decides how far the background task may compact.

    Keeps the last `retain_revisions` revisions and the revisions written during the last
    `retain_seconds`; with both set, history that either rule keeps is kept (a watcher that is
    recent by either measure can resume). None disables a rule; with both None nothing is
    compacted automatically.

    Time is not stored per revision (that would cost a column on every write); instead the
    policy samples (time, revision) on every tick, as kube-apiserver's compactor does, and a
    revision is old enough once a sample taken at least `retain_seconds` ago had reached it.
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
        targets: list[int] = []
        if self.retain_revisions is not None:
            targets.append(revision - self.retain_revisions)
        if self.retain_seconds is not None:
            self._samples.append((now, revision))
            old_enough = 0
            # Samples are in time order; the newest one old enough wins, older ones are no
            # longer needed.
            while self._samples and self._samples[0][0] <= now - self.retain_seconds:
                old_enough = self._samples.popleft()[1]
            # 0 when no sample matured this tick: nothing new to compact by time yet.
            targets.append(old_enough)
        return max(0, min(targets)) if targets else 0


class SqliteStore(interface.Store):
    """`interface.Store` on one SQLite file (or ``":memory:"``, for tests)."""

    def __init__(
        self,
        path: str,
        *,
        retain_revisions: int | None = None,
        retain_seconds: float | None = 300.0,
        compact_interval: float = 60.0,
        watch_buffer: int = 10_000,
        busy_timeout: float = 2.0,
    ) -> None:
        """
        retain_revisions / retain_seconds: the auto-compaction policy (see CompactionPolicy).
            The default keeps 5 minutes of history, as kube-apiserver's compaction of etcd
            does; pass None for both to leave compaction to explicit `compact()` calls.
        compact_interval: seconds between auto-compaction ticks.
        watch_buffer: events a live watch may fall behind before it is ended with
            WatchClosedError (its client re-lists, as with etcd's slow watchers).
        busy_timeout: how long start() waits for another process to release the file.
        """
        if compact_interval <= 0:
            raise ValueError(f"compact_interval must be > 0, not {compact_interval}")
        if watch_buffer < 1:
            raise ValueError(f"watch_buffer must be >= 1, not {watch_buffer}")
        self.path = path
        self.policy = CompactionPolicy(retain_revisions=retain_revisions, retain_seconds=retain_seconds)
        self.compact_interval = compact_interval
        self.watch_buffer = watch_buffer
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # Checkpoints: their own connection, used only from their own thread.
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._checkpoint_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._wal_dirty = asyncio.Event()
        # Cleared while a RESTART checkpoint runs: writers wait for it (readers do not).
        self._writable = asyncio.Event()
        self._writable.set()
        self._writes_since_checkpoint = 0
        self._checkpointed = asyncio.Event()  # pulsed by the checkpointer after each round
        self._checkpoint_now = asyncio.Event()  # writers are waiting: skip CHECKPOINT_DELAY
        self._closed = False
        self._revision = 0  # the last committed revision
        self._assigned = 0  # the last revision handed to a write (beyond _revision while a batch is open)
        # The open batch (group commit): its writes' events and their writers' futures, in revision order.
        self._batch: builtins.list[tuple[interface.WatchEvent, asyncio.Future[None]]] | None = None
        self._compact_revision = 0
        # prefix -> its watches: a write tests each distinct prefix once, whatever the number of
        # watches on it (the API server's watch cache puts hundreds on one prefix).
        self._watches: dict[str, set[_SqliteWatch]] = {}
        self._compactor: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path!r} revision={self._revision}>"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._conn is not None or self._closed:
            raise interface.StoreError("SqliteStore.start() may be called once")
        in_memory = self.path == ":memory:"
        if not in_memory:
            self._lock_fd = await self._lock()
        checkpoint_conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout, cached_statements=64)
        except sqlite3.Error as exc:
            self._unlock()
            raise interface.StoreError(f"cannot open {self.path!r}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal" and not in_memory:
                raise interface.StoreError(f"{self.path!r}: cannot enable WAL (journal_mode={mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # see _checkpoint_loop
            # Enough page cache and mmap for a large list to be served from memory.
            conn.execute("PRAGMA cache_size=-65536")
            conn.execute("PRAGMA mmap_size=268435456")
            # The WAL is reused from its start after each checkpoint; after a burst, trim it.
            conn.execute("PRAGMA journal_size_limit=67108864")
            conn.execute("BEGIN IMMEDIATE")
            # Statement by statement: executescript() would COMMIT the transaction first.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise interface.StoreError(
                    f"{self.path!r} has schema version {version}, this virtplane knows {SCHEMA_VERSION}"
                )
            row = conn.execute("SELECT value FROM meta WHERE name = 'compact_revision'").fetchone()
            compact_revision = row[0] if row else 0
            (last_logged,) = conn.execute("SELECT coalesce(max(revision), 0) FROM log").fetchone()
            conn.execute("COMMIT")
            if not in_memory:
                # Its busy timeout only ever waits in the checkpoint thread (for a read of the
                # main connection to finish during a RESTART), never on the loop.
                checkpoint_conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0, check_same_thread=False)
                checkpoint_conn.execute("PRAGMA synchronous=NORMAL")  # fsync WAL, then the file
                # It is the connection that starts the WAL over (see _checkpoint_loop), so the
                # trim after a burst is its job too.
                checkpoint_conn.execute("PRAGMA journal_size_limit=67108864")
        except BaseException as exc:
            conn.close()
            if checkpoint_conn is not None:
                checkpoint_conn.close()
            self._unlock()
            if isinstance(exc, sqlite3.Error):
                raise interface.StoreError(f"cannot open {self.path!r}: {exc}") from exc
            raise
        self._conn = conn
        if checkpoint_conn is not None:
            self._checkpoint_conn = checkpoint_conn
            self._checkpoint_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="sqlite-checkpoint"
            )
            self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name=f"checkpointer {self.path}")
        self._compact_revision = compact_revision
        # Compacting to the newest revision leaves the log empty; the persisted compact
        # revision then still holds the counter, so revisions never go backwards.
        self._revision = self._assigned = max(last_logged, compact_revision)
        if self.policy.enabled:
            self._compactor = asyncio.create_task(self._auto_compact(), name=f"compactor {self.path}")
        logger.debug("opened %s at revision %d (compacted %d)", self.path, self._revision, compact_revision)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._compactor, self._checkpointer):
            if task is not None:
                # Cancelling the task does not stop a checkpoint already running in the thread;
                # the executor shutdown below waits for it.
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._compactor = self._checkpointer = None
        if self._conn is not None:
            self._commit_batch()
        # Writers waiting at _write_gate go on, to find the store closed.
        self._writable.set()
        self._checkpointed.set()
        for watches in list(self._watches.values()):
            for watch in list(watches):
                watch._fail(interface.WatchClosedError("the store is closed"))
        self._watches.clear()
        try:
            if self._conn is not None:
                self._conn.close()
            if self._checkpoint_conn is not None and self._checkpoint_executor is not None:
                # The last connection to close checkpoints the WAL into the file (fsyncs) and
                # removes it: that is this one, in its thread.
                await asyncio.get_running_loop().run_in_executor(self._checkpoint_executor, self._checkpoint_conn.close)
        except sqlite3.Error as exc:
            raise interface.StoreError(f"closing {self.path!r}: {exc}") from exc
        finally:
            if self._checkpoint_executor is not None:
                self._checkpoint_executor.shutdown(wait=True)  # nothing left running in it
            self._checkpoint_executor = None
            self._checkpoint_conn = self._conn = None
            self._unlock()

    async def _lock(self) -> int:
        """An exclusive flock on `<path>.lock`, waiting up to busy_timeout for it."""
        lock_path = f"{self.path}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise interface.StoreError(f"cannot open {lock_path!r}: {exc}") from exc
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                if time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    continue
                os.close(fd)
                raise interface.StoreError(
                    f"{self.path!r} is locked ({lock_path}): is another virtplane process using it?"
                ) from exc
            except OSError as exc:
                os.close(fd)
                raise interface.StoreError(f"cannot lock {lock_path!r}: {exc}") from exc
            # For whoever wonders who holds it. The file itself stays: deleting a lock file
            # races with the next process taking it.
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise interface.StoreError("the store is closed" if self._closed else "the store is not started")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN ... COMMIT, rolled back on any error; sqlite errors become StoreError (chained).

        Callers pass `_write_gate` first: a write while the checkpoint thread holds the write
        lock would make SQLite's busy handler sleep on the event loop.
        """
        conn = self._connection()
        assert self._writable.is_set(), "a write did not wait at _write_gate"
        self._commit_batch()
        try:
            conn.execute("BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:  # disk full, I/O error, corrupt file, ...
            raise interface.StoreError(f"{self.path!r}: {exc}") from exc

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        # Every read is fetched whole (fetchone/fetchall) before the next await: an open cursor
        # held across an await would see a stale snapshot and pin the WAL against checkpoints.
        conn = self._connection()
        if self._batch is not None:
            self._commit_batch()  # a read sees committed writes only
        try:
            yield conn
        except sqlite3.Error as exc:
            raise interface.StoreError(f"{self.path!r}: {exc}") from exc

    # -- group commit (see the module docstring) ---------------------------------------------

    def _batch_connection(self) -> sqlite3.Connection:
        """The connection inside the open batch, opened (with its commit scheduled) if there is none."""
        conn = self._connection()
        assert self._writable.is_set(), "a write did not wait at _write_gate"
        if self._batch is None:
            try:
                conn.execute("BEGIN")
            except sqlite3.Error as exc:
                raise interface.StoreError(f"{self.path!r}: {exc}") from exc
            self._batch = []
            asyncio.get_running_loop().call_soon(self._commit_batch)
        return conn

    async def _batched(self, event: interface.WatchEvent) -> None:
        """Waits until the write behind `event` (its statements run) is committed; raises if its batch failed."""
        assert self._batch is not None
        self._assigned = event.revision
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.append((event, done))
        await done

    def _commit_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        try:
            self._connection().execute("COMMIT")
        except sqlite3.Error as exc:
            self._fail_batch(batch, exc)
            return
        for event, done in batch:
            self._committed(event)
            if not done.done():
                done.set_result(None)

    def _abort_batch(self, exc: sqlite3.Error) -> interface.StoreError:
        """A statement failed for a reason of the store's (I/O, disk full): SQLite may have rolled back the whole
        transaction, so every write in the batch fails. Returns the error for the write that hit it."""
        batch, self._batch = self._batch, None
        self._fail_batch(batch or [], exc)
        return interface.StoreError(f"{self.path!r}: {exc}")

    def _fail_batch(self, batch: builtins.list[tuple[interface.WatchEvent, asyncio.Future[None]]],
                    exc: sqlite3.Error) -> None:  # fmt: skip
        conn = self._connection()
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        self._assigned = self._revision
        for _, done in batch:
            if not done.done():
                error = interface.StoreError(f"{self.path!r}: {exc}")
                error.__cause__ = exc
                done.set_exception(error)

    # -- reads -------------------------------------------------------------------------------

    async def current_revision(self) -> int:
        return self._revision

    @property
    def compact_revision(self) -> int:
        return self._compact_revision

    async def get(self, key: str) -> interface.KeyValue | None:
        with self._reading() as conn:
            row = conn.execute(
                "SELECT value, create_revision, mod_revision FROM current WHERE key = ?", (key,)
            ).fetchone()
        return interface.KeyValue(key, *row) if row is not None else None

    async def list(self, prefix: str, *, start_after: str | None = None, limit: int = 0) -> interface.ListResult:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        where, params = _key_range(prefix, start_after)
        # One row more than asked tells whether there are more, without a second query.
        params.append(limit + 1 if limit else -1)
        with self._reading() as conn:
            rows = conn.execute(
                f"SELECT key, value, create_revision, mod_revision FROM current WHERE {where} ORDER BY key LIMIT ?",
                params,
            ).fetchall()
        more = bool(limit) and len(rows) > limit
        if more:
            del rows[limit:]
        # Reads and writes never interleave (see the module docstring), so the counter is
        # exactly the revision this list saw.
        return interface.ListResult(kvs=[interface.KeyValue(*row) for row in rows], revision=self._revision, more=more)

    async def count(self, prefix: str) -> int:
        where, params = _key_range(prefix, None)
        with self._reading() as conn:
            (n,) = conn.execute(f"SELECT count(*) FROM current WHERE {where}", params).fetchone()
        return int(n)

    # -- writes ------------------------------------------------------------------------------

    async def create(self, key: str, value: bytes) -> interface.KeyValue:
        key, value = _check(key, value)
        await self._write_gate()
        conn = self._batch_connection()
        revision = self._assigned + 1
        try:
            # The primary key is the existence check: no SELECT needed on the hot path.
            conn.execute(
                "INSERT INTO current (key, value, create_revision, mod_revision) VALUES (?, ?, ?, ?)",
                (key, value, revision, revision),
            )
        except sqlite3.IntegrityError as exc:
            raise interface.KeyExistsError(key) from exc
        except sqlite3.Error as exc:
            raise self._abort_batch(exc) from exc
        try:
            conn.execute(
                "INSERT INTO log (revision, key, value, create_revision, prev_revision, deleted) "
                "VALUES (?, ?, ?, ?, 0, 0)",
                (revision, key, value, revision),
            )
        except sqlite3.Error as exc:
            raise self._abort_batch(exc) from exc
        kv = interface.KeyValue(key, value, revision, revision)
        await self._batched(interface.WatchEvent(interface.EventType.PUT, kv))
        return kv

    async def update(self, key: str, value: bytes, *, expected_revision: int) -> interface.KeyValue:
        key, value = _check(key, value)
        await self._write_gate()
        conn = self._batch_connection()
        revision = self._assigned + 1
        prev = self._compare(conn, key, expected_revision)
        try:
            conn.execute("UPDATE current SET value = ?, mod_revision = ? WHERE key = ?", (value, revision, key))
            conn.execute(
                "INSERT INTO log (revision, key, value, create_revision, prev_revision, deleted) "
                "VALUES (?, ?, ?, ?, ?, 0)",
                (revision, key, value, prev.create_revision, prev.mod_revision),
            )
        except sqlite3.Error as exc:
            raise self._abort_batch(exc) from exc
        kv = interface.KeyValue(key, value, prev.create_revision, revision)
        await self._batched(interface.WatchEvent(interface.EventType.PUT, kv, prev))
        return kv

    async def delete(self, key: str, *, expected_revision: int | None = None) -> interface.KeyValue:
        key = _check_key(key)
        await self._write_gate()
        conn = self._batch_connection()
        revision = self._assigned + 1
        prev = self._compare(conn, key, expected_revision)
        try:
            conn.execute("DELETE FROM current WHERE key = ?", (key,))
            # The tombstone keeps the last value: watchers replaying history get it in DELETE.
            conn.execute(
                "INSERT INTO log (revision, key, value, create_revision, prev_revision, deleted) "
                "VALUES (?, ?, ?, ?, ?, 1)",
                (revision, key, prev.value, prev.create_revision, prev.mod_revision),
            )
        except sqlite3.Error as exc:
            raise self._abort_batch(exc) from exc
        kv = interface.KeyValue(key, prev.value, prev.create_revision, revision)
        await self._batched(interface.WatchEvent(interface.EventType.DELETE, kv, prev))
        return kv

    def _compare(self, conn: sqlite3.Connection, key: str, expected_revision: int | None) -> interface.KeyValue:
        """The key's current value, inside the open batch (so it sees the batch's earlier writes)."""
        try:
            row = conn.execute("SELECT value, create_revision, mod_revision FROM current WHERE key = ?",
                               (key,)).fetchone()
        except sqlite3.Error as exc:
            raise self._abort_batch(exc) from exc
        if row is None:
            raise interface.KeyNotFoundError(key)
        current = interface.KeyValue(key, *row)
        if expected_revision is not None and current.mod_revision != expected_revision:
            raise interface.ConflictError(key, expected_revision, current)
        return current

    def _committed(self, event: interface.WatchEvent) -> None:
        """Advance the counter and fan the event out; called only after COMMIT succeeded."""
        self._revision = event.revision
        self._wal_dirty.set()
        self._writes_since_checkpoint += 1
        key = event.kv.key
        # Snapshots: a watch that overflows unregisters itself in the middle of this loop.
        for prefix, watches in tuple(self._watches.items()):
            if key.startswith(prefix):
                for watch in tuple(watches):
                    watch._push(event)

    # -- watch -------------------------------------------------------------------------------

    def watch(self, prefix: str, *, after_revision: int) -> interface.Watch:
        """See `interface.Store.watch`. after_revision=0 is not special: it means every
        retained event (all of them if nothing was compacted yet, as on a fresh store)."""
        self._connection()
        if after_revision < 0:
            raise ValueError(f"after_revision must be >= 0, not {after_revision}")
        if after_revision < self._compact_revision:
            raise interface.CompactedError(after_revision, self._compact_revision)
        watch = _SqliteWatch(self, prefix, after_revision)
        self._watches.setdefault(prefix, set()).add(watch)
        return watch

    def _unregister(self, watch: _SqliteWatch) -> None:
        watches = self._watches.get(watch.prefix)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.prefix]

    def _replay(self, prefix: str, after_revision: int, limit: int) -> tuple[builtins.list[interface.WatchEvent], int]:
        """Retained events under `prefix` after `after_revision`: at most `limit` of them, from at
        most REPLAY_SCAN revisions. Returns them and the revision the log has been read up to.

        (`builtins.list` because inside this class `list` is the method.)
        """
        if after_revision < self._compact_revision:
            # Rows above after_revision may already be deleted: a replay would have gaps.
            raise interface.CompactedError(after_revision, self._compact_revision)
        high = min(after_revision + REPLAY_SCAN, self._revision)
        where, params = _key_range(prefix, None, column="l.key")
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT l.revision, l.key, l.value, l.create_revision, l.prev_revision, l.deleted, "
                "p.value, p.create_revision "
                "FROM log AS l LEFT JOIN log AS p ON p.revision = l.prev_revision "
                f"WHERE l.revision > ? AND l.revision <= ? AND {where} ORDER BY l.revision LIMIT ?",
                [after_revision, high, *params, limit],
            ).fetchall()
        events = [_log_event(*row) for row in rows]
        # A full batch may stop before `high`; otherwise the whole window has been read.
        read_up_to = events[-1].revision if len(events) == limit else high
        return events, read_up_to

    # -- compaction --------------------------------------------------------------------------

    async def compact(self, revision: int) -> None:
        """Forget history at or below `revision`. Compacting to an already compacted revision is
        a no-op; a revision above the current one raises ValueError (as etcd's ErrFutureRev).

        The compact revision is persisted first, so from then on no watch can ask for the rows
        being deleted; the rows then go in batches, yielding to the loop between them. A crash
        in between leaves some dead rows that the next compaction removes.
        """
        if revision > self._revision:
            raise ValueError(f"cannot compact to {revision}: the current revision is {self._revision}")
        if revision <= self._compact_revision:
            return
        await self._write_gate()
        if revision <= self._compact_revision:  # compacted further while waiting
            return
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('compact_revision', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (revision,),
            )
        self._compact_revision = revision
        with self._reading() as conn:
            (low,) = conn.execute("SELECT coalesce(min(revision), 0) FROM log").fetchone()
        # Revisions are dense until compacted, so a range of COMPACT_BATCH revisions is at most
        # that many rows: batch by range, which is a primary-key seek.
        while low <= revision and not self._closed:
            high = min(low + COMPACT_BATCH, revision)
            await self._write_gate()
            with self._transaction() as conn:
                conn.execute("DELETE FROM log WHERE revision <= ?", (high,))
            self._wal_dirty.set()
            if high >= revision:
                break
            low = high
            await asyncio.sleep(0)
        logger.debug("compacted %s to revision %d", self.path, revision)

    async def _auto_compact(self) -> None:
        while True:
            await asyncio.sleep(self.compact_interval)
            target = self.policy.target(now=time.monotonic(), revision=self._revision)
            if target > self._compact_revision:
                try:
                    await self.compact(target)
                except Exception:
                    # A full disk, say: the store keeps serving; try again next tick.
                    logger.exception("auto-compaction of %s to %d failed", self.path, target)

    async def _checkpoint_loop(self) -> None:
        """Checkpoints, CHECKPOINT_DELAY after writes, without an fsync on the event loop.

        SQLite starts the WAL over only after a checkpoint copied every frame, which a PASSIVE
        checkpoint never manages while writes keep coming: the WAL then grows without end, and
        appends to a growing file wait behind the filesystem's journal (measured: 90 ms). And
        the write that starts it over fsyncs the WAL header, in whichever connection makes it.
        So each round is: a PASSIVE pass with writers running (the bulk of the copying and the
        fsyncs), then, with writers held at `_write_gate` (the loop is not held: reads, lists,
        watches go on), a RESTART pass for what came in meanwhile and a tiny write from the
        checkpoint connection, which starts the WAL over in the checkpoint thread.
        """
        loop = asyncio.get_running_loop()
        while True:
            await self._wal_dirty.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHECKPOINT_DELAY):
                    await self._checkpoint_now.wait()
            self._wal_dirty.clear()
            try:
                await loop.run_in_executor(self._checkpoint_executor, self._checkpoint, "PASSIVE")
                self._commit_batch()  # writers are held from here on; the RESTART must find no open transaction
                self._writable.clear()
                try:
                    if not await loop.run_in_executor(self._checkpoint_executor, self._restart_wal):
                        self._wal_dirty.set()  # a reader was on the old WAL: another round
                finally:
                    self._writable.set()
            except Exception:
                # Durability does not depend on it (commits are in the WAL); retry after writes.
                logger.exception("checkpoint of %s failed", self.path)
            finally:
                # Whatever the outcome, writers held by WAL_MAX_WRITES go on: a failing
                # checkpoint must not stop the store, only let the WAL grow until the next round.
                self._writes_since_checkpoint = 0
                self._checkpoint_now.clear()
                self._checkpointed.set()
                self._checkpointed.clear()

    def _checkpoint(self, mode: str) -> tuple[int, int, int]:
        """Runs in the checkpoint thread: (busy, frames in the WAL, frames copied)."""
        assert self._checkpoint_conn is not None
        busy, frames, copied = self._checkpoint_conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return busy, frames, copied

    def _restart_wal(self) -> bool:
        """Runs in the checkpoint thread while writers are held; True once the WAL starts over."""
        busy, frames, copied = self._checkpoint("RESTART")
        if busy or copied < frames:
            return False  # a reader was still on the old WAL; next round
        conn = self._checkpoint_conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('checkpoints', 1) "
                "ON CONFLICT (name) DO UPDATE SET value = value + 1"
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return True

    async def _write_gate(self) -> None:
        """Where every write waits, before its synchronous part, while the checkpointer needs
        the writers still (see _checkpoint_loop) or WAL_MAX_WRITES writes went by since the last checkpoint."""
        checkpointer = self._checkpointer
        if self._writes_since_checkpoint >= WAL_MAX_WRITES and checkpointer and not checkpointer.done():
            self._checkpoint_now.set()
            await self._checkpointed.wait()
        if not self._writable.is_set():
            await self._writable.wait()


class _SqliteWatch(interface.Watch, AsyncIterator[interface.WatchEvent]):
    """One watch: first catches up from the log, then takes live events from the fan-out.

    While catching up ("unsynced", in etcd's words) the watch ignores live events: they are in
    the log, which it reads in batches, so a long replay needs no buffer that could overflow.
    When the log has been read up to the store's current revision, the watch turns live in the
    same synchronous step; the next write is pushed to it, so
    nothing falls between the replay and the live events. `_last` (the highest revision handed
    out) additionally drops anything at or below it, so neither path can produce a duplicate.
    """

    def __init__(self, store: SqliteStore, prefix: str, after_revision: int) -> None:
        self._store = store
        self.prefix = prefix
        self._last = after_revision  # the highest revision handed out
        self._replayed = after_revision  # the log has been read up to here
        self._buffer: collections.deque[interface.WatchEvent] = collections.deque()
        # Already at the head (the usual case: a watch right after a list): no replay needed.
        self._synced = after_revision >= store._revision
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
            while self._buffer:
                event = self._buffer.popleft()
                if event.revision > self._last:
                    self._last = event.revision
                    return event
            if not self._synced:
                self._catch_up()
                continue
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _catch_up(self) -> None:
        # Batches no larger than the buffer: when the watch turns live, what is left of the
        # last (short) batch is below the overflow limit.
        batch = min(REPLAY_BATCH, self._store.watch_buffer)
        try:
            events, self._replayed = self._store._replay(self.prefix, self._replayed, batch)
        except interface.StoreError as exc:
            self._fail(exc)
            raise
        self._buffer.extend(events)
        if self._replayed >= self._store._revision:
            self._synced = True  # read up to the head; from the next write on, events are pushed

    def _push(self, event: interface.WatchEvent) -> None:
        if not self._synced or self._closed:
            return  # catching up: the log has it
        if len(self._buffer) >= self._store.watch_buffer:
            self._fail(
                interface.WatchClosedError(f"watch on {self.prefix!r} fell {len(self._buffer)} events behind; re-list")
            )
            return
        self._buffer.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: interface.StoreError) -> None:
        if self._closed:
            return
        self._error = error
        self._end()

    async def close(self) -> None:
        if not self._closed:
            self._end()

    def _end(self) -> None:
        self._closed = True
        self._buffer.clear()
        self._store._unregister(self)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _log_event(
    revision: int,
    key: str,
    value: bytes,
    create_revision: int,
    prev_revision: int,
    deleted: int,
    prev_value: bytes | None,
    prev_create_revision: int | None,
) -> interface.WatchEvent:
    """The watch event for a `log` row (joined with the row it replaced, when retained)."""
    kv = interface.KeyValue(key, value, create_revision, revision)
    if deleted:
        # The tombstone holds the value it removed, so prev_kv never depends on retention.
        return interface.WatchEvent(
            interface.EventType.DELETE, kv, interface.KeyValue(key, value, create_revision, prev_revision)
        )
    # prev_kv of an update is known only while the replaced row is retained (as in etcd).
    prev = None
    if prev_value is not None and prev_create_revision is not None:
        prev = interface.KeyValue(key, prev_value, prev_create_revision, prev_revision)
    return interface.WatchEvent(interface.EventType.PUT, kv, prev)


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"a key is a non-empty str, not {key!r}")
    return key


def _check(key: str, value: bytes) -> tuple[str, bytes]:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"a value is bytes, not {type(value).__name__}")
    return _check_key(key), bytes(value)


def _key_range(prefix: str, start_after: str | None, column: str = "key") -> tuple[str, list[str | int]]:
    """A WHERE clause selecting keys under `prefix` (after `start_after`) as an index range."""
    params: list[str | int]
    if start_after is not None and start_after >= prefix:
        clauses, params = [f"{column} > ?"], [start_after]
    else:
        clauses, params = [f"{column} >= ?"], [prefix]
    end = prefix_end(prefix)
    if end is not None:
        clauses.append(f"{column} < ?")
        params.append(end)
    return " AND ".join(clauses), params


def from_url(url: str) -> SqliteStore:
    """A SqliteStore for a ``sqlite:`` URL (not started). See `virtplane.store.open_store`.

    ``sqlite:///abs/path/state.db``   absolute path (like file: URLs)
    ``sqlite:relative/path/state.db`` relative to the working directory
    ``sqlite::memory:``               in memory, for tests
    Query parameters set the constructor's options: ``retain_revisions`` (int or ``none``),
    ``retain_seconds`` (float or ``none``), ``compact_interval`` (float), ``watch_buffer`` (int).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "sqlite":
        raise ValueError(f"not a sqlite URL: {url!r}")
    if parts.netloc:
        raise ValueError(
            f"{url!r}: a sqlite URL names a file, not a host; use sqlite:///abs/path.db or sqlite:rel/path.db"
        )
    path = urllib.parse.unquote(parts.path)
    if not path:
        raise ValueError(f"{url!r}: no database path")
    options: dict[str, float | int | None] = {}
    for name, raw in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        parse = _URL_OPTIONS.get(name)
        if parse is None:
            raise ValueError(f"{url!r}: unknown option {name!r} (known: {', '.join(_URL_OPTIONS)})")
        try:
            options[name] = parse(raw)
        except ValueError as exc:
            raise ValueError(f"{url!r}: bad value {raw!r} for {name}") from exc
    return SqliteStore(path, **options)  # type: ignore[arg-type]


def _optional(parse: Callable[[str], float]) -> Callable[[str], float | None]:
    return lambda raw: None if raw.lower() == "none" else parse(raw)


def _finite(raw: str) -> float:
    number = float(raw)
    if not math.isfinite(number):
        raise ValueError(raw)
    return number


# URL query parameter -> parser of its value (the constructor validates ranges).
_URL_OPTIONS: dict[str, Callable[[str], float | None]] = {
    "retain_revisions": _optional(int),
    "retain_seconds": _optional(_finite),
    "compact_interval": _finite,
    "watch_buffer": int,
}
