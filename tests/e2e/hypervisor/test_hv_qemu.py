"""The hypervisor layer against real QEMU (TCG) and virtplane's tiny guest.

The guest prints `virtplane-guest: ...` lines on the serial console (console.log) and a heartbeat
`virtplane-guest: tick <n> <uptime>` on its virtio console (guest.log); see images/README.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.hypervisor.conftest import GUEST, REPO, LogWatch, vmi
from virtplane.hypervisor.accel import probe_kvm, run_probe
from virtplane.hypervisor.cloudinit import build_for_volume
from virtplane.hypervisor.devices import spec_hash
from virtplane.hypervisor.errors import LaunchError
from virtplane.hypervisor.machine import Machine, RunState
from virtplane.hypervisor.process import ExitInfo
from virtplane.hypervisor.runtime import KernelBootFiles, NetworkAttachment, ResolvedVolume, RuntimeDir

pytestmark = pytest.mark.e2e

TICK = re.compile(GUEST + r"tick (\d+) ([0-9.]+)")
USER_DATA = """#cloud-config
bootcmd:
  - echo "virtplane-e2e user-data ran for $(hostname)" > /dev/console
"""

# Guest boots are a few seconds under TCG on a quiet host; a host busy with other tests (CI, developers)
# can make them many times slower. The waits are on conditions, so a generous bound costs nothing.
BOOT_TIMEOUT = 180


def overlay(base: Path, dest: Path) -> Path:
    """A qcow2 overlay on the shared base image, as the node agent makes for a containerDisk."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(dest)],
                   check=True)  # fmt: skip
    return dest


def blank_qcow2(dest: Path, size: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dest), size], check=True)
    return dest


def file_size(path: Path) -> int:
    return path.stat().st_size


async def test_accel_probe_picks_tcg_within_timeout() -> None:
    start = time.monotonic()
    probe = await probe_kvm(timeout=3.0)
    elapsed = time.monotonic() - start
    print(f"probe_kvm: {probe.reason} ({elapsed:.2f}s)")
    assert not probe.kvm_usable and probe.accel == "tcg"
    assert elapsed < 4.0
    # With a CPU model KVM can program here, the guest starts but crawls: the probe times out.
    start = time.monotonic()
    slow = await probe_kvm(timeout=1.5, cpu_model="qemu64")
    print(f"probe_kvm(qemu64): {slow.reason}")
    assert not slow.kvm_usable and time.monotonic() - start < 2.5
    # The probe guest itself is sound: under TCG it runs to completion.
    tcg = await run_probe("tcg", 10.0, cpu_model="max")
    assert tcg.kvm_usable, tcg.reason


