"""Pod sandboxes and containers on this node: a netns from the CNI chain, overlay root filesystems, runc.

A container's life is in files the agent re-reads after a restart (no in-memory state is authoritative):
`containers/<name>/state/` holds `started` and `pid` (written by the shim and runc) and `exit.json` (written
by the shim when runc returns). Every container gets the runc id `<pod uid>-<name>`; a restart deletes the
old runc container and runs a new one under the same id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from virtplane.hypervisor import cgroups
from virtplane.network import cni, netns

from .images import Image

log = logging.getLogger(__name__)

JSON = dict[str, Any]
RUNC = "runc"
POD_IFNAME = "eth0"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Docker's (and containerd's) default capability set.
DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
                "CAP_KILL", "CAP_AUDIT_WRITE"]  # fmt: skip


class RuntimeError_(Exception):
    """A sandbox or container operation failed; the message is meant for pod status / Events."""


def netns_name(uid: str) -> str:
    return f"vpp-{uid.replace('-', '')[:12]}"


def ptp_conflist(pod_cidr: str, state_dir: Path) -> JSON:
    """The pods' default chain when the node has no CNI pod network configured: `ptp` (a veth per pod, a /32
    host route to it) + host-local IPAM. No host-global bridge, so agents of several test clusters on one
    machine never share one; their subnets differ (derived from each node's data dir)."""
    net = ipaddress.ip_network(pod_cidr, strict=True)
    return {
        "cniVersion": "1.0.0", "name": "virtplane-pods",
        "plugins": [{"type": "ptp", "ipMasq": False, "mtu": 1500,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": str(net)}]],
                              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(state_dir / "ipam")}}],
    }  # fmt: skip


@dataclasses.dataclass(slots=True)
class Sandbox:
    """One pod on this node; persisted in `sandbox.json`."""

    dir: Path
    uid: str
    namespace: str
    name: str
    netns: str = ""
    pod_ip: str = ""
    conflist: JSON | None = None
    cni_result: JSON | None = None
    started_at: str = ""
    # per container: restartCount, lastState (terminated), backoff until (epoch seconds), image id
    containers: dict[str, JSON] = dataclasses.field(default_factory=dict)
    init_done: bool = False
    grace_deadline: float = 0.0  # deletion: SIGKILL after this (epoch seconds)
    reported_events: list[str] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def save(self) -> None:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "dir"}
        tmp = self.dir / "sandbox.json.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.dir / "sandbox.json")

    @classmethod
    def load(cls, d: Path) -> Sandbox | None:
        try:
            data = json.loads((d / "sandbox.json").read_text())
        except (OSError, ValueError):
            return None
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(dir=d, **fields)

    def cdir(self, name: str) -> Path:
        return self.dir / "containers" / name

    def state_dir(self, name: str) -> Path:
        return self.cdir(name) / "state"

    def runc_id(self, name: str) -> str:
        return f"{self.uid}-{name}"

    def log_path(self, name: str, restart: int) -> Path:
        return self.cdir(name) / "logs" / f"{restart}.log"


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerState:
    state: str  # "none" | "starting" | "running" | "exited"
    pid: int = 0
    started_at: str = ""
    exit_code: int = 0
    finished_at: str = ""


def read_state(sb: Sandbox, name: str) -> ContainerState:
    sd = sb.state_dir(name)
    try:
        started = (sd / "started").read_text().strip()
    except OSError:
        return ContainerState("none")
    try:
        ex = json.loads((sd / "exit.json").read_text())
        return ContainerState("exited", started_at=started, exit_code=int(ex.get("exitCode", 0)),
                              finished_at=str(ex.get("finishedAt", "")))  # fmt: skip
    except (OSError, ValueError):
        pass
    pid = 0
    with contextlib.suppress(OSError, ValueError):
        pid = int((sd / "pid").read_text().strip())
    shim_pid = 0
    with contextlib.suppress(OSError, ValueError):
        shim_pid = int((sd / "shim.pid").read_text().strip())
    if shim_pid and not _alive(shim_pid):
        # The shim died without writing exit.json (killed with the machine's session?): the container is gone
        # or orphaned; report it as ended, unknown code (the kubelet says 137/Unknown too).
        if not (pid and _alive(pid)):
            return ContainerState("exited", started_at=started, exit_code=137, finished_at=started)
    if not pid:
        # Shim launched, runc has not written the pid yet: started (never start it twice) but not running.
        return ContainerState("starting", started_at=started)
    return ContainerState("running", pid=pid, started_at=started)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


