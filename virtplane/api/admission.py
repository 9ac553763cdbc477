"""In-process admission: the defaulting and validation KubeVirt's, CDI's and Kubernetes' webhooks and
registry strategies apply, as pure functions over JSON objects.

    mutate(resource, obj, old, operation)              # defaults, in place; operation "CREATE"/"UPDATE"
    validate(resource, obj, old, operation) -> causes  # webhook rules the schema cannot express

Rules live in two registries keyed by (group, kind), built once at import from plain functions; a new
rule is a new function added to the tuple of its kind. Each function receives a `Request`.

Messages and field paths are KubeVirt's/CDI's/Kubernetes' own (including their quirks, such as KubeVirt's
`spec.dataVolumeTemplate[0]` and `spec.domain.volumes[0].name` paths), so users see what upstream shows.

Where virtplane deliberately differs from an upstream default, the constant below says so.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import types
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from virtplane.api import instancetype, quantity, rbac_validation, validation
from virtplane.api.resources import Cause, Resource

JSON = dict[str, Any]

KUBEVIRT = "kubevirt.io"
CDI = "cdi.kubevirt.io"

# KubeVirt's cluster defaults (virt-config), as this platform configures them.
DEFAULT_ARCHITECTURE = "amd64"
DEFAULT_MACHINE_TYPE = "q35"
DEFAULT_CPU_MODEL = "host-model"
# Upstream amd64 default for disk/cdrom/lun targets without a bus (pkg/defaults/arch/amd64.go).
DEFAULT_DISK_BUS = "sata"
# KubeVirt's default is the cluster's `network.defaultNetworkInterface`; virtplane uses masquerade, which
# keeps pod-network VMs live-migratable.
DEFAULT_INTERFACE_BINDING = "masquerade"
# Ratio for CPU hotplug headroom (maxSockets = sockets * ratio), KubeVirt's MaxHotplugRatio default.
MAX_HOTPLUG_RATIO = 4
MAX_VCPUS = 512
# Grace period a VMI gets when none is set (what `virtctl create vm` writes).
DEFAULT_VMI_GRACE_PERIOD = 180
# KubeVirt's legacy, name-derived firmware UUID namespace (pkg/virt-controller/watch/vm: magicUUID).
FIRMWARE_UUID_NAMESPACE = uuid.UUID("6a1a24a1-4061-4607-8bf4-a3963d0c5895")

VALID_RUN_STRATEGIES = ("Halted", "Manual", "Always", "RerunOnFailure", "Once")
VALID_EVICTION_STRATEGIES = ("None", "LiveMigrate", "LiveMigrateIfPossible", "External")
VALID_ARCHITECTURES = ("amd64", "arm64", "s390x")
DISK_BUSES = ("virtio", "scsi", "sata", "usb")
INTERFACE_MODELS = frozenset({"e1000", "e1000e", "igb", "ne2k_pci", "pcnet", "rtl8139", "virtio"})
CACHE_MODES = frozenset({"none", "writethrough", "writeback"})
IO_MODES = frozenset({"native", "threads"})
BINDING_METHODS = ("bridge", "masquerade", "sriov", "passtBinding")
DISCONTINUED_BINDINGS = {"slirp": "Slirp", "macvtap": "Macvtap", "passt": "Passt"}
VOLUME_SOURCES = (
    "persistentVolumeClaim", "sysprep", "cloudInitNoCloud", "cloudInitConfigDrive", "containerDisk", "ephemeral",
    "emptyDisk", "hostDisk", "dataVolume", "configMap", "secret", "downwardAPI", "serviceAccount",
    "downwardMetrics", "memoryDump", "containerPath",
)
DV_SOURCES = ("http", "s3", "gcs", "registry", "pvc", "upload", "blank", "imageio", "vddk", "snapshot")
RESTRICTED_VMI_LABELS = frozenset({
    "kubevirt.io/created-by", "kubevirt.io/migrationJobUID", "kubevirt.io/nodeName",
    "kubevirt.io/migration-target-node-name", "kubevirt.io/schedulable", "kubevirt.io/install-strategy",
})
CLOUD_INIT_MAX_LEN = 2048
PVC_ACCESS_MODES = ["ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"]


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """What an admission function sees. `privileged` marks virtplane's own components (controllers,
    node agents), which may change what users may not (e.g. a VMI's spec), like KubeVirt's service
    accounts."""

    resource: Resource
    obj: JSON
    old: JSON | None
    operation: str  # "CREATE" | "UPDATE"
    privileged: bool = False
    subresource: str = ""  # e.g. "ephemeralcontainers" for a pods/ephemeralcontainers write

    @property
    def create(self) -> bool:
        return self.operation == "CREATE"

    @property
    def update(self) -> bool:
        return self.operation == "UPDATE"


Mutator = Callable[[Request], None]
Check = Callable[[Request], list[Cause]]


# --------------------------------------------------------------------------------------------------
# small JSON helpers


def _dict(v: Any) -> JSON:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _ensure(obj: JSON, *keys: str) -> JSON:
    """obj[k1][k2]... as a dict, creating (or replacing non-dict) levels on the way."""
    cur = obj
    for k in keys:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    return cur


def _get(obj: Any, *keys: str) -> Any:
    cur = obj
    for k in keys:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(k)
    return cur


def _q(v: Any) -> int | None:
    """A quantity's integer value, or None when absent/unparsable (the schema reports those)."""
    if v is None:
        return None
    try:
        return quantity.quantity_value(v)
    except (ValueError, ArithmeticError):
        return None


def _invalid(field: str, message: str) -> Cause:
    return Cause("FieldValueInvalid", message, field)


def _required(field: str, message: str) -> Cause:
    return Cause("FieldValueRequired", message, field)


def _pull_policy(image: str) -> str:
    # Kubernetes' and KubeVirt's rule: `:latest` or no tag/digest -> Always.
    last = image.rsplit("/", 1)[-1]
    if image.endswith(":latest") or (":" not in last and "@" not in image):
        return "Always"
    return "IfNotPresent"


# --------------------------------------------------------------------------------------------------
# KubeVirt defaults


def legacy_firmware_uuid(name: str) -> str:
    """KubeVirt's CalculateLegacyUUID: UUIDv5 (SHA-1) of the VM name in a fixed namespace."""
    return str(uuid.uuid5(FIRMWARE_UUID_NAMESPACE, name))


def _default_network_interface(spec: JSON) -> None:
    """vmispec.SetDefaultNetworkInterface: only when neither interfaces nor networks are given."""
    devices = _ensure(spec, "domain", "devices")
    if devices.get("autoattachPodInterface") is False:
        return
    if _list(spec.get("networks")) or _list(devices.get("interfaces")):
        return
    devices["interfaces"] = [{"name": "default", DEFAULT_INTERFACE_BINDING: {}}]
    spec["networks"] = [{"name": "default", "pod": {}}]


def _default_arch_and_machine(spec: JSON) -> None:
    if not spec.get("architecture"):
        spec["architecture"] = DEFAULT_ARCHITECTURE
    machine = _ensure(spec, "domain", "machine")
    if not machine.get("type"):
        machine["type"] = DEFAULT_MACHINE_TYPE


def _mutate_vm(req: Request) -> None:
    """KubeVirt's VM mutating webhook (instancetype/preference kinds, architecture, machine type, default
    pod network) and, on create, the firmware UUID its VM controller persists."""
    spec = req.obj.get("spec")
    if not isinstance(spec, dict):
        return
    for key, kind in (("instancetype", "virtualmachineclusterinstancetype"),
                      ("preference", "virtualmachineclusterpreference")):
        matcher = spec.get(key)
        if isinstance(matcher, dict) and not matcher.get("kind"):
            matcher["kind"] = kind
    template = spec.get("template")
    if not isinstance(template, dict):
        return  # validation reports the missing template
    tspec = _ensure(template, "spec")
    _default_arch_and_machine(tspec)
    _default_network_interface(tspec)
    if req.create:
        firmware = _ensure(tspec, "domain", "firmware")
        if not firmware.get("uuid"):
            name = _get(req.obj, "metadata", "name")
            # With generateName the name is not known yet: a random UUID, as newer KubeVirt does.
            firmware["uuid"] = legacy_firmware_uuid(name) if name else str(uuid.uuid4())


def _default_resources(domain: JSON) -> None:
    """setDefaultResourceRequests + setGuestMemory."""
    resources = _ensure(domain, "resources")
    limits = _dict(resources.get("limits"))
    requests = resources.get("requests")
    for r in ("cpu", "memory"):
        if limits.get(r) is not None and not _q(_dict(requests).get(r)):
            requests = _ensure(resources, "requests")
            requests[r] = limits[r]
    memory = _ensure(domain, "memory")
    requests = _dict(resources.get("requests"))
    hugepages_size = _get(memory, "hugepages", "pageSize")
    if "memory" not in requests:
        guest = memory.get("guest")
        source = guest if guest is not None else hugepages_size
        if source is not None and (_q(source) or 0) > 0:
            _ensure(resources, "requests")["memory"] = source
    if memory.get("guest") is None:
        requests = _dict(resources.get("requests"))
        if _q(requests.get("memory")):
            memory["guest"] = requests["memory"]
        elif _q(limits.get("memory")):
            memory["guest"] = limits["memory"]
        elif hugepages_size is not None and _q(hugepages_size):
            memory["guest"] = hugepages_size
    if not memory:
        domain.pop("memory", None)


def _default_cpu(domain: JSON) -> None:
    """SetDefaultGuestCPUTopology, the default CPU model, and CPU hotplug headroom (LiveUpdate)."""
    cpu = _ensure(domain, "cpu")
    if not (cpu.get("cores") or cpu.get("sockets") or cpu.get("threads")):
        resources = _dict(domain.get("resources"))
        sockets = 1
        for src in (_dict(resources.get("limits")).get("cpu"), _dict(resources.get("requests")).get("cpu")):
            if src is not None:
                try:
                    sockets = int(quantity.parse_quantity(src))  # Quantity.Value() truncation as in Go
                except (ValueError, ArithmeticError):
                    pass
                break
        cpu["sockets"], cpu["cores"], cpu["threads"] = sockets, 1, 1
    if not cpu.get("model"):
        cpu["model"] = DEFAULT_CPU_MODEL
    if not cpu.get("maxSockets") and isinstance(cpu.get("sockets"), int):
        sockets = cpu["sockets"]
        per_socket = max(1, int(cpu.get("cores") or 1) * int(cpu.get("threads") or 1))
        max_sockets = sockets * MAX_HOTPLUG_RATIO
        if max_sockets * per_socket > MAX_VCPUS:
            max_sockets = max(MAX_VCPUS // per_socket, sockets)
        cpu["maxSockets"] = max_sockets


def _default_disks(spec: JSON) -> None:
    """SetDefaultVolumeDisk, SetDefaults_DiskDevice and the amd64 bus default; CD-ROM read-only/closed."""
    devices = _ensure(spec, "domain", "devices")
    disks = devices.get("disks")
    if not isinstance(disks, list):
        disks = []
    named = {d.get("name") for d in disks if isinstance(d, dict)}
    named |= {f.get("name") for f in _list(devices.get("filesystems")) if isinstance(f, dict)}
    for vol in _list(spec.get("volumes")):
        if isinstance(vol, dict) and vol.get("name") and vol["name"] not in named:
            disks.append({"name": vol["name"]})
            named.add(vol["name"])
    if disks:
        devices["disks"] = disks
    for disk in disks:
        if not isinstance(disk, dict):
            continue
        if all(disk.get(t) is None for t in ("disk", "cdrom", "lun")):
            disk["disk"] = {}
        for target in ("disk", "cdrom", "lun"):
            t = disk.get(target)
            if isinstance(t, dict) and not t.get("bus"):
                t["bus"] = DEFAULT_DISK_BUS
        cdrom = disk.get("cdrom")
        if isinstance(cdrom, dict):
            cdrom.setdefault("readonly", True)
            cdrom.setdefault("tray", "closed")


def _default_probe(probe: Any) -> None:
    if not isinstance(probe, dict):
        return
    for key, minimum, default in (("timeoutSeconds", 1, 1), ("periodSeconds", 1, 10),
                                  ("successThreshold", 1, 1), ("failureThreshold", 1, 3)):
        v = probe.get(key)
        if not isinstance(v, int) or v < minimum:
            probe[key] = default


def _mutate_vmi(req: Request) -> None:
    """KubeVirt's VMI mutating webhook (SetDefaultVirtualMachineInstance), applied on create."""
    if not req.create:
        return
    spec = req.obj.get("spec")
    if not isinstance(spec, dict):
        return
    _default_arch_and_machine(spec)
    domain = _ensure(spec, "domain")
    _default_resources(domain)
    _default_cpu(domain)
    for vol in _list(spec.get("volumes")):
        cd = _get(vol, "containerDisk")
        if isinstance(cd, dict) and not cd.get("imagePullPolicy") and isinstance(cd.get("image"), str):
            cd["imagePullPolicy"] = _pull_policy(cd["image"])
    _default_network_interface(spec)
    _default_disks(spec)
    # SetObjectDefaults_VirtualMachineInstance
    firmware = _ensure(domain, "firmware")
    if not firmware.get("uuid"):
        firmware["uuid"] = str(uuid.uuid4())
    features = _ensure(domain, "features")
    _ensure(features, "acpi").setdefault("enabled", True)
    for name in ("apic", "smm", "pvspinlock"):  # FeatureState defaults: present means enabled
        state = features.get(name)
        if isinstance(state, dict):
            state.setdefault("enabled", True)
    watchdog = _get(domain, "devices", "watchdog")
    if isinstance(watchdog, dict):
        i6300 = watchdog.get("i6300esb")
        if i6300 is None and not any(k in watchdog for k in ("diag288",)):
            i6300 = watchdog["i6300esb"] = {}
        if isinstance(i6300, dict):
            i6300.setdefault("action", "reset")
    _default_probe(spec.get("readinessProbe"))
    _default_probe(spec.get("livenessProbe"))
    if spec.get("terminationGracePeriodSeconds") is None:
        spec["terminationGracePeriodSeconds"] = DEFAULT_VMI_GRACE_PERIOD
    # Status the webhook initialises (the VMI has no status subresource: this is persisted).
    status = _ensure(req.obj, "status")
    guest = _get(domain, "memory", "guest")
    if guest is not None and "memory" not in status:
        status["memory"] = {"guestAtBoot": guest, "guestCurrent": guest, "guestRequested": guest}
    cpu = _dict(domain.get("cpu"))
    if "currentCPUTopology" not in status:
        status["currentCPUTopology"] = {k: cpu[k] for k in ("sockets", "cores", "threads") if k in cpu}


def _mutate_vmim(req: Request) -> None:
    """KubeVirt's migration mutator: the `kubevirt.io/vmi-name` label the controller selects by, and the
    finalizer it removes when the migration is done."""
    if not req.create:
        return
    vmi_name = _get(req.obj, "spec", "vmiName")
    meta = _ensure(req.obj, "metadata")
    if isinstance(vmi_name, str) and vmi_name:
        _ensure(meta, "labels")["kubevirt.io/vmi-name"] = vmi_name
    finalizers = meta.get("finalizers")
    if not isinstance(finalizers, list):
        finalizers = meta["finalizers"] = []
    if "kubevirt.io/migrationJobFinalize" not in finalizers:
        finalizers.append("kubevirt.io/migrationJobFinalize")


# --------------------------------------------------------------------------------------------------
# Kubernetes defaults (registry strategies and the default admission plugins, the cheap parts)


def _mutate_namespace(req: Request) -> None:
    if not req.create:
        return
    spec = _ensure(req.obj, "spec")
    if not spec.get("finalizers"):
        spec["finalizers"] = ["kubernetes"]
    status = _ensure(req.obj, "status")
    status.setdefault("phase", "Active")


def _default_container(c: Any) -> None:
    if not isinstance(c, dict):
        return
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    if isinstance(c.get("image"), str) and not c.get("imagePullPolicy"):
        c["imagePullPolicy"] = _pull_policy(c["image"])
    c.setdefault("resources", {})
    for p in _list(c.get("ports")):
        if isinstance(p, dict):
            p.setdefault("protocol", "TCP")


def _default_pod_spec(spec: JSON) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    for key in ("containers", "initContainers"):
        for c in _list(spec.get(key)):
            _default_container(c)


def _mutate_pod(req: Request) -> None:
    if not req.create:
        return
    spec = _ensure(req.obj, "spec")
    _default_pod_spec(spec)
    # The ServiceAccount admission plugin's default.
    if not spec.get("serviceAccountName"):
        spec["serviceAccountName"] = spec.get("serviceAccount") or "default"
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    status = _ensure(req.obj, "status")
    status.setdefault("phase", "Pending")
    status["qosClass"] = pod_qos_class(spec)


def pod_qos_class(spec: JSON) -> str:
    """Kubernetes' QoS class: Guaranteed when every container's cpu and memory limits equal their requests,
    BestEffort when no container asks for or limits anything, Burstable otherwise."""
    containers = [c for key in ("containers", "initContainers") for c in _list(spec.get(key))]
    any_set, guaranteed = False, bool(containers)
    for c in containers:
        res = c.get("resources") if isinstance(c.get("resources"), dict) else {}
        requests = res.get("requests") if isinstance(res.get("requests"), dict) else {}
        limits = res.get("limits") if isinstance(res.get("limits"), dict) else {}
        if requests or limits:
            any_set = True
        for name in ("cpu", "memory"):
            limit = limits.get(name)
            request = requests.get(name, limit)  # a limit alone defaults the request to it
            try:
                if limit is None or quantity.parse_quantity(str(request)) != quantity.parse_quantity(str(limit)):
                    guaranteed = False
            except ValueError:  # an invalid quantity is validation's to report
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def _mutate_service(req: Request) -> None:
    spec = req.obj.get("spec")
    if not isinstance(spec, dict):
        return
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    if spec["type"] in ("ClusterIP", "NodePort", "LoadBalancer"):
        spec.setdefault("internalTrafficPolicy", "Cluster")
    for p in _list(spec.get("ports")):
        if isinstance(p, dict):
            p.setdefault("protocol", "TCP")
            if p.get("targetPort") is None and p.get("port") is not None:
                p["targetPort"] = p["port"]


def _mutate_secret(req: Request) -> None:
    """Type defaults to Opaque; write-only `stringData` is merged into `data` (base64), as the Secret
    registry strategy does."""
    obj = req.obj
    if not obj.get("type"):
        obj["type"] = "Opaque"
    string_data = obj.pop("stringData", None)
    if isinstance(string_data, dict) and string_data:
        data = obj.get("data")
        if not isinstance(data, dict):
            data = obj["data"] = {}
        for k, v in string_data.items():
            if isinstance(v, str):
                data[k] = base64.b64encode(v.encode()).decode()


def _mutate_pvc(req: Request) -> None:
    spec = req.obj.get("spec")
    if isinstance(spec, dict):
        spec.setdefault("volumeMode", "Filesystem")
    if req.create:
        _ensure(req.obj, "status").setdefault("phase", "Pending")


def _mutate_pv(req: Request) -> None:
    spec = req.obj.get("spec")
    if isinstance(spec, dict):
        spec.setdefault("persistentVolumeReclaimPolicy", "Retain")
        spec.setdefault("volumeMode", "Filesystem")
    if req.create:
        _ensure(req.obj, "status").setdefault("phase", "Pending")


def _mutate_storage_class(req: Request) -> None:
    req.obj.setdefault("reclaimPolicy", "Delete")
    req.obj.setdefault("volumeBindingMode", "Immediate")


def _mutate_workload(req: Request, *, deployment: bool) -> None:
    spec = req.obj.get("spec")
    if not isinstance(spec, dict):
        return
    spec.setdefault("replicas", 1)
    if deployment:
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = _ensure(spec, "strategy")
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            ru = _ensure(strategy, "rollingUpdate")
            ru.setdefault("maxSurge", "25%")
            ru.setdefault("maxUnavailable", "25%")
    tspec = _get(spec, "template", "spec")
    if isinstance(tspec, dict):
        _default_pod_spec(tspec)


def _mutate_deployment(req: Request) -> None:
    _mutate_workload(req, deployment=True)


def _mutate_replicaset(req: Request) -> None:
    _mutate_workload(req, deployment=False)


# --------------------------------------------------------------------------------------------------
# KubeVirt validation


def _vmi_spec_causes(p: str, spec: JSON) -> list[Cause]:
    """ValidateVirtualMachineInstanceSpec, the parts that do not need cluster state. `p` is the path of
    the spec ("spec" for a VMI, "spec.template.spec" for a VM)."""
    causes: list[Cause] = []
    domain = _dict(spec.get("domain"))
    devices = _dict(domain.get("devices"))
    disks = [d for d in _list(devices.get("disks")) if isinstance(d, dict)]
    volumes = [v for v in _list(spec.get("volumes")) if isinstance(v, dict)]
    causes += _hostname_causes(p, spec)
    causes += _memory_causes(p, domain)
    causes += _cpu_causes(p, domain)
    causes += _network_causes(p, spec)
    causes += _boot_order_and_disk_volume_causes(p, spec, disks, volumes)
    causes += _probe_causes(f"{p}.readinessProbe", spec.get("readinessProbe"))
    causes += _probe_causes(f"{p}.livenessProbe", spec.get("livenessProbe"))
    causes += _disk_causes(f"{p}.domain.devices.disks", disks)
    causes += _firmware_causes(f"{p}.domain", domain)
    causes += _volume_causes(f"{p}.volumes", volumes)
    eviction = spec.get("evictionStrategy")
    if eviction is not None and eviction not in VALID_EVICTION_STRATEGIES:
        causes.append(_invalid(f"{p}.evictionStrategy",
                               f"{p}.evictionStrategy is set with an unrecognized option: {eviction}"))
    return causes


def _hostname_causes(p: str, spec: JSON) -> list[Cause]:
    causes = []
    hostname = spec.get("hostname")
    if isinstance(hostname, str) and hostname:
        errs = validation.is_dns1123_label(hostname)
        if errs:
            causes.append(_invalid(f"{p}.hostname", f"{p}.hostname does not conform to the kubernetes DNS_LABEL "
                                   f"rules : {', '.join(errs)}"))
    subdomain = spec.get("subdomain")
    if isinstance(subdomain, str) and subdomain:
        errs = validation.is_dns1123_subdomain(subdomain)
        if errs:
            causes.append(_invalid(f"{p}.subdomain", f"{p}.subdomain does not conform to the kubernetes "
                                   f"DNS_SUBDOMAIN rules : {', '.join(errs)}"))
    return causes


def _memory_causes(p: str, domain: JSON) -> list[Cause]:
    causes = []
    resources = _dict(domain.get("resources"))
    req_mem = _dict(resources.get("requests")).get("memory")
    lim_mem = _dict(resources.get("limits")).get("memory")
    field = f"{p}.domain.resources.requests.memory"
    v = _q(req_mem)
    if v is not None:
        if v < 0:
            causes.append(_invalid(field, f"{field} '{req_mem}': must be greater than or equal to 0."))
        elif v < 1_000_000:
            causes.append(_invalid(field, f"{field} '{req_mem}': must be greater than or equal to 1M."))
    lim = _q(lim_mem)
    if lim is not None and v is not None and v > lim:
        causes.append(_invalid(field, f"{field} '{req_mem}' is greater than "
                               f"{p}.domain.resources.limits.memory '{lim_mem}'"))
    guest = _get(domain, "memory", "guest")
    g = _q(guest)
    if g is not None and lim is not None and g > lim:
        causes.append(_invalid(f"{p}.domain.memory.guest",
                               f"{p}.domain.memory.guest '{guest}' must be equal to or less than the memory "
                               f"limit {p}.domain.resources.limits.memory '{lim_mem}'"))
    return causes


def _cpu_causes(p: str, domain: JSON) -> list[Cause]:
    cpu = _dict(domain.get("cpu"))
    sockets, max_sockets = cpu.get("sockets"), cpu.get("maxSockets")
    if isinstance(sockets, int) and isinstance(max_sockets, int) and max_sockets and sockets > max_sockets:
        return [_invalid(f"{p}.domain.cpu.sockets",
                         "Number of sockets in CPU topology is greater than the maximum sockets allowed")]
    return []


def _probe_causes(p: str, probe: Any) -> list[Cause]:
    if not isinstance(probe, dict):
        return []
    handlers = sum(1 for k in ("httpGet", "tcpSocket", "exec", "guestAgentPing") if probe.get(k) is not None)
    if handlers > 1:
        return [_invalid(p, f"{p} must have exactly one probe type set")]
    if handlers < 1:
        return [_required(p, f"either {p}.tcpSocket, {p}.exec or {p}.httpGet must be set if a {p} is specified")]
    return []


def _disk_causes(p: str, disks: list[JSON]) -> list[Cause]:
    """validateDisks: unique names, one target, supported bus, cache/io modes, names usable as
    container names."""
    causes: list[Cause] = []
    first_index: dict[Any, int] = {}
    for idx, disk in enumerate(disks):
        name = disk.get("name")
        if name in first_index:
            causes.append(_invalid(f"{p}[{idx}].name",
                                   f"{p}[{idx}] and {p}[{first_index[name]}] must not have the same Name."))
        else:
            first_index[name] = idx
        targets = [t for t in ("disk", "lun", "cdrom") if disk.get(t) is not None]
        if len(targets) > 1:
            causes.append(_invalid(f"{p}[{idx}]", f"{p}[{idx}] can only have a single target type defined"))
        boot = disk.get("bootOrder")
        if isinstance(boot, int) and boot < 1:
            causes.append(_invalid(f"{p}[{idx}].bootOrder", f"{p}[{idx}] must have a boot order > 0, if supplied"))
        if targets:
            target = targets[0]
            bus = _dict(disk.get(target)).get("bus")
            if bus:
                if bus == "ide":
                    causes.append(_invalid(f"{p}[{idx}].{target}.bus", "IDE bus is not supported"))
                elif bus == "virtio" and target == "cdrom":
                    causes.append(_invalid(f"{p}[{idx}].cdrom.bus", f"Bus type {bus} is invalid for CD-ROM device"))
                elif bus == "sata" and target == "disk" and _dict(disk.get("disk")).get("readonly"):
                    causes.append(_invalid(f"{p}[{idx}].disk.bus", f"{bus} hard-disks do not support read-only."))
                elif bus not in DISK_BUSES:
                    causes.append(_invalid(f"{p}[{idx}].{target}.bus",
                                           f"{p}[{idx}] is set with an unrecognized bus {bus}, must be one of: "
                                           f"[{' '.join(DISK_BUSES)}]"))
                if disk.get("dedicatedIOThread") is True and bus != "virtio":
                    causes.append(Cause("FieldValueNotSupported",
                                        f"IOThreads are not supported for disks on a {bus} bus", f"{p}[{idx}]"))
        cache = disk.get("cache")
        if cache and cache not in CACHE_MODES:
            causes.append(_invalid(f"{p}[{idx}].cache", f"{p}[{idx}].cache has invalid value {cache}"))
        io = disk.get("io")
        if io and io not in IO_MODES:
            causes.append(Cause("FieldValueNotSupported",
                                f"Disk IO mode for {p} is not supported. Supported modes are: native, threads.",
                                f"{p}[{idx}].io"))
        if isinstance(name, str):
            for msg in validation.is_dns1123_label(name):
                causes.append(_invalid(f"{p}[{idx}].name", msg))
    return causes


def _boot_order_and_disk_volume_causes(p: str, spec: JSON, disks: list[JSON], volumes: list[JSON]) -> list[Cause]:
    """validateBootOrder: every disk needs a volume of its name, LUNs only on PVC/DV volumes, boot
    orders unique across disks and interfaces."""
    causes: list[Cause] = []
    by_name = {v.get("name"): v for v in volumes}
    seen_boot: set[int] = set()
    dp = f"{p}.domain.devices.disks"
    for idx, disk in enumerate(disks):
        vol = by_name.get(disk.get("name"))
        if vol is None:
            # An empty CD-ROM is allowed: virtplane behaves as KubeVirt with DeclarativeHotplugVolumes enabled
            # (media are inserted and ejected by adding/removing a hotpluggable volume of the disk's name).
            if disk.get("cdrom") is None:
                causes.append(_invalid(f"{dp}[{idx}].name", f"{dp}[{idx}].Name '{disk.get('name')}' not found."))
        elif disk.get("lun") is not None and vol.get("persistentVolumeClaim") is None \
                and vol.get("dataVolume") is None:
            causes.append(_invalid(f"{dp}[{idx}].lun", f"{dp}[{idx}].lun can only be mapped to a DataVolume or "
                                   "PersistentVolumeClaim volume."))
        boot = disk.get("bootOrder")
        if isinstance(boot, int) and boot >= 1:
            if boot in seen_boot:
                causes.append(_invalid(f"{dp}[{idx}].bootOrder",
                                       f"Boot order for {dp}[{idx}].bootOrder already set for a different device."))
            seen_boot.add(boot)
    ip = f"{p}.domain.devices.interfaces"
    for idx, iface in enumerate(_list(_get(spec, "domain", "devices", "interfaces"))):
        boot = _dict(iface).get("bootOrder")
        if not isinstance(boot, int):
            continue
        if boot < 1:
            causes.append(_invalid(f"{ip}[{idx}].bootOrder", f"{ip}[{idx}] must have a boot order > 0, if supplied"))
        else:
            if boot in seen_boot:
                causes.append(_invalid(f"{ip}[{idx}].bootOrder",
                                       f"Boot order for {ip}[{idx}].bootOrder already set for a different device."))
            seen_boot.add(boot)
    return causes


_IFACE_NAME_RE = re.compile(r"^[A-Za-z0-9-_]+$")
_MAC_RE = re.compile(r"^([0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}$")


def _network_causes(p: str, spec: JSON) -> list[Cause]:
    """pkg/network/admitter: network sources, one pod network, bindings vs. networks, unique names,
    interfaces <-> networks cross-references, interface fields."""
    causes: list[Cause] = []
    networks = [n for n in _list(spec.get("networks")) if isinstance(n, dict)]
    ifaces = [i for i in _list(_get(spec, "domain", "devices", "interfaces")) if isinstance(i, dict)]
    ip = f"{p}.domain.devices.interfaces"
    pod_nets = [n for n in networks if n.get("pod") is not None]
    multus_default = [n for n in networks if _dict(n.get("multus")).get("default")]
    if len(pod_nets) > 1:
        causes.append(Cause("FieldValueDuplicate", f"more than one interface is connected to a pod network in "
                            f"{p}.interfaces", f"{p}.interfaces"))
    if len(multus_default) > 1:
        causes.append(_invalid(f"{p}.networks", "Multus CNI should only have one default network"))
    if pod_nets and multus_default:
        causes.append(_invalid(f"{p}.networks", "Pod network cannot be defined when Multus default network is "
                               "defined"))
    for idx, net in enumerate(networks):
        has_pod, multus = net.get("pod") is not None, net.get("multus")
        if not has_pod and multus is None and net.get("resourceClaim") is None:
            causes.append(_required(f"{p}.networks[{idx}]", "should have a network type"))
        elif has_pod and multus is not None:
            causes.append(_required(f"{p}.networks[{idx}]", "should have only one network type"))
        elif isinstance(multus, dict) and not multus.get("networkName"):
            causes.append(_required(f"{p}.networks[{idx}]", "CNI delegating plugin must have a networkName"))
    nets_by_name = {n.get("name"): n for n in networks}
    for idx, iface in enumerate(ifaces):
        name = iface.get("name")
        net = nets_by_name.get(name, {})
        methods = [m for m in BINDING_METHODS if iface.get(m) is not None]
        for old, label in DISCONTINUED_BINDINGS.items():
            if iface.get(old) is not None:
                causes.append(_invalid(f"{ip}[{idx}].{old}", f"{label} interface support has been discontinued "
                                       "since v1.3"))
        if iface.get("binding") is not None and methods:
            causes.append(_invalid(f"{ip}[{idx}].binding", f"logical {name} interface cannot have both binding "
                                   "plugin and interface binding method"))
        if len(methods) > 1:
            causes.append(_invalid(f"{ip}[{idx}]", f"{ip}[{idx}] can only have a single binding method defined: "
                                   f"{', '.join(methods)}"))
        if iface.get("masquerade") is not None and net and net.get("pod") is None:
            causes.append(_invalid(f"{ip}[{idx}].name", "Masquerade interface only implemented with pod network"))
        if iface.get("passtBinding") is not None and net and net.get("pod") is None:
            causes.append(_invalid(f"{ip}[{idx}].name", "Passt interface only implemented with pod network"))
        if iface.get("sriov") is not None and net and net.get("multus") is None:
            causes.append(_invalid(f"{ip}[{idx}].name", "SRIOV interface only implemented with Multus network"))
    seen: set[Any] = set()
    for idx, net in enumerate(networks):
        if net.get("name") in seen:
            causes.append(Cause("FieldValueDuplicate", f"Network with name {json.dumps(net.get('name'))} already "
                                "exists, every network must have a unique name", f"{p}.networks[{idx}].name"))
        seen.add(net.get("name"))
    iface_names = {i.get("name") for i in ifaces}
    for idx, net in enumerate(networks):
        if net.get("name") not in iface_names:
            f = f"{p}.networks[{idx}].name"
            causes.append(_required(f, f"{f} '{net.get('name')}' not found."))
    seen = set()
    for idx, iface in enumerate(ifaces):
        if iface.get("name") in seen:
            causes.append(Cause("FieldValueDuplicate", "Only one interface can be connected to one specific "
                                "network", f"{ip}[{idx}].name"))
        seen.add(iface.get("name"))
    for idx, iface in enumerate(ifaces):
        name = iface.get("name")
        f = f"{ip}[{idx}].name"
        if name not in nets_by_name:
            causes.append(_invalid(f, f"{f} '{name}' not found."))
        if isinstance(name, str) and not _IFACE_NAME_RE.match(name):
            causes.append(_invalid(f, "Network interface name can only contain alphabetical characters, numbers, "
                                   "dashes (-) or underscores (_)"))
        model = iface.get("model")
        if model and model not in INTERFACE_MODELS:
            causes.append(Cause("FieldValueNotSupported", f"interface {f} uses model {model} that is not "
                                "supported.", f"{ip}[{idx}].model"))
        mac = iface.get("macAddress")
        if isinstance(mac, str) and mac and not _MAC_RE.match(mac):
            causes.append(_invalid(f"{ip}[{idx}].macAddress", f"interface {f} has malformed MAC address ({mac})."))
    return causes


def _firmware_causes(p: str, domain: JSON) -> list[Cause]:
    causes: list[Cause] = []
    firmware = _dict(domain.get("firmware"))
    bootloader = _dict(firmware.get("bootloader"))
    bp = f"{p}.firmware.bootloader"
    if bootloader.get("efi") is not None and bootloader.get("bios") is not None:
        causes.append(_invalid(bp, f"{bp} has both EFI and BIOS configured, but they are mutually exclusive."))
    efi = bootloader.get("efi")
    if isinstance(efi, dict) and efi.get("secureBoot", True) is not False:
        smm = _get(domain, "features", "smm")
        if not (isinstance(smm, dict) and smm.get("enabled", True) is not False):
            causes.append(_invalid(p, f"{p} has EFI SecureBoot enabled. SecureBoot requires SMM, which is currently "
                                   "disabled."))
    kernel_boot = _dict(firmware.get("kernelBoot"))
    if kernel_boot and kernel_boot.get("container") is None and kernel_boot.get("kernelArgs"):
        causes.append(_invalid(f"{p}.firmware.kernelBoot.kernelArgs",
                               "kernel arguments cannot be provided without an external kernel"))
    return causes


def _volume_causes(p: str, volumes: list[JSON]) -> list[Cause]:
    """validateVolumes: unique names, exactly one source, source-specific required fields and limits."""
    causes: list[Cause] = []
    first: dict[Any, int] = {}
    counts = {"serviceAccount": 0, "downwardMetrics": 0, "memoryDump": 0}
    for idx, vol in enumerate(volumes):
        vp = f"{p}[{idx}]"
        name = vol.get("name")
        if name in first:
            causes.append(_invalid(f"{vp}.name", f"{vp} and {p}[{first[name]}] must not have the same Name."))
        else:
            first[name] = idx
        sources = [s for s in VOLUME_SOURCES if vol.get(s) is not None]
        for s in counts:
            if s in sources:
                counts[s] += 1
        if len(sources) != 1:
            causes.append(_invalid(vp, f"{vp} must have exactly one source type set"))
        dv = vol.get("dataVolume")
        if isinstance(dv, dict) and not dv.get("name"):
            causes.append(_required(f"{vp}.name", "DataVolume 'name' must be set"))
        for kind in ("cloudInitNoCloud", "cloudInitConfigDrive"):
            ci = vol.get(kind)
            if isinstance(ci, dict):
                causes += _cloud_init_causes(f"{vp}.{kind}", ci)
        host_disk = vol.get("hostDisk")
        if isinstance(host_disk, dict):
            if not host_disk.get("path"):
                causes.append(Cause("FieldValueNotFound", f"{vp}.hostDisk.path is required for hostDisk volume",
                                    f"{vp}.hostDisk.path"))
            if host_disk.get("type") not in ("Disk", "DiskOrCreate"):
                causes.append(_invalid(f"{vp}.hostDisk.type", f"{vp}.hostDisk.type has invalid value "
                                       f"'{host_disk.get('type', '')}', allowed are 'Disk' or 'DiskOrCreate'"))
        for kind, key in (("configMap", "name"), ("secret", "secretName"), ("serviceAccount", "serviceAccountName")):
            src = vol.get(kind)
            if isinstance(src, dict) and not src.get(key):
                causes.append(_invalid(f"{vp}.{kind}.{key}", f"{vp}.{kind}.{key} is a required field"))
    for kind, label in (("serviceAccount", "serviceAccount"), ("downwardMetrics", "downwardMetric"),
                        ("memoryDump", "memory dump")):
        if counts[kind] > 1:
            causes.append(_invalid(p, f"{p} must have max one {label} volume set"))
    return causes


def _cloud_init_causes(p: str, ci: JSON) -> list[Cause]:
    causes: list[Cause] = []
    total_sources = 0
    for what, max_len, label in (("userData", CLOUD_INIT_MAX_LEN, "userdata"),
                                 ("networkData", CLOUD_INIT_MAX_LEN, "networkdata")):
        n_sources, length = 0, 0
        if _dict(ci.get(f"{what}SecretRef")).get("name"):
            n_sources += 1
        b64 = ci.get(f"{what}Base64")
        if isinstance(b64, str) and b64:
            n_sources += 1
            try:
                length = len(base64.b64decode(b64, validate=True))
            except (binascii.Error, ValueError):
                causes.append(_invalid(f"{p}.{what}Base64",
                                       f"{p}.{what}Base64.{p.rsplit('.', 1)[-1]}.{what}Base64 is not a valid base64 "
                                       "value."))
        plain = ci.get(what)
        if isinstance(plain, str) and plain:
            n_sources += 1
            length = len(plain.encode())
        if n_sources > 1:
            which = "userdatasource" if what == "userData" else "networkdata source"
            causes.append(_invalid(p, f"{p} must have only one {which} set."))
        if length > max_len:
            ref = "UserDataSecretRef" if what == "userData" else "NetworkDataSecretRef"
            causes.append(_invalid(p, f"{p} {label} exceeds {max_len} byte limit. Should use {ref} for larger "
                                   "data."))
        total_sources += n_sources
    if total_sources == 0:
        causes.append(_invalid(p, f"{p} must have at least one userdatasource or one networkdatasource set."))
    return causes


def _dv_template_causes(spec: JSON) -> list[Cause]:
    """storage admitter ValidateDataVolumeTemplate (note KubeVirt's singular `dataVolumeTemplate` path)."""
    causes: list[Cause] = []
    volumes = _list(_get(spec, "template", "spec", "volumes"))
    for idx, dvt in enumerate(_list(spec.get("dataVolumeTemplates"))):
        f = f"spec.dataVolumeTemplate[{idx}]"
        dvt = _dict(dvt)
        name = _get(dvt, "metadata", "name")
        dspec = _dict(dvt.get("spec"))
        if not name:
            causes.append(_required(f"{f}.name", f"'name' field must not be empty for DataVolumeTemplate entry "
                                    f"{f}.name."))
            continue
        cause = _dv_template_spec_cause(f, dspec)
        if cause is not None:
            causes.append(cause)
            continue
        referenced = any(
            _get(v, "persistentVolumeClaim", "claimName") == name or _get(v, "dataVolume", "name") == name
            for v in volumes
        )
        if not referenced:
            causes.append(_required(f, f"DataVolumeTemplate entry {f} must be referenced in the VMI template's "
                                    "'volumes' list"))
    return causes


def _dv_template_spec_cause(f: str, dspec: JSON) -> Cause | None:
    pvc, storage = dspec.get("pvc"), dspec.get("storage")
    if pvc is None and storage is None:
        return _invalid(f"{f}.PVC.Storage", "Missing Data volume PVC or Storage")
    if pvc is not None and storage is not None:
        return _invalid(f"{f}.PVC.Storage", "Duplicate storage definition, both target storage and target pvc "
                        "defined")
    target = _dict(pvc if pvc is not None else storage)
    external = target.get("dataSourceRef") is not None or target.get("dataSource") is not None
    has_source = dspec.get("source") is not None or dspec.get("sourceRef") is not None
    if external and has_source:
        return _invalid(f"{f}.source", "External population is incompatible with Source and SourceRef")
    if not external and not has_source:
        return _invalid(f"{f}.source.sourceRef", "Data volume should have either Source, SourceRef, or be "
                        "externally populated")
    source = dspec.get("source")
    if isinstance(source, dict):
        n = sum(1 for v in source.values() if v is not None)
        if n == 0:
            return _invalid(f"{f}.source", "Missing dataVolume valid source")
        if n > 1:
            return _invalid(f"{f}.source", "Multiple dataVolume sources")
    return None


def _run_strategy_causes(spec: JSON) -> list[Cause]:
    causes: list[Cause] = []
    running, strategy = spec.get("running"), spec.get("runStrategy")
    if running is not None and strategy is not None:
        causes.append(_invalid("spec.running", "Running and RunStrategy are mutually exclusive. Note that Running "
                               "is deprecated, please use RunStrategy instead"))
    if running is None and strategy is None:
        causes.append(_invalid("spec.running", "RunStrategy must be specified"))
    if strategy is not None:
        if strategy == "WaitAsReceiver":
            causes.append(_invalid("spec.runStrategy", "Invalid RunStrategy (WaitAsReceiver), "
                                   "DecentralizedLiveMigration feature gate is not enabled in kubevirt resource"))
        elif strategy not in VALID_RUN_STRATEGIES:
            causes.append(_invalid("spec.runStrategy", f"Invalid RunStrategy ({strategy})"))
    return causes


def _validate_vm(req: Request) -> list[Cause]:
    spec = _dict(req.obj.get("spec"))
    template = spec.get("template")
    if not isinstance(template, dict):
        return [_required("spec.template", "missing virtual machine template.")]
    causes = _vmi_labels_causes("spec.template.metadata", _dict(template.get("metadata")), req)
    causes += _vmi_spec_causes("spec.template.spec", _dict(template.get("spec")))
    causes += _dv_template_causes(spec)
    causes += _run_strategy_causes(spec)
    if isinstance(spec.get("instancetype"), dict):
        conflicts = instancetype.static_conflicts(_dict(template.get("spec")))
        if conflicts:  # KubeVirt's instancetype admitter: one cause naming every conflicting field
            causes.append(_invalid(", ".join(conflicts), instancetype.conflicts_message(conflicts)))
    return causes


def _vmi_labels_causes(p: str, meta: JSON, req: Request) -> list[Cause]:
    if req.privileged:
        return []
    labels = _dict(meta.get("labels"))
    if any(k in RESTRICTED_VMI_LABELS for k in labels):
        return [Cause("FieldValueNotSupported", "creation of the following reserved kubevirt.io/ labels on a VMI "
                      "object is prohibited", f"{p}.labels")]
    return []


def _validate_vmi(req: Request) -> list[Cause]:
    obj = req.obj
    spec = _dict(obj.get("spec"))
    if req.update:
        old_spec = _dict(_dict(req.old).get("spec"))
        if spec != old_spec and not req.privileged:
            return [Cause("FieldValueNotSupported", "update of VMI object is restricted", "spec")]
        return []
    causes = _vmi_spec_causes("spec", spec)
    # Only for VMIs themselves: every volume needs a disk or filesystem (KubeVirt's own path quirk).
    devices = _dict(_get(spec, "domain", "devices"))
    names = {d.get("name") for d in _list(devices.get("disks")) if isinstance(d, dict)}
    names |= {f.get("name") for f in _list(devices.get("filesystems")) if isinstance(f, dict)}
    for idx, vol in enumerate(_list(spec.get("volumes"))):
        if isinstance(vol, dict) and vol.get("memoryDump") is None and vol.get("name") not in names:
            f = f"spec.domain.volumes[{idx}].name"
            causes.append(_invalid(f, f"{f} '{vol.get('name')}' not found."))
    causes += _mandatory_memory_causes(spec)
    causes += _vmi_labels_causes("metadata", _dict(obj.get("metadata")), req)
    arch = spec.get("architecture")
    if arch and arch not in VALID_ARCHITECTURES:
        causes.append(_invalid("spec.architecture", f"unsupported architecture: {arch}"))
    return causes


def _mandatory_memory_causes(spec: JSON) -> list[Cause]:
    """ValidateVirtualMachineInstanceMandatoryFields (after defaults: guest <-> requests were filled)."""
    domain = _dict(spec.get("domain"))
    if _q(_get(domain, "resources", "requests", "memory")):
        return []
    memory = _dict(domain.get("memory"))
    if memory.get("guest") is None and memory.get("hugepages") is None:
        return [Cause("FieldValueRequired", "no memory requested, at least one of 'spec.domain.memory.guest', "
                      "'spec.domain.memory.hugepages.size' or 'spec.domain.resources.requests.memory' must be set",
                      "")]
    return []


def _validate_vmirs(req: Request) -> list[Cause]:
    spec = _dict(req.obj.get("spec"))
    template = spec.get("template")
    if not isinstance(template, dict):
        return [_required("spec.template", "missing virtual machine template.")]
    causes = _vmi_spec_causes("spec.template.spec", _dict(template.get("spec")))
    selector = spec.get("selector")
    if not isinstance(selector, dict):
        causes.append(_required("spec.selector", "missing selector."))
    else:
        labels = _dict(_get(template, "metadata", "labels"))
        if any(labels.get(k) != v for k, v in _dict(selector.get("matchLabels")).items()):
            causes.append(_invalid("spec.selector", "selector does not match labels."))
    return causes


def _validate_vmim(req: Request) -> list[Cause]:
    spec = _dict(req.obj.get("spec"))
    if req.update:
        if spec != _dict(_dict(req.old).get("spec")) and not req.privileged:
            return [Cause("FieldValueNotSupported", "update of Migration object's spec is restricted", "spec")]
        return []
    if not spec.get("vmiName"):
        return [_required("spec.vmiName", "vmiName is missing")]
    return []


def _validate_migration_policy(req: Request) -> list[Cause]:
    spec = _dict(req.obj.get("spec"))
    causes = []
    timeout = spec.get("completionTimeoutPerGiB")
    if isinstance(timeout, int) and timeout < 0:
        causes.append(_invalid("spec.completionTimeoutPerGiB", "must not be negative"))
    bw = spec.get("bandwidthPerMigration")
    if bw is not None:
        try:
            negative = quantity.parse_quantity(bw) < 0
        except (ValueError, ArithmeticError):
            negative = False
        if negative:
            causes.append(_invalid("spec.bandwidthPerMigration", "must not be negative"))
    return causes


# --------------------------------------------------------------------------------------------------
# CDI validation (datavolume-validate webhook; the parts that need no lookups)


def _validate_dv(req: Request) -> list[Cause]:
    obj = req.obj
    spec = _dict(obj.get("spec"))
    if req.update:
        old_spec = _dict(_dict(req.old).get("spec"))
        if spec != old_spec and not _multistage_only(spec, old_spec):
            return [Cause("FieldValueDuplicate", "Cannot update DataVolume Spec", "DataVolume.Spec")]
        return []
    name = _get(obj, "metadata", "name") or ""
    if isinstance(name, str) and len(name) > 253:
        return [_invalid("", "Name of data volume cannot be more than 253 characters")]
    return _dv_spec_causes("spec", spec)


def _multistage_only(spec: JSON, old: JSON) -> bool:
    """CDI admits checkpoint updates of multi-stage (VDDK warm) imports."""
    if not (_get(spec, "source", "vddk") is not None and _list(spec.get("checkpoints"))):
        return False
    strip = ("checkpoints", "finalCheckpoint")
    return {k: v for k, v in spec.items() if k not in strip} == {k: v for k, v in old.items() if k not in strip}


def _storage_size_cause(f: str, target: JSON, label: str, *, required: bool) -> Cause | None:
    size = _get(target, "resources", "requests", "storage")
    field = f"{f}.{label}.resources.requests.size"
    if size is None:
        return _invalid(field, f"{label} size is missing") if required else None
    v = _q(size)
    if v is not None and v <= 0:
        return _invalid(field, f"{label} size can't be equal or less than zero")
    return None


def _dv_spec_causes(f: str, spec: JSON) -> list[Cause]:
    pvc, storage = spec.get("pvc"), spec.get("storage")
    if pvc is None and storage is None:
        return [_invalid(f"{f}.PVC", "Missing Data volume PVC")]
    if pvc is not None and storage is not None:
        return [_invalid(f"{f}.PVC.Storage", "Duplicate storage definition, both target storage and target pvc "
                         "defined")]
    source, source_ref = spec.get("source"), spec.get("sourceRef")
    if isinstance(pvc, dict):
        cause = _storage_size_cause(f, pvc, "PVC", required=True)
        if cause is not None:
            return [cause]
        modes = _list(pvc.get("accessModes"))
        if not modes:
            return [_invalid(f"{f}.PVC.accessModes", "Required value: at least 1 access mode is required")]
        if len(modes) > 1:
            return [_invalid(f"{f}.PVC.accessModes", "PVC multiple accessModes")]
        if modes[0] not in ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"):
            return [_invalid(f"{f}.PVC.accessModes", f'Unsupported value: "{modes[0]}": supported values: '
                             '"ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce"')]
    elif isinstance(storage, dict):
        # With `storage` CDI infers a clone's size from its source.
        cause = _storage_size_cause(f, storage, "Storage", required=False)
        if cause is not None:
            return [cause]
        for mode in _list(storage.get("accessModes")):
            if mode not in ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"):
                return [_invalid(f"{f}.PVC.accessModes", f'Unsupported value: "{mode}": supported values: '
                                 '"ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce"')]
    target = _dict(pvc if pvc is not None else storage)
    external = target.get("dataSourceRef") is not None or target.get("dataSource") is not None
    if external and (source is not None or source_ref is not None):
        return [_invalid(f"{f}.source", "External population is incompatible with Source and SourceRef")]
    if external:
        return []
    if (source is None) == (source_ref is None):
        return [_invalid(f"{f}.source", "Data volume should have either Source or SourceRef")]
    if isinstance(source_ref, dict):
        if not source_ref.get("kind"):
            return [_invalid(f"{f}.sourceRef.Kind", "Missing sourceRef kind")]
        if source_ref["kind"] != "DataSource":
            return [_invalid(f"{f}.sourceRef.Kind", f"Unsupported sourceRef kind {source_ref['kind']}, currently only "
                             "DataSource is supported")]
        if not source_ref.get("name"):
            return [_invalid(f"{f}.sourceRef.Name", "Missing sourceRef name")]
        return []
    source = _dict(source)
    present = [k for k, v in source.items() if v is not None]
    if not present:
        return [_invalid(f"{f}.source", "Missing Data volume source")]
    if len(present) > 1:
        return [_invalid(f"{f}.source", "Multiple Data volume sources")]
    kind = present[0]
    if kind not in DV_SOURCES:
        return [_invalid(f"{f}.source", f"Unknown Data volume source type {kind}")]
    labels = {"http": "HTTP", "s3": "S3", "imageio": "Imageio", "vddk": "VDDK", "gcs": "GCS"}
    if kind in labels:
        url = _dict(source[kind]).get("url", "")
        err = _source_url_error(url, gcs=kind == "gcs")
        if err:
            return [_invalid(f"{f}.source.{labels[kind]}.url", f"{f}.source {err}")]
    content_type = spec.get("contentType")
    if content_type and content_type not in ("kubevirt", "archive"):
        return [_invalid(f"{f}.contentType", "ContentType not one of: kubevirt, archive")]
    if kind == "blank" and content_type == "archive":
        return [_invalid(f"{f}.contentType", "SourceType cannot be blank and the contentType be archive")]
    if kind == "registry" and content_type and content_type != "kubevirt":
        return [_invalid(f"{f}.contentType", "ContentType must be kubevirt when Source is Registry")]
    if kind == "registry":
        reg = _dict(source["registry"])
        if (reg.get("url") is None) == (reg.get("imageStream") is None):
            return [_invalid(f"{f}.source.registry", "Source registry should have either URL or ImageStream")]
    if kind in ("pvc", "snapshot"):
        # CDI defaults the source namespace to the DataVolume's; a name is always needed.
        label = "PVC" if kind == "pvc" else "Snapshot"
        if not _dict(source[kind]).get("name"):
            return [_invalid(f"{f}.source.{label}", f"{f}.source {label} is not valid")]
    return []


def _source_url_error(url: Any, *, gcs: bool = False) -> str:
    if not url:
        return "source URL is empty"
    if not isinstance(url, str) or not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^\s]+$|^/", url):
        return f"Invalid source URL: {url}"
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    allowed = ("http", "https", "gs") if gcs else ("http", "https")
    if scheme not in allowed:
        return f"Invalid source URL scheme: {url}"
    return ""


# --------------------------------------------------------------------------------------------------
# Kubernetes validation (registry strategies)


_CONFIG_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")


def _config_key_causes(p: str, data: Any, seen: set[str] | None = None) -> list[Cause]:
    causes: list[Cause] = []
    for key in _dict(data):
        f = f"{p}[{key}]"
        if len(key) > 253:
            causes.append(validation.invalid(f, key, validation.max_len_error(253)))
        if not _CONFIG_KEY_RE.match(key):
            causes.append(validation.invalid(f, key, validation.regex_error(
                "a valid config key must consist of alphanumeric characters, '-', '_' or '.'", "[-._a-zA-Z0-9]+",
                "key.name", "KEY_NAME", "key-name")))
        if key in (".", ".."):
            causes.append(validation.invalid(f, key, "must not be '.' or '..'"))
        if seen is not None:
            if key in seen:
                causes.append(validation.invalid(f, key, "duplicate of key present in binaryData"))
            seen.add(key)
    return causes


def _immutable_data_causes(req: Request, fields: tuple[str, ...]) -> list[Cause]:
    old = _dict(req.old)
    if not req.update or old.get("immutable") is not True:
        return []
    causes = []
    for f in fields:
        if req.obj.get(f) != old.get(f):
            causes.append(validation.forbidden(f, "field is immutable when `immutable` is set"))
    if req.obj.get("immutable") is not True:
        causes.append(validation.forbidden("immutable", "field is immutable when `immutable` is set"))
    return causes


def _validate_configmap(req: Request) -> list[Cause]:
    seen: set[str] = set()
    causes = _config_key_causes("data", req.obj.get("data"), seen)
    causes += _config_key_causes("binaryData", req.obj.get("binaryData"), seen)
    return causes + _immutable_data_causes(req, ("data", "binaryData"))


def _validate_secret(req: Request) -> list[Cause]:
    causes = _config_key_causes("data", req.obj.get("data"))
    for key, v in _dict(req.obj.get("data")).items():
        if isinstance(v, str):
            try:
                base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError) as e:
                causes.append(validation.invalid(f"data[{key}]", "<secret contents redacted>",
                                                 f"illegal base64 data: {e}"))
    # The registry strategy's checks of docker-registry Secrets: the config key is there and is a JSON object.
    key = {"kubernetes.io/dockerconfigjson": ".dockerconfigjson", "kubernetes.io/dockercfg": ".dockercfg"}.get(
        str(req.obj.get("type")))
    data = _dict(req.obj.get("data"))
    if key is not None and not data.get(key):
        causes.append(validation.required(f"data[{key}]"))
    elif key is not None:
        try:
            if not isinstance(json.loads(base64.b64decode(data[key])), dict):
                raise ValueError("the docker config is not a JSON object")
        except (binascii.Error, ValueError) as e:
            causes.append(validation.invalid(f"data[{key}]", "<secret contents redacted>", str(e)))
    if req.update:
        old_type = _dict(req.old).get("type")
        if old_type and req.obj.get("type") != old_type:
            causes.append(validation.invalid("type", req.obj.get("type"), "field is immutable"))
    return causes + _immutable_data_causes(req, ("data",))


