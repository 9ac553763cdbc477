"""Kubernetes resource.Quantity parsing (`128Mi`, `1G`, `500m`, `1e3`, plain numbers).

Admission compares memory sizes (guest vs. requests vs. limits); exact decimal arithmetic keeps `1Gi`
and `1073741824` equal.
"""

from __future__ import annotations

import decimal
import functools
import math
import re

_QUANTITY_RE = re.compile(
    r"^(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))?$"
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": decimal.Decimal("1e-9"), "u": decimal.Decimal("1e-6"), "m": decimal.Decimal("1e-3"),
            "": decimal.Decimal(1), "k": decimal.Decimal(10**3), "M": decimal.Decimal(10**6),
            "G": decimal.Decimal(10**9), "T": decimal.Decimal(10**12), "P": decimal.Decimal(10**15),
            "E": decimal.Decimal(10**18)}


def parse_quantity(value: str | int | float) -> decimal.Decimal:
    """The exact value of a quantity; ValueError when it is not one."""
    if isinstance(value, bool):
        raise ValueError(f"quantity must be a string or a number, not {value!r}")
    if isinstance(value, int):
        return decimal.Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"quantity must be finite: {value!r}")
        return decimal.Decimal(repr(value))
    if not isinstance(value, str):
        raise ValueError(f"quantity must be a string or a number, not {value!r}")
    return _parse_text(value)


@functools.lru_cache(maxsize=1024)
def _parse_text(value: str) -> decimal.Decimal:
    """Cached: admission parses the same few quantities on every write; Decimals are immutable."""
    m = _QUANTITY_RE.match(value.strip())
    if m is None:
        raise ValueError(f"quantities must match the regular expression "
                         f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {value!r}")
    num = decimal.Decimal(m.group("num"))
    suffix = m.group("suffix") or ""
    if suffix in _BINARY:
        return num * _BINARY[suffix]
    if suffix in _DECIMAL:
        return num * _DECIMAL[suffix]
    return num * (decimal.Decimal(10) ** int(suffix[1:]))


def quantity_value(value: str | int | float) -> int:
    """The quantity rounded up to an integer, as resource.Quantity.Value() does (bytes, cores)."""
    return math.ceil(parse_quantity(value))
