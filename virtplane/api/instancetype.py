"""Instance types and preferences (`instancetype.kubevirt.io/v1beta1`), applied as KubeVirt applies them.

A VirtualMachine names a (Cluster)Instancetype in `spec.instancetype` and/or a (Cluster)Preference in
`spec.preference`. KubeVirt's VM controller captures each referenced object in an apps/v1 ControllerRevision
the first time it sees the VM (`status.instancetypeRef.controllerRevisionRef`), so later edits of the
instance type do not change existing VMs, and expands the captured specs into the VMI it creates:

- the instance type *owns* what it sets: guest vCPUs (spread into sockets/cores/threads by the preference's
  `preferredCPUTopology`), guest memory, and optionally CPU model, dedicated placement, NUMA, hugepages,
  IO-threads policy, GPUs, host devices, node selector, scheduler name and annotations. A VM that sets one
  of those itself *conflicts* ("VM field(s) … conflicts with selected instance type");
- the preference only *fills in* what the VM leaves unset: disk/CD-ROM/LUN bus, interface model, firmware
  (BIOS/EFI), machine type, features, clock, RNG, TPM, autoattach flags, termination grace period, …;
  its `requirements` (minimum vCPUs/memory) must be met by the instance type (or by the VM without one).

Pure functions only (no API access): the VM controller fetches and stores, this module decides.
"""

from __future__ import annotations

import copy
from typing import Any

from virtplane.api import quantity

JSON = dict[str, Any]

GROUP = "instancetype.kubevirt.io"
VERSION = "v1beta1"
API_VERSION = f"{GROUP}/{VERSION}"

# kinds as the matcher spells them (KubeVirt lower-cases the kind before comparing)
INSTANCETYPE_KINDS = {"virtualmachineinstancetype": "VirtualMachineInstancetype",
                      "virtualmachineinstancetypes": "VirtualMachineInstancetype",
                      "virtualmachineclusterinstancetype": "VirtualMachineClusterInstancetype",
                      "virtualmachineclusterinstancetypes": "VirtualMachineClusterInstancetype"}
PREFERENCE_KINDS = {"virtualmachinepreference": "VirtualMachinePreference",
                    "virtualmachinepreferences": "VirtualMachinePreference",
                    "virtualmachineclusterpreference": "VirtualMachineClusterPreference",
                    "virtualmachineclusterpreferences": "VirtualMachineClusterPreference"}
PLURALS = {"VirtualMachineInstancetype": "virtualmachineinstancetypes",
           "VirtualMachineClusterInstancetype": "virtualmachineclusterinstancetypes",
           "VirtualMachinePreference": "virtualmachinepreferences",
           "VirtualMachineClusterPreference": "virtualmachineclusterpreferences"}

INSTANCETYPE_ANNOTATION = "kubevirt.io/instancetype-name"
CLUSTER_INSTANCETYPE_ANNOTATION = "kubevirt.io/cluster-instancetype-name"
PREFERENCE_ANNOTATION = "kubevirt.io/preference-name"
CLUSTER_PREFERENCE_ANNOTATION = "kubevirt.io/cluster-preference-name"

REVISION_LABELS = ("instancetype.kubevirt.io/object-generation", "instancetype.kubevirt.io/object-kind",
                   "instancetype.kubevirt.io/object-name", "instancetype.kubevirt.io/object-uid",
                   "instancetype.kubevirt.io/object-version")

CONFLICTS_FMT = "VM field(s) {} conflicts with selected instance type"
DEFAULT_SPREAD_RATIO = 2


class ExpansionError(Exception):
    """The instance type or preference cannot be applied (a conflict, an unmet requirement, a bad kind)."""


# --------------------------------------------------------------------------------------------------
# matchers


