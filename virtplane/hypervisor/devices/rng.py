"""devices.rng: a virtio-rng device fed from the host's /dev/urandom (never blocks, same quality)."""

from __future__ import annotations

from .base import BuildContext, Issue, virtio_driver

JSON = dict


def check(spec: JSON, path: str) -> list[Issue]:
    return []


def build(ctx: BuildContext) -> None:
    if ctx.devices.get("rng") is None:
        return
    ctx.object({"qom-type": "rng-random", "id": "objrng0", "filename": "/dev/urandom"})
    ctx.device({"driver": virtio_driver(ctx, "virtio-rng-pci"), "id": "rng0", "rng": "objrng0",
                "bus": ctx.pci.allocate()})