def _validate_service(req: Request) -> list[Cause]:
    # Services are named by DNS-1035 labels (they become DNS names); ObjectMeta validation checked the
    # looser subdomain rule already, so only add what that rule let through.
    name = _get(req.obj, "metadata", "name")
    if req.create and isinstance(name, str) and name and not validation.is_dns1123_subdomain(name):
        return [validation.invalid("metadata.name", name, m) for m in validation.is_dns1035_label(name)]
    return []


def _validate_storage_class(req: Request) -> list[Cause]:
    obj = req.obj
    causes = []
    if obj.get("provisioner") == "":
        causes.append(validation.required("provisioner"))
    if req.update:
        old = _dict(req.old)
        if obj.get("parameters") != old.get("parameters"):
            causes.append(validation.forbidden("parameters", "updates to parameters are forbidden."))
        if obj.get("provisioner") != old.get("provisioner"):
            causes.append(validation.forbidden("provisioner", "updates to provisioner are forbidden."))
        if obj.get("reclaimPolicy") != old.get("reclaimPolicy"):
            causes.append(validation.forbidden("reclaimPolicy", "updates to reclaimPolicy are forbidden."))
        if obj.get("volumeBindingMode") != old.get("volumeBindingMode"):
            causes.append(validation.invalid("volumeBindingMode", obj.get("volumeBindingMode"), "field is immutable"))
    return causes