async def test_bios_disk_cloudinit_pause_hotplug_adopt_powerdown(
    images: dict[str, Path], tmp_path: Path, machines: list[Machine]
) -> None:
    t: dict[str, float] = {}
    rt = RuntimeDir(tmp_path / "rt")
    spec = vmi(
        "e2e-bios",
        disks=[{"name": "containerdisk", "disk": {"bus": "virtio"}, "bootOrder": 1},
               {"name": "cloudinitdisk", "disk": {"bus": "virtio"}}],
        volumes=[{"name": "containerdisk", "containerDisk": {"image": "tiny"}},
                 {"name": "cloudinitdisk", "cloudInitNoCloud": {"userData": USER_DATA}}],
    )  # fmt: skip
    cidata = await build_for_volume(spec, "cloudinitdisk", tmp_path / "cidata.iso")
    volumes = {"containerdisk": ResolvedVolume(overlay(images["tiny.qcow2"], tmp_path / "root.qcow2"), "qcow2"),
               "cloudinitdisk": cidata}  # fmt: skip
    m = Machine.create(spec, rt, volumes, {"default": NetworkAttachment.user()}, "tcg")
    machines.append(m)
    console, guest = LogWatch(rt.console_log), LogWatch(rt.guest_log)

    start = time.monotonic()
    await m.start()
    t["start"] = time.monotonic() - start
    assert m.state == RunState.RUNNING
    await console.wait(GUEST + "booted", BOOT_TIMEOUT)
    t["booted"] = time.monotonic() - start

    # cloud-init NoCloud: datasource found, meta-data hostname applied, user-data executed
    await console.wait(GUEST + "cloud-init datasource nocloud", 30)
    assert (await console.wait(r"virtplane-e2e user-data ran for (\S+)", 30)).group(1) == "e2e-bios"
    t["user-data"] = time.monotonic() - start

    # pause: the heartbeat stops; resume: it continues from where it was
    await guest.wait(TICK.pattern, 30)
    t0 = time.monotonic()
    await m.pause()
    t["pause"] = time.monotonic() - t0
    assert m.state == RunState.PAUSED
    assert (await m.query_status())["status"] == "paused"
    guest.skip_to_end()
    last = int(TICK.findall(guest.text())[-1][0])
    await asyncio.sleep(2.5)  # a negative check needs time: no tick may appear while paused
    assert TICK.search(guest.text(), guest.offset) is None
    t0 = time.monotonic()
    await m.resume()
    t["resume"] = time.monotonic() - t0
    assert m.state == RunState.RUNNING
    n = int((await guest.wait(TICK.pattern, 10)).group(1))
    assert n == last + 1

    # guest agent
    await m.guest_ping(timeout=30)
    osinfo = await m.guest_osinfo()
    assert osinfo["kernel-release"].startswith("6.")

    stats = await m.stats()
    assert stats.cpu_time > 0 and stats.rss_bytes > 64 << 20
    assert stats.block["disk-containerdisk"].rd_bytes > 0
    assert 0 in stats.vcpu_times

    # disk hotplug (scsi on the controller, virtio on a spare root port) and unplug
    for bus, size in (("scsi", "16M"), ("virtio", "8M")):
        img = blank_qcow2(tmp_path / f"hot-{bus}.qcow2", size)
        t0 = time.monotonic()
        dev_id = await m.hotplug_disk({"name": f"hot-{bus}", "disk": {"bus": bus}}, ResolvedVolume(img, "qcow2"))
        assert dev_id == f"disk-hot-{bus}"
        added = await console.wait(GUEST + r"disk (\w+) added", 30)
        t[f"hotplug-{bus}"] = time.monotonic() - t0
        t0 = time.monotonic()
        await m.unplug_disk(f"hot-{bus}", timeout=30)
        await console.wait(GUEST + f"disk {added.group(1)} removed", 30)
        t[f"unplug-{bus}"] = time.monotonic() - t0
        await m.unplug_disk(f"hot-{bus}")  # idempotent: a retry after a timeout must not fail

    # NIC hotplug on a spare root port (user networking stands in for the network layer's tap)
    t0 = time.monotonic()
    await m.hotplug_nic({"name": "hot-nic", "model": "virtio", "bridge": {}}, NetworkAttachment.user())
    nic = (await console.wait(GUEST + r"nic (\w+) added", 30)).group(1)
    t["hotplug-nic"] = time.monotonic() - t0
    await m.unplug_nic("hot-nic", timeout=30)
    await console.wait(GUEST + f"nic {nic} removed", 30)
    await m.unplug_nic("hot-nic")

    # the consoles the node agent will proxy: serial on a unix socket (also logged), VNC (RFB) on another
    reader, writer = await asyncio.open_unix_connection(str(rt.serial_sock))
    writer.write(b"\n")
    await asyncio.wait_for(reader.readuntil(b"login: "), 10)
    writer.close()
    reader, writer = await asyncio.open_unix_connection(str(rt.vnc_sock))
    assert (await asyncio.wait_for(reader.readexactly(12), 5)).startswith(b"RFB 003.")
    writer.close()

    # node agent restart: a new Machine adopts the running QEMU; the guest never rebooted
    pid = m.pid
    await m.detach()
    guest.skip_to_end()
    before = TICK.findall(guest.text())[-1]
    t0 = time.monotonic()
    m2 = await Machine.adopt(rt)
    t["adopt"] = time.monotonic() - t0
    assert m2 is not None
    machines.append(m2)
    assert m2.pid == pid and m2.state == RunState.RUNNING and m2.spec_hash == m.spec_hash
    after = TICK.search(guest.text(), guest.offset) or await guest.wait(TICK.pattern, 10)
    assert int(after.group(1)) > int(before[0]) and float(after.group(2)) > float(before[1])
    assert len(re.findall(GUEST + "booted", console.text())) == 1
    await m2.pause()  # the adopted Machine controls the same process
    await m2.resume()

    # ACPI power button: the guest shuts down, QEMU exits 0, Stopped
    t0 = time.monotonic()
    await m2.powerdown()
    assert m2.state == RunState.SHUTTING_DOWN
    info = await m2.wait_exit(60)
    t["powerdown"] = time.monotonic() - t0
    assert info.exit_code == 0, info
    assert m2.state == RunState.STOPPED
    assert "guest-shutdown" in m2.reason
    print("timings (s):", {k: round(v, 3) for k, v in t.items()})


