"""Launching QEMU as a daemon-like child and watching a pid — ours or adopted — for its exit.

QEMU runs in its own session (setsid) with stdin from /dev/null and stdout/stderr appended to a file, so
it survives the node agent dying (no controlling terminal, no SIGHUP, no SIGPIPE). Exit is observed with
a pidfd registered in the event loop: it works for processes that are not our children (after adoption),
and signalling through it cannot hit a recycled pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import shutil
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from . import cgroups
from .errors import LaunchError


@dataclasses.dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a QEMU process ended. `exit_code`/`signal` are None when we were not its parent (adopted
    after a node agent restart) and therefore could not collect its status."""

    exit_code: int | None
    signal: int | None
    reason: str

    @classmethod
    def from_wait_status(cls, status: int) -> ExitInfo:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return cls(None, sig, f"killed by signal {signal.Signals(sig).name}")
        code = os.waitstatus_to_exitcode(status)
        return cls(code, None, f"exited with code {code}")

    def to_json(self) -> dict[str, object]:
        return {"exit_code": self.exit_code, "signal": self.signal, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ExitInfo:
        code, sig = data.get("exit_code"), data.get("signal")
        return cls(
            int(code) if isinstance(code, int) else None,
            int(sig) if isinstance(sig, int) else None,
            str(data.get("reason") or ""),
        )


def spawn(argv: Sequence[str], log_path: Path, pass_fds: Sequence[int] = ()) -> int:
    """Start argv in a new session; returns its pid. stdout+stderr are appended to `log_path`."""
    exe = shutil.which(argv[0])
    if exe is None:
        raise LaunchError(f"{argv[0]} not found in PATH")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    # Only explicitly passed fds (tap fds) are inherited: Python's fds are close-on-exec by default.
    previously = {fd: os.get_inheritable(fd) for fd in pass_fds}
    try:
        for fd in pass_fds:
            os.set_inheritable(fd, True)
        return os.posix_spawn(
            exe,
            list(argv),
            # glibc gives each thread that mallocs its own arena (up to 8 per core), each keeping freed
            # memory; QEMU's vCPU, I/O and RCU threads then hold a few MiB apiece for nothing.
            {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")},
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    except OSError as err:
        raise LaunchError(f"cannot start {exe}: {err}") from err
    finally:
        for fd, inheritable in previously.items():
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, inheritable)
        os.close(log_fd)


def nice_for_cpu_request(cores: float | None) -> int:
    """The CPU niceness that gives a VM the scheduler weight Kubernetes gives its CPU request.

    The kubelet sets a container's cpu.shares to request x 1024 per core (100m -> 102) against 1024 for
    the system's own daemons; the kernel's weight falls by ~1.25x per nice step (nice 0 = 1024, 10 = 110),
    so nice = log1.25(1024 / shares). Without this, each QEMU (a session of its own, hence an autogroup of
    its own) weighs as much as the node agent and the control plane together: 100 booting TCG guests on 2
    cores then starve the agent that reports them Running. A request of a core or more stays at nice 0:
    a VM never outranks the node's own processes.
    """
    if cores is None or cores >= 1:
        return 0
    return min(19, round(math.log(1024 / cgroups.shares_for(cores), 1.25)))


def set_niceness(pid: int, nice: int) -> None:
    """Lower a process's CPU priority: its autogroup's (when the kernel groups by session, the weight that
    counts between sessions) and each thread's (nice is per thread on Linux). Best effort: a process that
    is gone or a kernel without autogroups is not an error."""
    if nice <= 0:
        return
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def proc_state(pid: int) -> str | None:
    """The process state letter from /proc/<pid>/stat (R, S, D, Z, ...), None when there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The comm field may contain spaces and parentheses: the state follows the last ')'.
    return stat[stat.rindex(")") + 2]


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return [part.decode(errors="surrogateescape") for part in raw.split(b"\0")[:-1]]


class _NotYet:
    """try_reap: our child, but not waitable yet (its threads are still exiting)."""


NOT_YET = _NotYet()


def try_reap(pid: int) -> ExitInfo | _NotYet | None:
    """Collect the exit status of `pid` if it is our exited child.

    Returns the ExitInfo; NOT_YET when it is our child but still running (or a zombie leader whose other
    threads are still exiting — /proc says Z before waitpid can collect it); None when it is not our child.
    """
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if got == 0:
        return NOT_YET
    return ExitInfo.from_wait_status(status)


async def reap_soon(pid: int, timeout: float = 5.0) -> ExitInfo | None:  # noqa: ASYNC109
    """try_reap, waiting (briefly) for a dying child to become waitable. None when not our child."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = try_reap(pid)
        if not isinstance(info, _NotYet):
            return info
        if loop.time() > deadline:
            return None
        await asyncio.sleep(0.01)


class ProcessWatch:
    """Calls `on_exit(ExitInfo)` once, from the event loop, when the process ends."""

    def __init__(self, pid: int, on_exit: Callable[[ExitInfo], None]) -> None:
        self.pid = pid
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self._done = False
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None
            self._loop.call_soon(self._exited)
            return
        self._loop.add_reader(self._pidfd, self._exited)

    @property
    def done(self) -> bool:
        return self._done

    def send_signal(self, sig: int) -> None:
        if self._done:
            return
        if self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, sig)
        else:
            os.kill(self.pid, sig)

    def _exited(self) -> None:
        if self._done:
            return
        info = try_reap(self.pid)
        if isinstance(info, _NotYet):
            if proc_state(self.pid) in (None, "Z", "X"):
                # Dying child whose threads are still exiting: look again shortly.
                self._loop.call_later(0.01, self._exited)
            return  # else: a spurious wake-up, still running
        if info is None:
            # Not our child (adopted after an agent restart): the status went to its real parent.
            info = ExitInfo(None, None, "process gone")
        self.close()
        self._done = True
        self._on_exit(info)

    def close(self) -> None:
        """Stop watching (the process keeps running)."""
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
