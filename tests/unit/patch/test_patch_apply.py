"""Server-side apply, field ownership and managedFields (FieldsV1)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from virtplane.api import fieldpath as fp
from virtplane.api.apply import (
    LAST_APPLIED_ANNOTATION,
    ApplyConflictError,
    managed_field_paths,
    manager_from_user_agent,
    server_side_apply,
    update_managed_fields,
)
from virtplane.api.patch import PatchError, builtin_merge_keys, merge_keys_from_schema

DEPLOY = builtin_merge_keys("apps", "Deployment")
T1, T2, T3, T4, T5 = (f"2024-05-0{i}T10:00:00Z" for i in range(1, 6))
REPO = Path(__file__).resolve().parents[3]


def deployment(image: str = "nginx:1.14", replicas: int = 2, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "nginx", "image": image, "ports": [{"containerPort": 80}]}]},
            },
        },
    }
    for key, value in extra.items():
        obj["spec"][key] = value
    return obj


def apply(
    live: dict[str, Any] | None,
    cfg: dict[str, Any],
    manager: str = "kubectl",
    *,
    force: bool = False,
    now: str = T1,
    **kw: Any,
) -> dict[str, Any]:
    kw.setdefault("list_keys", DEPLOY)
    return server_side_apply(live, cfg, manager=manager, force=force, now=now, **kw)


def edited(obj: dict[str, Any], manager: str, change: Any, now: str = T2, list_keys: Any = DEPLOY) -> dict[str, Any]:
    """A non-apply write (kubectl edit/patch/scale, a controller's update) by `manager`."""
    new = copy.deepcopy(obj)
    change(new)
    update_managed_fields(obj, new, manager=manager, now=now, list_keys=list_keys)
    return new


def entries(obj: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["manager"], e["operation"]) for e in obj["metadata"].get("managedFields", [])]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj["spec"]["template"]["spec"]["containers"]


# ---------------------------------------------------------------------------------------------------------
# create and re-apply


def test_create_via_apply_records_fieldsv1() -> None:
    cfg = deployment()
    out = apply(None, cfg)
    body = copy.deepcopy(out)
    managed = body["metadata"].pop("managedFields")
    assert body == cfg
    assert managed == [
        {
            "manager": "kubectl",
            "operation": "Apply",
            "apiVersion": "apps/v1",
            "time": T1,
            "fieldsType": "FieldsV1",
            "fieldsV1": {
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {
                    "f:replicas": {},
                    "f:selector": {},
                    "f:template": {
                        "f:metadata": {"f:labels": {"f:app": {}}},
                        "f:spec": {
                            "f:containers": {
                                'k:{"name":"nginx"}': {
                                    ".": {},
                                    "f:image": {},
                                    "f:name": {},
                                    "f:ports": {
                                        'k:{"containerPort":80,"protocol":"TCP"}': {".": {}, "f:containerPort": {}}
                                    },
                                }
                            }
                        },
                    },
                },
            },
        }
    ]
    assert cfg == deployment()  # input untouched


