"""Kubernetes resource quantities (k8s.io/apimachinery resource.Quantity) as exact numbers.

Only what the hypervisor needs: byte sizes (`64Mi`, `1Gi`, `128M`, `1e9`, `0.5Gi`) and CPU counts (`500m`, `2`).
Arithmetic is done with `Fraction` so `0.5Gi` or `1.5G` are exact and nothing is lost to floats.
"""

from __future__ import annotations

import functools
import math
import re
from fractions import Fraction

# Suffix → multiplier. Binary (Ki..Ei), decimal SI (n..E) as in resource.Quantity.
_SUFFIXES: dict[str, Fraction] = {
    "": Fraction(1),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}

# sign, digits with optional fraction, then either a suffix or a decimal exponent (e/E followed by an integer).
_QUANTITY_RE = re.compile(
    r"^(?P<sign>[+-]?)(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<exp>[eE][+-]?[0-9]+)|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$"
)


class QuantityError(ValueError):
    """Not a valid Kubernetes quantity."""


def parse_quantity(value: str | int | float) -> Fraction:
    """Parse a Kubernetes quantity into an exact Fraction (`"64Mi"` → 67108864, `"500m"` → 1/2)."""
    if isinstance(value, bool):
        raise QuantityError(f"not a quantity: {value!r}")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise QuantityError(f"not a quantity: {value!r}")
        return Fraction(value)
    if not isinstance(value, str):
        raise QuantityError(f"not a quantity: {value!r}")
    return _parse_text(value)


@functools.lru_cache(maxsize=1024)
def _parse_text(value: str) -> Fraction:
    """Cached: the same few quantities (`128Mi`, `100m`) are parsed on every admission and build, and
    Fraction from text is slow. Fractions are immutable, so sharing them is safe."""
    m = _QUANTITY_RE.match(value.strip())
    if not m:
        raise QuantityError(f"not a quantity: {value!r}")
    number = Fraction(m.group("num"))
    if m.group("exp"):
        number *= Fraction(10) ** int(m.group("exp")[1:])
    else:
        number *= _SUFFIXES[m.group("suffix") or ""]
    return -number if m.group("sign") == "-" else number


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
