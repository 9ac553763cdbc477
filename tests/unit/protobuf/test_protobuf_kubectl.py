"""Real kubectl request bodies, captured by a throwaway HTTP endpoint, decoded by virtplane.api.protobuf.

The oracle is kubectl itself: `kubectl create ... --dry-run=client -o json` prints, through Go's JSON
encoder, the same Go object the real command sends as protobuf. For commands that read an object
first (`kubectl debug --copy-to`, `kubectl certificate approve`, `kubectl create job --from`), the fake
server serves a rich object as JSON, kubectl decodes it into Go structs and sends it back as protobuf:
decoding must give back what was served (plus kubectl's own, known changes).

kubectl >= 1.32 sends protobuf from its typed clientsets; older ones send JSON, so only those are run.
"""

from __future__ import annotations

import base64
import copy
import json
import pathlib
import re
from typing import TYPE_CHECKING, Any

import pytest

from virtplane.api.protobuf import CONTENT_TYPE, decode_k8s_protobuf

if TYPE_CHECKING:  # conftest is not importable as a module; the fixtures come from it
    from conftest import FakeAPIServer, Recorded

# `kubectl` is parametrized by conftest over the kubectl binaries that send protobuf (none: skipped).

# `kubectl create ...` commands (typed clientsets: protobuf). "{tmp}" is a directory with a binary file.
CREATE_CASES: dict[str, list[str]] = {
    "namespace": ["create", "namespace", "foo"],
    "configmap": ["create", "configmap", "c", "--from-literal=a=b", "--from-literal=n=1"],
    "secret-generic": ["create", "secret", "generic", "s", "--from-literal=k=v", "--from-file=bin={tmp}/bin"],
    "secret-docker-registry": [
        "create", "secret", "docker-registry", "reg", "--docker-server=r.io", "--docker-username=u",
        "--docker-password=p",
    ],
    "deployment": ["create", "deployment", "d", "--image=busybox", "--replicas=2", "--port=8080"],
    "deployment-zero-replicas": ["create", "deployment", "z", "--image=busybox", "--replicas=0"],
    "service-clusterip": ["create", "service", "clusterip", "svc", "--tcp=80:8080", "--tcp=443:https"],
    "service-nodeport": ["create", "service", "nodeport", "np", "--tcp=80:8080", "--node-port=30080"],
    "service-externalname": ["create", "service", "externalname", "ext", "--external-name=example.com"],
    "job": ["create", "job", "j", "--image=busybox", "--", "echo", "hi"],
    "cronjob": ["create", "cronjob", "cj", "--image=busybox", "--schedule=*/1 * * * *", "--", "date"],
    "quota": ["create", "quota", "q", "--hard=cpu=1,memory=1Gi,pods=10", "--scopes=BestEffort"],
    "pdb-min-available": ["create", "pdb", "pdb", "--selector=app=x", "--min-available=50%"],
    "pdb-max-unavailable": ["create", "pdb", "pdb2", "--selector=app=x", "--max-unavailable=1"],
    "ingress": [
        "create", "ingress", "ing", "--rule=foo.com/bar=svc:8080", "--rule=foo.com/*=svc2:http", "--class=nginx",
        "--default-backend=def:80",
    ],
    "role": ["create", "role", "r", "--verb=get,list", "--resource=pods,deployments.apps", "--resource-name=x"],
    "clusterrole": ["create", "clusterrole", "cr", "--verb=get", "--non-resource-url=/logs/*"],
    "rolebinding": ["create", "rolebinding", "rb", "--role=r", "--group=g"],
    "clusterrolebinding": [
        "create", "clusterrolebinding", "crb", "--clusterrole=view", "--user=alice", "--serviceaccount=default:sa",
    ],
    "serviceaccount": ["create", "serviceaccount", "sa"],
    "priorityclass": ["create", "priorityclass", "pc", "--value=1000", "--description=x", "--preemption-policy=Never"],
}


def body_json(rec: Recorded) -> dict[str, Any]:
    if rec.content_type == CONTENT_TYPE:
        return decode_k8s_protobuf(rec.body)
    return json.loads(rec.body)


def normalize(value: Any) -> Any:
    """Modulo empty values: Go's JSON writes non-omitempty zero fields (`creationTimestamp: null`,
    `status: {}`, a PodDisruptionBudget's `currentHealthy: 0`); the decoder leaves non-pointer zero
    fields out. Pointer zeros are checked separately (test_pointer_zero_values_are_kept)."""
    if isinstance(value, dict):
        out = {k: normalize(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, "", {}, [], 0, False) or v is True}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def _with_flags(args: list[str], *flags: str) -> list[str]:
    # Flags go before `--`, after which everything is the container's command.
    i = args.index("--") if "--" in args else len(args)
    return [*args[:i], *flags, *args[i:]]