def test_reapply_without_a_field_removes_it() -> None:
    cfg = deployment()
    cfg["metadata"]["labels"]["tier"] = "front"
    containers(cfg)[0]["env"] = [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    containers(cfg).append({"name": "sidecar", "image": "envoy"})
    cfg["spec"]["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}
    live = apply(None, cfg)
    # the server defaults fields nobody applied; they are nobody's and must survive pruning
    live["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"
    containers(live)[0]["imagePullPolicy"] = "IfNotPresent"

    cfg2 = deployment()
    containers(cfg2)[0]["env"] = [{"name": "A", "value": "1"}]
    cfg2["spec"]["strategy"] = {"type": "Recreate"}
    out = apply(live, cfg2, now=T2)
    assert out["metadata"]["labels"] == {"app": "web"}
    assert [c["name"] for c in containers(out)] == ["nginx"]
    assert containers(out)[0]["env"] == [{"name": "A", "value": "1"}]
    assert containers(out)[0]["imagePullPolicy"] == "IfNotPresent"
    assert out["spec"]["strategy"] == {"type": "Recreate"}
    assert out["spec"]["template"]["spec"]["dnsPolicy"] == "ClusterFirst"
    assert ".spec.strategy.rollingUpdate.maxSurge" not in managed_field_paths(out, "kubectl")
    assert out["metadata"]["managedFields"][0]["time"] == T2


def test_reapply_keeps_fields_other_managers_own() -> None:
    live = apply(None, deployment(), "gitops")
    # another applier applies the same label value: shared ownership
    live = apply(
        live,
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"app": "web"}}},
        "labeler",
    )
    live = edited(live, "kubectl-edit", lambda o: o["spec"].update(paused=True))
    cfg = deployment()
    del cfg["metadata"]["labels"]
    out = apply(live, cfg, "gitops", now=T3)
    assert out["metadata"]["labels"] == {"app": "web"}  # still owned by labeler
    assert out["spec"]["paused"] is True
    assert ".metadata.labels.app" not in managed_field_paths(out, "gitops")
    assert managed_field_paths(out, "labeler") == [".metadata.labels.app"]


def test_applying_the_same_value_shares_ownership_then_conflicts() -> None:
    live = apply(None, deployment(replicas=3), "alice")
    live = apply(live, deployment(replicas=3), "bob")  # same value: no conflict
    assert ".spec.replicas" in managed_field_paths(live, "alice")
    assert ".spec.replicas" in managed_field_paths(live, "bob")
    with pytest.raises(ApplyConflictError) as e:
        apply(live, deployment(replicas=4), "bob")
    # between appliers there is no "using <version>"
    assert e.value.message == 'Apply failed with 1 conflict: conflict with "alice": .spec.replicas'


def test_associative_list_merge_keeps_live_items_and_order() -> None:
    live = apply(None, deployment(), "gitops")
    containers(live).extend([{"name": "b", "image": "b"}, {"name": "c", "image": "c"}])
    cfg = deployment()
    containers(cfg).append({"name": "d", "image": "d"})
    out = apply(live, cfg, "other")
    assert [c["name"] for c in containers(out)] == ["nginx", "b", "c", "d"]
    # the configuration's order wins for the items it names; live-only items keep their place
    # (structured-merge-diff's order: b stays before c, as it was live)
    cfg = deployment()
    containers(cfg).insert(0, {"name": "c", "image": "c"})
    out = apply(live, cfg, "other")
    assert [c["name"] for c in containers(out)] == ["b", "c", "nginx"]


def test_sets_are_owned_per_value() -> None:
    base = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}
    live = apply(None, {**base, "metadata": {"name": "web", "finalizers": ["a"]}}, "alice")
    live = apply(live, {**base, "metadata": {"name": "web", "finalizers": ["b"]}}, "bob")
    assert live["metadata"]["finalizers"] == ["a", "b"]
    assert managed_field_paths(live, "bob") == ['.metadata.finalizers[="b"]']
    out = apply(live, base, "alice")
    assert out["metadata"]["finalizers"] == ["b"]


def test_null_in_configuration_unsets_and_owns() -> None:
    live = apply(None, deployment(), "gitops")
    live = edited(live, "ctl", lambda o: o["spec"].update(paused=True))
    cfg = deployment()
    cfg["spec"]["paused"] = None
    with pytest.raises(ApplyConflictError):
        apply(live, cfg, "gitops")
    out = apply(live, cfg, "gitops", force=True)
    assert "paused" not in out["spec"]
    assert ".spec.paused" in managed_field_paths(out, "gitops")
    assert ("ctl", "Update") not in entries(out)
    # null over an absent or null field changes nothing and conflicts with no one
    again = apply(out, cfg, "gitops", now=T5)
    assert again == out


# ---------------------------------------------------------------------------------------------------------
# conflicts


