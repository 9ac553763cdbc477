"""Kubernetes resource quantities as the hypervisor needs them: exact byte sizes and CPU counts.

The parsing itself is `virtplane.api.quantity` (one grammar for admission and the hypervisor); here the
value becomes a `Fraction`, so `0.5Gi`, `1.5G` or `500m` are exact and nothing is lost to floats, and a
bad quantity is a `QuantityError` the device builders can turn into a field message.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

from virtplane.api import quantity as api_quantity


class QuantityError(ValueError):
    """Not a valid Kubernetes quantity."""


def parse_quantity(value: str | int | float) -> Fraction:
    """Parse a Kubernetes quantity into an exact Fraction (`"64Mi"` → 67108864, `"500m"` → 1/2)."""
    if isinstance(value, str):
        return _parse_text(value)
    try:
        return Fraction(api_quantity.parse_quantity(value))
    except ValueError as exc:
        raise QuantityError(f"not a quantity: {value!r}") from exc


@functools.lru_cache(maxsize=1024)
def _parse_text(value: str) -> Fraction:
    """Cached: the same few quantities (`128Mi`, `100m`) come back on every build; Fractions are immutable."""
    try:
        return Fraction(api_quantity.parse_quantity(value))
    except (ValueError, ArithmeticError) as exc:
        raise QuantityError(f"not a quantity: {value!r}") from exc


def parse_bytes(value: str | int | float) -> int:
    """A byte size; fractional bytes round up, as Kubernetes does for memory (`Value()` rounds up)."""
    q = parse_quantity(value)
    if q < 0:
        raise QuantityError(f"negative size: {value!r}")
    return math.ceil(q)


def parse_cpu(value: str | int | float) -> Fraction:
    """A CPU amount in cores (`"500m"` → 1/2)."""
    q = parse_quantity(value)
    if q < 0:
        raise QuantityError(f"negative cpu: {value!r}")
    return q


def mib_ceil(size_bytes: int) -> int:
    """Bytes → whole MiB, rounding up (QEMU's `-m` takes MiB; never give the guest less than asked)."""
    return -(-size_bytes // (1 << 20))
