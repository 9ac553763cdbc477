"""The memory balloon (devices.autoattachMemBalloon, default on): lets the host reclaim guest memory and
reports guest memory statistics."""

from __future__ import annotations

from .base import BALLOON_ID, BuildContext, Issue, virtio_driver

JSON = dict


def check(spec: JSON, path: str) -> list[Issue]:
    return []


def build(ctx: BuildContext) -> None:
    if ctx.devices.get("autoattachMemBalloon", True) is False:
        return
    ctx.device({"driver": virtio_driver(ctx, "virtio-balloon-pci"), "id": BALLOON_ID, "bus": ctx.pci.allocate()})
