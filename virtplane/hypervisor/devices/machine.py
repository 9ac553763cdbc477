"""Machine type, accelerator, CPU model and topology, features, clock, reboot policy, identity.

KubeVirt's default CPU model is host-model and `host-passthrough` is common. Both mean "the host's CPU"
and only exist under KVM (`-cpu host`); under TCG there is no host CPU to pass through, so they become
`max` (everything TCG can emulate). Named models (libvirt names mostly equal QEMU's) are passed through.
"""

from __future__ import annotations

import datetime
import re
import zoneinfo

from ..quantity import QuantityError, parse_cpu
from .base import BuildContext, Issue, enabled, opt_escape, vcpu_topology

JSON = dict

MACHINE_TYPE_RE = re.compile(r"^(q35|pc-q35-[0-9]+\.[0-9]+)$")
CPU_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CPU_FEATURE_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
HOST_MODELS = ("host-passthrough", "host-model")
_FEATURE_POLICIES = {"force": "+", "require": "+", "optional": "+", "disable": "-", "forbid": "-"}
_TICK_POLICIES = ("delay", "catchup", "merge", "discard")
_MAX_VCPUS = 288  # q35 with x2APIC in QEMU 7.2

# TCG's translation cache, MiB. QEMU 7.2 reserves 1 GiB and an idle booted guest has touched ~76 MiB of it,
# the biggest part of a VM's host overhead; 32 MiB costs a few % of CPU to boot (bench/vm_memory.py sweeps
# default/48/32/24/16) and keeps the overhead near KubeVirt-beating figures. KVM has no such cache.
TCG_TB_SIZE_MIB = 32