def kind_of(matcher: JSON | None, *, preference: bool) -> str | None:
    """The Kind a `spec.instancetype` / `spec.preference` matcher names (cluster-scoped when unset)."""
    if not isinstance(matcher, dict) or not matcher.get("name"):
        return None
    kinds = PREFERENCE_KINDS if preference else INSTANCETYPE_KINDS
    raw = str(matcher.get("kind") or "").lower()
    if not raw:
        return "VirtualMachineClusterPreference" if preference else "VirtualMachineClusterInstancetype"
    if raw not in kinds:
        what = "PreferenceMatcher" if preference else "InstancetypeMatcher"
        raise ExpansionError(f"got unexpected kind in {what}: {matcher.get('kind')}")
    return kinds[raw]


def is_cluster_kind(kind: str) -> bool:
    return "Cluster" in kind


def vmi_annotations(vm_spec: JSON) -> JSON:
    """The annotations KubeVirt puts on a VMI started from a VM with an instance type / preference."""
    out: JSON = {}
    for key, pref, ns_ann, cluster_ann in (
            ("instancetype", False, INSTANCETYPE_ANNOTATION, CLUSTER_INSTANCETYPE_ANNOTATION),
            ("preference", True, PREFERENCE_ANNOTATION, CLUSTER_PREFERENCE_ANNOTATION)):
        matcher = vm_spec.get(key)
        kind = kind_of(matcher, preference=pref)
        if kind is not None:
            out[cluster_ann if is_cluster_kind(kind) else ns_ann] = matcher["name"]
    return out


# --------------------------------------------------------------------------------------------------
# ControllerRevisions


def revision_name(vm_name: str, obj: JSON) -> str:
    """KubeVirt's GenerateName: VM-OBJECT-VERSION-UID-GENERATION."""
    meta = obj.get("metadata") or {}
    version = str(obj.get("apiVersion") or API_VERSION).rsplit("/", 1)[-1]
    return f"{vm_name}-{meta.get('name')}-{version}-{meta.get('uid')}-{meta.get('generation', 1)}"


def controller_revision(vm: JSON, obj: JSON, owner_ref: JSON) -> JSON:
    """The apps/v1 ControllerRevision capturing `obj` (an instance type or preference) for `vm`."""
    meta = obj.get("metadata") or {}
    version = str(obj.get("apiVersion") or API_VERSION).rsplit("/", 1)[-1]
    data = {"apiVersion": obj.get("apiVersion") or API_VERSION, "kind": obj.get("kind"),
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "generation", "resourceVersion",
                                              "creationTimestamp") if k in meta},
            "spec": copy.deepcopy(obj.get("spec") or {})}
    return {
        "apiVersion": "apps/v1", "kind": "ControllerRevision",
        "metadata": {
            "name": revision_name(vm["metadata"]["name"], obj),
            "namespace": vm["metadata"].get("namespace"),
            "ownerReferences": [owner_ref],
            "labels": dict(zip(REVISION_LABELS, (str(meta.get("generation", 1)), str(obj.get("kind")),
                                                 str(meta.get("name")), str(meta.get("uid")), version),
                               strict=True)),
        },
        "data": data,
        "revision": 0,
    }


def spec_from_revision(revision: JSON) -> JSON:
    data = revision.get("data") or {}
    return copy.deepcopy(data.get("spec") or {})


def same_revision_data(a: JSON, b: JSON) -> bool:
    """KubeVirt's Compare: an existing revision of that name must hold the same object spec."""
    return (a.get("data") or {}).get("spec") == (b.get("data") or {}).get("spec")


# --------------------------------------------------------------------------------------------------
# conflicts that need no instance type in hand (admission)


def _d(v: Any) -> JSON:
    return v if isinstance(v, dict) else {}


