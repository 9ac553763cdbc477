"""Bad input gets a Kubernetes Status with the right code and the field named; nothing is stored."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

import pytest

from virtplane.testing.cluster import Cluster

pytestmark = pytest.mark.e2e
VMS = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines"


def call(cluster: Cluster, method: str, path: str, body: bytes | None,
         ctype: str = "application/json") -> tuple[int, dict[str, Any]]:
    server, token, ca = cluster.config()
    req = urllib.request.Request(server + path, data=body, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": ctype})
    ctx = ssl.create_default_context(cadata=ca.decode())
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def vm(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name},
        "spec": {"runStrategy": "Halted", "template": {"spec": {
            "domain": {"devices": {}, "resources": {"requests": {"memory": "64Mi"}}}}}},
    }
    base["spec"].update(spec)
    return base


def assert_status(code: int, body: dict[str, Any], want_code: int, field: str | None = None) -> None:
    assert code == want_code, body
    assert body["kind"] == "Status" and body["status"] == "Failure" and body["code"] == want_code
    if field:
        assert field in body["message"], body["message"]
        causes = body.get("details", {}).get("causes", [])
        assert any(field in c.get("field", "") for c in causes), causes


def count_vms(cluster: Cluster) -> int:
    code, body = call(cluster, "GET", VMS, None)
    assert code == 200
    return len(body["items"])


def test_malformed_json_and_yaml_are_400(cluster: Cluster) -> None:
    before = count_vms(cluster)
    code, body = call(cluster, "POST", VMS, b'{"apiVersion": "kubevirt.io/v1", "kind": ')
    assert_status(code, body, 400)
    code, body = call(cluster, "POST", VMS, b"kind: [unclosed", "application/yaml")
    assert_status(code, body, 400)
    assert count_vms(cluster) == before


def test_unknown_field_strict_is_rejected_naming_it(cluster: Cluster) -> None:
    obj = vm("unknown-field")
    obj["spec"]["runStrateggy"] = "Always"
    code, body = call(cluster, "POST", VMS + "?fieldValidation=Strict", json.dumps(obj).encode())
    assert_status(code, body, 400)
    assert 'unknown field "spec.runStrateggy"' in body["message"]
    code, _ = call(cluster, "GET", VMS + "/unknown-field", None)
    assert code == 404


def test_unknown_field_kubectl_apply(cluster: Cluster) -> None:
    doc = json.dumps({**vm("kubectl-unknown"), "spec": {**vm("x")["spec"], "runStrateggy": "Always"}})
    proc = cluster.kubectl("apply", "-f", "-", input=doc, check=False)
    assert proc.returncode != 0 and "runStrateggy" in proc.stderr


def test_wrong_type_is_422_naming_the_field(cluster: Cluster) -> None:
    obj = vm("wrong-type")
    obj["spec"]["template"]["spec"]["domain"]["cpu"] = {"cores": "four"}
    code, body = call(cluster, "POST", VMS, json.dumps(obj).encode())
    assert_status(code, body, 422, "spec.template.spec.domain.cpu.cores")


def test_missing_name_is_422(cluster: Cluster) -> None:
    obj = vm("")
    obj["metadata"] = {}
    code, body = call(cluster, "POST", VMS, json.dumps(obj).encode())
    assert_status(code, body, 422, "metadata.name")


def test_invalid_run_strategy_is_422(cluster: Cluster) -> None:
    code, body = call(cluster, "POST", VMS, json.dumps(vm("bad-rs", runStrategy="Sometimes")).encode())
    assert_status(code, body, 422, "spec.runStrategy")
    code, body = call(cluster, "POST", VMS, json.dumps(vm("both", running=True)).encode())
    assert_status(code, body, 422, "spec.running")
    for name in ("bad-rs", "both"):
        assert call(cluster, "GET", f"{VMS}/{name}", None)[0] == 404


def test_unknown_resource_and_missing_object_are_404(cluster: Cluster) -> None:
    code, body = call(cluster, "GET", "/apis/kubevirt.io/v1/namespaces/default/nosuchthings", None)
    assert_status(code, body, 404)
    code, body = call(cluster, "GET", VMS + "/does-not-exist", None)
    assert_status(code, body, 404)
    assert body["details"]["name"] == "does-not-exist"


def test_no_token_is_401(cluster: Cluster) -> None:
    server, _, ca = cluster.config()
    req = urllib.request.Request(server + VMS)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, context=ssl.create_default_context(cadata=ca.decode()), timeout=10)
    assert info.value.code == 401
    assert json.loads(info.value.read())["reason"] == "Unauthorized"


def test_duplicate_create_is_409_and_keeps_the_first(cluster: Cluster) -> None:
    obj = vm("dup")
    assert call(cluster, "POST", VMS, json.dumps(obj).encode())[0] == 201
    obj2 = vm("dup", runStrategy="Always")
    code, body = call(cluster, "POST", VMS, json.dumps(obj2).encode())
    assert_status(code, body, 409)
    assert body["reason"] == "AlreadyExists"
    code, stored = call(cluster, "GET", VMS + "/dup", None)
    assert stored["spec"]["runStrategy"] == "Halted"
    call(cluster, "DELETE", VMS + "/dup", None)


def _devices(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]["domain"]["devices"]


def test_vm_specs_the_runtime_cannot_run_are_422_naming_the_field(cluster: Cluster) -> None:
    gpu = vm("with-gpu")
    _devices(gpu)["gpus"] = [{"name": "g1", "deviceName": "nvidia.com/GP102GL_Tesla_P40"}]
    code, body = call(cluster, "POST", VMS, json.dumps(gpu).encode())
    assert_status(code, body, 422, "spec.template.spec.domain.devices.gpus")

    bad_bus = vm("bad-bus")
    _devices(bad_bus)["disks"] = [{"name": "root", "disk": {"bus": "floppy"}}]
    bad_bus["spec"]["template"]["spec"]["volumes"] = [{"name": "root", "containerDisk": {"image": "x"}}]
    code, body = call(cluster, "POST", VMS, json.dumps(bad_bus).encode())
    assert_status(code, body, 422, "disks[0]")
    assert "floppy" in body["message"]

    no_volume = vm("no-volume")
    _devices(no_volume)["disks"] = [{"name": "root", "disk": {"bus": "virtio"}}]
    code, body = call(cluster, "POST", VMS, json.dumps(no_volume).encode())
    assert_status(code, body, 422, "disks[0].name")

    dup = vm("dup-disks")
    _devices(dup)["disks"] = [{"name": "root", "disk": {}}, {"name": "root", "disk": {}}]
    dup["spec"]["template"]["spec"]["volumes"] = [{"name": "root", "containerDisk": {"image": "x"}}]
    code, body = call(cluster, "POST", VMS, json.dumps(dup).encode())
    assert_status(code, body, 422, "disks[1].name")
    for name in ("with-gpu", "bad-bus", "no-volume", "dup-disks"):
        assert call(cluster, "GET", f"{VMS}/{name}", None)[0] == 404
