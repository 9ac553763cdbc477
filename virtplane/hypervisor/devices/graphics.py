"""VNC and the video device (devices.autoattachGraphicsDevice, default on).

VNC listens on a unix socket in the runtime dir (the console proxy connects there; nothing listens on the
network). `share=allow-exclusive` lets several viewers watch at once while still honouring a client that
asks for exclusive access — KubeVirt's default kicks the first viewer out (#7041).
Default video device as in KubeVirt: VGA for BIOS guests, bochs-display for EFI guests (no legacy VGA
needed by UEFI).
"""

from __future__ import annotations

from .base import BuildContext, Issue, opt_escape

JSON = dict
VIDEO_DRIVERS = {"vga": "VGA", "virtio": "virtio-vga", "bochs": "bochs-display", "ramfb": "ramfb",
                 "cirrus": "cirrus-vga"}


def check(spec: JSON, path: str) -> list[Issue]:
    devices = (spec.get("domain") or {}).get("devices") or {}
    video = (devices.get("video") or {}).get("type")
    issues: list[Issue] = []
    if video is not None and video not in VIDEO_DRIVERS:
        issues.append(Issue(f"{path}.domain.devices.video.type", f"unknown video type {video!r}", "invalid"))
    if video is not None and devices.get("autoattachGraphicsDevice") is False:
        issues.append(Issue(f"{path}.domain.devices.video", "video needs autoattachGraphicsDevice", "invalid"))
    return issues


def build(ctx: BuildContext) -> None:
    devices = ctx.devices
    if devices.get("autoattachGraphicsDevice") is False:
        return
    video = (devices.get("video") or {}).get("type") or ("bochs" if ctx.is_efi else "vga")
    driver = VIDEO_DRIVERS[video]
    dev: JSON = {"driver": driver, "id": "video0"}
    if driver != "ramfb":
        # Slot 1 of the root complex, where a PC's VGA lives; integrated, never hot-unplugged.
        dev.update({"bus": "pcie.0", "addr": "0x1"})
    ctx.device(dev)
    ctx.body += ["-vnc", f"unix:{opt_escape(str(ctx.runtime.vnc_sock))},share=allow-exclusive"]
