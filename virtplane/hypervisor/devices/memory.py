"""Guest memory: domain.memory.guest, else resources.requests.memory, else resources.limits.memory."""

from __future__ import annotations

from ..errors import InvalidSpecError
from ..quantity import QuantityError, mib_ceil, parse_bytes
from .base import BuildContext, Issue

JSON = dict
MIN_BYTES = 1 << 20


def _source(domain: JSON) -> tuple[str, object] | None:
    guest = (domain.get("memory") or {}).get("guest")
    if guest is not None:
        return "memory.guest", guest
    resources = domain.get("resources") or {}
    for section in ("requests", "limits"):
        value = (resources.get(section) or {}).get("memory")
        if value is not None:
            return f"resources.{section}.memory", value
    return None


def guest_memory_bytes(domain: JSON) -> int:
    """The guest's RAM in bytes. Raises InvalidSpecError (with the field path) when missing or malformed."""
    src = _source(domain)
    if src is None:
        raise InvalidSpecError(
            "spec.domain.memory.guest", "no guest memory: set memory.guest or resources.requests.memory"
        )
    field, value = src
    try:
        size = parse_bytes(value)  # type: ignore[arg-type]
    except QuantityError as err:
        raise InvalidSpecError(f"spec.domain.{field}", str(err)) from err
    if size < MIN_BYTES:
        raise InvalidSpecError(f"spec.domain.{field}", "guest memory must be at least 1Mi")
    return size


def check(spec: JSON, path: str) -> list[Issue]:
    domain = spec.get("domain") or {}
    try:
        guest = guest_memory_bytes(domain)
    except InvalidSpecError as err:
        return [Issue(err.field_path.replace("spec", path, 1), err.message, "invalid")]
    limit = ((domain.get("resources") or {}).get("limits") or {}).get("memory")
    if limit is not None:
        try:
            if parse_bytes(limit) < guest:
                return [Issue(f"{path}.domain.memory.guest", "guest memory exceeds resources.limits.memory", "invalid")]
        except QuantityError as err:
            return [Issue(f"{path}.domain.resources.limits.memory", str(err), "invalid")]
    return []


def build(ctx: BuildContext) -> None:
    # QEMU takes MiB; round up so the guest never gets less than asked (128M = 122.07Mi → 123 MiB).
    ctx.head += ["-m", f"size={mib_ceil(guest_memory_bytes(ctx.domain))}M"]
