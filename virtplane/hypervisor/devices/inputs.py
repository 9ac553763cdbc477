"""Input devices: a tablet (absolute pointer, so the VNC cursor lines up) on USB or virtio."""

from __future__ import annotations

from .base import BuildContext, Issue

JSON = dict


def check(spec: JSON, path: str) -> list[Issue]:
    issues: list[Issue] = []
    devices = (spec.get("domain") or {}).get("devices") or {}
    for i, dev in enumerate(devices.get("inputs") or []):
        ipath = f"{path}.domain.devices.inputs[{i}]"
        if dev.get("type") != "tablet":
            issues.append(Issue(f"{ipath}.type", "only tablet input devices are supported"))
        if (dev.get("bus") or "usb") not in ("usb", "virtio"):
            issues.append(Issue(f"{ipath}.bus", "input bus must be usb or virtio", "invalid"))
    return issues


def build(ctx: BuildContext) -> None:
    devices = ctx.devices
    inputs = list(devices.get("inputs") or [])
    if devices.get("autoattachInputDevice") and not inputs:
        inputs.append({"name": "tablet", "type": "tablet", "bus": "usb"})
    for dev in inputs:
        dev_id = f"input-{dev.get('name') or 'tablet'}"
        if (dev.get("bus") or "usb") == "virtio":
            ctx.device({"driver": "virtio-tablet-pci", "id": dev_id, "bus": ctx.pci.allocate()})
        else:
            ctx.ensure_usb_controller()
            ctx.device({"driver": "usb-tablet", "id": dev_id, "bus": "usb.0"})