def static_conflicts(template_spec: JSON, base: str = "spec.template.spec") -> list[str]:
    """The fields every instance type sets (guest CPUs and memory are required in its spec): a VM with an
    instance type may not set them itself. What an instance type sets optionally is checked when applied."""
    domain = _d(template_spec.get("domain"))
    resources = _d(domain.get("resources"))
    cpu = _d(domain.get("cpu"))
    out = []
    if "cpu" in _d(resources.get("requests")):
        out.append(f"{base}.domain.resources.requests.cpu")
    if "cpu" in _d(resources.get("limits")):
        out.append(f"{base}.domain.resources.limits.cpu")
    out += [f"{base}.domain.cpu.{k}" for k in ("sockets", "cores", "threads") if cpu.get(k)]
    memory = _d(domain.get("memory"))
    if memory.get("guest") is not None:
        out.append(f"{base}.domain.memory.guest")
    elif "memory" in _d(resources.get("requests")):
        out.append(f"{base}.domain.resources.requests.memory")
    elif "memory" in _d(resources.get("limits")):
        out.append(f"{base}.domain.resources.limits.memory")
    return out


def conflicts_message(paths: list[str]) -> str:
    return CONFLICTS_FMT.format(", ".join(paths))


# --------------------------------------------------------------------------------------------------
# applying an instance type


def _preferred_topology(pref: JSON | None) -> str:
    topo = str(_d(_d(pref).get("cpu")).get("preferredCPUTopology") or "sockets")
    return {"preferSockets": "sockets", "preferCores": "cores", "preferThreads": "threads",
            "preferSpread": "spread", "preferAny": "any"}.get(topo, topo)


def _spread_options(pref: JSON) -> tuple[int, str]:
    ratio = int(pref.get("preferSpreadSocketToCoreRatio") or DEFAULT_SPREAD_RATIO)
    across = "SocketsCores"
    opts = _d(_d(pref.get("cpu")).get("spreadOptions"))
    if opts.get("across"):
        across = str(opts["across"])
    if opts.get("ratio"):
        ratio = int(opts["ratio"])
    return ratio, across


def guest_topology(vcpus: int, pref: JSON | None) -> tuple[int, int, int]:
    """(sockets, cores, threads) for `vcpus` guest CPUs under the preference's preferredCPUTopology."""
    if vcpus <= 1:
        return 1, 1, 1
    topo = _preferred_topology(pref)
    if topo == "cores":
        return 1, vcpus, 1
    if topo == "threads":
        return 1, 1, vcpus
    if topo == "spread":
        ratio, across = _spread_options(_d(pref))
        if across == "CoresThreads":
            return 1, vcpus // ratio, ratio
        if across == "SocketsCoresThreads":
            return vcpus // 2 // ratio, ratio, 2
        return vcpus // ratio, ratio, 1
    return vcpus, 1, 1  # sockets, any


