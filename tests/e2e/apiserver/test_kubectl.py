"""Real kubectl against a live `virtplane up`: what a KubeVirt user types, and what they see."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import yaml

from tests.e2e.apiserver import manifests
from virtplane.testing.cluster import Cluster

pytestmark = pytest.mark.e2e


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def test_readyz_and_version(cluster: Cluster) -> None:
    assert cluster.kubectl("get", "--raw", "/readyz").stdout == "ok"
    out = cluster.kubectl("version", "-o", "json").stdout
    server = json.loads(out)["serverVersion"]
    assert server["major"] == "1" and "virtplane" in server["gitVersion"]


def test_the_kubernetes_service_names_the_api_server(cluster: Cluster) -> None:
    """`kubectl get svc,endpoints kubernetes`: what every cluster has, pointing at this API server's port."""
    out = cluster.kubectl("get", "svc", "kubernetes", "-n", "default").stdout
    assert "10.96.0.1" in out and "443/TCP" in out, out
    port = cluster.config()[0].rsplit(":", 1)[1]
    eps = cluster.kubectl("get", "endpoints", "kubernetes", "-n", "default",
                          "-o", "jsonpath={.subsets[0].addresses[0].ip}:{.subsets[0].ports[0].port}").stdout
    assert eps == f"127.0.0.1:{port}", eps
    # the serving certificate is valid for the in-cluster names, as kube-apiserver's is
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((cluster.data_dir / "pki" / "apiserver.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kubernetes.default.svc" in san.get_values_for_type(x509.DNSName)
    assert "10.96.0.1" in [str(a) for a in san.get_values_for_type(x509.IPAddress)]


def test_api_resources_lists_kubevirt_kinds_with_short_names(cluster: Cluster) -> None:
    out = cluster.kubectl("api-resources", "--no-headers").stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for plural, short in [("virtualmachines", "vm"), ("virtualmachineinstances", "vmi"),
                          ("virtualmachineinstancemigrations", "vmim"), ("datavolumes", "dv"),
                          ("persistentvolumeclaims", "pvc"), ("persistentvolumes", "pv"),
                          ("storageclasses", "sc"), ("namespaces", "ns"), ("pods", "po"), ("nodes", "no"),
                          ("events", "ev"), ("configmaps", "cm")]:
        assert plural in rows, f"{plural} missing from api-resources"
        assert short in rows[plural][1].split(","), rows[plural]
    cats = cluster.kubectl("api-resources", "--categories=all", "-o", "name").stdout.split()
    assert "virtualmachines.kubevirt.io" in cats and "pods" in cats


def test_apply_get_patch_label_delete_vm(cluster: Cluster) -> None:
    out = cluster.kubectl("apply", "-f", "-", input=manifests.VM_CIRROS.format(name="vm-basic")).stdout
    assert "virtualmachine.kubevirt.io/vm-basic created" in out

    table = cluster.kubectl("get", "vm").stdout.splitlines()
    assert table[0].split() == ["NAME", "AGE", "STATUS", "READY"]
    assert any(line.split()[0] == "vm-basic" for line in table[1:])

    obj = yaml.safe_load(cluster.kubectl("get", "vm", "vm-basic", "-o", "yaml").stdout)
    assert obj["spec"]["runStrategy"] == "Halted"
    assert obj["metadata"]["uid"] and obj["metadata"]["generation"] == 1
    disks = obj["spec"]["template"]["spec"]["domain"]["devices"]["disks"]
    assert [d["name"] for d in disks] == ["containerdisk", "cloudinitdisk"]

    out = cluster.kubectl("patch", "vm", "vm-basic", "--type", "merge", "-p",
                          '{"spec":{"runStrategy":"Manual"}}').stdout
    assert "patched" in out
    obj = json.loads(cluster.kubectl("get", "vm", "vm-basic", "-o", "json").stdout)
    assert obj["spec"]["runStrategy"] == "Manual" and obj["metadata"]["generation"] == 2

    cluster.kubectl("label", "vm", "vm-basic", "tier=gold")
    assert "vm-basic" in cluster.kubectl("get", "vm", "-l", "tier=gold", "-o", "name").stdout
    assert cluster.kubectl("get", "vm", "-l", "tier=silver", "-o", "name").stdout.strip() == ""
    cluster.kubectl("annotate", "vm", "vm-basic", "note=hi")
    obj = json.loads(cluster.kubectl("get", "vm", "vm-basic", "-o", "json").stdout)
    assert obj["metadata"]["annotations"]["note"] == "hi"
    assert obj["metadata"]["generation"] == 2  # metadata changes do not bump generation

    out = cluster.kubectl("delete", "vm", "vm-basic").stdout
    assert 'virtualmachine.kubevirt.io "vm-basic" deleted' in out
    proc = cluster.kubectl("get", "vm", "vm-basic", check=False)
    assert proc.returncode != 0 and "NotFound" in proc.stderr


def test_get_watch_sees_updates(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=manifests.VM_CIRROS.format(name="vm-watch"))
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    jsonpath = 'jsonpath={.spec.runStrategy}{"\\n"}'
    watcher = subprocess.Popen(["kubectl", "get", "vm", "vm-watch", "-w", "-o", jsonpath],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline().strip()
        assert first == "Halted"
        cluster.kubectl("patch", "vm", "vm-watch", "--type", "merge", "-p", '{"spec":{"runStrategy":"Always"}}')
        assert watcher.stdout.readline().strip() == "Always"
    finally:
        os.killpg(watcher.pid, 9)
        watcher.wait()
    cluster.kubectl("delete", "vm", "vm-watch")


def test_update_conflict_like_kubectl_edit(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=manifests.VM_CIRROS.format(name="vm-conflict"))
    stale = json.loads(cluster.kubectl("get", "vm", "vm-conflict", "-o", "json").stdout)
    cluster.kubectl("patch", "vm", "vm-conflict", "--type", "merge", "-p", '{"spec":{"runStrategy":"Manual"}}')
    stale["spec"]["runStrategy"] = "Always"
    proc = cluster.kubectl("replace", "-f", "-", input=json.dumps(stale), check=False)
    assert proc.returncode != 0
    assert "the object has been modified" in proc.stderr and "Conflict" in proc.stderr
    obj = json.loads(cluster.kubectl("get", "vm", "vm-conflict", "-o", "json").stdout)
    assert obj["spec"]["runStrategy"] == "Manual"  # the stale write changed nothing
    cluster.kubectl("delete", "vm", "vm-conflict")


def test_explain_vm_spec(cluster: Cluster) -> None:
    out = cluster.kubectl("explain", "vm.spec.runStrategy").stdout
    assert "runStrategy" in out and "Halted" in out
    out = cluster.kubectl("explain", "vm.spec").stdout
    assert "template" in out and "dataVolumeTemplates" in out


def test_server_side_apply(cluster: Cluster) -> None:
    doc = manifests.VM_CIRROS.format(name="vm-ssa")
    out = cluster.kubectl("apply", "--server-side", "-f", "-", input=doc).stdout
    assert "serverside-applied" in out
    obj = json.loads(cluster.kubectl("get", "vm", "vm-ssa", "-o", "json", "--show-managed-fields").stdout)
    managers = {m["manager"] for m in obj["metadata"]["managedFields"]}
    assert "kubectl" in managers
    # another manager takes runStrategy; kubectl's next apply of a different value conflicts
    cluster.kubectl("patch", "vm", "vm-ssa", "--type", "merge", "-p", '{"spec":{"runStrategy":"Manual"}}',
                    "--field-manager", "operator")
    changed = doc.replace("runStrategy: Halted", "runStrategy: Always")
    proc = cluster.kubectl("apply", "--server-side", "-f", "-", input=changed, check=False)
    assert proc.returncode != 0 and "conflict" in proc.stderr.lower() and "runStrategy" in proc.stderr
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=changed)
    obj = json.loads(cluster.kubectl("get", "vm", "vm-ssa", "-o", "json").stdout)
    assert obj["spec"]["runStrategy"] == "Always"
    # dropping a label from the applied config removes it: kubectl owned it
    no_label = changed.replace("  labels:\n    app: demo\n", "")
    cluster.kubectl("apply", "--server-side", "-f", "-", input=no_label)
    obj = json.loads(cluster.kubectl("get", "vm", "vm-ssa", "-o", "json").stdout)
    assert "app" not in (obj["metadata"].get("labels") or {})
    cluster.kubectl("delete", "vm", "vm-ssa")


def test_dry_run_server_stores_nothing(cluster: Cluster) -> None:
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-",
                          input=manifests.VM_CIRROS.format(name="vm-dry")).stdout
    assert "created (server dry run)" in out
    assert cluster.kubectl("get", "vm", "vm-dry", check=False).returncode != 0


def test_delete_namespace_cascades(cluster: Cluster) -> None:
    cluster.kubectl("create", "namespace", "doomed")
    cluster.kubectl("-n", "doomed", "apply", "-f", "-", input=manifests.VM_CIRROS.format(name="vm-in-ns"))
    cluster.kubectl("-n", "doomed", "create", "configmap", "settings", "--from-literal=a=b")
    cluster.kubectl("delete", "namespace", "doomed", "--timeout=60s")
    proc = cluster.kubectl("get", "namespace", "doomed", check=False)
    assert proc.returncode != 0 and "NotFound" in proc.stderr
    assert cluster.kubectl("get", "vm", "-A", "-o", "name").stdout.count("vm-in-ns") == 0
    # creating in a namespace that does not exist is a clear 404
    proc = cluster.kubectl("-n", "doomed", "create", "configmap", "x", check=False)
    assert proc.returncode != 0 and 'namespaces "doomed" not found' in proc.stderr


def _owned_cm(name: str, owner: dict, block: bool = False) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "blockOwnerDeletion": block}]},
        "data": {"k": "v"},
    })


