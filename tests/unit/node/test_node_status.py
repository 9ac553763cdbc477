"""Pure status construction: conditions, disk targets, interfaces, guest-agent shapes, launcher pod, Node."""

from __future__ import annotations

from typing import Any

from virtplane.hypervisor.accel import AccelProbe
from virtplane.hypervisor.devices.interfaces import derived_mac
from virtplane.hypervisor.stats import BlockStats, MachineStats
from virtplane.node import network, nodeinfo
from virtplane.node import status as st
from virtplane.node.controller import qos_class
from virtplane.node.metrics import render, samples


def vmi(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "domain": {"devices": {
            "disks": [{"name": "root", "disk": {"bus": "virtio"}}, {"name": "ci", "disk": {"bus": "virtio"}},
                      {"name": "cd", "cdrom": {}}, {"name": "data", "disk": {"bus": "scsi"}}],
            "interfaces": [{"name": "default", "masquerade": {}}],
        }, "resources": {"requests": {"memory": "128Mi"}}},
        "networks": [{"name": "default", "pod": {}}],
        "volumes": [{"name": "root", "containerDisk": {"image": "x"}}, {"name": "ci", "cloudInitNoCloud": {}},
                    {"name": "cd", "emptyDisk": {"capacity": "1Gi"}}, {"name": "data", "emptyDisk": {}}],
    }  # fmt: skip
    base.update(spec)
    return {"metadata": {"name": "vm", "namespace": "ns", "uid": "u-1"}, "spec": base}


def test_set_condition_keeps_transition_time_and_other_conditions() -> None:
    conds = [{"type": "PodScheduled", "status": "True"}]
    a = st.set_condition(conds, "Ready", "True", now="t1")
    assert a[0] == {"type": "PodScheduled", "status": "True"}
    assert a[1] == {"type": "Ready", "status": "True", "lastTransitionTime": "t1"}
    b = st.set_condition(a, "Ready", "True", "", "", now="t2")
    assert b[1]["lastTransitionTime"] == "t1"
    c = st.set_condition(b, "Ready", "False", "GuestNotRunning", "paused", now="t3")
    assert c[1] == {"type": "Ready", "status": "False", "lastTransitionTime": "t3", "reason": "GuestNotRunning",
                    "message": "paused"}  # fmt: skip
    assert st.remove_condition(c, "Ready") == [{"type": "PodScheduled", "status": "True"}]


def test_phase_transitions_append_once() -> None:
    s: dict[str, Any] = {"phase": "Scheduled", "phaseTransitionTimestamps": [{"phase": "Scheduled"}]}
    st.add_phase_transition(s, "Running", "t")
    st.add_phase_transition(s, "Running", "t2")
    assert s["phase"] == "Running"
    assert s["phaseTransitionTimestamps"] == [{"phase": "Scheduled"},
                                              {"phase": "Running", "phaseTransitionTimestamp": "t"}]


def test_disk_targets_and_volume_status() -> None:
    v = vmi()
    assert st.disk_targets(v) == {"root": "vda", "ci": "vdb", "cd": "sda", "data": "sdb"}
    assert st._letters(25) == "z" and st._letters(26) == "aa"
    status = st.volume_status(v, {"root": {"containerDiskVolume": {"checksum": 0}}})
    assert [(s["name"], s["target"], s["phase"]) for s in status] == [
        ("root", "vda", "Ready"), ("ci", "vdb", "Ready"), ("cd", "sda", "Ready"), ("data", "sdb", "Ready")]
    assert status[0]["containerDiskVolume"] == {"checksum": 0}