async def test_uefi_boot_then_external_kill9(images: dict[str, Path], tmp_path: Path, machines: list[Machine]) -> None:
    rt = RuntimeDir(tmp_path / "rt")
    spec = vmi(
        "e2e-uefi",
        disks=[{"name": "containerdisk", "disk": {"bus": "virtio"}}],
        volumes=[{"name": "containerdisk", "containerDisk": {"image": "tiny"}}],
        domain={"firmware": {"bootloader": {"efi": {"secureBoot": False}}}},
        interfaces=False,
    )
    volumes = {"containerdisk": ResolvedVolume(overlay(images["tiny.qcow2"], tmp_path / "root.qcow2"), "qcow2")}
    m = Machine.create(spec, rt, volumes, {}, "tcg")
    machines.append(m)
    console = LogWatch(rt.console_log)
    start = time.monotonic()
    await m.start()
    await console.wait(GUEST + "booted", BOOT_TIMEOUT)
    print(f"UEFI booted in {time.monotonic() - start:.2f}s")
    assert file_size(rt.efi_vars) == file_size(Path("/usr/share/OVMF/OVMF_VARS_4M.fd"))  # per-VM copy

    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)  # not through the Machine: QEMU dies under it
    info = await m.wait_exit(10)
    assert m.state == RunState.CRASHED
    assert info.signal == signal.SIGKILL and "SIGKILL" in m.reason


def kernel_vmi(name: str) -> dict[str, Any]:
    return vmi(
        name,
        disks=[],
        volumes=[],
        domain={"firmware": {"kernelBoot": {
            "kernelArgs": "console=ttyS0,115200",
            "container": {"image": "kernels", "kernelPath": "/boot/vmlinuz", "initrdPath": "/boot/initrd.img"}}}},
    )  # fmt: skip