def test_conflict_with_an_update_manager() -> None:
    live = apply(None, deployment(), "gitops")
    live = edited(live, "kubectl-edit", lambda o: containers(o)[0].update(image="nginx:1.16"))
    with pytest.raises(ApplyConflictError) as e:
        apply(live, deployment(), "gitops", now=T3)
    err = e.value
    assert err.status == 409 and err.reason == "Conflict"
    assert err.message == (
        'Apply failed with 1 conflict: conflict with "kubectl-edit" using apps/v1: '
        '.spec.template.spec.containers[name="nginx"].image'
    )
    assert err.conflicts == [("kubectl-edit", '.spec.template.spec.containers[name="nginx"].image')]
    assert err.causes == [
        {
            "reason": "FieldManagerConflict",
            "message": 'conflict with "kubectl-edit" using apps/v1',
            "field": '.spec.template.spec.containers[name="nginx"].image',
        }
    ]


def test_several_conflicts_are_grouped_by_manager() -> None:
    live = apply(None, deployment(), "gitops")
    live = edited(live, "kubectl-edit", lambda o: containers(o)[0].update(image="nginx:1.16"))
    live = edited(live, "kubectl-scale", lambda o: o["spec"].update(replicas=5), now=T3)
    live = edited(live, "kubectl-scale", lambda o: o["metadata"]["labels"].update(app="x"), now=T4)
    with pytest.raises(ApplyConflictError) as e:
        apply(live, deployment(), "gitops", now=T5)
    assert e.value.message == (
        "Apply failed with 3 conflicts: "
        'conflicts with "kubectl-edit" using apps/v1:\n'
        '- .spec.template.spec.containers[name="nginx"].image\n'
        'conflicts with "kubectl-scale" using apps/v1:\n'
        "- .metadata.labels.app\n"
        "- .spec.replicas"
    )
    assert len(e.value.conflicts) == len(e.value.causes) == 3


def test_force_moves_ownership() -> None:
    live = apply(None, deployment(), "gitops")
    live = edited(live, "kubectl-edit", lambda o: containers(o)[0].update(image="nginx:1.16"))
    live = edited(live, "hpa", lambda o: o["spec"].update(replicas=7), now=T3)
    out = apply(live, deployment(), "gitops", force=True, now=T4)
    assert containers(out)[0]["image"] == "nginx:1.14"
    assert out["spec"]["replicas"] == 2
    assert entries(out) == [("gitops", "Apply")]  # the editors owned nothing else
    assert '.spec.template.spec.containers[name="nginx"].image' in managed_field_paths(out, "gitops")


def test_apply_after_kubectl_edit_that_the_configuration_does_not_touch() -> None:
    live = apply(None, deployment(), "gitops")
    live = edited(live, "kubectl-edit", lambda o: o["spec"].update(replicas=9, paused=True))
    assert managed_field_paths(live, "kubectl-edit", "Update") == [".spec.paused", ".spec.replicas"]
    assert ".spec.replicas" not in managed_field_paths(live, "gitops")
    # the next apply leaves replicas out: no conflict, and the edit's value stays (kubectl-edit owns it)
    cfg = deployment()
    del cfg["spec"]["replicas"]
    out = apply(live, cfg, "gitops", now=T3)
    assert out["spec"]["replicas"] == 9 and out["spec"]["paused"] is True


def test_conflicts_with_before_first_apply() -> None:
    """An object created without ownership records: its content belongs to "before-first-apply"."""
    live = deployment(replicas=1)
    out = apply(live, deployment(replicas=1), "gitops")  # same values: fine
    assert ("before-first-apply", "Update") in entries(out)
    with pytest.raises(ApplyConflictError) as e:
        apply(deployment(replicas=1), deployment(replicas=3), "gitops")
    assert e.value.message == (
        'Apply failed with 1 conflict: conflict with "before-first-apply" using apps/v1: .spec.replicas'
    )