def _only_write(fake: FakeAPIServer) -> Recorded:
    writes = fake.writes()
    assert len(writes) == 1, [(w.method, w.path) for w in writes]
    return writes[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("files")
    (d / "bin").write_bytes(b"\x00\xff\xfe binary \x80")
    return d


@pytest.mark.parametrize("case", CREATE_CASES)
def test_create_matches_client_dry_run(fake: FakeAPIServer, files: pathlib.Path, kubectl: str, case: str) -> None:
    args = [a.replace("{tmp}", str(files)) for a in CREATE_CASES[case]]
    expected = json.loads(fake.kubectl(kubectl, *_with_flags(args, "--dry-run=client", "-o", "json")).stdout)
    fake.reset()
    fake.kubectl(kubectl, *args)
    rec = _only_write(fake)
    assert rec.content_type == CONTENT_TYPE
    assert rec.body.startswith(b"k8s\x00")
    got = decode_k8s_protobuf(rec.body)
    assert (got["apiVersion"], got["kind"]) == (expected["apiVersion"], expected["kind"])
    assert normalize(got) == normalize(expected)


def test_pointer_zero_values_are_kept(fake: FakeAPIServer, kubectl: str) -> None:
    # `replicas` is *int32: 0 means "no pods", absent means "default to 1" - it must survive.
    fake.kubectl(kubectl, "create", "deployment", "z", "--image=busybox", "--replicas=0")
    got = decode_k8s_protobuf(_only_write(fake).body)
    assert got["spec"]["replicas"] == 0


def test_secret_bytes_are_base64(fake: FakeAPIServer, files: pathlib.Path, kubectl: str) -> None:
    fake.kubectl(kubectl, "create", "secret", "generic", "s", "--from-literal=k=v", f"--from-file=bin={files}/bin")
    got = decode_k8s_protobuf(_only_write(fake).body)
    assert got["data"] == {"bin": base64.b64encode((files / "bin").read_bytes()).decode(), "k": "dg=="}


def test_service_target_ports_are_int_or_string(fake: FakeAPIServer, kubectl: str) -> None:
    fake.kubectl(kubectl, "create", "service", "clusterip", "svc", "--tcp=80:8080", "--tcp=443:https")
    got = decode_k8s_protobuf(_only_write(fake).body)
    ports = {p["port"]: p for p in got["spec"]["ports"]}
    assert ports[80]["targetPort"] == 8080
    assert ports[443]["targetPort"] == "https"
    assert ports[80]["protocol"] == "TCP"


def test_create_token(fake: FakeAPIServer, kubectl: str) -> None:
    fake.replies[("POST", "/api/v1/namespaces/default/serviceaccounts/sa/token")] = {
        "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1", "spec": {},
        "status": {"token": "the-token", "expirationTimestamp": "2030-01-01T00:00:00Z"},
    }
    out = fake.kubectl(
        kubectl, "create", "token", "sa", "--duration=10m", "--audience=a1", "--audience=a2",
        "--bound-object-kind=Pod", "--bound-object-name=p1", "--bound-object-uid=1234-uid",
    ).stdout
    assert out.strip() == "the-token"
    rec = _only_write(fake)
    assert rec.content_type == CONTENT_TYPE
    assert decode_k8s_protobuf(rec.body) == {
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "spec": {
            "audiences": ["a1", "a2"],
            "expirationSeconds": 600,
            # `uID` in protobuf, `uid` in JSON: the table carries the Go JSON names.
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p1", "uid": "1234-uid"},
        },
    }


def test_drain_eviction(fake: FakeAPIServer, kubectl: str) -> None:
    node = {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n1"}}
    pod = {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": "p1", "namespace": "default", "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u1", "controller": True}]},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]},
    }
    fake.replies[("GET", "/api/v1/nodes/n1")] = node
    fake.replies[("PATCH", "/api/v1/nodes/n1")] = {**node, "spec": {"unschedulable": True}}
    fake.replies[("GET", "/api/v1/pods")] = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod]}
    fake.replies[("POST", "/api/v1/namespaces/default/pods/p1/eviction")] = {
        "kind": "Status", "apiVersion": "v1", "status": "Success"}
    fake.kubectl(kubectl, "drain", "n1", "--grace-period=7", "--timeout=20s")
    rec = _only_write(fake)
    # kubectl 1.32/1.33's drain helper still sends JSON; whichever it sends must read the same.
    assert normalize(body_json(rec)) == {
        "kind": "Eviction", "apiVersion": "policy/v1",
        "metadata": {"name": "p1", "namespace": "default"},
        "deleteOptions": {"gracePeriodSeconds": 7},
    }


