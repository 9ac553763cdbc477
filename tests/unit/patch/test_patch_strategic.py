"""Strategic merge patch: list merging by key, directives, kubectl's own patches, and MergeKeys."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from virtplane.api.patch import (
    ListRule,
    MergeKeys,
    PatchError,
    builtin_merge_keys,
    merge_keys_from_schema,
    strategic_merge_patch,
)

HERE = Path(__file__).parent
REPO = HERE.parents[2]
POD = builtin_merge_keys("", "Pod")
DEPLOY = builtin_merge_keys("apps", "Deployment")


def pod(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}


def names(items: list[dict[str, Any]]) -> list[str]:
    return [i["name"] for i in items]


# ---------------------------------------------------------------------------------------------------------
# maps


def test_maps_merge_and_null_deletes() -> None:
    live = {"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": {"y": 1, "z": 2}}}
    out = strategic_merge_patch(live, {"metadata": {"labels": {"a": None, "c": "3"}}, "spec": {"x": {"z": None}}}, POD)
    assert out == {"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"x": {"y": 1}}}
    # deleting what is not there is fine; new nested maps drop their nulls
    out = strategic_merge_patch(live, {"spec": {"nope": None, "new": {"a": None, "b": 1}}}, POD)
    assert out["spec"]["new"] == {"b": 1} and "nope" not in out["spec"]


def test_inputs_are_never_mutated() -> None:
    live = pod(containers=[{"name": "a", "image": "x", "env": [{"name": "E", "value": "1"}]}])
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "F", "value": "2"}]}, {"name": "b"}]}}
    before_live, before_patch = copy.deepcopy(live), copy.deepcopy(patch)
    out = strategic_merge_patch(live, patch, POD)
    out["spec"]["containers"][0]["env"][0]["value"] = "changed"
    assert live == before_live and patch == before_patch


def test_map_directives() -> None:
    live = {"spec": {"affinity": {"nodeAffinity": {"a": 1}}, "securityContext": {"runAsUser": 1, "fsGroup": 2}}}
    out = strategic_merge_patch(
        live,
        {"spec": {"affinity": {"$patch": "delete"}, "securityContext": {"$patch": "replace", "runAsUser": 5}}},
        POD,
    )
    assert out == {"spec": {"securityContext": {"runAsUser": 5}}}
    out = strategic_merge_patch(live, {"spec": {"securityContext": {"$patch": "merge", "runAsUser": 5}}}, POD)
    assert out["spec"]["securityContext"] == {"runAsUser": 5, "fsGroup": 2}
    # a delete directive for something absent leaves nothing behind
    assert "dnsConfig" not in strategic_merge_patch(live, {"spec": {"dnsConfig": {"$patch": "delete"}}}, POD)["spec"]
    assert strategic_merge_patch(live, {"$patch": "replace", "kind": "Pod"}, POD) == {"kind": "Pod"}


def test_retain_keys() -> None:
    """kubectl apply changing a Deployment from RollingUpdate to Recreate."""
    live = {"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}}
    patch = {"spec": {"strategy": {"$retainKeys": ["type"], "rollingUpdate": None, "type": "Recreate"}}}
    assert strategic_merge_patch(live, patch, DEPLOY) == {"spec": {"strategy": {"type": "Recreate"}}}
    # keys the patch does not set and $retainKeys does not list are cleared too
    live = {"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}, "junk": 1}}}
    patch = {"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}
    assert strategic_merge_patch(live, patch, DEPLOY) == {"spec": {"strategy": {"type": "Recreate"}}}


def test_retain_keys_must_cover_the_patch() -> None:
    with pytest.raises(PatchError) as e:
        strategic_merge_patch({}, {"spec": {"$retainKeys": ["a"], "b": 1}}, POD)
    assert e.value.status == 400 and "spec.b" in e.value.message
    with pytest.raises(PatchError):
        strategic_merge_patch({}, {"spec": {"$retainKeys": "a"}}, POD)


@pytest.mark.parametrize("directive", ["bogus", 1, None])
def test_unknown_directive_is_400(directive: Any) -> None:
    with pytest.raises(PatchError) as e:
        strategic_merge_patch({"spec": {}}, {"spec": {"x": {"$patch": directive}}}, POD)
    assert e.value.status == 400 and "spec.x" in e.value.message


def test_patch_must_be_an_object() -> None:
    with pytest.raises(PatchError) as e:
        strategic_merge_patch({}, [{"op": "add"}], POD)  # type: ignore[arg-type]
    assert e.value.status == 400


# ---------------------------------------------------------------------------------------------------------
# lists


def test_containers_merge_by_name() -> None:
    live = pod(containers=[{"name": "a", "image": "x:1", "args": ["1"]}, {"name": "b", "image": "y"}])
    out = strategic_merge_patch(live, {"spec": {"containers": [{"name": "b", "image": "y:2"}]}}, POD)
    assert out["spec"]["containers"] == [{"name": "a", "image": "x:1", "args": ["1"]}, {"name": "b", "image": "y:2"}]


def test_new_items_come_first_without_set_element_order() -> None:
    """`kubectl patch pod -p '{"spec":{"containers":[{"name":"c",...}]}}'` puts c before the live containers,
    as Kubernetes does (and as its docs' patch-demo example shows)."""
    live = pod(containers=[{"name": "a"}, {"name": "b"}])
    out = strategic_merge_patch(live, {"spec": {"containers": [{"name": "c", "image": "z"}]}}, POD)
    assert names(out["spec"]["containers"]) == ["c", "a", "b"]
    # an item the patch also modifies anchors the order: new ones after it
    out = strategic_merge_patch(live, {"spec": {"containers": [{"name": "b", "image": "q"}, {"name": "c"}]}}, POD)
    assert names(out["spec"]["containers"]) == ["a", "b", "c"]


def test_set_element_order() -> None:
    live = pod(containers=[{"name": "a"}, {"name": "b"}, {"name": "c"}])
    patch = {
        "spec": {
            "$setElementOrder/containers": [{"name": "c"}, {"name": "a"}, {"name": "d"}, {"name": "b"}],
            "containers": [{"name": "d", "image": "new"}],
        }
    }
    assert names(strategic_merge_patch(live, patch, POD)["spec"]["containers"]) == ["c", "a", "d", "b"]
    # order only, no list in the patch
    patch = {"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}, {"name": "c"}]}}
    assert names(strategic_merge_patch(live, patch, POD)["spec"]["containers"]) == ["b", "a", "c"]
    # items not listed keep their place relative to the live order
    patch = {"spec": {"$setElementOrder/containers": [{"name": "c"}, {"name": "b"}]}}
    assert names(strategic_merge_patch(live, patch, POD)["spec"]["containers"]) == ["a", "c", "b"]


def test_set_element_order_must_agree_with_the_patch() -> None:
    live = pod(containers=[{"name": "a"}])
    with pytest.raises(PatchError) as e:
        strategic_merge_patch(
            live,
            {"spec": {"$setElementOrder/containers": [{"name": "a"}], "containers": [{"name": "z"}]}},
            POD,
        )
    assert e.value.status == 400 and "$setElementOrder/containers" in e.value.message
    with pytest.raises(PatchError):
        strategic_merge_patch(live, {"spec": {"$setElementOrder/containers": {"name": "a"}}}, POD)


def test_delete_and_replace_list_items() -> None:
    live = pod(containers=[{"name": "a"}, {"name": "b"}, {"name": "c"}])
    out = strategic_merge_patch(live, {"spec": {"containers": [{"name": "b", "$patch": "delete"}]}}, POD)
    assert names(out["spec"]["containers"]) == ["a", "c"]
    out = strategic_merge_patch(
        live, {"spec": {"containers": [{"name": "z", "image": "i"}, {"$patch": "replace"}]}}, POD
    )
    assert out["spec"]["containers"] == [{"name": "z", "image": "i"}]
    with pytest.raises(PatchError) as e:
        strategic_merge_patch(live, {"spec": {"containers": [{"$patch": "delete"}]}}, POD)
    assert e.value.status == 422
    with pytest.raises(PatchError) as e:
        strategic_merge_patch(live, {"spec": {"containers": [{"$patch": "frob", "name": "a"}]}}, POD)
    assert e.value.status == 400


def test_items_need_their_merge_key() -> None:
    with pytest.raises(PatchError) as e:
        strategic_merge_patch(pod(containers=[]), {"spec": {"containers": [{"image": "x"}]}}, POD)
    assert e.value.status == 422 and "'name'" in e.value.message and "spec.containers[0]" == e.value.field
    with pytest.raises(PatchError) as e:
        strategic_merge_patch(pod(containers=[]), {"spec": {"containers": ["x"]}}, POD)
    assert e.value.status == 422


def test_env_ports_mounts_volumes() -> None:
    live = pod(
        containers=[
            {
                "name": "a",
                "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                "ports": [{"containerPort": 80, "protocol": "TCP"}],
                "volumeMounts": [{"name": "v", "mountPath": "/data"}],
            }
        ],
        volumes=[{"name": "v", "emptyDir": {}}, {"name": "w", "configMap": {"name": "cm"}}],
    )
    patch = {
        "spec": {
            "containers": [
                {
                    "name": "a",
                    "env": [{"name": "B", "value": "3"}, {"name": "A", "$patch": "delete"}],
                    "ports": [{"containerPort": 80, "name": "http"}, {"containerPort": 443}],
                    "volumeMounts": [{"mountPath": "/data", "readOnly": True}],
                }
            ],
            "volumes": [
                {"name": "w", "$retainKeys": ["name", "secret"], "configMap": None, "secret": {"secretName": "s"}}
            ],
        }
    }
    c = strategic_merge_patch(live, patch, POD)["spec"]
    a = c["containers"][0]
    assert a["env"] == [{"name": "B", "value": "3"}]
    assert a["ports"] == [{"containerPort": 80, "protocol": "TCP", "name": "http"}, {"containerPort": 443}]
    assert a["volumeMounts"] == [{"name": "v", "mountPath": "/data", "readOnly": True}]
    assert c["volumes"] == [{"name": "v", "emptyDir": {}}, {"name": "w", "secret": {"secretName": "s"}}]


def test_lists_without_strategy_are_replaced() -> None:
    live = pod(
        containers=[{"name": "a", "args": ["1", "2"]}],
        tolerations=[{"key": "a", "operator": "Exists"}],
    )
    patch = {
        "spec": {"tolerations": [{"key": "b", "operator": "Exists"}], "containers": [{"name": "a", "args": ["3"]}]}
    }
    out = strategic_merge_patch(live, patch, POD)
    assert out["spec"]["tolerations"] == [{"key": "b", "operator": "Exists"}]
    assert out["spec"]["containers"][0]["args"] == ["3"]
    # Node taints carry no patch strategy in Kubernetes: kubectl taint sends the whole list
    node = {"spec": {"taints": [{"key": "a", "effect": "NoSchedule"}]}}
    out = strategic_merge_patch(
        node, {"spec": {"taints": [{"key": "b", "effect": "NoSchedule"}]}}, builtin_merge_keys("", "Node")
    )
    assert out["spec"]["taints"] == [{"key": "b", "effect": "NoSchedule"}]


def test_finalizers_are_a_set() -> None:
    live = {"metadata": {"finalizers": ["a", "b"]}}
    assert strategic_merge_patch(live, {"metadata": {"finalizers": ["c", "a"]}}, POD)["metadata"]["finalizers"] == [
        "c",
        "a",
        "b",
    ]
    patch = {
        "metadata": {
            "$deleteFromPrimitiveList/finalizers": ["a"],
            "$setElementOrder/finalizers": ["b", "c"],
            "finalizers": ["c"],
        }
    }
    assert strategic_merge_patch(live, patch, POD)["metadata"]["finalizers"] == ["b", "c"]
    # deleting from a list that is not there is a no-op
    assert strategic_merge_patch({}, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}, POD) == {
        "metadata": {}
    }
    with pytest.raises(PatchError):
        strategic_merge_patch(live, {"metadata": {"finalizers": [{"a": 1}]}}, POD)


def test_owner_references_by_uid_and_conditions_by_type() -> None:
    live = {
        "metadata": {"ownerReferences": [{"uid": "1", "name": "rs"}]},
        "status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}]},
    }
    patch = {
        "metadata": {"ownerReferences": [{"uid": "1", "controller": True}]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    out = strategic_merge_patch(live, patch, POD)
    assert out["metadata"]["ownerReferences"] == [{"uid": "1", "name": "rs", "controller": True}]
    assert out["status"]["conditions"] == [
        {"type": "Ready", "status": "True"},
        {"type": "PodScheduled", "status": "True"},
    ]


def test_pod_template_rules_apply_under_workloads() -> None:
    for group, kind, prefix in [
        ("apps", "Deployment", "spec.template.spec"),
        ("apps", "ReplicaSet", "spec.template.spec"),
        ("apps", "StatefulSet", "spec.template.spec"),
        ("apps", "DaemonSet", "spec.template.spec"),
        ("batch", "Job", "spec.template.spec"),
        ("batch", "CronJob", "spec.jobTemplate.spec.template.spec"),
        ("", "ReplicationController", "spec.template.spec"),
        ("", "PodTemplate", "template.spec"),
    ]:
        mk = builtin_merge_keys(group, kind)
        assert mk.rule(f"{prefix}.containers") == ListRule.keyed("name"), kind
        assert mk.rule(f"{prefix}.containers[].env") == ListRule.keyed("name"), kind
        assert mk.rule(f"{prefix}.tolerations") is None, kind


def test_builtin_rules_table() -> None:
    svc = builtin_merge_keys("", "Service")
    rule = svc.rule("spec.ports")
    assert rule is not None and rule.patch_merge_keys == ("port",) and rule.keys == ("port", "protocol")
    assert dict(rule.key_defaults) == {"protocol": "TCP"}
    assert POD.rule("spec.containers[].volumeMounts") == ListRule.keyed("mountPath")
    assert POD.rule("spec.imagePullSecrets") == ListRule.keyed("name")
    assert POD.rule("spec.hostAliases") == ListRule.keyed("ip")
    assert POD.rule("spec.containers[].ports").patch_merge_keys == ("containerPort",)  # type: ignore[union-attr]
    node = builtin_merge_keys("", "Node")
    assert node.rule("spec.podCIDRs") == ListRule.scalar_set()
    assert node.rule("spec.taints") is None
    addresses = node.rule("status.addresses")
    assert addresses is not None and addresses.merges and addresses.type == "atomic"
    for kind in ("Pod", "Node", "PersistentVolumeClaim", "Namespace"):
        assert builtin_merge_keys("", kind).rule("status.conditions") == ListRule.keyed("type"), kind
    assert builtin_merge_keys("", "Namespace").rule("spec.finalizers") is None
    unknown = builtin_merge_keys("example.com", "Widget")
    assert unknown.rule("metadata.finalizers") == ListRule.scalar_set()
    assert unknown.rule("spec.anything") is None


def test_merge_keys_paths_and_describe() -> None:
    mk = MergeKeys.build(
        {
            "spec.items": ListRule.keyed("id"),
            "spec.items[].tags": ListRule.scalar_set(),
            "spec.byName.*.list": ListRule.keyed("k"),
        },
        atomic=["spec.selector"],
    )
    assert mk.at(["spec", "items", "[]", "tags"]).list_rule == ListRule.scalar_set()
    assert mk.rule("spec.byName.anykey.list") == ListRule.keyed("k")
    assert mk.at("spec.selector").atomic
    assert mk.at("spec.nothing.here").list_rule is None
    assert mk.describe() == {
        "spec.items": "map[id] merge(id)",
        "spec.items[].tags": "set merge-set",
        "spec.byName.*.list": "map[k] merge(k)",
        "spec.selector": "atomic-object",
    }
    both = mk.merged(MergeKeys.build({"spec.items": ListRule.atomic(), "spec.other": ListRule.keyed("x")}))
    assert both.rule("spec.items") == ListRule.atomic()
    assert both.rule("spec.items[].tags") == ListRule.scalar_set()
    assert both.rule("spec.other") == ListRule.keyed("x")
    assert mk.rule("spec.other") is None  # merged() builds a new tree


def test_composite_merge_keys() -> None:
    mk = MergeKeys.build({"spec.tsc": ListRule.keyed("topologyKey", "whenUnsatisfiable")})
    live = {"spec": {"tsc": [{"topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "maxSkew": 1}]}}
    patch = {
        "spec": {
            "tsc": [
                {"topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "maxSkew": 2},
                {"topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway", "maxSkew": 3},
            ]
        }
    }
    out = strategic_merge_patch(live, patch, mk)["spec"]["tsc"]
    assert [(t["whenUnsatisfiable"], t["maxSkew"]) for t in out] == [("DoNotSchedule", 2), ("ScheduleAnyway", 3)]


# ---------------------------------------------------------------------------------------------------------
# patches kubectl really sends (captured from kubectl v1.32.4, see kubectl_session.json)


def _session() -> list[dict[str, Any]]:
    return json.loads((HERE / "kubectl_session.json").read_text())["requests"]


def test_kubectl_client_side_apply_three_way_patch() -> None:
    """`kubectl apply -f deploy2.yaml` over deploy1.yaml: $setElementOrder, $deleteFromPrimitiveList,
    $retainKeys on the strategy and on a volume, `$patch: delete` items, a new container."""
    requests = _session()
    created = copy.deepcopy(requests[0]["body"])  # what `kubectl apply -f deploy1.yaml` created
    patch = requests[1]["body"]
    assert requests[1]["contentType"] == "application/strategic-merge-patch+json"
    assert requests[1]["query"]["fieldManager"] == "kubectl-client-side-apply"
    out = strategic_merge_patch(created, patch, DEPLOY)
    last_applied = json.loads(out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"])
    assert out["metadata"]["finalizers"] == ["example.com/b", "example.com/c"]
    assert out["metadata"]["labels"] == {"app": "web", "tier": "front"}
    spec = out["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {"type": "Recreate"}
    pod_spec = spec["template"]["spec"]
    assert pod_spec == last_applied["spec"]["template"]["spec"]
    assert names(pod_spec["containers"]) == ["nginx", "sidecar"]
    assert pod_spec["containers"][0]["env"] == [{"name": "A", "value": "1"}, {"name": "C", "value": "3"}]
    assert pod_spec["containers"][0]["ports"] == [{"containerPort": 80}, {"containerPort": 443}]
    assert pod_spec["volumes"] == [{"name": "cfg", "secret": {"secretName": "cfg"}}]


def test_kubectl_patch_and_edit_patches() -> None:
    requests = _session()
    live = strategic_merge_patch(requests[0]["body"], requests[1]["body"], DEPLOY)
    # kubectl patch (strategic by default for built-ins) adding a container: it goes first
    live = strategic_merge_patch(live, requests[3]["body"], DEPLOY)
    assert names(live["spec"]["template"]["spec"]["containers"]) == ["debug", "nginx", "sidecar"]
    # kubectl edit sends a two-way patch with $setElementOrder for the list it touched
    edit = requests[4]
    assert edit["query"]["fieldManager"] == "kubectl-edit"
    assert "$setElementOrder/containers" in edit["body"]["spec"]["template"]["spec"]
    live = strategic_merge_patch(live, edit["body"], DEPLOY)
    containers = live["spec"]["template"]["spec"]["containers"]
    assert names(containers) == ["debug", "nginx", "sidecar"]
    assert containers[2] == {"image": "envoy:v2", "name": "sidecar"}


# ---------------------------------------------------------------------------------------------------------
# CRDs


def _crd_schema(kind: str) -> dict[str, Any]:
    path = REPO / "virtplane" / "api" / "data" / "crds.json"
    if not path.exists():
        pytest.skip("crds.json not generated")
    for crd in json.loads(path.read_text()):
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v.get("storage", True))
            return version["schema"]["openAPIV3Schema"]
    pytest.skip(f"no {kind} CRD")


def test_merge_keys_from_virtual_machine_crd() -> None:
    mk = merge_keys_from_schema(_crd_schema("VirtualMachine"))
    vmi = "spec.template.spec"
    # KubeVirt's schema marks no list type on disks/interfaces/volumes: atomic, replaced
    assert mk.rule(f"{vmi}.domain.devices.disks") is None
    assert mk.rule(f"{vmi}.volumes") is None
    assert mk.rule(f"{vmi}.accessCredentials") == ListRule.atomic()
    assert mk.rule(f"{vmi}.resourceClaims") == ListRule.keyed("name")
    rule = mk.rule(f"{vmi}.topologySpreadConstraints")
    assert rule is not None and rule.keys == ("topologyKey", "whenUnsatisfiable")
    # metadata is `type: object` in CRDs; ObjectMeta's rules still apply
    assert mk.rule("metadata.finalizers") == ListRule.scalar_set()
    assert mk.rule("metadata.ownerReferences") == ListRule.keyed("uid")

    vm = {
        "metadata": {"finalizers": ["a"]},
        "spec": {"template": {"spec": {"domain": {"devices": {"disks": [{"name": "root"}, {"name": "ci"}]}}}}},
    }
    patch = {
        "metadata": {"finalizers": ["b"]},
        "spec": {"template": {"spec": {"domain": {"devices": {"disks": [{"name": "root", "cache": "none"}]}}}}},
    }
    out = strategic_merge_patch(vm, patch, mk)
    assert out["metadata"]["finalizers"] == ["b", "a"]
    assert out["spec"]["template"]["spec"]["domain"]["devices"]["disks"] == [{"name": "root", "cache": "none"}]


def test_merge_keys_from_swagger_with_refs() -> None:
    path = Path("/work/shared/api-specs/kubevirt-swagger.json")
    if not path.exists():
        pytest.skip("no KubeVirt swagger")
    swagger = json.loads(path.read_text())
    mk = merge_keys_from_schema({"$ref": "#/definitions/v1.VirtualMachine"}, swagger["definitions"])
    vmi = "spec.template.spec"
    assert mk.rule(f"{vmi}.topologySpreadConstraints") == ListRule.keyed(
        "topologyKey", "whenUnsatisfiable", patch_key="topologyKey"
    )
    assert mk.rule(f"{vmi}.utilityVolumes") == ListRule.keyed("name")
    assert mk.rule(f"{vmi}.domain.devices.disks") is None
    assert mk.rule("metadata.ownerReferences") == ListRule.keyed("uid")
    assert mk.rule("metadata.finalizers") == ListRule.scalar_set()


def test_merge_keys_from_schema_markers() -> None:
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "ports": {
                        "type": "array",
                        "x-kubernetes-list-type": "map",
                        "x-kubernetes-list-map-keys": ["port", "protocol"],
                        "items": {"type": "object", "properties": {"protocol": {"type": "string", "default": "TCP"}}},
                    },
                    "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                    "legacy": {
                        "type": "array",
                        "x-kubernetes-patch-strategy": "merge",
                        "x-kubernetes-patch-merge-key": "id",
                    },
                    "selector": {"type": "object", "x-kubernetes-map-type": "atomic"},
                    "byZone": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "array",
                            "x-kubernetes-list-type": "map",
                            "x-kubernetes-list-map-keys": ["name"],
                        },
                    },
                },
            }
        },
    }
    mk = merge_keys_from_schema(schema)
    ports = mk.rule("spec.ports")
    assert ports is not None and ports.keys == ("port", "protocol") and dict(ports.key_defaults) == {"protocol": "TCP"}
    assert mk.rule("spec.tags") == ListRule.scalar_set()
    assert mk.rule("spec.legacy") == ListRule.keyed("id", ssa=False)
    assert mk.at("spec.selector").atomic
    assert mk.rule("spec.byZone.eu-west.x") is None
    assert mk.rule("spec.byZone.eu-west") == ListRule.keyed("name")
    assert mk.at("spec.byZone").is_map_entry("eu-west")
    # recursion through $ref terminates
    defs = {
        "Node": {
            "type": "object",
            "properties": {"children": {"type": "array", "items": {"$ref": "#/definitions/Node"}}},
        }
    }
    rec = merge_keys_from_schema({"$ref": "#/definitions/Node"}, defs)
    assert rec.at("children[].children[].children").list_rule is None