def test_kubectl_takes_over_from_client_side_apply() -> None:
    """`kubectl apply --server-side` (manager "kubectl") on an object `kubectl apply` managed: fields whose
    live value is still the last-applied one do not conflict, and the annotation follows the new config."""
    old_cfg = deployment()
    created = copy.deepcopy(old_cfg)
    created["metadata"]["annotations"] = {LAST_APPLIED_ANNOTATION: json.dumps(old_cfg)}
    update_managed_fields(None, created, manager="kubectl-client-side-apply", now=T1, list_keys=DEPLOY)
    live = edited(created, "kubectl-scale", lambda o: o["spec"].update(replicas=5))

    new_cfg = deployment(image="nginx:1.16", replicas=5)
    out = apply(live, new_cfg, "kubectl", now=T3)
    assert containers(out)[0]["image"] == "nginx:1.16"
    assert json.loads(out["metadata"]["annotations"][LAST_APPLIED_ANNOTATION]) == new_cfg
    assert '.spec.template.spec.containers[name="nginx"].image' in managed_field_paths(out, "kubectl")
    # a field someone else changed since the last client-side apply still conflicts
    with pytest.raises(ApplyConflictError) as e:
        apply(live, deployment(image="nginx:1.16", replicas=2), "kubectl", now=T3)
    assert e.value.conflicts == [("kubectl-scale", ".spec.replicas")]
    # another manager name gets no such treatment
    with pytest.raises(ApplyConflictError) as e:
        apply(live, new_cfg, "gitops", now=T3)
    assert ("kubectl-client-side-apply", '.spec.template.spec.containers[name="nginx"].image') in e.value.conflicts


# ---------------------------------------------------------------------------------------------------------
# request validation and details


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: c["metadata"].update(managedFields=[]), "managedFields must be nil"),
        (lambda c: containers(c).append({"image": "x"}), "omits key field 'name'"),
        (lambda c: containers(c).append({"name": "nginx", "image": "x"}), "duplicate entries"),
        (lambda c: containers(c)[0].update(ports=[{"name": "p"}]), "containerPort"),
    ],
)
def test_malformed_configurations_are_400(mutate: Any, needle: str) -> None:
    cfg = deployment()
    mutate(cfg)
    with pytest.raises(PatchError) as e:
        apply(None, cfg)
    assert e.value.status == 400 and needle in e.value.message
    assert not isinstance(e.value, ApplyConflictError)


def test_field_manager_is_required() -> None:
    with pytest.raises(PatchError) as e:
        apply(None, deployment(), "")
    assert e.value.status == 422 and "fieldManager: Required value" in e.value.message


def test_manager_from_user_agent() -> None:
    assert manager_from_user_agent("kubectl/v1.32.4 (linux/amd64) kubernetes/4cb5f07") == "kubectl"
    assert manager_from_user_agent("virt-controller/v1.5.0") == "virt-controller"
    assert manager_from_user_agent("Go-http-client/1.1") == "Go-http-client"
    assert manager_from_user_agent("a\x00b") == "ab"
    assert manager_from_user_agent("x" * 300) == "x" * 128
    assert manager_from_user_agent("") == ""


def test_reset_fields_are_kept_and_not_owned() -> None:
    live = apply(None, deployment(), "gitops")
    live["status"] = {"replicas": 2}
    cfg = deployment()
    cfg["status"] = {"replicas": 99}
    out = apply(live, cfg, "gitops", reset_fields=("status",), now=T2)
    assert out["status"] == {"replicas": 2}
    assert not [p for p in managed_field_paths(out, "gitops") if p.startswith(".status")]


def test_status_subresource_entry() -> None:
    live = apply(None, deployment(), "gitops")
    cfg = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "status": {"replicas": 2}}
    out = apply(live, cfg, "controller", subresource="status", reset_fields=("spec",), now=T2)
    entry = next(e for e in out["metadata"]["managedFields"] if e["manager"] == "controller")
    assert entry["subresource"] == "status" and entry["fieldsV1"] == {"f:status": {"f:replicas": {}}}
    live = edited(out, "kubectl-edit", lambda o: o["status"].update(replicas=3))
    with pytest.raises(ApplyConflictError) as e:
        apply(live, cfg, "controller", subresource="status", now=T3)
    assert e.value.conflicts == [("kubectl-edit", ".status.replicas")]


