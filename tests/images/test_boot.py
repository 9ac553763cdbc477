"""Boots every image format under QEMU TCG and checks what the guest promises: the
serial protocol, cloud-init (NoCloud and ConfigDrive), SSH, the guest agent, hotplug,
reboot persistence and clean ACPI shutdown. One boot serves many assertions, since a
boot costs seconds on 2 cores."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from virtplane.testing import guest

pytestmark = pytest.mark.e2e

BOOTED = r"virtplane-guest: booted$"
MAC0 = "52:54:00:12:34:56"  # QEMU's default MAC for the first NIC


def test_bios_disk_cloud_config_ssh_agent_hotplug_reboot_shutdown(
        images: guest.ImagePaths, ssh_key: tuple[Path, str], tmp_path: Path) -> None:
    key, pub = ssh_key
    seed = guest.make_nocloud_seed(
        tmp_path / "seed.iso",
        meta_data={"instance-id": "iid-bios-1", "local-hostname": "from-meta"},
        user_data=guest.cloud_config(
            hostname="bios-vm",
            ssh_authorized_keys=[pub],
            password="s3cret",
            chpasswd={"expire": False},
            runcmd=["echo virtplane-guest: runcmd-ran > /dev/console", ["touch", "/var/lib/virtplane/argv ok"]],
        ),
    )
    with guest.start_guest(tmp_path / "vm", image=images.qcow2, cidata=seed, ssh=True,
                           hotplug_ports=1, scsi=True) as g:
        g.wait_for(BOOTED, 90)
        g.wait_for(r"hostname bios-vm$")
        g.wait_for(r"virtplane-guest: ip eth0 10\.0\.2\.15$")
        g.wait_for(r"runcmd-ran")
        g.wait_for(r"virtplane-guest: ready$")

        out = g.ssh(key, "hostname; ls '/var/lib/virtplane/argv ok'; cat /run/tick").stdout.splitlines()
        assert out[0] == "bios-vm"
        assert re.fullmatch(r"virtplane-guest: tick \d+ [\d.]+", out[2])
        assert any(re.fullmatch(r"virtplane-guest: tick \d+ [\d.]+", line) for line in g.hvc_lines())

        osinfo = g.qga("guest-get-osinfo")
        assert osinfo["id"] == "virtplane-tiny"
        assert g.qga("guest-get-host-name")["host-name"] == "bios-vm"
        ifaces = {i["name"]: i for i in g.qga("guest-network-get-interfaces")}
        assert {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24} in ifaces["eth0"]["ip-addresses"]

        # Hotplug the way KubeVirt does: a SCSI disk on the virtio-scsi controller,
        # a NIC on a free PCIe root port.
        m = g.mark()
        g.qmp("blockdev-add", **{"node-name": "hp-disk", "driver": "file", "filename": str(seed),
                                 "read-only": True})
        g.qmp("device_add", driver="scsi-hd", id="hp-disk0", drive="hp-disk", bus="scsi0.0")
        g.wait_for(r"virtplane-guest: disk sda added$", 30, since=m)
        g.qmp("netdev_add", type="user", id="hp-net")
        g.qmp("device_add", driver="virtio-net-pci", id="hp-nic0", netdev="hp-net", bus="hp0")
        g.wait_for(r"virtplane-guest: nic eth1 added$", 30, since=m)
        g.wait_for(r"virtplane-guest: ip eth1 10\.0\.2\.15$", 30, since=m)
        g.qmp("device_del", id="hp-disk0")
        g.wait_for(r"virtplane-guest: disk sda removed$", 30, since=m)
        g.qmp("device_del", id="hp-nic0")
        g.wait_for(r"virtplane-guest: nic eth1 removed$", 30, since=m)

        # The serial console is a real login: root with the cloud-init password.
        g.console_login("root", "s3cret")
        assert g.console_run("cat /etc/hostname").strip() == "bios-vm"

        # Reboot keeps the instance state (state partition): runcmd must not run again.
        m = g.mark()
        g.ssh(key, "reboot", check=False, retry=False)
        g.wait_for(BOOTED, 60, since=m)
        g.wait_for(r"per-instance steps already done for iid-bios-1", 60, since=m)
        g.wait_for(r"virtplane-guest: ready$", 60, since=m)
        assert "runcmd-ran" not in "\n".join(g.console.lines[m:])

        # ACPI power button: a clean shutdown makes QEMU itself exit 0.
        g.qmp("system_powerdown")
        assert g.wait_exit(60) == 0
        g.wait_for(r"acpi power button")


def test_uefi_disk_user_data_script_and_poweroff(
        images: guest.ImagePaths, ssh_key: tuple[Path, str], tmp_path: Path) -> None:
    key, pub = ssh_key
    script = f"""#!/bin/sh