async def test_agent_restart_adopts_orphaned_qemu_kernel_boot(
    images: dict[str, Path], tmp_path: Path, machines: list[Machine]
) -> None:
    """Agent 1 (a separate process) starts a kernelBoot VM and exits; QEMU lives on, parentless. Agent 2 (this
    test) adopts it, reboots the guest both ways, and powers it down — without being QEMU's parent."""
    rt = RuntimeDir(tmp_path / "rt")
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({
        "vmi": kernel_vmi("e2e-kernel"), "runtime": str(rt.path), "kernel": str(images["vmlinuz"]),
        "initrd": str(images["initrd.img"]), "wait_for": GUEST + "ready",
    }))  # fmt: skip
    start = time.monotonic()
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.e2e.hypervisor.agent_once", str(config), cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(agent.communicate(), 90)
    assert agent.returncode == 0
    pid = int(out)
    print(f"kernelBoot: agent 1 saw the guest ready after {time.monotonic() - start:.2f}s")

    t0 = time.monotonic()
    m = await Machine.adopt(rt)
    print(f"adopted in {time.monotonic() - t0:.3f}s")
    assert m is not None
    machines.append(m)
    assert m.pid == pid and m.state == RunState.RUNNING
    assert m.spec_hash == spec_hash(kernel_vmi("e2e-kernel"))
    reasons: list[str] = []
    m.add_state_listener(lambda _state, reason: reasons.append(reason))
    console = LogWatch(rt.console_log)
    await console.wait(GUEST + "ready")

    # guest-visible reboots: through the guest agent, and by ACPI power button + reset; the guest boots again
    for method in ("agent", "acpi"):
        t0 = time.monotonic()
        async with m.events({"RESET"}) as resets:
            assert await m.reboot(method=method) == method
            await resets.get(timeout=BOOT_TIMEOUT)
        await console.wait(GUEST + "booted", BOOT_TIMEOUT)
        assert m.state == RunState.RUNNING
        if method == "acpi":
            # reset + continue by the Machine once the guest powered off (SeaBIOS then resets once more itself)
            assert "rebooted" in reasons, reasons
        print(f"reboot via {method}: booted again after {time.monotonic() - t0:.2f}s")
        # The guest handles the power button (acpid) and runs its agent once its boot steps are done.
        await console.wait(GUEST + "ready", BOOT_TIMEOUT)

    info = await _powerdown(m)
    assert m.state == RunState.STOPPED, m.reason
    assert info.exit_code is None  # not our child: the status went to init; our intent says it was clean
    assert "guest-shutdown" in m.reason


async def _powerdown(m: Machine) -> ExitInfo:
    await m.powerdown()
    return await m.wait_exit(60)


async def test_adopt_after_kill9_reports_crash(
    images: dict[str, Path], tmp_path: Path, machines: list[Machine]
) -> None:
    rt = RuntimeDir(tmp_path / "rt")
    files = KernelBootFiles(kernel=images["vmlinuz"], initrd=images["initrd.img"])
    m = Machine.create(kernel_vmi("e2e-crash"), rt, {}, {"default": NetworkAttachment.user()}, "tcg",
                       kernel_boot=files)  # fmt: skip
    machines.append(m)
    start = time.monotonic()
    await m.start()
    await LogWatch(rt.console_log).wait(GUEST + "booted", BOOT_TIMEOUT)
    print(f"kernelBoot booted in {time.monotonic() - start:.2f}s")

    # the agent goes away, QEMU is SIGKILLed meanwhile; the next agent's adoption reports the crash
    pid = m.pid
    assert pid is not None
    await m.detach()
    os.kill(pid, signal.SIGKILL)
    m2 = await Machine.adopt(rt)
    assert m2 is not None and m2.pid == pid
    assert m2.state == RunState.CRASHED
    assert "SIGKILL" in m2.reason  # this process is QEMU's parent, so the status was collectable
    # ... and stays known: a later adoption reads what this one recorded
    m3 = await Machine.adopt(rt)
    assert m3 is not None and m3.state == RunState.CRASHED and m3.reason == m2.reason


async def test_start_failure_reports_qemu_stderr(tmp_path: Path, machines: list[Machine]) -> None:
    rt = RuntimeDir(tmp_path / "rt")
    spec = vmi("e2e-broken", disks=[{"name": "root", "disk": {}}], volumes=[{"name": "root", "emptyDisk": {}}],
               interfaces=False)  # fmt: skip
    m = Machine.create(spec, rt, {"root": ResolvedVolume(tmp_path / "missing.qcow2", "qcow2")}, {}, "tcg")
    machines.append(m)
    with pytest.raises(LaunchError) as err:
        await m.start()
    assert "missing.qcow2" in str(err.value)
    assert m.state == RunState.CRASHED and "missing.qcow2" in m.reason
    assert "missing.qcow2" in rt.stderr_log.read_text()