def test_noop_apply_keeps_the_time() -> None:
    live = apply(None, deployment(), now=T1)
    out = apply(live, deployment(), now=T4)
    assert out == live
    assert out["metadata"]["managedFields"][0]["time"] == T1


def test_inputs_are_not_mutated() -> None:
    live = apply(None, deployment())
    cfg = deployment(replicas=4)
    del cfg["metadata"]["labels"]
    before_live, before_cfg = copy.deepcopy(live), copy.deepcopy(cfg)
    apply(live, cfg, now=T2)
    assert live == before_live and cfg == before_cfg


# ---------------------------------------------------------------------------------------------------------
# Update ownership (create/update/patch)


def test_create_owns_everything_but_identity_fields() -> None:
    obj = deployment()
    obj["metadata"].update(uid="u", resourceVersion="1", creationTimestamp=T1, generation=1)
    update_managed_fields(None, obj, manager="kubectl-create", now=T1, list_keys=DEPLOY)
    (entry,) = obj["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"], entry["apiVersion"], entry["time"]) == (
        "kubectl-create",
        "Update",
        "apps/v1",
        T1,
    )
    paths = managed_field_paths(obj, "kubectl-create", "Update")
    assert ".metadata.labels.app" in paths and '.spec.template.spec.containers[name="nginx"].image' in paths
    assert not {".metadata.name", ".metadata.uid", ".metadata.resourceVersion", ".apiVersion", ".kind"} & set(paths)
    # containers added by a non-apply write are members themselves, as Kubernetes reports them
    assert entry["fieldsV1"]["f:metadata"]["f:labels"] == {".": {}, "f:app": {}}


def _created_objects() -> list[tuple[dict[str, Any], Any]]:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": {"a": "1", "b": ""},
           "finalizers": ["x/y", "a/b"],
           "ownerReferences": [{"uid": "u1", "name": "o", "kind": "K", "apiVersion": "v1"}]},
           "spec": {"containers": [{"name": "b", "image": "i", "env": [{"name": "Z", "value": "1"}, {"name": "A"}],
                                    "ports": [{"containerPort": 80, "protocol": "TCP"}], "args": ["x", "x"]},
                                   {"name": "a", "image": "j", "resources": {}}], "volumes": [], "nodeSelector": {}},
           "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]}}
    odd = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {}},
           "data": {"k": "v", "e": ""}, "binaryData": None, "extra": [1, 2, {"x": 1}]}
    bare = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n", "uid": "u"}}
    return [(deployment(), DEPLOY), (pod, builtin_merge_keys("", "Pod")), (odd, None), (bare, None),
            (deployment(strategy={"type": "Recreate"}, paused=False), DEPLOY)]


@pytest.mark.parametrize("index", range(5))
def test_create_encoding_matches_the_general_path(index: int) -> None:
    """A create encodes its FieldsV1 directly; it must equal what the general path-set route gives (the
    route every update takes), the create fast path being an optimisation only."""
    obj, keys = _created_objects()[index]
    fast = copy.deepcopy(obj)
    update_managed_fields(None, fast, manager="m", now=T1, list_keys=keys)
    # The general route: a create that carries an (unrelated, then dropped) manager entry goes through it.
    slow = copy.deepcopy(obj)
    slow["metadata"]["managedFields"] = [{"manager": "other", "operation": "Update", "apiVersion": "v1",
                                          "fieldsType": "FieldsV1", "fieldsV1": {"f:zzz": {}}}]
    update_managed_fields(None, slow, manager="m", now=T1, list_keys=keys)
    mine = [e for e in slow["metadata"]["managedFields"] if e["manager"] == "m"]
    assert fast["metadata"].get("managedFields", []) == mine
    assert json.dumps(fast["metadata"].get("managedFields")) == json.dumps(mine or None)  # key order too