RICH_POD: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {
        "name": "web", "namespace": "default", "labels": {"app": "web"}, "annotations": {"note": "x"},
        "creationTimestamp": "2026-01-02T03:04:05Z", "uid": "11111111-2222-3333-4444-555555555555",
    },
    "spec": {
        "volumes": [
            {"name": "data", "emptyDir": {}},
            {"name": "cfg", "configMap": {"name": "cm", "items": [{"key": "a", "path": "a.txt"}], "defaultMode": 420}},
            {"name": "sec", "secret": {"secretName": "sec", "optional": False}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            {"name": "proj", "projected": {"sources": [
                {"serviceAccountToken": {"audience": "api", "expirationSeconds": 3600, "path": "token"}},
                {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
            ]}},
        ],
        "initContainers": [{"name": "init", "image": "alpine", "command": ["sh", "-c", "true"]}],
        "containers": [{
            "name": "app", "image": "nginx:1.27", "args": ["-g", "daemon off;"],
            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
            "envFrom": [{"prefix": "CM_", "configMapRef": {"name": "cm"}}],
            "env": [
                {"name": "A", "value": "1"},
                {"name": "S", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "k", "optional": True}}},
                {"name": "C", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
                {"name": "F", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                {"name": "R", "valueFrom": {"resourceFieldRef": {
                    "containerName": "app", "resource": "limits.memory", "divisor": "1Mi"}}},
            ],
            "resources": {
                "limits": {"cpu": "500m", "memory": "128Mi", "nvidia.com/gpu": "1"},
                "requests": {"cpu": "250m", "memory": "64Mi"},
            },
            "volumeMounts": [
                {"name": "data", "mountPath": "/data"}, {"name": "cfg", "readOnly": True, "mountPath": "/cfg"},
            ],
            "livenessProbe": {"tcpSocket": {"port": 8080}, "failureThreshold": 5, "terminationGracePeriodSeconds": 30},
            "readinessProbe": {
                "httpGet": {"path": "/healthz", "port": "http", "httpHeaders": [{"name": "X", "value": "y"}]},
                "initialDelaySeconds": 3, "periodSeconds": 10,
            },
            "startupProbe": {"exec": {"command": ["cat", "/tmp/ok"]}},
            "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
            "imagePullPolicy": "IfNotPresent",
            "securityContext": {
                "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
            },
        }],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 0,
        "dnsPolicy": "ClusterFirst",
        "nodeSelector": {"disk": "ssd"},
        "serviceAccountName": "default",
        "automountServiceAccountToken": False,
        "nodeName": "n1",
        "securityContext": {
            "runAsUser": 0, "runAsNonRoot": False, "fsGroup": 2000,
            "sysctls": [{"name": "net.ipv4.ip_local_port_range", "value": "1024 65535"}],
        },
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]}},
            "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {
                    "labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}}]},
        },
        "schedulerName": "default-scheduler",
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                         "tolerationSeconds": 300}],
        "hostAliases": [{"ip": "10.0.0.1", "hostnames": ["a.local", "b.local"]}],
        "priority": 0,
        "dnsConfig": {"nameservers": ["1.1.1.1"], "options": [{"name": "ndots", "value": "2"}]},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": {"app": "web"}}}],
    },
    "status": {"phase": "Running", "startTime": "2026-01-02T03:04:06Z"},
}


def test_debug_copy_round_trips_a_rich_pod(fake: FakeAPIServer, kubectl: str) -> None:
    """Served as JSON, decoded by kubectl into a Go Pod, copied and sent back as protobuf.

    Exercises inline embedded structs (Volume.volumeSource, Probe.handler, the selectors'
    LocalObjectReference), Quantity maps, IntOrString ports (named and numeric), pointer zeros
    (runAsUser: 0, automountServiceAccountToken: false, optional: false) and field order.
    """
    fake.replies[("GET", "/api/v1/namespaces/default/pods/web")] = RICH_POD
    fake.kubectl(
        kubectl, "debug", "web", "--copy-to=web-copy", "--attach=false", "--set-image=*=busybox:1.36",
        "--share-processes=false", "--keep-labels", "--keep-annotations", "--keep-liveness", "--keep-readiness",
        "--keep-startup", "--same-node", "--profile=legacy",
    )
    rec = _only_write(fake)
    assert rec.content_type == CONTENT_TYPE
    got = decode_k8s_protobuf(rec.body)

    # What `kubectl debug --copy-to` does to the pod (k8s.io/kubectl/pkg/cmd/debug).
    expected = copy.deepcopy(RICH_POD)
    del expected["status"]
    expected["metadata"] = {"name": "web-copy", "namespace": "default", "labels": {"app": "web"},
                            "annotations": {"note": "x"}}
    for c in expected["spec"]["containers"]:  # `*` covers the containers, not the init containers
        c["image"] = "busybox:1.36"
    expected["spec"]["shareProcessNamespace"] = False
    assert got == expected
    # Go's field order, not the wire's (Container.envFrom is field 19 but comes before env).
    assert list(got["spec"]["containers"][0]) == list(expected["spec"]["containers"][0])