@pytest.mark.parametrize("policy", ["background", "foreground", "orphan"])
def test_owner_reference_garbage_collection(cluster: Cluster, policy: str) -> None:
    owner_name, dep_name = f"owner-{policy}", f"dep-{policy}"
    cluster.kubectl("create", "configmap", owner_name)
    owner = json.loads(cluster.kubectl("get", "cm", owner_name, "-o", "json").stdout)
    cluster.kubectl("create", "-f", "-", input=_owned_cm(dep_name, owner, block=True))
    cluster.kubectl("delete", "cm", owner_name, f"--cascade={policy}", "--timeout=60s")
    if policy == "orphan":
        dep = json.loads(cluster.kubectl("get", "cm", dep_name, "-o", "json").stdout)
        assert not dep["metadata"].get("ownerReferences")
        cluster.kubectl("delete", "cm", dep_name)
    else:
        wait_for(lambda: cluster.kubectl("get", "cm", dep_name, check=False).returncode != 0)
    assert cluster.kubectl("get", "cm", owner_name, check=False).returncode != 0


def test_user_crd_is_served(cluster: Cluster) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wdg"]},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "properties": {"spec": {"type": "object", "properties": {
                         "size": {"type": "integer"}}}}}}}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    cluster.kubectl("wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=30s")
    w = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}}
    wait_for(lambda: cluster.kubectl("apply", "-f", "-", input=json.dumps(w), check=False).returncode == 0)
    assert "w1" in cluster.kubectl("get", "wdg").stdout
    bad = {**w, "metadata": {"name": "w2"}, "spec": {"size": "big"}}
    proc = cluster.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0 and "spec.size" in proc.stderr
    cluster.kubectl("delete", "crd", "widgets.example.com")


def test_metrics_endpoint(cluster: Cluster) -> None:
    out = cluster.kubectl("get", "--raw", "/metrics").stdout
    assert "apiserver_request_total{" in out and 'resource="virtualmachines"' in out
    assert "apiserver_request_duration_seconds_bucket" in out
