"""Errors of the hypervisor layer.

Every error that is caused by something else (an OSError, a QMP error response, a dead process) is raised
`from` that cause, so callers can report the root cause (`err.__cause__`) without parsing messages.
"""

from __future__ import annotations

from typing import Any


class HypervisorError(Exception):
    """Base class of everything this package raises on purpose."""


class UnsupportedSpecError(HypervisorError):
    """A VMI spec field (or field value) this layer cannot turn into QEMU arguments.

    `field_path` is a KubeVirt-style path relative to the VMI object, e.g.
    `spec.domain.devices.disks[1].lun`, so the API server can return it as a StatusCause.
    """

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field_path = field_path
        self.message = message


class InvalidSpecError(HypervisorError):
    """The spec is self-contradictory or references something that does not exist (e.g. a disk without
    a volume). Admission should have rejected it; we still refuse to guess."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field_path = field_path
        self.message = message


class MissingResourceError(HypervisorError):
    """The caller did not resolve something the spec needs (a volume's file, a network's tap, kernel files)."""


class InvalidStateError(HypervisorError):
    """An action was requested in a run state that does not allow it."""

    def __init__(self, action: str, state: Any, allowed: tuple[Any, ...] = ()) -> None:
        state_name = getattr(state, "value", state)
        msg = f"cannot {action}: machine is {state_name}"
        if allowed:
            msg += f" (allowed in: {', '.join(str(getattr(s, 'value', s)) for s in allowed)})"
        super().__init__(msg)
        self.action = action
        self.state = state


class LaunchError(HypervisorError):
    """QEMU could not be started or died before it was controllable. `stderr` holds QEMU's last words."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(f"{message}: {stderr.strip()}" if stderr.strip() else message)
        self.stderr = stderr


class QMPError(HypervisorError):
    """Base class for monitor (QMP / guest agent) failures."""


class QMPConnectError(QMPError):
    """Could not connect to a QMP or guest-agent socket within the allowed time."""


class QMPCommandError(QMPError):
    """A command failed. `error_class` is QEMU's error class (e.g. `GenericError`, `DeviceNotFound`) when
    QEMU answered with an error, or None when the command never got an answer (see `__cause__`)."""

    def __init__(self, command: str, message: str, error_class: str | None = None) -> None:
        super().__init__(f"{command}: {message}")
        self.command = command
        self.error_class = error_class
        self.message = message


class QMPDisconnectedError(QMPCommandError):
    """The monitor connection is gone (QEMU exited or the socket was closed) before the command finished."""


class QMPTimeoutError(QMPCommandError):
    """No answer within the timeout. For the guest agent this usually means no agent runs in the guest."""


class GuestAgentError(QMPCommandError):
    """A guest agent command failed or the agent is not reachable."""


class CloudInitError(HypervisorError):
    """The cloud-init data disk could not be built."""
