"""Prometheus text-format metrics, kept per API server instance (no global registry)."""

from __future__ import annotations

import bisect
from collections import defaultdict

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self.latency: dict[tuple[str, str], list[int]] = {}
        self.latency_sum: dict[tuple[str, str], float] = defaultdict(float)
        self.watchers: dict[str, int] = defaultdict(int)
        self.gauges: dict[str, float] = {}

    def observe(self, verb: str, resource: str, code: int, seconds: float, group: str = "") -> None:
        self.requests[(verb, group, resource, str(code))] += 1
        if verb == "WATCH":
            return  # a watch's duration is its lifetime, not a latency
        key = (verb, resource)
        counts = self.latency.get(key)
        if counts is None:
            counts = self.latency[key] = [0] * (len(BUCKETS) + 1)
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum[key] += seconds

    def render(self) -> str:
        out = [
            "# HELP apiserver_request_total Counter of apiserver requests by verb, group, resource and code.",
            "# TYPE apiserver_request_total counter",
        ]
        for (verb, group, res, code), n in sorted(self.requests.items()):
            out.append(
                f'apiserver_request_total{{verb="{verb}",group="{group}",resource="{res}",code="{code}"}} {n}'
            )
        out += [
            "# HELP apiserver_request_duration_seconds Response latency by verb and resource.",
            "# TYPE apiserver_request_duration_seconds histogram",
        ]
        for (verb, res), counts in sorted(self.latency.items()):
            acc = 0
            for le, c in zip((*BUCKETS, float("inf")), counts, strict=True):
                acc += c
                le_s = "+Inf" if le == float("inf") else repr(le)
                out.append(
                    f'apiserver_request_duration_seconds_bucket{{verb="{verb}",resource="{res}",le="{le_s}"}} {acc}'
                )
            out.append(f'apiserver_request_duration_seconds_sum{{verb="{verb}",resource="{res}"}} '
                       f"{self.latency_sum[(verb, res)]:.6f}")
            out.append(f'apiserver_request_duration_seconds_count{{verb="{verb}",resource="{res}"}} {acc}')
        out += ["# HELP apiserver_registered_watchers Number of open watches by resource.",
                "# TYPE apiserver_registered_watchers gauge"]
        for res, n in sorted(self.watchers.items()):
            out.append(f'apiserver_registered_watchers{{resource="{res}"}} {n}')
        for name, value in sorted(self.gauges.items()):
            out.append(f"# TYPE {name} gauge")
            out.append(f"{name} {value}")
        return "\n".join(out) + "\n"
