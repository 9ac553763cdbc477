"""Timestamps as the Kubernetes API writes them (RFC 3339, UTC, whole seconds)."""

from __future__ import annotations

import time

_cached: tuple[int, str] = (-1, "")


def now_rfc3339() -> str:
    """`2026-11-28T20:08:49Z`. Formatted once per second: strftime is a visible share of a create's cost
    (two timestamps per create) and the value only changes once a second."""
    global _cached  # a cache of a pure function of the clock, not state: safe to share
    now = int(time.time())
    if _cached[0] != now:
        _cached = (now, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)))
    return _cached[1]