def _validate_pvc(req: Request) -> list[Cause]:
    spec = _dict(req.obj.get("spec"))
    causes: list[Cause] = []
    if req.create:
        modes = spec.get("accessModes")
        if not _list(modes):
            causes.append(validation.required("spec.accessModes", "at least 1 access mode is required"))
        for mode in _list(modes):
            if mode not in PVC_ACCESS_MODES:
                causes.append(validation.not_supported("spec.accessModes", mode, PVC_ACCESS_MODES))
        if "ReadWriteOncePod" in _list(modes) and len(_list(modes)) > 1:
            causes.append(validation.forbidden("spec.accessModes", "may not use ReadWriteOncePod with other access "
                                               "modes"))
        storage = _get(spec, "resources", "requests", "storage")
        if storage is None:
            causes.append(validation.required("spec.resources[storage]"))
        elif (_q(storage) or 0) <= 0 and _q(storage) is not None:
            causes.append(validation.invalid("spec.resources[storage]", storage, "must be greater than zero"))
        return causes
    old_spec = _dict(_dict(req.old).get("spec"))
    # Mutable after creation: storage requests (expansion only), volumeAttributesClassName, and the
    # binding the PV controller writes into an unbound claim.
    new_cmp, old_cmp = dict(spec), dict(old_spec)
    for d in (new_cmp, old_cmp):
        d.pop("volumeAttributesClassName", None)
        d["resources"] = {k: v for k, v in _dict(d.get("resources")).items() if k != "requests"}
    if not old_spec.get("volumeName"):
        new_cmp.pop("volumeName", None)
        old_cmp.pop("volumeName", None)
    if new_cmp != old_cmp:
        causes.append(validation.forbidden("spec", "spec is immutable after creation except resources.requests and "
                                           "volumeAttributesClassName for bound claims"))
    new_size, old_size = _q(_get(spec, "resources", "requests", "storage")), \
        _q(_get(old_spec, "resources", "requests", "storage"))
    if new_size is not None and old_size is not None and new_size < old_size:
        causes.append(validation.forbidden("spec.resources.requests.storage",
                                           "field can not be less than status.capacity"))
    return causes


