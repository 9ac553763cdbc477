#!/usr/bin/env python3
"""Builds virtplane's tiny guest images from Debian packages (see images/README.md).

Run as `.venv/bin/python images/build.py` (``make setup`` does). Outputs go to
images/out/, downloads and scratch to images/cache/. The whole output set is keyed by
a recipe hash over this file, the guest tree and the host package versions it copies
from; when nothing changed the run only re-hashes and exits (well under 2 s).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST = HERE / "guest"
OUT = HERE / "out"
CACHE = HERE / "cache"
DEBS = CACHE / "debs"

# Every timestamp inside the images (cpio, FAT, ext4, ISO, tar, OCI) is this one, so
# the same inputs give the same bytes.
EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))

KERNEL_META = "linux-image-cloud-amd64"
# cryptomgr.notests: the crypto self-tests are among the slowest initcalls under TCG.
# no_timer_check: on a host starved of CPU (a TCG guest beside a busy CI run) the kernel's IO-APIC timer
# check can see no ticks in its window and panic ("IO-APIC + timer doesn't work!"); cloud images skip it.
KERNEL_CMDLINE = "console=ttyS0,115200 quiet cryptomgr.notests no_timer_check"

# Host packages whose files end up in the image; their versions are part of the
# recipe hash so an upgrade (say, a dropbear security fix) triggers a rebuild.
HOST_PACKAGES = [
    "busybox-static", "dropbear-bin", "libc6", "libcrypt1", "zlib1g", "libtomcrypt1", "libtommath1",
    "libgmp10", "libglib2.0-0", "libpcre2-8-0", "libudev1", "libnuma1", "liburing2",
    "syslinux-common", "isolinux", "mtools", "dosfstools", "e2fsprogs", "xorriso", "qemu-utils",
    "xz-utils", "gcc-12",
]

# Drivers the guest loads at boot (whatever of them is a module in this kernel;
# built-ins need nothing). Dependencies come from modules.dep / modinfo.
MODULES = [
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "virtio_console", "virtio_balloon",
    "virtio_rng", "sd_mod", "sr_mod", "ahci", "ata_piix", "e1000e", "vmxnet3",
    "isofs", "vfat", "nls_cp437", "nls_iso8859_1", "nls_utf8", "nls_ascii",
    "button", "evdev", "virtio_input",
]

# Drivers the cloud kernel flavour leaves out but KubeVirt VMs use (SATA CD-ROMs are
# KubeVirt's default cdrom bus; e1000e a common NIC model). They are built from the
# matching linux-source against the flavour's headers: file lists and extra flags.
OOT_MODULES = {
    "ahci": {
        "files": ["drivers/ata/ahci.c", "drivers/ata/ahci.h", "drivers/ata/libahci.c", "drivers/ata/libata.h"],
        "kbuild": "obj-m += ahci.o libahci.o\nccflags-y += -DCONFIG_SATA_MOBILE_LPM_POLICY=0\n",
    },
    "e1000e": {
        "files": ["drivers/net/ethernet/intel/e1000e/"],
        "kbuild": "obj-m += e1000e.o\ne1000e-objs := 82571.o ich8lan.o 80003es2lan.o mac.o manage.o"
        " nvm.o phy.o param.o ethtool.o netdev.o ptp.o\n",
    },
}

OOT_KCFLAGS = "-fmacro-prefix-map={cache}/= -ffile-prefix-map={cache}/="

DISK_SIZE_MIB = 128
ESP_LABEL = "VPBOOT"
STATE_LABEL = "vpstate"


def log(msg: str) -> None:
    print(f"images: {msg}", file=sys.stderr, flush=True)


def run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        capture: bool = False) -> str:
    full_env = {**os.environ, "LC_ALL": "C", "SOURCE_DATE_EPOCH": str(EPOCH), "MTOOLS_SKIP_CHECK": "1"}
    full_env.update(env or {})
    # Output is kept for the error message only: `make setup` stays quiet.
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, check=False, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr}")
    return res.stdout if capture else ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# recipe hash and the fast path


def host_versions() -> dict[str, str]:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version}\n", *HOST_PACKAGES],
                         capture_output=True, text=True, check=False).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def recipe_hash() -> tuple[str, dict[str, str]]:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    for p in sorted(GUEST.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(GUEST)).encode() + b"\0")
            h.update(b"x" if os.access(p, os.X_OK) else b"-")
            h.update(p.read_bytes())
    versions = host_versions()
    h.update(json.dumps(versions, sort_keys=True).encode())
    return h.hexdigest(), versions


def up_to_date(rhash: str) -> bool:
    try:
        manifest = json.loads((OUT / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("recipe_hash") != rhash:
        return False
    for name, art in manifest["artifacts"].items():
        p = OUT / name
        if art.get("kind") == "dir":
            if not p.is_dir():
                return False
        elif not p.is_file() or p.stat().st_size != art["size"]:
            return False
    return True


# ---------------------------------------------------------------------------
# Debian packages: fetched with apt-get download, unpacked with dpkg -x, never installed


_apt_updated = False


def apt_download(spec: str) -> Path:
    """Downloads one package (name or name=version) into the cache; returns the .deb."""
    global _apt_updated
    name = spec.split("=")[0]
    DEBS.mkdir(parents=True, exist_ok=True)
    ver = spec.split("=", 1)[1] if "=" in spec else None
    pattern = f"{name}_{(ver or '*').replace(':', '%3a')}_*.deb"
    existing = sorted(DEBS.glob(pattern))
    if existing:
        return existing[-1]
    for attempt in range(2):
        try:
            # apt refuses to drop privileges into a dir _apt can't write; we are root here.
            run("apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", spec, cwd=DEBS, capture=True)
            break
        except RuntimeError:
            if attempt or _apt_updated:
                raise
            log("apt lists missing or stale: apt-get update")
            run("apt-get", "update", "-qq")
            _apt_updated = True
    found = sorted(DEBS.glob(pattern))
    if not found:
        raise RuntimeError(f"apt-get download {spec} produced no {pattern}")
    return found[-1]


def apt_depends(pkg: str, prefix: str) -> list[str]:
    out = run("apt-cache", "depends", pkg, capture=True)
    return [m.group(1) for m in re.finditer(r"^\s+Depends: (\S+)", out, re.M) if m.group(1).startswith(prefix)]


def deb_field(deb: Path, fieldname: str) -> str:
    return run("dpkg-deb", "-f", deb, fieldname, capture=True).strip()


def unpack(deb: Path, dest: Path) -> Path:
    """dpkg -x into dest once (a stamp names the .deb that filled it)."""
    stamp = dest / ".unpacked"
    if stamp.exists() and stamp.read_text() == deb.name:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    run("dpkg", "-x", deb, dest)
    stamp.write_text(deb.name)
    return dest


@dataclass
class Inputs:
    kver: str
    kernel_deb: Path
    kernel_root: Path
    debs: dict[str, str] = field(default_factory=dict)

    @property
    def moddir(self) -> Path:
        return self.kernel_root / "lib/modules" / self.kver


def fetch_kernel() -> Inputs:
    flavour_pkgs = apt_depends(KERNEL_META, "linux-image-")
    if not flavour_pkgs:
        raise RuntimeError(f"cannot resolve {KERNEL_META}")
    deb = apt_download(flavour_pkgs[0])
    kver = flavour_pkgs[0].removeprefix("linux-image-")
    root = unpack(deb, CACHE / f"kernel-{kver}")
    inputs = Inputs(kver=kver, kernel_deb=deb, kernel_root=root)
    inputs.debs[deb_field(deb, "Package")] = deb_field(deb, "Version")
    return inputs


def build_oot_modules(inputs: Inputs) -> dict[str, Path]:
    """Builds OOT_MODULES against the flavour's headers; returns module name -> .ko."""
    kver = inputs.kver
    dest = CACHE / f"oot-{kver}"
    kos = {p.stem: p for p in dest.glob("*.ko")}
    stamp = dest / ".built"
    want = json.dumps({"modules": OOT_MODULES, "kcflags": OOT_KCFLAGS}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want:
        return kos
    log(f"building {', '.join(OOT_MODULES)} for {kver} from linux-source")
    hdr_pkg = f"linux-headers-{kver}"
    hdr_root = CACHE / f"headers-{kver}"
    debs = [apt_download(hdr_pkg)]
    debs += [apt_download(d) for d in apt_depends(hdr_pkg, "linux-")
             if d.startswith(("linux-headers-", "linux-kbuild-"))]
    if not (hdr_root / ".unpacked").exists():
        shutil.rmtree(hdr_root, ignore_errors=True)
        hdr_root.mkdir(parents=True)
        for d in debs:
            run("dpkg", "-x", d, hdr_root)
        (hdr_root / ".unpacked").write_text("\n".join(d.name for d in debs))
    for d in debs:
        inputs.debs[deb_field(d, "Package")] = deb_field(d, "Version")
    kdir = hdr_root / "usr/src" / hdr_pkg
    # The flavour Makefile includes the common one by absolute /usr/src path.
    mk = kdir / "Makefile"
    mk.write_text(re.sub(r"include /usr/src/", f"include {hdr_root}/usr/src/", mk.read_text()))

    # The driver sources, from the linux-source of the kernel's own version if the
    # archive still has it, else the current one (same upstream release).
    kernel_version = inputs.debs[inputs.kernel_deb.name.split("_")[0]]
    series = ".".join(kver.split(".")[:2])
    try:
        src_deb = apt_download(f"linux-source-{series}={kernel_version}")
    except RuntimeError:
        src_deb = apt_download(f"linux-source-{series}")
    inputs.debs[deb_field(src_deb, "Package")] = deb_field(src_deb, "Version")
    srcdir = CACHE / f"source-{series}-tree"
    members = [f"linux-source-{series}/{f}" for m in OOT_MODULES.values() for f in m["files"]]
    if not all((srcdir / m).exists() for m in members):
        # Only a few files of the 140 MB tarball are needed: keep those, drop the rest.
        src_root = unpack(src_deb, CACHE / f"source-{series}")
        tarball = next((src_root / "usr/src").glob(f"linux-source-{series}.tar.*"))
        srcdir.mkdir(parents=True, exist_ok=True)
        run("tar", "-xf", tarball, "-C", srcdir, *[m.rstrip("/") for m in members])
        shutil.rmtree(src_root)

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name, spec in OOT_MODULES.items():
        bdir = CACHE / f"oot-build-{kver}" / name
        shutil.rmtree(bdir, ignore_errors=True)
        bdir.mkdir(parents=True)
        for f in spec["files"]:
            src = srcdir / f"linux-source-{series}" / f
            if src.is_dir():
                for s in src.glob("*.[ch]"):
                    shutil.copy2(s, bdir)
            else:
                shutil.copy2(src, bdir)
        (bdir / "Kbuild").write_text(spec["kbuild"])
        # __FILE__ of an external module is its absolute path; mapping the cache
        # prefix away keeps the .ko (and so every image) identical across checkouts.
        kcflags = OOT_KCFLAGS.format(cache=CACHE)
        run("make", "-s", "-C", kdir, f"M={bdir}", f"-j{os.cpu_count() or 1}", f"KCFLAGS={kcflags}", "modules")
        for ko in bdir.glob("*.ko"):
            shutil.copy2(ko, dest / ko.name)
            # Debug info is most of an out-of-tree .ko's size.
            run("strip", "--strip-debug", dest / ko.name)
    stamp.write_text(want)
    return {p.stem: p for p in dest.glob("*.ko")}


# ---------------------------------------------------------------------------
# kernel modules: pick, resolve dependencies, order


def modinfo_depends(ko: Path) -> list[str]:
    """The depends= entry of a .ko's .modinfo ELF section (kmod isn't on the host)."""
    data = ko.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def sh(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size
    _, stroff, _ = sh(shstrndx)
    for i in range(shnum):
        name, off, size = sh(i)
        if data[stroff + name:data.index(b"\0", stroff + name)] == b".modinfo":
            for entry in data[off:off + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[8:].decode().split(",") if d]
    return []


def norm(mod: str) -> str:
    return mod.replace("-", "_")


def select_modules(inputs: Inputs, oot: dict[str, Path]) -> list[tuple[str, Path]]:
    """(relative path under /lib/modules, source file), dependencies first."""
    moddir = inputs.moddir
    deps: dict[str, list[str]] = {}
    paths: dict[str, tuple[str, Path]] = {}
    # depmod runs at package install time, so the .deb has no modules.dep: each
    # module's own modinfo names its dependencies.
    for ko in (moddir / "kernel").rglob("*.ko"):
        paths[norm(ko.stem)] = (f"{inputs.kver}/{ko.relative_to(moddir)}", ko)
    for name, ko in oot.items():
        rel = f"{inputs.kver}/extra/{ko.name}"
        paths[norm(name)] = (rel, ko)
        deps[norm(name)] = [norm(d) for d in modinfo_depends(ko)]
    builtin = {norm(Path(line).name.removesuffix(".ko"))
               for line in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []
    def visit(m: str) -> None:
        if m in order or m in builtin:
            return
        if m not in paths:
            raise RuntimeError(f"module {m} is neither built in nor shipped by {inputs.kver}")
        if m not in deps:
            deps[m] = [norm(d) for d in modinfo_depends(paths[m][1])]
        for d in deps[m]:
            visit(d)
        order.append(m)
    for m in MODULES:
        visit(norm(m))
    return [paths[m] for m in order]


# ---------------------------------------------------------------------------
# the initramfs: a tree in memory, written as a newc cpio with fixed metadata


@dataclass
class Node:
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class Tree:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p not in self.nodes:
                self.nodes[p] = Node(stat.S_IFDIR | (mode if i == len(parts) else 0o755))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        if "/" in path:
            self.mkdir(os.path.dirname(path))
        self.nodes[path] = Node(stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self.nodes[path] = Node(stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.nodes[path.strip("/")] = Node(stat.S_IFCHR | mode, rdev=(major, minor))

    def cpio(self) -> bytes:
        out = io.BytesIO()
        def entry(ino: int, name: str, node: Node) -> None:
            nb = name.encode() + b"\0"
            nlink = 2 if stat.S_ISDIR(node.mode) else 1
            hdr = "070701" + "".join(f"{v:08X}" for v in (
                ino, node.mode, 0, 0, nlink, EPOCH, len(node.data), 0, 0,
                node.rdev[0], node.rdev[1], len(nb), 0))
            out.write(hdr.encode() + nb)
            out.write(b"\0" * (-(110 + len(nb)) % 4))
            out.write(node.data)
            out.write(b"\0" * (-len(node.data) % 4))
        for ino, name in enumerate(sorted(self.nodes), start=1):
            entry(ino, name, self.nodes[name])
        entry(0, "TRAILER!!!", Node(0))
        return out.getvalue()


def ldd_closure(binaries: list[Path], extra_lib_dirs: list[Path]) -> dict[str, Path]:
    """Shared libraries (guest path -> host file) that the binaries load, via ldd."""
    libs: dict[str, Path] = {}
    env = {"LD_LIBRARY_PATH": ":".join(map(str, extra_lib_dirs))} if extra_lib_dirs else None
    for b in binaries:
        for line in run("ldd", b, env=env, capture=True).splitlines():
            m = re.match(r"\s*(\S+) => (/\S+)", line) or re.match(r"\s*(/\S+) \(", line)
            if not m:
                continue
            host = Path(m.group(m.lastindex or 1))
            guest = host if m.lastindex == 1 else Path(m.group(2))
            libs[str(guest)] = host.resolve()
    return libs


def build_initramfs(inputs: Inputs, modules: list[tuple[str, Path]], qga_root: Path) -> Tree:
    t = Tree()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib", "proc", "sys", "dev", "run", "tmp",
              "var/log", "var/lib/virtplane", "home", "mnt", "etc/dropbear"):
        t.mkdir(d)
    t.mkdir("root", 0o700)
    t.mkdir("tmp", 0o1777)
    t.symlink("var/run", "../run")
    # The kernel opens /dev/console before init can mount devtmpfs.
    t.chardev("dev/console", 5, 1)
    t.chardev("dev/null", 1, 3, 0o666)

    t.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    for applet in run("/bin/busybox", "--list-full", capture=True).split():
        if applet not in ("bin/busybox", "linuxrc"):
            t.symlink(applet, "/bin/busybox")

    bins = {
        "usr/sbin/dropbear": Path("/usr/sbin/dropbear"),
        "usr/bin/dropbearkey": Path("/usr/bin/dropbearkey"),
        "usr/bin/qemu-ga": qga_root / "usr/sbin/qemu-ga",
    }
    for guest_path, host in bins.items():
        t.file(guest_path, host.read_bytes(), 0o755)
    for guest_path, host in ldd_closure(list(bins.values()), []).items():
        t.file(guest_path, host.read_bytes(), 0o755)
    t.symlink("usr/sbin/qemu-ga", "../bin/qemu-ga")

    dep_lines = []
    for rel, src in modules:
        t.file(f"lib/modules/{rel}", src.read_bytes())
        dep_lines.append(rel.split("/", 1)[1] + ":")
    t.file(f"lib/modules/{inputs.kver}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
    t.file("lib/modules/load.list", "".join(f"{rel}\n" for rel, _ in modules).encode())

    for p in sorted(GUEST.rglob("*")):
        rel = str(p.relative_to(GUEST))
        if p.is_dir():
            t.mkdir(rel)
        else:
            t.file(rel, p.read_bytes(), 0o755 if os.access(p, os.X_OK) else 0o644)
    # An empty password hash: console login as root without a password until
    # cloud-init sets one (dropbear refuses empty passwords; SSH needs a key).
    t.file("etc/shadow", b"root::19000:0:99999:7:::\n", 0o600)
    t.file("etc/os-release", (
        'NAME="virtplane tiny guest"\nID=virtplane-tiny\nID_LIKE=debian\nVERSION_ID="1"\n'
        f'PRETTY_NAME="virtplane tiny guest (Debian kernel {inputs.kver})"\n'
        'HOME_URL="https://example.invalid/virtplane"\n').encode())
    t.file("etc/hostname", b"localhost\n")
    t.file("etc/machine-id", b"")
    return t


# ---------------------------------------------------------------------------
# boot media


def touch_epoch(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        os.utime(p, (EPOCH, EPOCH), follow_symlinks=False)


def make_esp(work: Path, vmlinuz: Path, initrd: Path, sdboot: Path, syslinux_bin: Path) -> Path:
    """FAT image that boots with SeaBIOS (syslinux) and UEFI (systemd-boot), both
    reading the same kernel and initrd."""
    tree = work / "esp"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "EFI/BOOT").mkdir(parents=True)
    (tree / "loader/entries").mkdir(parents=True)
    (tree / "syslinux").mkdir()
    shutil.copy(vmlinuz, tree / "vmlinuz")
    shutil.copy(initrd, tree / "initrd.img")
    shutil.copy(sdboot, tree / "EFI/BOOT/BOOTX64.EFI")
    (tree / "loader/loader.conf").write_text("default virtplane.conf\ntimeout 0\neditor no\n")
    (tree / "loader/entries/virtplane.conf").write_text(
        f"title virtplane tiny guest\nlinux /vmlinuz\ninitrd /initrd.img\noptions {KERNEL_CMDLINE}\n")
    (tree / "syslinux/syslinux.cfg").write_text(
        "DEFAULT virtplane\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL virtplane\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {KERNEL_CMDLINE}\n")
    touch_epoch(tree)
    used = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    size_mib = (used >> 20) + 4
    img = work / "esp.img"
    img.unlink(missing_ok=True)
    run("mkfs.vfat", "-C", "-n", ESP_LABEL, "-i", "56504254", "--invariant", img, str(size_mib * 1024))
    run("mcopy", "-i", img, "-s", "-p", "-m", *sorted(tree.iterdir()), "::/")
    # mtools-based installer: writes the FAT boot sector and ldlinux.sys/.c32 in place.
    run(syslinux_bin, "--install", "--directory", "/syslinux", img)
    return img


def make_state_fs(work: Path, size_mib: int) -> Path:
    img = work / "state.img"
    img.unlink(missing_ok=True)
    run("mke2fs", "-q", "-t", "ext4", "-L", STATE_LABEL, "-U", "0b6a7e5e-7a1e-4c1e-9d1e-76706c616e65",
        "-E", "hash_seed=0b6a7e5e-7a1e-4c1e-9d1e-76706c616e65,root_owner=0:0", "-m", "0",
        img, f"{size_mib}M", env={"E2FSPROGS_FAKE_TIME": str(EPOCH)})
    return img


def make_disk(work: Path, esp: Path, state_mib: int) -> Path:
    """MBR disk: syslinux's MBR code, p1 = ESP (active, type EF), p2 = state (83)."""
    mib = 1 << 20
    esp_sectors = esp.stat().st_size // 512
    p1_start = mib // 512
    p2_start = p1_start + -(-esp_sectors // 2048) * 2048
    p2_sectors = state_mib * 2048
    total = DISK_SIZE_MIB * mib
    assert (p2_start + p2_sectors) * 512 <= total
    disk = work / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(total)
        mbr = bytearray(512)
        code = Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()
        mbr[:len(code)] = code
        mbr[440:444] = struct.pack("<I", 0x76706C6E)  # disk signature "vpln"
        def part(active: bool, ptype: int, start: int, count: int) -> bytes:
            # CHS fields say "use LBA"; every BIOS and loader here does.
            return struct.pack("<B3sB3sII", 0x80 if active else 0, b"\xfe\xff\xff", ptype,
                               b"\xfe\xff\xff", start, count)
        mbr[446:462] = part(True, 0xEF, p1_start, esp_sectors)
        mbr[462:478] = part(False, 0x83, p2_start, p2_sectors)
        mbr[510:512] = b"\x55\xaa"
        f.write(mbr)
        for img, start in ((esp, p1_start), (make_state_fs(work, state_mib), p2_start)):
            f.seek(start * 512)
            with img.open("rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
    return disk


def pin_vmdk_cid(vmdk: Path) -> None:
    """qemu-img writes a random content id into the embedded descriptor (no checksum
    covers it); a fixed one makes the file reproducible. (VHDX's random GUIDs sit
    under CRC32C-protected headers, so that format stays content-equal only.)"""
    with vmdk.open("r+b") as f:
        head = f.read(1 << 16)
        m = re.search(rb"\nCID=([0-9a-f]{8})\n", head)
        if m:
            f.seek(m.start(1))
            f.write(b"7670706e")


def make_iso(work: Path, vmlinuz: Path, initrd: Path, esp: Path, dest: Path) -> None:
    """Hybrid ISO: isolinux for BIOS, the ESP image as El Torito EFI boot image."""
    tree = work / "iso"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "isolinux").mkdir(parents=True)
    shutil.copy("/usr/lib/ISOLINUX/isolinux.bin", tree / "isolinux")
    shutil.copy("/usr/lib/syslinux/modules/bios/ldlinux.c32", tree / "isolinux")
    (tree / "isolinux/isolinux.cfg").write_text(
        "DEFAULT virtplane\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL virtplane\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {KERNEL_CMDLINE}\n")
    shutil.copy(vmlinuz, tree / "vmlinuz")
    shutil.copy(initrd, tree / "initrd.img")
    shutil.copy(esp, tree / "efiboot.img")
    touch_epoch(tree)
    dest.unlink(missing_ok=True)
    run("xorriso", "-as", "mkisofs", "-quiet", "-o", dest, "-R", "-J", "-V", "VIRTPLANE_TINY",
        "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat", "-no-emul-boot",
        "-boot-load-size", "4", "-boot-info-table",
        "-isohybrid-mbr", "/usr/lib/ISOLINUX/isohdpfx.bin",
        "-eltorito-alt-boot", "-e", "efiboot.img", "-no-emul-boot", "-isohybrid-gpt-basdat",
        tree)


# ---------------------------------------------------------------------------
# containerDisk: an OCI image layout with the disk at /disk/, owned by qemu (107)


def make_containerdisk(qcow2: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    blobs = dest / "blobs/sha256"
    blobs.mkdir(parents=True)
    def add_blob(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("disk")
        d.type, d.mode, d.uid, d.gid, d.mtime = tarfile.DIRTYPE, 0o555, 107, 107, EPOCH
        tar.addfile(d)
        f = tarfile.TarInfo(f"disk/{qcow2.name}")
        f.size, f.mode, f.uid, f.gid, f.mtime = qcow2.stat().st_size, 0o440, 107, 107, EPOCH
        with qcow2.open("rb") as src:
            tar.addfile(f, src)
    layer_tar = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=6) as z:
        z.write(layer_tar)
    layer_digest, layer_size = add_blob(gz.getvalue())
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH))
    config = {
        "created": created, "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer_tar).hexdigest()}"]},
        "history": [{"created": created, "created_by": "virtplane images/build.py"}],
    }
    config_digest, config_size = add_blob(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": layer_size}],
    }
    manifest_digest, manifest_size = add_blob(json.dumps(manifest, sort_keys=True).encode())
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (dest / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": "latest"}}],
    }, sort_keys=True))


# ---------------------------------------------------------------------------


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """One build at a time (make setup and a test fixture may race)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build(rhash: str, versions: dict[str, str]) -> None:
    t0 = time.monotonic()
    inputs = fetch_kernel()
    oot = build_oot_modules(inputs)
    modules = select_modules(inputs, oot)
    qga_deb = apt_download("qemu-guest-agent")
    qga_root = unpack(qga_deb, CACHE / "qemu-guest-agent")
    sdboot_deb = apt_download("systemd-boot-efi")
    sdboot_root = unpack(sdboot_deb, CACHE / "systemd-boot-efi")
    syslinux_deb = apt_download("syslinux")
    syslinux_root = unpack(syslinux_deb, CACHE / "syslinux")
    for d in (qga_deb, sdboot_deb, syslinux_deb):
        inputs.debs[deb_field(d, "Package")] = deb_field(d, "Version")

    work = CACHE / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tree = build_initramfs(inputs, modules, qga_root)
    cpio = tree.cpio()
    # gzip: 5.5 MiB instead of 14 MiB to pull through BIOS int13 / the EFI FAT
    # driver; for direct kernel boot, uncompressed, lz4 and zstd measured within the
    # noise of gzip under TCG (images/README.md), so the smaller, universal one wins.
    initrd = work / "initrd.img"
    with gzip.GzipFile(initrd, "wb", mtime=0, compresslevel=9) as z:
        z.write(cpio)
    vmlinuz = inputs.kernel_root / "boot" / f"vmlinuz-{inputs.kver}"
    sdboot = sdboot_root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    esp = make_esp(work, vmlinuz, initrd, sdboot, syslinux_root / "usr/bin/syslinux")
    esp_mib = -(-esp.stat().st_size // (1 << 20))
    disk = make_disk(work, esp, DISK_SIZE_MIB - esp_mib - 2)

    # Outputs are staged next to out/ and swapped in with two renames: tests of
    # other components may be starting VMs from out/ while this runs.
    stage = CACHE / "out.new"  # same filesystem as out/, and git-ignored
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    shutil.copy(vmlinuz, stage / "vmlinuz")
    shutil.copy(initrd, stage / "initrd.img")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", disk, stage / "tiny.qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", disk, stage / "tiny.vmdk")
    pin_vmdk_cid(stage / "tiny.vmdk")
    # VHDX allocates whole blocks; 1 MiB ones keep the mostly-empty state
    # partition's scattered ext4 metadata from costing 32 MiB blocks each.
    run("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", disk, stage / "tiny.vhdx")
    with (stage / "tiny.raw.xz").open("wb") as f:
        subprocess.run(["xz", "-T2", "-6", "-c", str(disk)], stdout=f, check=True)
    make_iso(work, vmlinuz, initrd, esp, stage / "tiny.iso")
    make_containerdisk(stage / "tiny.qcow2", stage / "containerdisk-oci")

    artifacts: dict[str, dict[str, object]] = {}
    for p in sorted(stage.iterdir()):
        if p.is_dir():
            idx = json.loads((p / "index.json").read_text())
            artifacts[p.name] = {"kind": "dir", "format": "oci-layout",
                                 "manifest_digest": idx["manifests"][0]["digest"]}
        else:
            artifacts[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest = {
        "recipe_hash": rhash,
        "kernel_release": inputs.kver,
        "kernel_cmdline": KERNEL_CMDLINE,
        "containerdisk_path": "/disk/tiny.qcow2",
        "disk_virtual_size": DISK_SIZE_MIB << 20,
        "inputs": {"debs": inputs.debs, "host_packages": versions},
        "modules": [rel for rel, _ in modules],
        "artifacts": artifacts,
    }
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    old = CACHE / "out.old"
    shutil.rmtree(old, ignore_errors=True)
    if OUT.exists():
        OUT.rename(old)
    stage.rename(OUT)
    # Running QEMUs keep their open files; the old names just go away.
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    log(f"built in {time.monotonic() - t0:.1f}s: " + ", ".join(
        f"{n} {a['size'] / (1 << 20):.1f}MiB" for n, a in artifacts.items() if "size" in a))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if the outputs are current")
    ap.add_argument("--verify", action="store_true", help="also check every artifact's sha256")
    args = ap.parse_args(argv)
    rhash, versions = recipe_hash()
    if not args.force and up_to_date(rhash):
        if args.verify:
            manifest = json.loads((OUT / "manifest.json").read_text())
            bad = [n for n, a in manifest["artifacts"].items() if "sha256" in a
                   and sha256_file(OUT / n) != a["sha256"]]
            if bad:
                log(f"checksum mismatch: {', '.join(bad)}; rebuilding")
                args.force = True
        if not args.force:
            log(f"up to date ({rhash[:12]})")
            return 0
    with locked():
        # Another build may have finished while we waited for the lock.
        if args.force or not up_to_date(rhash):
            build(rhash, versions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
