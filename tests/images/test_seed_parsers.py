"""The guest's YAML/JSON flatteners (busybox awk), run on the host's busybox."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

AWK_DIR = Path(__file__).resolve().parents[2] / "images" / "guest" / "usr" / "lib" / "virtplane"

pytestmark = pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox-static not installed")


def flat(script: str, text: str) -> list[str]:
    res = subprocess.run(["/bin/busybox", "awk", "-f", str(AWK_DIR / script)], input=text,
                         capture_output=True, text=True, check=True)
    return res.stdout.splitlines()


def test_cloud_config_subset() -> None:
    doc = """#cloud-config
hostname: web-1   # trailing comment
password: 'it''s'
chpasswd: { expire: False }
ssh_authorized_keys:
  - ssh-ed25519 AAAAC3 a@b
  - "ssh-rsa AAAAB3 key#2"
runcmd:
- echo hi > /tmp/x
- [ sh, -c, "echo a, b" ]
users:
  - name: alice
    ssh_authorized_keys: [k1, k2]
  - default
write_files:
  - path: /etc/motd
    content: |
      line one
        indented
"""
    assert flat("yaml2flat.awk", doc) == [
        "hostname=web-1",
        "password=it's",
        "chpasswd.expire=False",
        "ssh_authorized_keys.0=ssh-ed25519 AAAAC3 a@b",
        "ssh_authorized_keys.1=ssh-rsa AAAAB3 key#2",
        "runcmd.0=echo hi > /tmp/x",
        "runcmd.1.0=sh",
        "runcmd.1.1=-c",
        "runcmd.1.2=echo a, b",
        "users.0.name=alice",
        "users.0.ssh_authorized_keys.0=k1",
        "users.0.ssh_authorized_keys.1=k2",
        "users.1=default",
        "write_files.0.path=/etc/motd",
        "write_files.0.content=line one",
        "write_files.0.content=  indented",
    ]


def test_network_config_v2() -> None:
    doc = """network:
  version: 2
  ethernets:
    id0:
      match:
        macaddress: "52:54:00:12:34:56"
      addresses:
        - 10.0.2.15/24
      routes:
        - to: default
          via: 10.0.2.2
      nameservers:
        addresses: [10.0.2.3]
"""
    assert flat("yaml2flat.awk", doc) == [
        "network.version=2",
        "network.ethernets.id0.match.macaddress=52:54:00:12:34:56",
        "network.ethernets.id0.addresses.0=10.0.2.15/24",
        "network.ethernets.id0.routes.0.to=default",
        "network.ethernets.id0.routes.0.via=10.0.2.2",
        "network.ethernets.id0.nameservers.addresses.0=10.0.2.3",
    ]


def test_json_meta_data() -> None:
    doc = '{"uuid": "u-1", "hostname": "h\\"q", "public_keys": {"k": "ssh-ed25519 A b"},\n' \
          ' "n": 3, "ok": true, "z": null, "links": [{"id": "l0"}, {"id": "l1"}], "e": []}'
    assert flat("json2flat.awk", doc) == [
        "uuid=u-1",
        'hostname=h"q',
        "public_keys.k=ssh-ed25519 A b",
        "n=3",
        "ok=true",
        "z=",
        "links.0.id=l0",
        "links.1.id=l1",
    ]
