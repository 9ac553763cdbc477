"""Pod spec → runc process/env/volumes, whiteout conversion, and the CRI log shim's line format."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from virtplane.node.pods import images, spec
from virtplane.node.pods.runtime import cgroup_resources, oci_spec, ptp_conflist

POD = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "a"}, "annotations": {"x": "y"}},
       "spec": {"nodeName": "n1", "serviceAccountName": "sa"}}  # fmt: skip
OBJS = {
    ("configmaps", "cm"): {"data": {"k1": "v1", "k2": "v2"}},
    ("secrets", "sec"): {"data": {"pw": base64.b64encode(b"s3").decode()}},
}


def lookup(kind: str, name: str) -> dict | None:
    return OBJS.get((kind, name))


def test_expand_only_known_and_escape() -> None:
    env = {"A": "1"}
    assert spec.expand("$(A)-$(B)-$$(A)", env) == "1-$(B)-$(A)"


def test_env_order_sources_and_expansion() -> None:
    c = {"envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}, {"secretRef": {"name": "sec"}}],
         "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                 {"name": "X", "value": "$(POD)-$(LATER)"}, {"name": "LATER", "value": "l"},
                 {"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                 {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k2"}}},
                 {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}  # fmt: skip
    env = dict(e.split("=", 1) for e in spec.container_env(POD, c, ["PATH=/bin", "IMG=1"], lookup, "10.0.0.1",
                                                            "10.88.0.2"))  # fmt: skip
    assert env["PATH"] == "/bin" and env["IMG"] == "1"
    assert env["CM_k1"] == "v1" and env["pw"] == "s3"
    assert env["X"] == "p-$(LATER)"  # only variables defined before are expanded
    assert env["L"] == "a" and env["K"] == "v2" and env["IP"] == "10.88.0.2"


def test_env_missing_refs() -> None:
    with pytest.raises(spec.ContainerConfigError, match='configmap "nope" not found'):
        spec.container_env(POD, {"envFrom": [{"configMapRef": {"name": "nope"}}]}, [], lookup, "", "")
    with pytest.raises(spec.ContainerConfigError, match="couldn't find key zz"):
        spec.container_env(POD, {"env": [{"name": "Z", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "zz"}}}]},
                           [], lookup, "", "")  # fmt: skip
    env = spec.container_env(POD, {"env": [{"name": "Z", "valueFrom": {
        "secretKeyRef": {"name": "sec", "key": "zz", "optional": True}}}]}, [], lookup, "", "")
    assert not any(e.startswith("Z=") for e in env)


@pytest.mark.parametrize(("container", "argv"), [
    ({}, ["/ep", "cmd"]),
    ({"command": ["c"]}, ["c"]),
    ({"args": ["a"]}, ["/ep", "a"]),
    ({"command": ["c"], "args": ["$(V)"]}, ["c", "v"]),
])  # fmt: skip
def test_process_command_semantics(container: dict, argv: list[str]) -> None:
    p = spec.process(POD, container, {"Entrypoint": ["/ep"], "Cmd": ["cmd"], "User": "1000:2000"}, ["V=v"])
    assert p["args"] == argv
    assert p["user"] == {"uid": 1000, "gid": 2000}
    assert p["cwd"] == "/"


def test_volumes_on_disk(tmp_path: Path) -> None:
    pod = {**POD, "spec": {**POD["spec"], "volumes": [
        {"name": "e", "emptyDir": {}},
        {"name": "c", "configMap": {"name": "cm", "items": [{"key": "k1", "path": "sub/one"}], "defaultMode": 0o600}},
        {"name": "s", "secret": {"secretName": "sec"}},
        {"name": "d", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
    ]}}  # fmt: skip
    vols = spec.prepare_volumes(pod, tmp_path, lookup, "", "")
    assert (vols["c"] / "sub" / "one").read_text() == "v1"
    assert not (vols["c"] / "k2").exists()
    assert stat.S_IMODE((vols["c"] / "sub" / "one").stat().st_mode) == 0o600
    assert (vols["s"] / "pw").read_bytes() == b"s3"
    assert (vols["d"] / "labels").read_text() == 'app="a"'
    m = spec.mounts({"volumeMounts": [{"name": "s", "mountPath": "/s", "readOnly": True}]}, vols)
    assert m == [{"destination": "/s", "type": "bind", "source": str(vols["s"]), "options": ["rbind", "ro"]}]
    with pytest.raises(spec.ContainerConfigError):
        spec.prepare_volumes({**POD, "spec": {"volumes": [{"name": "x", "secret": {"secretName": "gone"}}]}},
                             tmp_path, lookup, "", "")  # fmt: skip


def test_pvc_volume_needs_a_bound_claim(tmp_path: Path) -> None:
    objs = {("persistentvolumeclaims", "c"): {"spec": {"volumeName": "pv1"}, "status": {"phase": "Bound"}},
            ("persistentvolumes", "pv1"): {"spec": {"local": {"path": str(tmp_path)}}},
            ("persistentvolumeclaims", "pending"): {"spec": {}, "status": {"phase": "Pending"}}}  # fmt: skip
    pod = {**POD, "spec": {"volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "c"}}]}}
    assert spec.prepare_volumes(pod, tmp_path / "vols", lambda k, n: objs.get((k, n)), "", "") == {"v": tmp_path}
    pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "pending"
    with pytest.raises(spec.ContainerConfigError, match="not bound"):
        spec.prepare_volumes(pod, tmp_path / "vols", lambda k, n: objs.get((k, n)), "", "")


def test_limits_and_oci_spec() -> None:
    lim = spec.limits({"resources": {"limits": {"memory": "64Mi", "cpu": "500m"}}})
    assert lim == {"memory": 64 << 20, "cpu": 500}
    res = cgroup_resources(lim, spec.cpu_request({"resources": {"limits": {"cpu": "500m"}}}))
    assert res == {"memory": {"limit": 64 << 20}, "cpu": {"shares": 512, "quota": 50000, "period": 100000}}
    # the request weighs (1024 shares a core), the limit caps; no request: the kubelet's minimum of 2 shares
    assert spec.cpu_request({"resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": "1"}}}) == 250
    assert cgroup_resources({}, 250) == {"cpu": {"shares": 256}}
    assert cgroup_resources({}, spec.cpu_request({})) == {"cpu": {"shares": 2}}
    s = oci_spec(process={"args": ["sh"]}, mounts=[], netns="/var/run/netns/x", hostname="h", cgroups_path="/c",
                 resources=res)  # fmt: skip
    assert {"type": "network", "path": "/var/run/netns/x"} in s["linux"]["namespaces"]
    assert s["linux"]["resources"]["memory"] == {"limit": 64 << 20}
    assert s["process"]["args"] == ["sh"] and "rlimits" not in s["process"]


def test_ptp_chain() -> None:
    conf = ptp_conflist("10.88.7.0/24", Path("/x"))
    assert conf["plugins"][0]["type"] == "ptp"
    assert conf["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.88.7.0/24"}]]


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod and trusted.* xattrs need root")
def test_whiteouts_become_overlay_whiteouts(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".wh..wh..opq").write_text("")
    (tmp_path / ".wh.gone").write_text("")
    images.convert_whiteouts(tmp_path)
    st = (tmp_path / "gone").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(tmp_path / "d", "trusted.overlay.opaque") == b"y"
    assert not (tmp_path / ".wh.gone").exists() and not (tmp_path / "d" / ".wh..wh..opq").exists()


def test_default_pull_policy() -> None:
    assert images.default_pull_policy("reg:5000/a/b") == "Always"
    assert images.default_pull_policy("reg:5000/a/b:latest") == "Always"
    assert images.default_pull_policy("reg:5000/a/b:1") == "IfNotPresent"


def test_pod_cgroup_sums_requests_and_caps_only_when_every_container_is_capped() -> None:
    from virtplane.node.pods.controller import pod_cgroup_resources

    def pod(*resources: dict, inits: tuple[dict, ...] = ()) -> dict:
        return {"spec": {"containers": [{"name": f"c{i}", "resources": r} for i, r in enumerate(resources)],
                         "initContainers": [{"name": f"i{i}", "resources": r} for i, r in enumerate(inits)]}}

    capped = {"requests": {"cpu": "250m"}, "limits": {"cpu": "500m", "memory": "64Mi"}}
    assert pod_cgroup_resources(pod(capped, capped)) == {
        "cpu": {"shares": 512, "quota": 100000, "period": 100000}, "memory": {"limit": 128 << 20}}
    # one container without limits: the pod is weighed by its requests but not capped
    assert pod_cgroup_resources(pod(capped, {})) == {"cpu": {"shares": 256}}
    assert pod_cgroup_resources(pod({}, {})) == {"cpu": {"shares": 2}}
    # a larger init container counts instead of the sum (it runs alone)
    big_init = {"requests": {"cpu": "2"}, "limits": {"cpu": "2", "memory": "1Gi"}}
    assert pod_cgroup_resources(pod(capped, inits=(big_init,))) == {
        "cpu": {"shares": 2048, "quota": 200000, "period": 100000}, "memory": {"limit": 1 << 30}}