def spread_conflict(it: JSON, pref: JSON | None) -> str | None:
    """CheckSpreadCPUTopology: the instance type's vCPUs must divide evenly over the preferred spread."""
    if _preferred_topology(pref) != "spread":
        return None
    vcpus = int(_d(it.get("cpu")).get("guest") or 0)
    ratio, across = _spread_options(_d(pref))
    if across == "SocketsCoresThreads":
        if vcpus % 2 or (vcpus // 2) % ratio:
            return (f"{vcpus} vCPUs provided by the instance type are not divisible by the number of threads per "
                    f"core 2 and Spec.PreferSpreadSocketToCoreRatio or Spec.CPU.PreferSpreadOptions.Ratio of {ratio}")
    elif vcpus % ratio:
        if across == "CoresThreads":
            return (f"{vcpus} vCPUs provided by the instance type are not divisible by the number of threads per "
                    f"core {ratio}")
        return (f"{vcpus} vCPUs provided by the instance type are not divisible by the "
                f"Spec.PreferSpreadSocketToCoreRatio or Spec.CPU.PreferSpreadOptions.Ratio of {ratio} provided by "
                f"the preference")
    return None


# (instance type's cpu field, the VMI's domain.cpu field); maxSockets last (it never conflicts)
_CPU_FIELDS = (("model", "model"), ("dedicatedCPUPlacement", "dedicatedCpuPlacement"),
               ("isolateEmulatorThread", "isolateEmulatorThread"), ("numa", "numa"), ("realtime", "realtime"),
               ("maxSockets", "maxSockets"))


def _apply_cpu(base: str, it: JSON, pref: JSON | None, spec: JSON) -> list[str]:
    domain = spec.setdefault("domain", {})
    cpu = domain.setdefault("cpu", {})
    it_cpu = _d(it.get("cpu"))
    resources = _d(domain.get("resources"))
    out = []
    if "cpu" in _d(resources.get("requests")):
        out.append(f"{base}.domain.resources.requests.cpu")
    if "cpu" in _d(resources.get("limits")):
        out.append(f"{base}.domain.resources.limits.cpu")
    out += [f"{base}.domain.cpu.{k}" for k in ("sockets", "cores", "threads") if cpu.get(k)]
    for it_key, key in _CPU_FIELDS[:-1]:
        if cpu.get(key) and it_cpu.get(it_key) is not None:
            out.append(f"{base}.domain.cpu.{key}")
    if out:
        return out
    for it_key, key in _CPU_FIELDS:
        if it_cpu.get(it_key) is not None:
            cpu[key] = copy.deepcopy(it_cpu[it_key])
    problem = spread_conflict(it, pref)
    if problem:
        raise ExpansionError(problem)
    cpu["sockets"], cpu["cores"], cpu["threads"] = guest_topology(int(it_cpu.get("guest") or 1), pref)
    return []


def _apply_memory(base: str, it: JSON, spec: JSON) -> list[str]:
    domain = spec.setdefault("domain", {})
    memory = domain.setdefault("memory", {})
    it_mem = _d(it.get("memory"))
    resources = _d(domain.get("resources"))
    if memory.get("guest") is not None:
        return [f"{base}.domain.memory.guest"]
    for key in ("hugepages", "maxGuest"):
        if memory.get(key) is not None and it_mem.get(key) is not None:
            return [f"{base}.domain.memory.{key}"]
    if "memory" in _d(resources.get("requests")):
        return [f"{base}.domain.resources.requests.memory"]
    if "memory" in _d(resources.get("limits")):
        return [f"{base}.domain.resources.limits.memory"]
    memory["guest"] = it_mem.get("guest")
    overcommit = int(it_mem.get("overcommitPercent") or 0)
    if overcommit > 0:
        guest = quantity.parse_quantity(str(it_mem.get("guest")))
        requested = int(float(guest) * (1 - overcommit / 100))
        domain.setdefault("resources", {}).setdefault("requests", {})["memory"] = str(requested)
    for key in ("hugepages", "maxGuest"):
        if it_mem.get(key) is not None:
            memory[key] = copy.deepcopy(it_mem[key])
    return []


def _apply_simple(base: str, it: JSON, spec: JSON) -> list[str]:
    """nodeSelector, schedulerName, ioThreadsPolicy, launchSecurity, gpus, hostDevices."""
    out = []
    domain = spec.setdefault("domain", {})
    for it_key, holder, key, path in (("nodeSelector", spec, "nodeSelector", "nodeSelector"),
                                      ("schedulerName", spec, "schedulerName", "schedulerName"),
                                      ("ioThreadsPolicy", domain, "ioThreadsPolicy", "domain.ioThreadsPolicy"),
                                      ("launchSecurity", domain, "launchSecurity", "domain.launchSecurity")):
        if it.get(it_key) is None:
            continue
        if holder.get(key):
            out.append(f"{base}.{path}")
        else:
            holder[key] = copy.deepcopy(it[it_key])
    devices = domain.setdefault("devices", {})
    for key in ("gpus", "hostDevices"):
        if not it.get(key):
            continue
        if devices.get(key):
            out.append(f"{base}.domain.devices.{key}")
        else:
            devices[key] = copy.deepcopy(it[key])
    return out


def _apply_annotations(base_meta: str, annotations: JSON | None, meta: JSON, *, conflicts: bool) -> list[str]:
    out = []
    if not annotations:
        return out
    target = meta.setdefault("annotations", {})
    for k, v in annotations.items():
        if k not in target:
            target[k] = v
        elif conflicts and target[k] != v:
            out.append(f"{base_meta}.annotations.{k}")
    return out


def apply_instancetype(it: JSON, pref: JSON | None, spec: JSON, meta: JSON, base: str = "spec") -> list[str]:
    """ApplyToVMI's instance-type half, in place; returns the conflicting field paths ([] when applied)."""
    out = _apply_simple(base, it, spec)
    out += _apply_cpu(base, it, pref, spec)
    out += _apply_memory(base, it, spec)
    out += _apply_annotations("metadata", it.get("annotations"), meta, conflicts=True)
    return out


# --------------------------------------------------------------------------------------------------
# applying a preference (only where the VM leaves a field unset)


def _set_if_unset(target: JSON, key: str, value: Any) -> None:
    if value is not None and target.get(key) is None:
        target[key] = copy.deepcopy(value)


def _apply_devices(pd: JSON, spec: JSON) -> None:
    devices = spec.setdefault("domain", {}).setdefault("devices", {})
    for pkey, key in (("preferredUseVirtioTransitional", "useVirtioTransitional"),
                      ("preferredBlockMultiQueue", "blockMultiQueue"),
                      ("preferredNetworkInterfaceMultiQueue", "networkInterfaceMultiQueue"),
                      ("preferredRng", "rng"), ("preferredTPM", "tpm"),
                      ("preferredAutoattachGraphicsDevice", "autoattachGraphicsDevice"),
                      ("preferredAutoattachMemBalloon", "autoattachMemBalloon"),
                      ("preferredAutoattachPodInterface", "autoattachPodInterface"),
                      ("preferredAutoattachSerialConsole", "autoattachSerialConsole"),
                      ("preferredAutoattachInputDevice", "autoattachInputDevice")):
        _set_if_unset(devices, key, pd.get(pkey))
    if pd.get("preferredDisableHotplug") is not None:
        devices["disableHotplug"] = pd["preferredDisableHotplug"]
    sound = devices.get("sound")
    if pd.get("preferredSoundModel") and isinstance(sound, dict) and not sound.get("model"):
        sound["model"] = pd["preferredSoundModel"]
    for disk in devices.get("disks") or []:
        if not isinstance(disk, dict):
            continue
        if not any(k in disk for k in ("disk", "cdrom", "lun")):
            disk["disk"] = {}
        if isinstance(disk.get("disk"), dict):
            target = disk["disk"]
            if pd.get("preferredDiskBus") and not target.get("bus"):
                target["bus"] = pd["preferredDiskBus"]
            for pkey, key in (("preferredDiskBlockSize", "blockSize"), ("preferredDiskCache", "cache"),
                              ("preferredDiskIO", "io")):
                if pd.get(pkey) and not disk.get(key):
                    disk[key] = copy.deepcopy(pd[pkey])
            if pd.get("preferredDiskDedicatedIoThread") is not None and disk.get("dedicatedIOThread") is None \
                    and target.get("bus") == "virtio":
                disk["dedicatedIOThread"] = pd["preferredDiskDedicatedIoThread"]
        elif isinstance(disk.get("cdrom"), dict):
            if pd.get("preferredCdromBus") and not disk["cdrom"].get("bus"):
                disk["cdrom"]["bus"] = pd["preferredCdromBus"]
        elif isinstance(disk.get("lun"), dict):
            if pd.get("preferredLunBus") and not disk["lun"].get("bus"):
                disk["lun"]["bus"] = pd["preferredLunBus"]
    pod_networks = {n.get("name") for n in spec.get("networks") or [] if isinstance(n, dict) and "pod" in n}
    bindings = ("bridge", "masquerade", "sriov", "slirp", "macvtap", "passt", "binding")
    for iface in devices.get("interfaces") or []:
        if not isinstance(iface, dict):
            continue
        if pd.get("preferredInterfaceModel") and not iface.get("model"):
            iface["model"] = pd["preferredInterfaceModel"]
        if pd.get("preferredInterfaceMasquerade") is not None and not any(k in iface for k in bindings) \
                and iface.get("name") in pod_networks:
            iface["masquerade"] = copy.deepcopy(pd["preferredInterfaceMasquerade"])
    for inp in devices.get("inputs") or []:
        if isinstance(inp, dict):
            if pd.get("preferredInputBus") and not inp.get("bus"):
                inp["bus"] = pd["preferredInputBus"]
            if pd.get("preferredInputType") and not inp.get("type"):
                inp["type"] = pd["preferredInputType"]


def _apply_firmware(pf: JSON, spec: JSON) -> None:
    firmware = spec.setdefault("domain", {}).setdefault("firmware", {})
    boot = firmware.setdefault("bootloader", {})
    if pf.get("preferredUseBios") and boot.get("bios") is None and boot.get("efi") is None:
        boot["bios"] = {}
    if pf.get("preferredUseBiosSerial") is not None and isinstance(boot.get("bios"), dict) \
            and boot["bios"].get("useSerial") is None:
        boot["bios"]["useSerial"] = pf["preferredUseBiosSerial"]
    if boot.get("efi") is None and boot.get("bios") is None and pf.get("preferredEfi") is not None:
        boot["efi"] = copy.deepcopy(pf["preferredEfi"])
    elif pf.get("preferredUseEfi") and boot.get("efi") is None and boot.get("bios") is None:
        boot["efi"] = {}
        if pf.get("preferredUseSecureBoot") is not None:
            boot["efi"]["secureBoot"] = pf["preferredUseSecureBoot"]
    if not boot:
        firmware.pop("bootloader")


def _apply_features(pf: JSON, spec: JSON) -> None:
    features = spec.setdefault("domain", {}).setdefault("features", {})
    if pf.get("preferredAcpi") is not None:
        features["acpi"] = copy.deepcopy(pf["preferredAcpi"])
    for pkey, key in (("preferredApic", "apic"), ("preferredKvm", "kvm"), ("preferredPvspinlock", "pvspinlock"),
                      ("preferredSmm", "smm")):
        _set_if_unset(features, key, pf.get(pkey))
    hyperv = pf.get("preferredHyperv")
    if isinstance(hyperv, dict) and not _d(features.get("hypervPassthrough")).get("enabled"):
        target = features.setdefault("hyperv", {})
        for k, v in hyperv.items():
            _set_if_unset(target, k, v)
    if not features:
        spec["domain"].pop("features")


def apply_preference(pref: JSON, spec: JSON, meta: JSON) -> None:
    """The preference's half of ApplyToVMI, in place: fills in only what the VMI spec leaves unset."""
    domain = spec.setdefault("domain", {})
    pcpu = _d(pref.get("cpu"))
    if pcpu.get("preferredCPUFeatures"):
        cpu = domain.setdefault("cpu", {})
        have = {f.get("name") for f in cpu.get("features") or [] if isinstance(f, dict)}
        cpu["features"] = [*(cpu.get("features") or []),
                           *(copy.deepcopy(f) for f in pcpu["preferredCPUFeatures"] if f.get("name") not in have)]
    if isinstance(pref.get("devices"), dict):
        _apply_devices(pref["devices"], spec)
    if isinstance(pref.get("features"), dict):
        _apply_features(pref["features"], spec)
    if isinstance(pref.get("firmware"), dict):
        _apply_firmware(pref["firmware"], spec)
    machine_type = _d(pref.get("machine")).get("preferredMachineType")
    if machine_type and not _d(domain.get("machine")).get("type"):
        domain.setdefault("machine", {})["type"] = machine_type
    clock = _d(pref.get("clock"))
    if clock:
        target = domain.setdefault("clock", {})
        if clock.get("preferredClockOffset") and "utc" not in target and "timezone" not in target:
            target.update(copy.deepcopy(clock["preferredClockOffset"]))
        _set_if_unset(target, "timer", clock.get("preferredTimer"))
    if pref.get("preferredSubdomain") and not spec.get("subdomain"):
        spec["subdomain"] = pref["preferredSubdomain"]
    _set_if_unset(spec, "terminationGracePeriodSeconds", pref.get("preferredTerminationGracePeriodSeconds"))
    _apply_annotations("metadata", pref.get("annotations"), meta, conflicts=False)


# --------------------------------------------------------------------------------------------------
# requirements and the whole expansion


def _vm_vcpus(spec: JSON) -> int:
    cpu = _d(_d(spec.get("domain")).get("cpu"))
    if any(cpu.get(k) for k in ("sockets", "cores", "threads")):
        return int(cpu.get("sockets") or 1) * int(cpu.get("cores") or 1) * int(cpu.get("threads") or 1)
    return 1


def _vm_memory(spec: JSON) -> Any:
    domain = _d(spec.get("domain"))
    return _d(domain.get("memory")).get("guest") or _d(_d(domain.get("resources")).get("requests")).get("memory")


def requirement_problem(it: JSON | None, pref: JSON | None, spec: JSON) -> str | None:
    """checkPreferenceRequirements: the preference's minimum vCPUs / memory against what the VM gets."""
    req = _d(_d(pref).get("requirements"))
    if not req:
        return None
    source = "instance type" if it is not None else "VirtualMachine"
    need_cpu = _d(req.get("cpu")).get("guest")
    if need_cpu:
        have = int(_d(it.get("cpu")).get("guest") or 0) if it is not None else _vm_vcpus(spec)
        if have < int(need_cpu):
            return (f"insufficient CPU resources of {have} vCPU provided by {source}, "
                    f"preference requires {need_cpu} vCPU")
    need_mem = _d(req.get("memory")).get("guest")
    if need_mem:
        have_mem = _d(it.get("memory")).get("guest") if it is not None else _vm_memory(spec)
        if have_mem is None or quantity.parse_quantity(str(have_mem)) < quantity.parse_quantity(str(need_mem)):
            return (f"insufficient Memory resources of {have_mem} provided by {source}, "
                    f"preference requires {need_mem}")
    return None


def expand_vmi(vmi: JSON, vm_spec: JSON, it: JSON | None, pref: JSON | None) -> JSON:
    """The VMI the VM controller creates, with the captured instance type and preference applied in place
    (annotations naming them included). Raises ExpansionError on conflicts or unmet requirements."""
    if it is None and pref is None:
        return vmi
    meta = vmi.setdefault("metadata", {})
    meta.setdefault("annotations", {}).update(vmi_annotations(vm_spec))
    spec = vmi.setdefault("spec", {})
    problem = requirement_problem(it, pref, spec)
    if problem:
        raise ExpansionError(f"failure checking preference requirements: {problem}")
    if it is not None:
        conflicts = apply_instancetype(it, pref, spec, meta)
        if conflicts:
            raise ExpansionError(f"VMI conflicts with instancetype spec in fields: [{', '.join(conflicts)}]")
    if pref is not None:
        set_default_volume_disks(spec)
        apply_preference(pref, spec, meta)
    return vmi


def set_default_volume_disks(spec: JSON) -> None:
    """SetDefaultVolumeDisk, which KubeVirt's VM controller runs before applying the preference so that the
    disks it adds for bare volumes get the preferred bus too (admission adds the rest of the defaults)."""
    devices = spec.setdefault("domain", {}).setdefault("devices", {})
    named = {d.get("name") for d in devices.get("disks") or [] if isinstance(d, dict)}
    named |= {f.get("name") for f in devices.get("filesystems") or [] if isinstance(f, dict)}
    for vol in spec.get("volumes") or []:
        if isinstance(vol, dict) and vol.get("name") and vol["name"] not in named:
            devices.setdefault("disks", []).append({"name": vol["name"]})
            named.add(vol["name"])