def test_update_moves_and_drops_ownership() -> None:
    live = apply(None, deployment(), "gitops")
    live = edited(live, "ctl", lambda o: o["spec"].update(replicas=3))
    assert ".spec.replicas" not in managed_field_paths(live, "gitops")
    # removing a field takes it from everyone
    live = edited(live, "ctl2", lambda o: o["metadata"].pop("labels"), now=T3)
    assert ".metadata.labels.app" not in managed_field_paths(live, "gitops")
    assert ("ctl2", "Update") not in entries(live)  # removed only: owns nothing, no entry


def test_update_without_change_keeps_time_and_drops_nothing() -> None:
    live = edited(apply(None, deployment()), "ctl", lambda o: o["spec"].update(replicas=3), now=T2)
    again = edited(live, "ctl", lambda o: None, now=T5)
    assert again == live


def test_reset_and_user_supplied_managed_fields() -> None:
    live = apply(None, deployment())
    new = copy.deepcopy(live)
    new["metadata"]["managedFields"] = []
    update_managed_fields(live, new, manager="kubectl-edit", now=T2, list_keys=DEPLOY)
    assert "managedFields" not in new["metadata"]
    new = copy.deepcopy(live)
    new["metadata"]["managedFields"] = [{}]
    update_managed_fields(live, new, manager="x", now=T2)
    assert "managedFields" not in new["metadata"]
    # a write may carry its own entries (kubectl's CSA->SSA upgrade does that with a JSON patch)
    new = copy.deepcopy(live)
    mine = {
        "manager": "me",
        "operation": "Apply",
        "apiVersion": "apps/v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:replicas": {}}},
    }
    new["metadata"]["managedFields"] = [mine]
    update_managed_fields(live, new, manager="x", now=T2)
    assert new["metadata"]["managedFields"] == [mine]
    # ... but not through a subresource
    new = copy.deepcopy(live)
    new["metadata"]["managedFields"] = [mine]
    new["status"] = {"replicas": 1}
    update_managed_fields(live, new, manager="kubelet", subresource="status", now=T2)
    assert entries(new) == [("kubectl", "Apply"), ("kubelet", "Update")]
    assert new["metadata"]["managedFields"][1]["subresource"] == "status"


def test_update_managers_are_capped() -> None:
    live = apply(None, deployment())
    for i in range(12):
        live = edited(
            live,
            f"ctl-{i:02d}",
            lambda o, i=i: o["metadata"]["labels"].update({f"l{i}": "x"}),
            now=f"2024-05-01T10:{i:02d}:00Z",
        )
    updaters = [m for m, op in entries(live) if op == "Update"]
    assert len(updaters) == 10
    assert "ancient-changes" in updaters and "ctl-00" not in updaters and "ctl-02" not in updaters
    ancient = managed_field_paths(live, "ancient-changes", "Update")
    assert ancient == [".metadata.labels.l0", ".metadata.labels.l1", ".metadata.labels.l2"]


def test_garbage_managed_fields_do_not_break_writes() -> None:
    live = deployment()
    live["metadata"]["managedFields"] = [{"manager": "m", "fieldsType": "FieldsV1", "fieldsV1": {"x:bad": {}}}]
    new = copy.deepcopy(live)
    new["spec"]["replicas"] = 5
    update_managed_fields(live, new, manager="ctl", now=T2, list_keys=DEPLOY)
    assert entries(new) == [("ctl", "Update")]
    assert apply(live, deployment(), "gitops")["spec"]["replicas"] == 2


# ---------------------------------------------------------------------------------------------------------
# a KubeVirt VirtualMachine (a CRD)


def _vm_keys() -> Any:
    path = REPO / "virtplane" / "api" / "data" / "crds.json"
    if not path.exists():
        pytest.skip("crds.json not generated")
    crd = next(c for c in json.loads(path.read_text()) if c["spec"]["names"]["kind"] == "VirtualMachine")
    return merge_keys_from_schema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def vm(run_strategy: str = "Halted", bus: str = "virtio") -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm1", "namespace": "default"},
        "spec": {
            "runStrategy": run_strategy,
            "template": {
                "spec": {
                    "domain": {
                        "devices": {"disks": [{"name": "root", "disk": {"bus": bus}}]},
                        "memory": {"guest": "1Gi"},
                    },
                    "volumes": [{"name": "root", "containerDisk": {"image": "fedora"}}],
                    "topologySpreadConstraints": [
                        {"topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "maxSkew": 1}
                    ],
                }
            },
        },
    }