mkdir -p /root/.ssh && echo '{pub}' >> /root/.ssh/authorized_keys
echo "virtplane-guest: user-script-ran $(hostname)" > /dev/console
"""
    seed = guest.make_nocloud_seed(tmp_path / "seed.img", fs="vfat",
                                   meta_data={"instance-id": "iid-uefi-1", "local-hostname": "uefi-vm"},
                                   user_data=script)
    with guest.start_guest(tmp_path / "vm", image=images.qcow2, firmware="uefi", cidata=seed, ssh=True) as g:
        g.wait_for(BOOTED, 90)
        g.wait_for(r"cloud-init datasource nocloud")
        g.wait_for(r"user-script-ran uefi-vm", 60)
        assert "uefi-vm" in g.ssh(key, "hostname; ls /sys/firmware/efi").stdout
        g.ssh(key, "poweroff", check=False, retry=False)
        assert g.wait_exit(60) == 0


def test_iso_configdrive_e1000e_static_network(
        images: guest.ImagePaths, ssh_key: tuple[Path, str], tmp_path: Path) -> None:
    key, pub = ssh_key
    network_data = {
        "links": [{"id": "tap0", "type": "phy", "ethernet_mac_address": MAC0}],
        "networks": [{"id": "net0", "type": "ipv4", "link": "tap0", "ip_address": "10.0.2.15",
                      "netmask": "255.255.255.0",
                      "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.0.2.2"}]}],
        "services": [],
    }
    drive = guest.make_configdrive(
        tmp_path / "config-2.iso",
        meta_data={"uuid": "cd-uuid-1", "hostname": "iso-vm", "public_keys": {"k": pub}},
        user_data="#!/bin/sh\necho virtplane-guest: configdrive-script-ran > /dev/console\n",
        network_data=network_data)
    # The ISO boots from a SATA CD-ROM (AHCI, built for the cloud kernel) with an
    # e1000e NIC (also built): KubeVirt's defaults for cdroms and a common NIC model.
    with guest.start_guest(tmp_path / "vm", image=images.iso, boot="cdrom", cidata=drive, cidata_bus="sata",
                           nic="e1000e", ssh=True) as g:
        g.wait_for(BOOTED, 90)
        g.wait_for(r"cloud-init datasource configdrive")
        g.wait_for(r"virtplane-guest: ip eth0 10\.0\.2\.15$")
        g.wait_for(r"configdrive-script-ran")
        out = g.ssh(key, "hostname; cat /run/virtplane/if.eth0/mode; "
                    "cat /sys/class/net/eth0/device/uevent | grep DRIVER").stdout.split()
        assert out == ["iso-vm", "static", "DRIVER=e1000e"]
        g.qmp("system_powerdown")
        assert g.wait_exit(60) == 0


def test_kernel_boot_network_config_v2_static_on_sata_seed(
        images: guest.ImagePaths, ssh_key: tuple[Path, str], tmp_path: Path) -> None:
    key, pub = ssh_key
    seed = guest.make_nocloud_seed(
        tmp_path / "seed.img", fs="vfat",
        meta_data={"instance-id": "iid-kernel-1", "local-hostname": "kernel-vm"},
        user_data=guest.cloud_config(ssh_authorized_keys=[pub]),
        network_config={"version": 2, "ethernets": {"nic0": {
            "match": {"macaddress": MAC0}, "addresses": ["10.0.2.15/24"],
            "routes": [{"to": "default", "via": "10.0.2.2"}], "nameservers": {"addresses": ["10.0.2.3"]}}}})
    with guest.start_guest(tmp_path / "vm", boot="kernel", kernel=images.vmlinuz, initrd=images.initrd,
                           cmdline=images.kernel_cmdline, cidata=seed, cidata_bus="sata", ssh=True) as g:
        g.wait_for(BOOTED, 90)
        g.wait_for(r"virtplane-guest: ip eth0 10\.0\.2\.15$")
        out = g.ssh(key, "hostname; cat /run/virtplane/if.eth0/mode; ip route show default; cat /etc/resolv.conf")
        lines = out.stdout.splitlines()
        assert lines[:2] == ["kernel-vm", "static"]
        assert "default via 10.0.2.2 dev eth0" in lines[2]
        assert "nameserver 10.0.2.3" in lines
        # KubeVirt's accessCredentials propagate keys through the guest agent.
        key2, pub2 = guest.make_ssh_key(tmp_path / "k2")
        g.qga("guest-ssh-add-authorized-keys", username="root", keys=[pub2])
        assert g.ssh(key2, "echo via-agent-key").stdout.strip() == "via-agent-key"
        # The agent's shutdown goes through the /sbin/shutdown shim to an ACPI poweroff.
        g.qga("guest-shutdown", mode="powerdown")
        assert g.wait_exit(60) == 0


@pytest.mark.parametrize("artifact", ["tiny.raw.xz", "tiny.vmdk", "tiny.vhdx"])
def test_import_formats_boot_to_a_passwordless_console(
        images: guest.ImagePaths, tmp_path: Path, artifact: str) -> None:
    # No cloud-init at all: the image must still boot, and root logs in on the
    # serial console without a password (the cloud-image default here).
    with guest.start_guest(tmp_path / "vm", image=images.out / artifact, nic=None,
                           virtio_console=False, qga=False) as g:
        g.wait_for(BOOTED, 90)
        g.wait_for(r"cloud-init no datasource")
        g.console_login("root")
        info = json.loads(g.console_run("echo \"{\\\"state\\\": \\\"$(cat /proc/mounts | grep -c vda2)\\\"}\""))
        assert info == {"state": "1"}
