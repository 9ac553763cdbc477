"""A small async layer over `qemu.qmp.QMPClient`: bounded connect-with-retry, commands that raise
`QMPCommandError` wrapping the root cause, events as per-subscriber asyncio queues, and disconnect
detection (QEMU exiting closes the socket; every subscriber's iterator then ends).

`GuestAgent` speaks the same protocol to qemu-guest-agent over the VM's virtio-serial channel: no greeting,
no capability negotiation, and every call has a timeout because there may be nobody on the other end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, Message, QMPClient, QMPError, StateError
from qemu.qmp.protocol import Runstate

from .errors import (
    GuestAgentError,
    QMPCommandError,
    QMPConnectError,
    QMPDisconnectedError,
    QMPTimeoutError,
)

log = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class QMPEvent:
    name: str
    data: dict[str, Any]
    timestamp: float  # QEMU's wall clock time of the event, seconds since the epoch

    @classmethod
    def from_message(cls, msg: Message | Mapping[str, Any]) -> QMPEvent:
        ts = msg.get("timestamp") or {}
        return cls(
            name=str(msg.get("event")),
            data=dict(msg.get("data") or {}),
            timestamp=float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6,
        )


class EventStream:
    """One subscriber's view of the event stream: an async iterator that ends when the connection closes.

    Subscribe *before* triggering what you wait for (use it as an async context manager around the
    command), so the event cannot slip by in between.
    """

    def __init__(self, owner: QMP, names: frozenset[str] | None) -> None:
        self._owner = owner
        self.names = names
        self._queue: asyncio.Queue[QMPEvent | None] = asyncio.Queue()
        self._closed = False

    def _offer(self, event: QMPEvent | None) -> None:
        if self._closed:
            return
        if event is None or self.names is None or event.name in self.names:
            self._queue.put_nowait(event)

    def __aiter__(self) -> AsyncIterator[QMPEvent]:
        return self

    async def __anext__(self) -> QMPEvent:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            self.close()
            raise StopAsyncIteration
        return event

    async def get(self, timeout: float | None = None) -> QMPEvent:  # noqa: ASYNC109 - a plain wait helper
        """The next event; TimeoutError after `timeout`, QMPDisconnectedError when the connection closed."""
        try:
            async with asyncio.timeout(timeout):
                return await self.__anext__()
        except StopAsyncIteration as err:
            raise QMPDisconnectedError("event", "connection closed while waiting for an event") from err

    async def wait_for(
        self,
        predicate: Callable[[QMPEvent], bool],
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> QMPEvent:
        """The first event matching `predicate`."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.get()
                if predicate(event):
                    return event

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._unsubscribe(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _FanOut(EventListener):
    """A qemu.qmp listener that hands every event to our subscribers as it arrives (no pump task)."""

    def __init__(self, sink: Callable[[Message], None]) -> None:
        super().__init__()
        self._sink = sink

    async def put(self, event: Message) -> None:
        self._sink(event)


def _exists(path: Path) -> bool:
    return os.path.exists(path)  # a stat of a local socket path: not worth a thread


class QMP:
    """One QMP (or guest agent) connection over a unix socket."""

    def __init__(self, path: Path | str, *, name: str = "qmp", guest_agent: bool = False) -> None:
        self.path = Path(path)
        self.name = name
        self._client = QMPClient(name)
        if guest_agent:
            # qemu-ga sends no greeting and has no capabilities negotiation.
            self._client.await_greeting = False
            self._client.negotiate = False
        self._client.register_listener(_FanOut(self._dispatch))
        self._subscribers: list[EventStream] = []
        self._watcher: asyncio.Task[None] | None = None
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self.disconnect_reason: BaseException | None = None

    # -- connection ---------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    async def connect(
        self,
        timeout: float = 10.0,  # noqa: ASYNC109 - bounded retry loop, not a single await
        *,
        alive: Callable[[], bool] | None = None,
        retry_interval: float = 0.02,
    ) -> None:
        """Connect, retrying until the socket exists and QEMU accepts (bounded by `timeout`).

        `alive` lets the caller abort early when the process it waits for has died.
        """
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            if alive is not None and not alive():
                raise QMPConnectError(f"{self.name}: process exited before {self.path} accepted connections")
            if _exists(self.path):
                try:
                    async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                        await self._client.connect(str(self.path))
                    break
                except (QMPError, OSError, TimeoutError) as err:
                    last = err
            if time.monotonic() >= deadline:
                raise QMPConnectError(f"{self.name}: could not connect to {self.path} within {timeout:g}s") from last
            await asyncio.sleep(retry_interval)
        self._disconnected.clear()
        self.disconnect_reason = None
        self._watcher = asyncio.create_task(self._watch(), name=f"{self.name}-watch")

    async def _watch(self) -> None:
        """Notice the server hanging up (QEMU exited / closed the socket) and finish the disconnect."""
        client = self._client
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        if client.runstate == Runstate.DISCONNECTING:
            try:
                await client.disconnect()
            except Exception as err:  # EOFError / ConnectionResetError: the reason it went away
                self.disconnect_reason = err
        self._mark_disconnected()

    def _mark_disconnected(self) -> None:
        if self._disconnected.is_set():
            return
        self._disconnected.set()
        for sub in list(self._subscribers):
            sub._offer(None)

    async def wait_disconnected(self) -> None:
        await self._disconnected.wait()

    async def close(self) -> None:
        """Disconnect (idempotent). Does not affect QEMU."""
        watcher, self._watcher = self._watcher, None
        if self._client.runstate != Runstate.IDLE:
            with contextlib.suppress(Exception):
                await self._client.disconnect()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        self._mark_disconnected()

    # -- commands -----------------------------------------------------------------------------------
    async def execute(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT,  # noqa: ASYNC109
    ) -> Any:
        """Run a command and return its `return` value; QMPCommandError (root cause chained) otherwise."""
        try:
            async with asyncio.timeout(timeout):
                return await self._client.execute(cmd, dict(args) if args is not None else None)
        except ExecuteError as err:
            raise QMPCommandError(cmd, err.error.error.desc, err.error_class) from err
        except (ExecInterruptedError, StateError, EOFError, ConnectionError) as err:
            raise QMPDisconnectedError(cmd, f"{self.name} connection lost: {err}") from err
        except TimeoutError as err:
            raise QMPTimeoutError(cmd, f"no reply from {self.name} within {timeout:g}s") from err
        except QMPError as err:
            raise QMPCommandError(cmd, str(err)) from err

    def send_fd(self, fd: int) -> None:
        """Send an fd over the socket (SCM_RIGHTS) for a following `getfd` / `add-fd`."""
        try:
            self._client.send_fd_scm(fd)
        except (StateError, OSError) as err:
            raise QMPDisconnectedError("send_fd", str(err)) from err

    # -- events -------------------------------------------------------------------------------------
    def events(self, names: Iterable[str] | None = None) -> EventStream:
        """Subscribe to events (all when `names` is None). The stream ends when the connection closes."""
        stream = EventStream(self, frozenset(names) if names is not None else None)
        self._subscribers.append(stream)
        if self._disconnected.is_set():
            stream._offer(None)
        return stream

    def _unsubscribe(self, stream: EventStream) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(stream)

    def _dispatch(self, msg: Message) -> None:
        event = QMPEvent.from_message(msg)
        for sub in list(self._subscribers):
            sub._offer(event)