CSR: dict[str, Any] = {
    "kind": "CertificateSigningRequest", "apiVersion": "certificates.k8s.io/v1",
    "metadata": {
        "name": "csr1", "uid": "u-1", "resourceVersion": "7", "creationTimestamp": "2026-01-02T03:04:05Z",
        "managedFields": [{
            "manager": "kubectl", "operation": "Update", "apiVersion": "certificates.k8s.io/v1",
            "time": "2026-01-02T03:04:05Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:request": {}}},
        }],
    },
    "spec": {
        "request": base64.b64encode(b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n")
        .decode(),
        "signerName": "kubernetes.io/kube-apiserver-client",
        "expirationSeconds": 86400,
        "usages": ["client auth", "digital signature"],
        "username": "alice", "uid": "alice-uid", "groups": ["dev", "system:authenticated"],
        "extra": {"empty": [], "scopes": ["a", "b"]},
    },
    "status": {"conditions": [{
        "type": "Pending", "status": "True", "reason": "r", "message": "m",
        "lastUpdateTime": "2026-01-02T03:04:05Z", "lastTransitionTime": "2026-01-02T03:04:06Z",
    }]},
}


def test_certificate_approve_round_trips_times_fields_v1_and_extra(fake: FakeAPIServer, kubectl: str) -> None:
    """A PUT (not only POSTs are protobuf): Time, FieldsV1, bytes and map<string, ExtraValue>."""
    fake.replies[("GET", "/apis/certificates.k8s.io/v1/certificatesigningrequests/csr1")] = CSR
    fake.kubectl(kubectl, "certificate", "approve", "csr1")
    rec = _only_write(fake)
    assert (rec.method, rec.path, rec.content_type) == (
        "PUT", "/apis/certificates.k8s.io/v1/certificatesigningrequests/csr1/approval", CONTENT_TYPE)
    got = decode_k8s_protobuf(rec.body)
    approved = got["status"]["conditions"].pop()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", approved.pop("lastUpdateTime"))
    assert approved == {"type": "Approved", "status": "True", "reason": "KubectlApprove",
                        "message": "This CSR was approved by kubectl certificate approve."}
    assert got == CSR


def test_create_job_from_cronjob(fake: FakeAPIServer, kubectl: str) -> None:
    fake.replies[("GET", "/apis/batch/v1/namespaces/default/cronjobs/cj")] = {
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": "cj", "namespace": "default", "uid": "cj-uid"},
        "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"metadata": {"labels": {"x": "y"}}, "spec": {
            "backoffLimit": 0, "activeDeadlineSeconds": 600, "template": {"spec": {
                "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "command": ["date"]}]}}}}},
    }
    fake.kubectl(kubectl, "create", "job", "j2", "--from=cronjob/cj")
    rec = _only_write(fake)
    assert rec.content_type == CONTENT_TYPE
    assert decode_k8s_protobuf(rec.body) == {
        "kind": "Job", "apiVersion": "batch/v1",
        "metadata": {
            "name": "j2", "labels": {"x": "y"}, "annotations": {"cronjob.kubernetes.io/instantiate": "manual"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "cj", "uid": "cj-uid",
                                 "controller": True}],
        },
        "spec": {"activeDeadlineSeconds": 600, "backoffLimit": 0, "template": {"spec": {
            "containers": [{"name": "c", "image": "busybox", "command": ["date"]}], "restartPolicy": "Never"}}},
    }


def test_run_sends_json(fake: FakeAPIServer, kubectl: str) -> None:
    """`kubectl run` goes through the dynamic resource helper: JSON, not protobuf (kubectl 1.32/1.33)."""
    args = ["run", "p", "--image=busybox", "--restart=Never", "--labels=a=b", "--env=X=1", "--", "sleep", "1"]
    expected = json.loads(fake.kubectl(kubectl, *_with_flags(args, "--dry-run=client", "-o", "json")).stdout)
    fake.reset()
    fake.kubectl(kubectl, *args)
    assert normalize(body_json(_only_write(fake))) == normalize(expected)
