"""Container probes (startup, liveness, readiness) as the kubelet runs them: exec (in the container, through runc),
httpGet (2xx/3xx is success) and tcpSocket (a connection is success) against the pod IP, with
initialDelaySeconds / periodSeconds / timeoutSeconds / successThreshold / failureThreshold.

Results live in memory: after an agent restart a readiness probe starts over (not ready until it passes
again), as after a kubelet restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

JSON = dict[str, Any]


@dataclasses.dataclass(slots=True)
class ProbeState:
    run: str = ""  # the container run (start time) these counters belong to
    last: float = 0.0
    successes: int = 0
    failures: int = 0
    ok: bool = False
    message: str = ""


def resolve_port(container: JSON, port: Any) -> int:
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"port {port!r} is not a named port of the container")


ExecFn = Callable[[list[str], float], Awaitable[tuple[int, bytes]]]  # (command, timeout) → (exit code, output)


async def run_probe(probe: JSON, container: JSON, pod_ip: str, run_exec: ExecFn) -> tuple[bool, str]:
    timeout = float(probe.get("timeoutSeconds") or 1)
    try:
        if probe.get("exec"):
            code, out = await run_exec(list(probe["exec"].get("command") or []), timeout)
            if code == 0:
                return True, ""
            return False, f"command failed with exit code {code}: {out.decode(errors='replace')[:200]}"
        if probe.get("httpGet"):
            hg = probe["httpGet"]
            port = resolve_port(container, hg.get("port"))
            scheme = str(hg.get("scheme") or "HTTP").lower()
            host = hg.get("host") or pod_ip
            url = f"{scheme}://{host}:{port}{hg.get('path') or '/'}"
            headers = {h["name"]: h["value"] for h in hg.get("httpHeaders") or []}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
                    s.get(url, headers=headers, ssl=False, allow_redirects=False) as r:  # fmt: skip
                ok = 200 <= r.status < 400
                return ok, "" if ok else f"HTTP probe failed with statuscode: {r.status}"
        if probe.get("tcpSocket"):
            port = resolve_port(container, probe["tcpSocket"].get("port"))
            host = probe["tcpSocket"].get("host") or pod_ip
            _r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
            return True, ""
    except TimeoutError:
        return False, f"timeout: probe did not answer within {timeout:g}s"
    except (OSError, aiohttp.ClientError, ValueError) as err:
        return False, str(err) or type(err).__name__
    return False, "probe has no handler (exec, httpGet or tcpSocket)"


def due(probe: JSON, state: ProbeState, started: float, now: float) -> bool:
    if now < started + float(probe.get("initialDelaySeconds") or 0):
        return False
    return now - state.last >= float(probe.get("periodSeconds") or 10)


def record(probe: JSON, state: ProbeState, ok: bool, message: str) -> None:
    state.last = time.time()  # wall clock, as `due` compares it with the container's start time
    state.message = message
    if ok:
        state.successes += 1
        state.failures = 0
        if state.successes >= int(probe.get("successThreshold") or 1):
            state.ok = True
    else:
        state.failures += 1
        state.successes = 0
        if state.failures >= int(probe.get("failureThreshold") or 3):
            state.ok = False