def _validate_pv(req: Request) -> list[Cause]:
    spec = _dict(req.obj.get("spec"))
    if not req.create:
        return []
    causes = []
    if not _list(spec.get("accessModes")):
        causes.append(validation.required("spec.accessModes"))
    if _get(spec, "capacity", "storage") is None:
        causes.append(validation.required("spec.capacity"))
    return causes


_POD_MUTABLE_HINT = (
    "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,"
    "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),"
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"
)


_EPHEMERAL_FORBIDDEN = ("ports", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle", "resources")


def _validate_ephemeral(new: JSON, old: JSON) -> list[Cause]:
    """pods/ephemeralcontainers: existing ephemeral containers stay as they are, new ones get unique names and
    none of the fields an ephemeral container may not have (Kubernetes' ValidatePodEphemeralContainersUpdate)."""
    causes: list[Cause] = []
    before = {c.get("name"): c for c in _list(old.get("ephemeralContainers")) if isinstance(c, dict)}
    after = [c for c in _list(new.get("ephemeralContainers")) if isinstance(c, dict)]
    names = {c.get("name") for key in ("containers", "initContainers") for c in _list(new.get(key))
             if isinstance(c, dict)}  # fmt: skip
    for name, c in before.items():
        if not any(a.get("name") == name for a in after):
            causes.append(validation.forbidden("spec.ephemeralContainers",
                                               f'existing ephemeral containers "{name}" may not be removed'))
        elif next(a for a in after if a.get("name") == name) != c:
            causes.append(validation.forbidden("spec.ephemeralContainers",
                                               f'existing ephemeral containers "{name}" may not be changed'))
    seen: set[Any] = set()
    for i, c in enumerate(after):
        path = f"spec.ephemeralContainers[{i}]"
        if c.get("name") in names or c.get("name") in seen:
            causes.append(validation.duplicate(f"{path}.name", c.get("name")))
        seen.add(c.get("name"))
        if c.get("name") in before:
            continue
        if not c.get("image"):
            causes.append(validation.required(f"{path}.image"))
        for field in _EPHEMERAL_FORBIDDEN:
            if c.get(field):
                causes.append(validation.forbidden(f"{path}.{field}", "cannot be set for an Ephemeral Container"))
        target = c.get("targetContainerName")
        if target and target not in names:
            causes.append(Cause("FieldValueNotFound", f"Not found: {validation.format_value(target)}",
                                f"{path}.targetContainerName"))
    return causes


def _validate_pod(req: Request) -> list[Cause]:
    if req.create:
        if _dict(req.obj.get("spec")).get("ephemeralContainers"):
            return [validation.forbidden("spec.ephemeralContainers", "cannot be set on create")]
        return []
    if not req.update:
        return []
    new, old = _dict(req.obj.get("spec")), _dict(_dict(req.old).get("spec"))
    if req.subresource == "ephemeralcontainers":
        return _validate_ephemeral(new, old)

    def strip(spec: JSON) -> JSON:
        s = dict(spec)
        for k in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"):
            s.pop(k, None)
        for key in ("containers", "initContainers"):
            s[key] = [{k: v for k, v in c.items() if k != "image"} if isinstance(c, dict) else c
                      for c in _list(spec.get(key))]
        return s

    a, b = strip(new), strip(old)
    if not old.get("nodeName"):
        # Binding a pending pod to a node (the scheduler's pods/binding) is allowed.
        a.pop("nodeName", None)
        b.pop("nodeName", None)
    if a != b:
        return [validation.forbidden("spec", _POD_MUTABLE_HINT)]
    return []


def _validate_workload(req: Request) -> list[Cause]:
    spec = _dict(req.obj.get("spec"))
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        return [validation.required("spec.selector")]
    labels = _dict(_get(spec, "template", "metadata", "labels"))
    if any(labels.get(k) != v for k, v in _dict(selector.get("matchLabels")).items()):
        return [validation.invalid("spec.template.metadata.labels", labels,
                                   "`selector` does not match template `labels`")]
    if req.update and selector != _get(req.old, "spec", "selector"):
        return [validation.invalid("spec.selector", selector, "field is immutable")]
    return []


# --------------------------------------------------------------------------------------------------
# Registries and entry points

MUTATORS: Mapping[tuple[str, str], tuple[Mutator, ...]] = types.MappingProxyType({
    (KUBEVIRT, "VirtualMachine"): (_mutate_vm,),
    (KUBEVIRT, "VirtualMachineInstance"): (_mutate_vmi,),
    (KUBEVIRT, "VirtualMachineInstanceMigration"): (_mutate_vmim,),
    ("", "Namespace"): (_mutate_namespace,),
    ("", "Pod"): (_mutate_pod,),
    ("", "Service"): (_mutate_service,),
    ("", "Secret"): (_mutate_secret,),
    ("", "PersistentVolumeClaim"): (_mutate_pvc,),
    ("", "PersistentVolume"): (_mutate_pv,),
    ("storage.k8s.io", "StorageClass"): (_mutate_storage_class,),
    ("apps", "Deployment"): (_mutate_deployment,),
    ("apps", "ReplicaSet"): (_mutate_replicaset,),
})

VALIDATORS: Mapping[tuple[str, str], tuple[Check, ...]] = types.MappingProxyType({
    (KUBEVIRT, "VirtualMachine"): (_validate_vm,),
    (KUBEVIRT, "VirtualMachineInstance"): (_validate_vmi,),
    (KUBEVIRT, "VirtualMachineInstanceReplicaSet"): (_validate_vmirs,),
    (KUBEVIRT, "VirtualMachineInstanceMigration"): (_validate_vmim,),
    ("migrations.kubevirt.io", "MigrationPolicy"): (_validate_migration_policy,),
    (CDI, "DataVolume"): (_validate_dv,),
    ("", "ConfigMap"): (_validate_configmap,),
    ("", "Secret"): (_validate_secret,),
    ("", "Service"): (_validate_service,),
    ("", "PersistentVolumeClaim"): (_validate_pvc,),
    ("", "PersistentVolume"): (_validate_pv,),
    ("", "Pod"): (_validate_pod,),
    ("storage.k8s.io", "StorageClass"): (_validate_storage_class,),
    ("apps", "Deployment"): (_validate_workload,),
    ("apps", "ReplicaSet"): (_validate_workload,),
    (rbac_validation.RBAC_GROUP, "Role"): (rbac_validation.validate_role,),
    (rbac_validation.RBAC_GROUP, "ClusterRole"): (rbac_validation.validate_cluster_role,),
    (rbac_validation.RBAC_GROUP, "RoleBinding"): (rbac_validation.validate_role_binding,),
    (rbac_validation.RBAC_GROUP, "ClusterRoleBinding"): (rbac_validation.validate_cluster_role_binding,),
})


def mutate(resource: Resource, obj: JSON, old: JSON | None, operation: str) -> None:
    """Applies the defaulting rules registered for the resource's (group, kind) to `obj`, in place.
    Skipped for objects being deleted (KubeVirt's webhooks return early for them too)."""
    fns = MUTATORS.get((resource.group, resource.kind))
    if not fns or _get(obj, "metadata", "deletionTimestamp"):
        return
    req = Request(resource, obj, old, operation.upper())
    for fn in fns:
        fn(req)


def validate(
    resource: Resource, obj: JSON, old: JSON | None, operation: str, *, privileged: bool = False,
    subresource: str = "",
) -> list[Cause]:
    """Causes from the validation rules registered for the resource's (group, kind); [] when admitted.
    `privileged`: the request comes from a virtplane component, not a user (see `Request`)."""
    fns = VALIDATORS.get((resource.group, resource.kind))
    if not fns or _get(obj, "metadata", "deletionTimestamp"):
        return []
    req = Request(resource, obj, old, operation.upper(), privileged, subresource)
    causes: list[Cause] = []
    for fn in fns:
        causes.extend(fn(req))
    return causes