def _every_option_vmi() -> dict[str, Any]:
    """A spec using every device option the layer supports, to check QEMU accepts the whole command line."""
    spec = vmi(
        "e2e-options",
        disks=[
            {"name": "a", "disk": {"bus": "virtio"}, "dedicatedIOThread": True, "cache": "writethrough",
             "io": "threads", "serial": "A-1", "bootOrder": 1, "errorPolicy": "report",
             "blockSize": {"custom": {"logical": 512, "physical": 4096}}},
            {"name": "b", "disk": {"bus": "sata"}, "cache": "writeback", "shareable": True},
            {"name": "c", "disk": {"bus": "scsi"}, "errorPolicy": "enospace"},
            {"name": "d", "disk": {"bus": "usb"}},
            {"name": "e", "cdrom": {"bus": "sata"}},
            {"name": "f", "cdrom": {"bus": "scsi"}},
        ],
        volumes=[{"name": n, "emptyDisk": {"capacity": "8Mi"}} for n in "abcdef"],
        domain={
            "cpu": {"sockets": 1, "cores": 2, "threads": 1, "maxSockets": 2, "features": [{"name": "pcid"}]},
            "memory": {"guest": "128M"},
            "ioThreadsPolicy": "shared",
            "features": {"acpi": {}, "apic": {}, "smm": {"enabled": True}, "pvspinlock": {}},
            "clock": {"timezone": "Europe/Berlin",
                      "timer": {"hpet": {"present": False}, "rtc": {"tickPolicy": "catchup", "track": "wall"},
                                "pit": {"tickPolicy": "delay"}}},
            "chassis": {"manufacturer": "ACME", "serial": "S1", "asset": "A", "sku": "K", "version": "1"},
            "firmware": {"serial": "serial,with,commas", "bootloader": {"bios": {"useSerial": True}}},
            "rebootPolicy": "Terminate",
        },
    )  # fmt: skip
    devices = spec["spec"]["domain"]["devices"]
    devices.update({
        "blockMultiQueue": True, "autoattachInputDevice": True, "video": {"type": "virtio"},
        "inputs": [{"name": "t1", "type": "tablet", "bus": "virtio"}, {"name": "t2", "type": "tablet", "bus": "usb"}],
        "watchdog": {"name": "wd", "i6300esb": {"action": "reset"}},
    })  # fmt: skip
    devices["interfaces"][0].update(model="e1000e", bootOrder=2, acpiIndex=7, macAddress="02:00:00:00:00:01")
    models = ("e1000", "rtl8139", "ne2k_pci", "pcnet")
    devices["interfaces"] += [{"name": f"n-{m}", "model": m, "bridge": {}} for m in models]
    spec["spec"]["networks"] += [{"name": f"n-{m}", "pod": {}} for m in models]
    return spec


@pytest.mark.parametrize(
    "variant",
    ["every-option", "efi-secureboot", "efi-plain", "transitional", "no-extras"],
)
async def test_qemu_accepts_command_line(variant: str, tmp_path: Path, machines: list[Machine]) -> None:
    """QEMU validates every -device/-blockdev at startup: start paused (no guest runs), check, kill."""
    spec = _every_option_vmi()
    d = spec["spec"]["domain"]
    if variant.startswith("efi"):
        d["firmware"] = {"bootloader": {"efi": {"secureBoot": variant == "efi-secureboot"}}}
    elif variant == "transitional":
        d["devices"]["useVirtioTransitional"] = True
    elif variant == "no-extras":
        d["devices"].update({"autoattachGraphicsDevice": False, "autoattachSerialConsole": False,
                             "autoattachMemBalloon": False, "disableHotplug": True})  # fmt: skip
        del d["devices"]["video"]
    volumes = {n: ResolvedVolume(blank_qcow2(tmp_path / f"{n}.qcow2", "8M"), "qcow2") for n in "abcdef"}
    nets = {i["name"]: NetworkAttachment.user() for i in d["devices"]["interfaces"]}
    m = Machine.create(spec, RuntimeDir(tmp_path / "rt"), volumes, nets, "tcg")
    machines.append(m)
    await m.start(paused=True)
    assert m.state == RunState.PAUSED
    status = await m.query_status()
    assert status["status"] == "prelaunch" and not status["running"]
    info = await m.kill()
    assert m.state == RunState.STOPPED and info.signal == signal.SIGKILL