class GuestAgent:
    """qemu-guest-agent over the VM's `org.qemu.guest_agent.0` channel (qga.sock).

    Calls time out (default 5 s) instead of hanging when no agent runs in the guest. Replies to a request
    that already timed out arrive with an id nobody waits for and are dropped, so a late agent cannot
    confuse later calls.
    """

    def __init__(self, path: Path | str, *, default_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.default_timeout = default_timeout
        self._qmp: QMP | None = None
        self._lock = asyncio.Lock()

    async def _connection(self, timeout: float) -> QMP:  # noqa: ASYNC109
        async with self._lock:
            if self._qmp is None or not self._qmp.connected:
                if self._qmp is not None:
                    await self._qmp.close()
                qmp = QMP(self.path, name="qga", guest_agent=True)
                try:
                    await qmp.connect(timeout)
                except QMPConnectError as err:
                    raise GuestAgentError("connect", f"guest agent socket not reachable: {err}") from err
                self._qmp = qmp
            return self._qmp

    async def execute(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        timeout = self.default_timeout if timeout is None else timeout
        qmp = await self._connection(timeout)
        try:
            return await qmp.execute(cmd, args, timeout=timeout)
        except QMPTimeoutError as err:
            raise GuestAgentError(cmd, f"guest agent did not answer within {timeout:g}s (not running?)") from err
        except QMPCommandError as err:
            raise GuestAgentError(cmd, err.message, err.error_class) from err


    async def shutdown(self, mode: str = "powerdown", *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """guest-shutdown (powerdown, reboot, halt). On success the agent sends no reply — it goes down with
        the guest — so silence until the timeout counts as accepted; an error reply still raises."""
        try:
            await self.execute("guest-shutdown", {"mode": mode}, timeout=timeout)
        except GuestAgentError as err:
            if not isinstance(err.__cause__, (QMPTimeoutError, QMPDisconnectedError)):
                raise

    async def ping(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self.execute("guest-ping", timeout=timeout)

    async def info(self, *, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        return await self.execute("guest-info", timeout=timeout)

    async def osinfo(self, *, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        return await self.execute("guest-get-osinfo", timeout=timeout)

    async def network_interfaces(self, *, timeout: float | None = None) -> list[dict[str, Any]]:  # noqa: ASYNC109
        return await self.execute("guest-network-get-interfaces", timeout=timeout)

    async def close(self) -> None:
        async with self._lock:
            if self._qmp is not None:
                await self._qmp.close()
                self._qmp = None