class PodRuntime:
    """Host-side operations for pods of one node. Blocking work runs in threads."""

    def __init__(self, root: Path, *, node_name: str, conflist: JSON, cni_path: Sequence[Path] = cni.DEFAULT_CNI_PATH,
                 cgroup_prefix: str = "virtplane", cgroup_scope: str = "") -> None:  # fmt: skip
        self.root = root
        self.node_name = node_name
        self.conflist = conflist
        self.cni_path = tuple(cni_path)
        self.cgroup_prefix = cgroup_prefix
        # Containers' cgroups go under /virtplane/<cgroup_scope>, a parent weighing the host's cores beside the
        # node's VMs (setup.build); made when the first container starts, so a node without pods leaves none.
        self.cgroup_scope = cgroup_scope
        self.cgroup_parent = ""
        self.cpu_control: cgroups.CPUControl | None = None  # that parent, released when the agent stops
        self._cgroup_checked = False
        self._cgroup_lock = asyncio.Lock()
        self.runc_root = root / "runc"
        self.sandboxes_dir = root / "sandboxes"

    # -- sandboxes ----------------------------------------------------------------------------------------
    def existing(self) -> list[Sandbox]:
        if not self.sandboxes_dir.exists():
            return []
        out = []
        for d in sorted(self.sandboxes_dir.iterdir()):
            sb = Sandbox.load(d)
            if sb is not None:
                out.append(sb)
        return out

    async def create_sandbox(self, uid: str, namespace: str, name: str, hostname: str) -> Sandbox:
        d = self.sandboxes_dir / uid
        d.mkdir(parents=True, exist_ok=True)
        sb = Sandbox(dir=d, uid=uid, namespace=namespace, name=name, netns=netns_name(uid),
                     conflist=self.conflist)  # fmt: skip
        sb.save()  # before anything exists: a crash mid-setup can still be undone
        inv = cni.Invocation(container_id=uid, netns=str(netns.path(sb.netns)), ifname=POD_IFNAME)
        try:
            await netns.delete(sb.netns)
            await netns.add(sb.netns)
            await netns.run_in(sb.netns, ["ip", "link", "set", "lo", "up"])
            result = await cni.add(self.conflist, inv, self.cni_path)
            ip = cni.result_ipv4(result, POD_IFNAME)
            if ip is None:
                raise RuntimeError_(f"the CNI chain gave {POD_IFNAME} no IPv4 address")
        except (cni.CNIError, netns.NetnsError, OSError) as err:
            await self.remove_sandbox(sb)
            raise RuntimeError_(f"failed to set up the pod network: {err}") from None
        sb.pod_ip, sb.cni_result = ip, result
        etc = d / "etc"
        etc.mkdir(exist_ok=True)
        (etc / "hostname").write_text(hostname + "\n")
        (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                                   f"{ip}\t{hostname}\n")  # fmt: skip
        await asyncio.to_thread(shutil.copyfile, "/etc/resolv.conf", etc / "resolv.conf")
        sb.save()
        return sb

    async def remove_sandbox(self, sb: Sandbox) -> None:
        """Everything of the pod: containers (killed), mounts, CNI DEL (frees the IP), netns, files."""
        for name in list(sb.containers) or []:
            await self.remove_container(sb, name, kill=True)
        cdirs = sb.dir / "containers"
        for c in cdirs.iterdir() if cdirs.is_dir() else ():
            await self.remove_container(sb, c.name, kill=True)
        if self.cgroup_parent:
            await asyncio.to_thread(remove_cgroup, self.pod_cgroup(sb))
        await self.release_network(sb)
        vols = sb.dir / "volumes"
        await asyncio.to_thread(_umount_tree, vols)
        await asyncio.to_thread(shutil.rmtree, sb.dir, True)

    async def release_network(self, sb: Sandbox) -> None:
        """CNI DEL (frees the pod IP) and the netns; idempotent (a finished pod needs no network)."""
        if sb.conflist:
            inv = cni.Invocation(container_id=sb.uid, netns=str(netns.path(sb.netns)) if netns.exists(sb.netns)
                                 else "", ifname=POD_IFNAME)  # fmt: skip
            for e in await cni.delete(sb.conflist, inv, self.cni_path, sb.cni_result, quiet=True):
                log.warning("CNI DEL of pod %s/%s: %s", sb.namespace, sb.name, e)
        await netns.delete(sb.netns)

    # -- containers ---------------------------------------------------------------------------------------
    def pod_cgroup(self, sb: Sandbox) -> str:
        return f"{self.cgroup_parent}/{self.cgroup_prefix}-pod{sb.uid}"

    async def start_container(self, sb: Sandbox, name: str, image: Image, process: JSON, mounts: list[JSON],
                              resources: JSON, restart: int, pod_resources: JSON | None = None,
                              pid_namespace: str = "") -> None:  # fmt: skip
        """Fresh rootfs on the image, bundle, then the shim (its own session) runs `runc run`. With
        `pod_resources` (cgroup v1 under the node's pods parent) the container's cgroup sits in the pod's."""
        await self.remove_container(sb, name, kill=True, keep_logs=True)
        cd = sb.cdir(name)
        for sub in ("rootfs", "upper", "work", "state", "logs"):
            (cd / sub).mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_mount_overlay, image.layers, cd)
        async with self._cgroup_lock:  # detect also prunes empty children: never beside another start
            if self.cgroup_scope and not self._cgroup_checked:
                self._cgroup_checked = True
                self.cpu_control = await asyncio.to_thread(cgroups.CPUControl.detect, self.cgroup_scope)
                if self.cpu_control is not None:
                    self.cgroup_parent = f"/{cgroups.TOP}/{self.cpu_control.scope_dir.name}"
        parent = self.cgroup_parent
        if pod_resources is not None and self.cpu_control is not None and self.cpu_control.version == 1:
            # the pod's own cgroup (the kubelet's kubepods/pod<uid>): its containers' requests and limits summed
            parent = self.pod_cgroup(sb)
            await asyncio.to_thread(ensure_pod_cgroup, parent, pod_resources)
        spec = oci_spec(process=process, mounts=[*self._sandbox_mounts(sb), *mounts], netns=str(netns.path(sb.netns)),
                        hostname=sb.name, cgroups_path=f"{parent}/{self.cgroup_prefix}-{sb.runc_id(name)}",
                        resources=resources, pid_namespace=pid_namespace)  # fmt: skip
        (cd / "config.json").write_text(json.dumps(spec))
        log_path = sb.log_path(name, restart)
        shim = str(Path(__file__).with_name("shim.py"))  # run as a script: no package imports, quick start
        argv = [sys.executable, "-I", shim, shutil.which(RUNC) or RUNC, str(self.runc_root), str(cd), sb.runc_id(name),
                str(log_path), str(cd / "state")]  # fmt: skip
        self.runc_root.mkdir(parents=True, exist_ok=True)
        # Written before the shim exists: from now on this run counts as started (a reconcile racing the shim's
        # start-up must not start the container a second time), and its start time identifies the run.
        (cd / "state" / "started").write_text(_now_nano())
        proc = await asyncio.to_thread(_spawn, argv, cd / "shim.log")
        (cd / "state" / "shim.pid").write_text(str(proc.pid))
        # Reap the shim when it ends while we are its parent (after an agent restart init reaps it).
        asyncio.get_running_loop().run_in_executor(None, proc.wait)

    @staticmethod
    def _sandbox_mounts(sb: Sandbox) -> list[JSON]:
        etc = sb.dir / "etc"
        return [{"destination": f"/etc/{f}", "type": "bind", "source": str(etc / f), "options": ["rbind", "rw"]}
                for f in ("hosts", "hostname", "resolv.conf")]

    async def signal(self, sb: Sandbox, name: str, sig: signal.Signals) -> None:
        await _run([RUNC, "--root", str(self.runc_root), "kill", "--all", sb.runc_id(name), sig.name[3:]],
                   check=False)  # fmt: skip

    async def remove_container(self, sb: Sandbox, name: str, *, kill: bool, keep_logs: bool = False) -> None:
        cd = sb.cdir(name)
        if not cd.exists():
            return
        if kill:
            await _run([RUNC, "--root", str(self.runc_root), "delete", "--force", sb.runc_id(name)], check=False)
        await asyncio.to_thread(_umount, cd / "rootfs")
        for sub in ("rootfs", "upper", "work", "state"):
            await asyncio.to_thread(shutil.rmtree, cd / sub, True)
        (cd / "config.json").unlink(missing_ok=True)
        if not keep_logs:
            await asyncio.to_thread(shutil.rmtree, cd, True)

    async def exec_argv(self, sb: Sandbox, name: str, command: Sequence[str], *, tty: bool) -> list[str]:
        argv = [RUNC, "--root", str(self.runc_root), "exec", *(["--tty"] if tty else [])]
        return [*argv, sb.runc_id(name), *command]