def test_virtual_machine_conflicts_with_client_side_apply() -> None:
    keys = _vm_keys()
    created = vm()
    update_managed_fields(None, created, manager="kubectl-client-side-apply", now=T1, list_keys=keys)
    with pytest.raises(ApplyConflictError) as e:
        server_side_apply(created, vm("Always"), manager="gitops", force=False, list_keys=keys, now=T2)
    assert e.value.message == (
        'Apply failed with 1 conflict: conflict with "kubectl-client-side-apply" using kubevirt.io/v1: '
        ".spec.runStrategy"
    )


def test_virtual_machine_atomic_and_keyed_lists() -> None:
    keys = _vm_keys()
    live = server_side_apply(None, vm(), manager="gitops", force=False, list_keys=keys, now=T1)
    fields = managed_field_paths(live, "gitops")
    # disks carry no list type in KubeVirt's schema: one atomic field
    assert ".spec.template.spec.domain.devices.disks" in fields
    assert (
        '.spec.template.spec.topologySpreadConstraints[topologyKey="zone",whenUnsatisfiable="DoNotSchedule"].maxSkew'
        in fields
    )
    live = edited(
        live,
        "kubectl-edit",
        lambda o: o["spec"]["template"]["spec"]["domain"]["devices"]["disks"].append({"name": "data"}),
        list_keys=keys,
    )
    with pytest.raises(ApplyConflictError) as e:
        server_side_apply(live, vm(bus="sata"), manager="gitops", force=False, list_keys=keys, now=T3)
    assert e.value.conflicts == [("kubectl-edit", ".spec.template.spec.domain.devices.disks")]
    out = server_side_apply(live, vm(bus="sata"), manager="gitops", force=True, list_keys=keys, now=T3)
    assert out["spec"]["template"]["spec"]["domain"]["devices"]["disks"] == [{"name": "root", "disk": {"bus": "sata"}}]
    # dropping memory from the configuration removes it (only gitops owned it)
    cfg = vm(bus="sata")
    del cfg["spec"]["template"]["spec"]["domain"]["memory"]
    out = server_side_apply(out, cfg, manager="gitops", force=False, list_keys=keys, now=T4)
    assert "memory" not in out["spec"]["template"]["spec"]["domain"]


# ---------------------------------------------------------------------------------------------------------
# FieldsV1 encoding


def test_fieldsv1_round_trip_and_path_strings() -> None:
    paths = {
        (fp.field("spec"), fp.field("containers"), fp.key({"name": "c"})),
        (fp.field("spec"), fp.field("containers"), fp.key({"name": "c"}), fp.field("image")),
        (fp.field("spec"), fp.field("ports"), fp.key({"protocol": "TCP", "port": 80}), fp.field("port")),
        (fp.field("metadata"), fp.field("finalizers"), fp.value("a/b")),
        (fp.field("spec"), fp.field("args"), fp.index(2)),
    }
    encoded = fp.to_fieldsv1(paths)
    assert encoded == {
        "f:metadata": {"f:finalizers": {'v:"a/b"': {}}},
        "f:spec": {
            "f:args": {"i:2": {}},
            "f:containers": {'k:{"name":"c"}': {".": {}, "f:image": {}}},
            "f:ports": {'k:{"port":80,"protocol":"TCP"}': {"f:port": {}}},
        },
    }
    assert fp.from_fieldsv1(json.loads(json.dumps(encoded))) == paths
    strings = sorted(fp.path_to_string(p) for p in paths)
    assert strings == [
        '.metadata.finalizers[="a/b"]',
        ".spec.args[2]",
        '.spec.containers[name="c"]',
        '.spec.containers[name="c"].image',
        '.spec.ports[port=80,protocol="TCP"].port',
    ]
    with pytest.raises(ValueError):
        fp.from_fieldsv1({"x:y": {}})
