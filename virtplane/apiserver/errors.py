"""Kubernetes `Status` errors: every failure a client sees is one of these, never a traceback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from virtplane.api import resources

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    501: "NotImplemented",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class StatusError(Exception):
    """An API error carried to the client as a metav1.Status object."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        causes: Sequence[resources.Cause] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or REASONS.get(code, "Unknown")
        self.details = dict(details or {})
        if causes:
            self.details["causes"] = [c.to_json() for c in causes]
        self.headers = headers or {}

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _details(res: resources.Resource | None, name: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if name:
        d["name"] = name
    if res is not None:
        if res.group:
            d["group"] = res.group
        d["kind"] = res.plural
    return d


def not_found(res: resources.Resource, name: str) -> StatusError:
    return StatusError(404, f'{res.group_resource} "{name}" not found', details=_details(res, name))


def already_exists(res: resources.Resource, name: str) -> StatusError:
    return StatusError(
        409,
        f'{res.group_resource} "{name}" already exists',
        reason="AlreadyExists",
        details=_details(res, name),
    )


def conflict(res: resources.Resource, name: str, why: str | None = None) -> StatusError:
    why = why or "the object has been modified; please apply your changes to the latest version and try again"
    return StatusError(
        409,
        f'Operation cannot be fulfilled on {res.group_resource} "{name}": {why}',
        reason="Conflict",
        details=_details(res, name),
    )


def invalid(res: resources.Resource, kind: str, name: str, causes: Sequence[resources.Cause]) -> StatusError:
    summary = ", ".join(f"{c.field}: {c.message}" if c.field else c.message for c in causes)
    return StatusError(
        422,
        f'{kind}.{res.group or "core"} "{name}" is invalid: {summary}' if res.group else
        f'{kind} "{name}" is invalid: {summary}',
        details={**_details(res, name), "kind": kind},
        causes=causes,
    )


def bad_request(message: str, causes: Sequence[resources.Cause] = ()) -> StatusError:
    return StatusError(400, message, causes=causes)


def forbidden(message: str) -> StatusError:
    return StatusError(403, message)


def gone(message: str) -> StatusError:
    return StatusError(410, message, reason="Expired")