def oci_spec(*, process: JSON, mounts: list[JSON], netns: str, hostname: str, cgroups_path: str,
             resources: JSON, pid_namespace: str = "") -> JSON:  # fmt: skip
    caps = list(DEFAULT_CAPS)
    proc = {"terminal": False, "user": {"uid": 0, "gid": 0}, "cwd": "/", "env": [],
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": False,  # no rlimits: the node's own apply (a container may not raise them)
            **process}  # fmt: skip
    base_mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755",
                                                                             "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]  # fmt: skip
    return {
        "ociVersion": "1.0.2",
        "process": proc,
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": [*base_mounts, *mounts],
        "linux": {
            "namespaces": [{"type": "pid", **({"path": pid_namespace} if pid_namespace else {})},
                           {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                           {"type": "network", "path": netns}],
            "cgroupsPath": cgroups_path,
            "resources": {"devices": [{"allow": False, "access": "rwm"}], **resources},
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }  # fmt: skip


def _hierarchies() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    with contextlib.suppress(OSError):
        return [base, *(h for h in base.iterdir() if h.is_dir() and not h.is_symlink())]
    return []


def release_cgroup_parent(parent: str) -> None:
    """rmdir the node's pods cgroup parent (and `virtplane` above it) in every hierarchy runc made it in
    (on cgroup v1: cpu, memory, pids ...), where nothing uses it any more; busy or missing is not an error.
    Pod cgroups left below it (their containers gone) go first."""
    if not parent:
        return
    rel = Path(parent.lstrip("/"))
    for root in _hierarchies():
        with contextlib.suppress(OSError):
            for child in (root / rel).iterdir():
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
        for d in (root / rel, root / rel.parent):
            if d != root:
                with contextlib.suppress(OSError):
                    d.rmdir()


def remove_cgroup(path: str) -> None:
    """rmdir a (pod) cgroup in every hierarchy; busy or missing is not an error."""
    rel = Path(path.lstrip("/"))
    for root in _hierarchies():
        if root / rel != root:
            with contextlib.suppress(OSError):
                (root / rel).rmdir()


def pod_cgroup_resources(containers: Sequence[JSON], init_containers: Sequence[JSON] = ()) -> JSON:
    """The pod cgroup's linux.resources-like values, as the kubelet's ResourceConfigForPod computes them: CPU
    shares of the summed CPU requests (a larger init container's counts instead; 2 for none), a CFS quota of the
    summed CPU limits and a memory limit of the summed memory limits, each only when every container has that
    limit (otherwise the pod is not capped on it). Each item: {"limits": {cpu millicores, memory bytes},
    "cpu_request": millicores}."""

    def total(items: Sequence[JSON], key: str) -> int | None:
        vals = [c["limits"].get(key) for c in items]
        return sum(vals) if vals and all(vals) else None

    request = max(sum(c["cpu_request"] for c in containers),
                  max((c["cpu_request"] for c in init_containers), default=0))  # fmt: skip
    out: JSON = {"cpu": {"shares": cgroups.shares_for(request / 1000)}}
    cpu, memory = total(containers, "cpu"), total(containers, "memory")
    if cpu is not None and init_containers:
        init_cpu = total(init_containers, "cpu")
        cpu = None if init_cpu is None else max(cpu, max(c["limits"]["cpu"] for c in init_containers))
    if memory is not None and init_containers:
        init_mem = total(init_containers, "memory")
        memory = None if init_mem is None else max(memory, max(c["limits"]["memory"] for c in init_containers))
    if cpu is not None:
        period = 100000
        out["cpu"].update(quota=max(1000, cpu * period // 1000), period=period)
    if memory is not None:
        out["memory"] = {"limit": memory}
    return out


def ensure_pod_cgroup(path: str, res: JSON) -> None:
    """Create the pod cgroup (cgroup v1: its cpu and memory directories; runc makes the rest below the
    containers) and write its values. Blocking; a value the kernel refuses is logged, not fatal."""
    rel = path.lstrip("/")
    base = Path("/sys/fs/cgroup")
    cpu = res.get("cpu") or {}
    writes = [(base / "cpu" / rel, "cpu.shares", str(cpu.get("shares", 2))),
              (base / "cpu" / rel, "cpu.cfs_period_us", str(cpu.get("period", 100000))),
              (base / "cpu" / rel, "cpu.cfs_quota_us", str(cpu.get("quota", -1))),
              (base / "memory" / rel, "memory.limit_in_bytes", str((res.get("memory") or {}).get("limit", -1)))]
    for d, name, value in writes:
        try:
            d.mkdir(parents=True, exist_ok=True)
            if (d / name).read_text().strip() != value:
                (d / name).write_text(value)
        except OSError as err:
            log.warning("pod cgroup %s: cannot set %s=%s: %s", d, name, value, err)


def cgroup_resources(limits: Mapping[str, int], cpu_request: int = 0) -> JSON:
    """linux.resources from container limits (bytes, millicores) and the CPU request (millicores), as the
    kubelet sets them: the request as cpu.shares (1024 a core, 2 for none: cgroups.shares_for), a CPU limit as
    a CFS quota per 100 ms period, a memory limit as the memory cgroup's limit."""
    out: JSON = {"cpu": {"shares": cgroups.shares_for(cpu_request / 1000)}}
    if limits.get("memory"):
        out["memory"] = {"limit": int(limits["memory"])}
    if limits.get("cpu"):
        period = 100000
        out["cpu"].update(quota=max(1000, int(limits["cpu"]) * period // 1000), period=period)
    return out


def _mount_overlay(layers: Sequence[Path], cd: Path) -> None:
    lower = ":".join(str(p) for p in reversed(layers))
    opts = f"lowerdir={lower},upperdir={cd / 'upper'},workdir={cd / 'work'}"
    if len(layers) == 0:
        raise RuntimeError_("image has no layers")
    res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(cd / "rootfs")],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError_(f"cannot mount the container's root filesystem: {res.stderr.strip()}")


def _now_nano() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _umount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _umount_tree(root: Path) -> None:
    if not root.exists():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _umount(d)


def _spawn(argv: Sequence[str], log_file: Path) -> subprocess.Popen[bytes]:
    with open(log_file, "ab") as err:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)


async def _run(argv: Sequence[str], *, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise RuntimeError_(f"{' '.join(argv[:4])}: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")