def test_interfaces_without_and_with_guest_agent() -> None:
    v = vmi()
    mac = derived_mac("u-1", "default")
    only_domain = st.interfaces_status(v, None)
    assert only_domain == [{"name": "default", "mac": mac, "infoSource": "domain", "linkState": "up",
                            "ipAddress": "10.0.2.2", "ipAddresses": ["10.0.2.2"]}]  # fmt: skip
    reply = [
        {"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [{"ip-address": "127.0.0.1"}]},
        {"name": "eth0", "hardware-address": mac.upper(), "ip-addresses": [
            {"ip-address": "10.0.2.2", "ip-address-type": "ipv4"},
            {"ip-address": "fec0::5054:ff:fe00:1", "ip-address-type": "ipv6"},
            {"ip-address": "fe80::1", "ip-address-type": "ipv6"}]},
    ]  # fmt: skip
    guest = st.GuestInterface.parse(reply)
    assert [g.name for g in guest] == ["eth0"]
    (iface,) = st.interfaces_status(v, guest)
    assert iface["infoSource"] == "domain, guest-agent" and iface["interfaceName"] == "eth0"
    assert iface["ipAddresses"] == ["10.0.2.2", "fec0::5054:ff:fe00:1"]
    explicit = vmi()
    explicit["spec"]["domain"]["devices"]["interfaces"][0]["macAddress"] = "02-00-00-AA-BB-CC"
    assert st.interfaces_status(explicit, None)[0]["mac"] == "02:00:00:aa:bb:cc"


def test_guest_agent_shapes() -> None:
    osinfo = {"name": "Debian GNU/Linux", "kernel-release": "6.1.0-56-cloud-amd64", "version": "12 (bookworm)",
              "pretty-name": "Debian GNU/Linux 12 (bookworm)", "version-id": "12", "kernel-version": "#1 SMP",
              "machine": "x86_64", "id": "debian"}  # fmt: skip
    assert st.guest_os_info(osinfo) == {"name": "Debian GNU/Linux", "kernelRelease": "6.1.0-56-cloud-amd64",
                                        "version": "12 (bookworm)", "prettyName": "Debian GNU/Linux 12 (bookworm)",
                                        "versionId": "12", "kernelVersion": "#1 SMP", "machine": "x86_64",
                                        "id": "debian"}  # fmt: skip
    users = st.users_list([{"user": "root", "login-time": 1700000000.5}, {"user": "bob", "domain": "LAB"}])
    assert users["kind"] == "VirtualMachineInstanceGuestOSUserList"
    assert users["items"] == [{"userName": "root", "loginTime": 1700000000.5}, {"userName": "bob", "domain": "LAB"}]
    fs = st.filesystem_list([{"name": "vda2", "mountpoint": "/var/lib/virtplane", "type": "ext4",
                              "used-bytes": 10, "total-bytes": 100, "disk": [{"dev": "/dev/vda2"}]}])  # fmt: skip
    assert fs["items"] == [{"diskName": "vda2", "mountPoint": "/var/lib/virtplane", "fileSystemType": "ext4",
                            "usedBytes": 10, "totalBytes": 100}]  # fmt: skip
    info = st.guest_agent_info({"version": "7.2.0", "supported_commands": [{"name": "guest-ping", "enabled": True}]},
                               osinfo, hostname="vm", timezone={"zone": "UTC", "offset": 0}, frozen=False)
    assert info["guestAgentVersion"] == "7.2.0" and info["supportedCommands"] == [{"name": "guest-ping",
                                                                                    "enabled": True}]
    assert info["os"]["id"] == "debian" and info["timezone"] == "UTC, 0" and info["fsFreezeStatus"] == "thawed"
    assert info["fsInfo"] == {"disks": []} and info["userList"] == []


def test_launcher_pod_status_running_then_terminated() -> None:
    old = {"conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "t0"}]}
    running = st.launcher_pod_status(old, phase="Running", host_ip="10.0.0.5", pod_ip="10.0.0.5",
                                     started_at="t1", now="t1")  # fmt: skip
    assert running["phase"] == "Running" and running["podIP"] == "10.0.0.5" and running["hostIP"] == "10.0.0.5"
    conds = {c["type"]: c for c in running["conditions"]}
    assert conds["PodScheduled"]["lastTransitionTime"] == "t0"
    assert all(conds[t]["status"] == "True" for t in ("Ready", "ContainersReady", "Initialized"))
    (compute,) = running["containerStatuses"]
    assert compute["name"] == "compute" and compute["state"] == {"running": {"startedAt": "t1"}} and compute["ready"]
    done = st.launcher_pod_status(running, phase="Failed", host_ip="10.0.0.5", pod_ip="10.0.0.5", started_at="t1",
                                  exit_code=1, reason="Error", message="killed", now="t2")  # fmt: skip
    assert done["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 1
    assert {c["type"]: c["status"] for c in done["conditions"]}["Ready"] == "False"
    assert done["message"] == "killed" and done["startTime"] == running["startTime"]


def test_qos_class() -> None:
    assert qos_class(vmi()) == "Burstable"
    g = vmi()
    g["spec"]["domain"]["resources"] = {"requests": {"cpu": "1", "memory": "1Gi"},
                                        "limits": {"cpu": "1", "memory": "1Gi"}}  # fmt: skip
    assert qos_class(g) == "Guaranteed"
    g["spec"]["domain"]["resources"] = {}
    assert qos_class(g) == "BestEffort"


FACTS = nodeinfo.HostFacts(cpus=4, memory_bytes=8 << 30, ephemeral_storage_bytes=100 << 30, kernel_version="6.1",
                           os_image="Debian GNU/Linux 12 (bookworm)", architecture="amd64", machine_id="m",
                           boot_id="b", qemu_version="7.2.22")  # fmt: skip


def test_node_status_with_and_without_kvm() -> None:
    tcg = AccelProbe(False, "kvm probe guest did not finish within 3s; using TCG")
    status = nodeinfo.build_node_status(FACTS, tcg, address="10.0.0.5", hostname="n1", port=10250, now="t")
    assert status["capacity"] == {"cpu": "4", "memory": "8388608Ki", "pods": "110",
                                  "ephemeral-storage": "104857600Ki"}  # fmt: skip
    assert status["allocatable"]["memory"] == "8286208Ki"
    assert "devices.kubevirt.io/kvm" not in status["capacity"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["reason"] == "KubeletReady" and "TCG" in ready["message"]
    assert status["nodeInfo"]["kubeletVersion"] == "v1.32.0-virtplane"
    assert status["nodeInfo"]["containerRuntimeVersion"] == "qemu://7.2.22"
    assert status["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10250}}
    assert status["addresses"][0] == {"type": "InternalIP", "address": "10.0.0.5"}
    again = nodeinfo.build_node_status(FACTS, tcg, address="10.0.0.5", hostname="n1", port=10250, old=status,
                                       now="t2")  # fmt: skip
    assert next(c for c in again["conditions"] if c["type"] == "Ready")["lastTransitionTime"] == "t"
    kvm = AccelProbe(True, "kvm probe guest completed in 20 ms")
    with_kvm = nodeinfo.build_node_status(FACTS, kvm, address="10.0.0.5", hostname="n1", port=1)
    assert with_kvm["capacity"]["devices.kubevirt.io/kvm"] == "1k" == with_kvm["allocatable"]["devices.kubevirt.io/kvm"]
    labels = nodeinfo.node_labels("n1", FACTS, tcg)
    assert labels["kubevirt.io/schedulable"] == "true" and labels["kubernetes.io/hostname"] == "n1"
    assert nodeinfo.node_annotations(tcg, "ab")["virtplane.io/agent-cert-sha256"] == "ab"


def test_network_attachments_masquerade_via_user_net() -> None:
    (att,) = network.attachments(vmi()).values()
    assert att.kind == "user"
    assert dict(att.user_options) == {"net": "10.0.2.0/24", "host": "10.0.2.1", "dhcpstart": "10.0.2.2"}
    multus = vmi(networks=[{"name": "default", "multus": {"networkName": "x"}}])
    try:
        network.attachments(multus)
    except network.NetworkSetupError as err:
        assert "multus" in str(err)
    else:
        raise AssertionError("multus must be refused until the network layer exists")


def test_metrics_text() -> None:
    stats = MachineStats(cpu_time=1.5, rss_bytes=123, vcpu_times={0: 0.75}, net={}, balloon_bytes=None,
                         block={"disk-root": BlockStats(10, 20, 1, 2, 0), "disk-unknown": BlockStats(1, 1, 1, 1, 1)})
    text = render(samples({"name": "vm", "namespace": "ns", "node": "n1"}, stats, {"root": "vda"}))
    assert 'kubevirt_vmi_memory_resident_bytes{name="vm",namespace="ns",node="n1"} 123' in text
    assert 'kubevirt_vmi_vcpu_seconds_total{name="vm",namespace="ns",node="n1",id="0",state="running"} 0.75' in text
    assert 'kubevirt_vmi_storage_read_traffic_bytes_total{name="vm",namespace="ns",node="n1",drive="vda"} 10' in text
    assert "drive=\"unknown\"" not in text and "# TYPE kubevirt_vmi_network_receive_bytes_total counter" in text
