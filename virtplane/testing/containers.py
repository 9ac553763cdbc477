"""A container image built from Debian's static busybox, for pod tests against a real registry.

One gzip layer: /bin/busybox plus symlinks for the applets tests use, /etc/passwd and /etc/group (root,
nobody), /tmp, /var/www. Image config: Cmd ["sh"], Env PATH, like the busybox image on Docker Hub.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from virtplane.hypervisor import cgroups
from virtplane.node.pods.runtime import release_cgroup_parent
from virtplane.node.pods.setup import cgroup_scope

from .guest import push_oci_layout

BUSYBOX = Path("/usr/bin/busybox")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
APPLETS = ("sh", "ash", "echo", "cat", "ls", "sleep", "httpd", "wget", "env", "ps", "kill", "true", "false",
           "hostname", "id", "ip", "ifconfig", "date", "mkdir", "rm", "touch", "grep", "head", "tail", "nc", "pwd",
           "seq", "printf", "test", "stat", "mount", "uname", "tr", "wc", "sed", "top", "trap")  # fmt: skip


def make_busybox_oci_layout(dest: Path, *, cmd: list[str] | None = None, env: list[str] | None = None) -> Path:
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def blob(data: bytes, media_type: str) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    def add(tar: tarfile.TarFile, name: str, *, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
            link: str = "") -> None:  # fmt: skip
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = 1700000000
        info.linkname = link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "etc", "tmp", "var", "var/www", "root", "proc", "sys", "dev"):
            add(tar, d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        add(tar, "bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755)
        for a in APPLETS:
            add(tar, f"bin/{a}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        add(tar, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add(tar, "etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")
        add(tar, "var/www/index.html", data=b"hello from busybox\n")
    layer_tar = raw.getvalue()
    layer = blob(gzip.compress(layer_tar, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")
    config = blob(json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd or ["sh"], "Env": env or [f"PATH={PATH}"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer_tar).hexdigest()}"]},
    }).encode(), "application/vnd.oci.image.config.v1+json")  # fmt: skip
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config, "layers": [layer]}).encode()  # fmt: skip
    desc = blob(manifest, "application/vnd.oci.image.manifest.v1+json")
    desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc],
                                                 "mediaType": "application/vnd.oci.image.index.v1+json"}))
    return dest


def push_busybox_image(registry: str, workdir: Path, repository: str = "virtplane/busybox", tag: str = "1") -> str:
    """Build and push the busybox image; returns its reference (`host:port/repo:tag`)."""
    push_oci_layout(registry, make_busybox_oci_layout(workdir / f"busybox-oci-{tag}"), repository, tag)
    return f"{registry}/{repository}:{tag}"


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """An htpasswd file for docker-registry's `auth: htpasswd` (it accepts bcrypt entries only). The hashes
    come from the system's libcrypt (libxcrypt, part of every Debian), so no bcrypt package is needed."""
    import ctypes

    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lines = []
    for user, password in users.items():
        salt = lib.crypt_gensalt(b"$2y$", 5, None, 0)  # cost 5: the test registry checks every request
        hashed = lib.crypt(password.encode(), salt) if salt else None
        if not hashed or not hashed.startswith(b"$2y$"):
            raise RuntimeError("libcrypt cannot make bcrypt hashes")
        lines.append(f"{user}:{hashed.decode()}\n")
    path.write_text("".join(lines))
    return path


def cleanup_node_pods(cluster_dir: Path) -> list[str]:
    """Remove what pods of a test cluster left on the host (containers outlive their agents by design):
    runc containers (and their cgroups), overlay mounts, pod network namespaces. Only things named in the
    cluster's own data dir are touched. Returns what was removed, for debugging."""
    import subprocess

    removed: list[str] = []
    for runc_root in cluster_dir.glob("nodes/*/pods/runc"):
        out = subprocess.run(["runc", "--root", str(runc_root), "list", "-q"], capture_output=True, text=True)
        for cid in out.stdout.split():
            subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", cid], capture_output=True)
            removed.append(f"container {cid}")
    for sandbox in cluster_dir.glob("nodes/*/pods/sandboxes/*"):
        for rootfs in sandbox.glob("containers/*/rootfs"):
            if os.path.ismount(rootfs):
                subprocess.run(["umount", "-l", str(rootfs)], capture_output=True)
                removed.append(f"mount {rootfs}")
        try:
            ns = json.loads((sandbox / "sandbox.json").read_text()).get("netns")
        except (OSError, ValueError):
            ns = None
        if ns and Path(f"/var/run/netns/{ns}").exists():
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            removed.append(f"netns {ns}")
    for node_dir in cluster_dir.glob("nodes/*"):  # the node's pods cgroup parent, once its containers are gone
        release_cgroup_parent(f"/{cgroups.TOP}/{cgroup_scope(node_dir.resolve())}")
    return removed
