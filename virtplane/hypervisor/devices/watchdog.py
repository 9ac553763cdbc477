"""The i6300esb watchdog; its action maps 1:1 onto QEMU's `-action watchdog=`."""

from __future__ import annotations

from .base import BuildContext, Issue

JSON = dict
ACTIONS = ("poweroff", "reset", "shutdown")


def check(spec: JSON, path: str) -> list[Issue]:
    watchdog = ((spec.get("domain") or {}).get("devices") or {}).get("watchdog")
    if not watchdog:
        return []
    wpath = f"{path}.domain.devices.watchdog"
    if "i6300esb" not in watchdog:
        return [Issue(wpath, "only the i6300esb watchdog is supported")]
    action = (watchdog.get("i6300esb") or {}).get("action") or "reset"
    if action not in ACTIONS:
        return [Issue(f"{wpath}.i6300esb.action", f"unknown action {action!r}", "invalid")]
    return []


def build(ctx: BuildContext) -> None:
    watchdog = ctx.devices.get("watchdog")
    if not watchdog:
        return
    action = (watchdog.get("i6300esb") or {}).get("action") or "reset"
    ctx.device({"driver": "i6300esb", "id": f"watchdog-{watchdog.get('name') or '0'}", "bus": "pcie.0"})
    ctx.head += ["-action", f"watchdog={action}"]