def check(spec: JSON, path: str) -> list[Issue]:
    issues: list[Issue] = []
    domain = spec.get("domain") or {}
    dpath = f"{path}.domain"

    arch = spec.get("architecture")
    if arch not in (None, "", "amd64"):
        issues.append(Issue(f"{path}.architecture", f"architecture {arch!r} is not supported (only amd64)"))

    start = spec.get("startStrategy")
    if start not in (None, "", "Paused"):
        issues.append(Issue(f"{path}.startStrategy", f"unknown start strategy {start!r}", "invalid"))

    mtype = (domain.get("machine") or {}).get("type")
    if mtype and not MACHINE_TYPE_RE.match(mtype):
        issues.append(Issue(f"{dpath}.machine.type", f"machine type {mtype!r} is not supported (only q35)"))

    cpu = domain.get("cpu") or {}
    for key in ("cores", "sockets", "threads", "maxSockets"):
        value = cpu.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            issues.append(Issue(f"{dpath}.cpu.{key}", "must be a non-negative integer", "invalid"))
    model = cpu.get("model")
    if model and model not in HOST_MODELS and not CPU_MODEL_RE.match(model):
        issues.append(Issue(f"{dpath}.cpu.model", f"invalid CPU model {model!r}", "invalid"))
    for i, feat in enumerate(cpu.get("features") or []):
        fpath = f"{dpath}.cpu.features[{i}]"
        if not CPU_FEATURE_RE.match(str(feat.get("name") or "")):
            issues.append(Issue(f"{fpath}.name", "invalid CPU feature name", "invalid"))
        if (feat.get("policy") or "require") not in _FEATURE_POLICIES:
            issues.append(Issue(f"{fpath}.policy", f"unknown policy {feat.get('policy')!r}", "invalid"))
    for section in ("requests", "limits"):
        value = ((domain.get("resources") or {}).get(section) or {}).get("cpu")
        if value is not None:
            try:
                parse_cpu(value)
            except QuantityError as err:
                issues.append(Issue(f"{dpath}.resources.{section}.cpu", str(err), "invalid"))
    if not any(".cpu" in i.field for i in issues):
        _vcpus, sockets, cores, threads = vcpu_topology(domain)
        max_sockets = cpu.get("maxSockets") or sockets
        if isinstance(max_sockets, int) and max_sockets < sockets:
            issues.append(Issue(f"{dpath}.cpu.maxSockets", "must be at least cpu.sockets", "invalid"))
        if (max_sockets or sockets) * cores * threads > _MAX_VCPUS:
            issues.append(Issue(f"{dpath}.cpu", f"more than {_MAX_VCPUS} vCPUs", "invalid"))

    features = domain.get("features") or {}
    apic = features.get("apic")
    if apic is not None and not enabled(apic):
        issues.append(Issue(f"{dpath}.features.apic.enabled", "disabling the APIC is not supported on q35"))
    if apic and apic.get("endOfInterrupt"):
        issues.append(Issue(f"{dpath}.features.apic.endOfInterrupt", "EOI notification is not supported"))

    clock = domain.get("clock") or {}
    if "utc" in clock and "timezone" in clock:
        issues.append(Issue(f"{dpath}.clock", "utc and timezone are mutually exclusive", "invalid"))
    tz = clock.get("timezone")
    if tz:
        try:
            zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            issues.append(Issue(f"{dpath}.clock.timezone", f"unknown time zone {tz!r}", "invalid"))
    timer = clock.get("timer") or {}
    for name in ("hpet", "rtc", "pit"):
        policy = (timer.get(name) or {}).get("tickPolicy")
        if policy and policy not in _TICK_POLICIES:
            issues.append(Issue(f"{dpath}.clock.timer.{name}.tickPolicy", f"unknown policy {policy!r}", "invalid"))
    rtc_policy = (timer.get("rtc") or {}).get("tickPolicy")
    if rtc_policy not in (None, "delay", "catchup"):
        issues.append(Issue(f"{dpath}.clock.timer.rtc.tickPolicy", f"{rtc_policy!r} is not supported for the RTC"))
    if (timer.get("rtc") or {}).get("track") not in (None, "guest", "wall"):
        issues.append(Issue(f"{dpath}.clock.timer.rtc.track", "must be guest or wall", "invalid"))
    if enabled_present(timer.get("rtc")) is False:
        issues.append(Issue(f"{dpath}.clock.timer.rtc.present", "the RTC cannot be removed"))
    if (timer.get("pit") or {}).get("tickPolicy") not in (None, "delay", "discard"):
        issues.append(Issue(f"{dpath}.clock.timer.pit.tickPolicy", "only delay and discard are supported"))
    if (timer.get("hpet") or {}).get("tickPolicy"):
        issues.append(Issue(f"{dpath}.clock.timer.hpet.tickPolicy", "HPET tick policies are not supported"))

    policy = domain.get("rebootPolicy")
    if policy not in (None, "", "Reboot", "Terminate"):
        issues.append(Issue(f"{dpath}.rebootPolicy", f"unknown reboot policy {policy!r}", "invalid"))
    if (domain.get("devices") or {}).get("autoattachVSOCK"):
        issues.append(Issue(f"{dpath}.devices.autoattachVSOCK", "VSOCK is not supported"))
    return issues


def enabled_present(timer: JSON | None) -> bool | None:
    if timer is None:
        return None
    present = timer.get("present")
    return True if present is None else bool(present)


def cpu_model(domain: JSON, accel: str) -> str:
    cpu = domain.get("cpu") or {}
    model = cpu.get("model") or "host-model"
    if model in HOST_MODELS:
        model = "host" if accel == "kvm" else "max"
    flags: list[str] = []
    for feat in cpu.get("features") or []:
        flags.append(f"{_FEATURE_POLICIES[feat.get('policy') or 'require']}{feat['name']}")
    features = domain.get("features") or {}
    # Paravirtual KVM knobs mean nothing under TCG (there is no KVM to expose), so they only apply there.
    if accel == "kvm":
        if (features.get("kvm") or {}).get("hidden"):
            flags.append("kvm=off")
        pvspin = features.get("pvspinlock")
        if pvspin is not None:
            flags.append("kvm-pv-unhalt=" + ("on" if enabled(pvspin) else "off"))
        kvm_timer = enabled_present(((domain.get("clock") or {}).get("timer") or {}).get("kvm"))
        if kvm_timer is not None:
            flags.append("kvmclock=" + ("on" if kvm_timer else "off"))
    return ",".join([model, *flags])


