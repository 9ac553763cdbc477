"""Run CNI plugins the way a kubelet (through its container runtime) does.

Each plugin is an executable in CNI_PATH that gets the operation in environment variables (CNI_COMMAND,
CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH) and its network configuration on stdin, and answers with a
JSON result (ADD) or an error object (any command, with a non-zero exit). A configuration list (`plugins`)
is a chain: ADD runs the plugins in order, each getting the previous result as `prevResult`; DEL runs them
in reverse (spec 1.0.0, "Network configuration lists").
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_CNI_PATH = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
PLUGIN_TIMEOUT = 30.0

JSON = dict[str, Any]


class CNIError(Exception):
    """A plugin failed, or the configuration is not usable. The message is meant for VMI status."""


@dataclasses.dataclass(frozen=True, slots=True)
class Invocation:
    container_id: str
    netns: str  # a path: /var/run/netns/NAME
    ifname: str = "eth0"


def parse_config(raw: str | Mapping[str, Any]) -> JSON:
    """A CNI config or config list → a config list (single configs become a one-plugin chain)."""
    try:
        conf = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except json.JSONDecodeError as err:
        raise CNIError(f"CNI config is not JSON: {err}") from None
    if not isinstance(conf, dict):
        raise CNIError("CNI config must be a JSON object")
    if "plugins" not in conf:
        if not conf.get("type"):
            raise CNIError("CNI config has neither `plugins` nor `type`")
        conf = {"cniVersion": conf.get("cniVersion", "1.0.0"), "name": conf.get("name", ""), "plugins": [conf]}
    if not conf.get("name"):
        raise CNIError("CNI config has no `name`")
    plugins = conf.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise CNIError("CNI config list has no plugins")
    for i, p in enumerate(plugins):
        if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
            raise CNIError(f"CNI config plugins[{i}] has no `type`")
        if "/" in p["type"]:
            raise CNIError(f"CNI plugin type {p['type']!r} must be a plain name")
    return conf


def find_plugin(kind: str, search: Sequence[Path]) -> Path:
    for d in search:
        candidate = d / kind
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CNIError(f"CNI plugin {kind!r} not found in {':'.join(str(d) for d in search)}")


async def _exec(plugin: Path, command: str, inv: Invocation, conf: JSON, search: Sequence[Path]) -> JSON:
    env = {
        "CNI_COMMAND": command, "CNI_CONTAINERID": inv.container_id, "CNI_NETNS": inv.netns,
        "CNI_IFNAME": inv.ifname, "CNI_PATH": ":".join(str(d) for d in search),
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        str(plugin), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(conf).encode()), PLUGIN_TIMEOUT)
    except TimeoutError:
        proc.kill()  # our own child, by its pid
        await proc.wait()
        raise CNIError(f"CNI plugin {plugin.name} {command} timed out after {PLUGIN_TIMEOUT:g}s") from None
    try:
        result = json.loads(out) if out.strip() else {}
    except json.JSONDecodeError:
        result = {}
    if proc.returncode != 0:
        msg = result.get("msg") if isinstance(result, dict) else None
        details = result.get("details") if isinstance(result, dict) else None
        text = msg or err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
        raise CNIError(f"CNI plugin {plugin.name} {command} failed: {text}" + (f" ({details})" if details else ""))
    return result if isinstance(result, dict) else {}


def _plugin_conf(conflist: JSON, plugin: JSON, prev: JSON | None) -> JSON:
    conf = {**plugin, "cniVersion": conflist.get("cniVersion", "1.0.0"), "name": conflist["name"]}
    if prev is not None:
        conf["prevResult"] = prev
    return conf


async def add(conflist: JSON, inv: Invocation, search: Sequence[Path] = DEFAULT_CNI_PATH) -> JSON:
    """ADD through the chain; returns the final result. On failure the chain is DELeted (best effort) so a
    half-run chain leaves no IPAM allocation or host veth behind, then the error is raised."""
    prev: JSON | None = None
    try:
        for plugin in conflist["plugins"]:
            prev = await _exec(find_plugin(plugin["type"], search), "ADD", inv, _plugin_conf(conflist, plugin, prev),
                               search)  # fmt: skip
    except CNIError:
        await delete(conflist, inv, search, prev, quiet=True)
        raise
    return prev or {}


async def delete(conflist: JSON, inv: Invocation, search: Sequence[Path] = DEFAULT_CNI_PATH,
                 prev: JSON | None = None, *, quiet: bool = False) -> list[str]:  # fmt: skip
    """DEL through the chain in reverse. Every plugin is run even when one fails (DEL must be idempotent and
    the later ones still hold resources); the errors are returned (or raised unless `quiet`)."""
    errors: list[str] = []
    for plugin in reversed(conflist["plugins"]):
        try:
            await _exec(find_plugin(plugin["type"], search), "DEL", inv, _plugin_conf(conflist, plugin, prev), search)
        except CNIError as err:
            errors.append(str(err))
    if errors and not quiet:
        raise CNIError("; ".join(errors))
    return errors


async def ipam_delete(conflist: JSON, inv: Invocation, search: Sequence[Path] = DEFAULT_CNI_PATH) -> list[str]:
    """DEL through the chain's IPAM plugins only (an IPAM plugin is an executable of the same protocol, run as
    the main plugins run it): releases an address whose interface is long gone. Returns the errors."""
    errors: list[str] = []
    for plugin in reversed(conflist["plugins"]):
        ipam = plugin.get("ipam")
        if not isinstance(ipam, dict) or not ipam.get("type") or "/" in str(ipam["type"]):
            continue
        try:
            await _exec(find_plugin(str(ipam["type"]), search), "DEL", inv, _plugin_conf(conflist, plugin, None),
                        search)  # fmt: skip
        except CNIError as err:
            errors.append(str(err))
    return errors


def without_ipam(conflist: JSON) -> JSON:
    """The chain with every plugin's IPAM swapped for `static` (whose DEL releases nothing): a DEL of it
    removes the interfaces and plugin state but keeps the addresses reserved."""
    return {**conflist, "plugins": [{**p, "ipam": {"type": "static"}} if isinstance(p.get("ipam"), dict) else p
                                    for p in conflist["plugins"]]}


def result_ipv4(result: Mapping[str, Any], ifname: str = "eth0") -> str | None:
    """The container interface's first IPv4 address (without prefix) from an ADD result (0.4.0 / 1.0.0)."""
    ifaces = result.get("interfaces") or []
    for ip in result.get("ips") or []:
        addr = str(ip.get("address", ""))
        if ":" in addr or not addr:
            continue
        idx = ip.get("interface")
        if idx is None or (isinstance(idx, int) and idx < len(ifaces) and ifaces[idx].get("name") == ifname
                           and ifaces[idx].get("sandbox")):  # fmt: skip
            return addr.split("/")[0]
    return None