def build(ctx: BuildContext) -> None:
    domain = ctx.domain
    features = domain.get("features") or {}
    meta = ctx.metadata
    name = f"{meta.get('namespace') or 'default'}_{meta.get('name') or 'vm'}"
    ctx.head += ["-name", f"guest={opt_escape(name)},debug-threads=on"]

    mtype = (domain.get("machine") or {}).get("type") or "q35"
    machine = [mtype, "usb=off", "vmport=off", "dump-guest-core=off"]
    # Secure boot needs SMM (KubeVirt defaults features.smm on for EFI secure boot).
    smm = enabled(features.get("smm"), default=False) or secure_boot(domain)
    machine.append("smm=" + ("on" if smm else "off"))
    if not enabled(features.get("acpi")):
        machine.append("acpi=off")
    timer = (domain.get("clock") or {}).get("timer") or {}
    hpet = enabled_present(timer.get("hpet"))
    if hpet is not None:
        machine.append("hpet=" + ("on" if hpet else "off"))
    pit = enabled_present(timer.get("pit"))
    if pit is False:
        machine.append("pit=off")
    if bios_use_serial(domain):
        # What libvirt does for <bios useserial='yes'/>: SeaBIOS then prints to the serial port.
        machine.append("graphics=off")
    ctx.head += ["-machine", ",".join(machine)]
    ctx.head += ["-accel", "kvm" if ctx.accel == "kvm" else f"tcg,tb-size={TCG_TB_SIZE_MIB}"]
    ctx.head += ["-cpu", cpu_model(domain, ctx.accel)]

    vcpus, sockets, cores, threads = vcpu_topology(domain)
    max_sockets = (domain.get("cpu") or {}).get("maxSockets") or sockets
    # -smp describes the maximal topology (sockets = maxSockets); `vcpus` of it are present at boot.
    ctx.head += [
        "-smp",
        f"{vcpus},sockets={max_sockets},cores={cores},threads={threads},maxcpus={max_sockets * cores * threads}",
    ]

    ctx.head += ["-rtc", rtc_option(domain)]
    if ctx.accel == "kvm" and (timer.get("pit") or {}).get("tickPolicy"):
        ctx.head += ["-global", f"kvm-pit.lost_tick_policy={timer['pit']['tickPolicy']}"]

    if domain.get("rebootPolicy") == "Terminate":
        # The guest's reboot ends the VM (KubeVirt: the VMI terminates, the VM controller decides).
        ctx.head += ["-action", "reboot=shutdown"]


def secure_boot(domain: JSON) -> bool:
    efi = ((domain.get("firmware") or {}).get("bootloader") or {}).get("efi")
    if efi is None:
        return False
    value = efi.get("secureBoot")
    return True if value is None else bool(value)  # KubeVirt: defaults to true


def bios_use_serial(domain: JSON) -> bool:
    bios = ((domain.get("firmware") or {}).get("bootloader") or {}).get("bios") or {}
    return bool(bios.get("useSerial"))


def rtc_option(domain: JSON, now: datetime.datetime | None = None) -> str:
    """-rtc: the guest's RTC starts at UTC unless a time zone or offset is asked for."""
    clock = domain.get("clock") or {}
    now = now or datetime.datetime.now(datetime.UTC)
    base = "utc"
    if clock.get("timezone"):
        local = now.astimezone(zoneinfo.ZoneInfo(clock["timezone"]))
        base = local.strftime("%Y-%m-%dT%H:%M:%S")
    elif (clock.get("utc") or {}).get("offsetSeconds"):
        shifted = now + datetime.timedelta(seconds=int(clock["utc"]["offsetSeconds"]))
        base = shifted.strftime("%Y-%m-%dT%H:%M:%S")
    rtc = (clock.get("timer") or {}).get("rtc") or {}
    parts = [f"base={base}"]
    if rtc.get("track") == "wall":
        parts.append("clock=host")
    if rtc.get("tickPolicy") == "catchup":
        parts.append("driftfix=slew")
    return ",".join(parts)
