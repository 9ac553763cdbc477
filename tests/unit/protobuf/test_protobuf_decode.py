"""virtplane.api.protobuf on hand-encoded bodies: special types, wire-format corners, errors, the table.

Field numbers here are written by hand from Kubernetes' generated.proto files, independently of the
generated table, so a table that disagrees with Kubernetes fails these tests too.
"""

from __future__ import annotations

import base64
import json

import pytest

from virtplane.api import protobuf
from virtplane.api.protobuf import (
    ProtobufDecodeError,
    decode_k8s_protobuf,
    decode_message,
    message_type_for,
    schema,
)

META = "k8s.io.apimachinery.pkg.apis.meta.v1"

# --- a minimal protobuf encoder (for building test bodies only) ----------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers are sign-extended to 10 bytes, as Go writes them
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def vi(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def ld(number: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def entry(number: int, key: str, value: bytes | str) -> bytes:
    return ld(number, ld(1, key) + ld(2, value))


def envelope(api_version: str, kind: str, raw: bytes, content_type: str = "", encoding: str = "") -> bytes:
    # runtime.Unknown as client-go writes it: empty contentEncoding/contentType are still present.
    return b"k8s\x00" + ld(1, ld(1, api_version) + ld(2, kind)) + ld(2, raw) + ld(3, encoding) + ld(4, content_type)


def meta(name: str, namespace: str = "") -> bytes:
    # ObjectMeta as gogo marshals it: every non-pointer field, even empty, and an empty creationTimestamp.
    return ld(1, ld(1, name) + ld(2, "") + ld(3, namespace) + ld(4, "") + ld(5, "") + ld(6, "") + vi(7, 0)
              + ld(8, b""))


def timestamp(seconds: int, nanos: int = 0) -> bytes:
    return vi(1, seconds) + vi(2, nanos)


# --- objects -------------------------------------------------------------------------------------


def test_namespace() -> None:
    body = envelope("v1", "Namespace", meta("foo") + ld(2, b"") + ld(3, ld(1, "")))
    assert decode_k8s_protobuf(body) == {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "foo"}}


def test_configmap_and_secret_maps() -> None:
    raw = meta("c", "ns") + entry(2, "b", "2") + entry(2, "a", "1") + entry(3, "bin", b"\x00\xff")
    body = envelope("v1", "ConfigMap", raw)
    assert decode_k8s_protobuf(body) == {
        "kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "c", "namespace": "ns"},
        "data": {"a": "1", "b": "2"}, "binaryData": {"bin": "AP8="},
    }
    secret = envelope("v1", "Secret", meta("s") + entry(2, "k", b"v\x00") + ld(3, "Opaque") + vi(5, 0))
    assert decode_k8s_protobuf(secret) == {
        "kind": "Secret", "apiVersion": "v1", "metadata": {"name": "s"},
        "immutable": False,  # *bool: a present false is kept
        "data": {"k": base64.b64encode(b"v\x00").decode()}, "type": "Opaque",
    }


def test_map_entry_without_value_is_the_zero_value() -> None:
    body = envelope("v1", "ConfigMap", meta("c") + ld(2, ld(1, "empty")))
    assert decode_k8s_protobuf(body)["data"] == {"empty": ""}


def test_service_ports_int_or_string() -> None:
    def port(name: str, number: int, target: bytes) -> bytes:
        return ld(1, ld(1, name) + ld(2, "TCP") + vi(3, number) + ld(4, target) + vi(5, 0))

    spec = port("http", 80, vi(1, 0) + vi(2, 8080) + ld(3, "")) + port("tls", 443, vi(1, 1) + vi(2, 0) + ld(3, "https"))
    spec += port("same", 81, vi(1, 0) + vi(2, 0) + ld(3, ""))  # a zero IntOrString: unset, left out
    obj = decode_k8s_protobuf(envelope("v1", "Service", meta("svc") + ld(2, spec)))
    assert obj["spec"]["ports"] == [
        {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
        {"name": "tls", "protocol": "TCP", "port": 443, "targetPort": "https"},
        {"name": "same", "protocol": "TCP", "port": 81},
    ]


def test_pod_resources_quantities_and_inline_volume_source() -> None:
    # ResourceRequirements{limits=1, requests=2}: map<string, Quantity{string=1}>
    resources = entry(1, "cpu", ld(1, "500m")) + entry(1, "memory", ld(1, "64Mi")) + entry(2, "cpu", ld(1, "250m"))
    container = ld(1, "app") + ld(2, "busybox") + ld(8, resources)
    # Volume{name=1, volumeSource=2 (inline)}; VolumeSource.emptyDir=2 (*EmptyDirVolumeSource, empty)
    volume = ld(1, "scratch") + ld(2, ld(2, b""))
    spec = ld(1, volume) + ld(2, container) + vi(4, 0)  # terminationGracePeriodSeconds: *int64 = 0
    obj = decode_k8s_protobuf(envelope("v1", "Pod", meta("p") + ld(2, spec)))
    assert obj["spec"] == {
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "containers": [{
            "name": "app", "image": "busybox",
            "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}, "requests": {"cpu": "250m"}},
        }],
        "terminationGracePeriodSeconds": 0,
    }


def test_deployment_pointer_zero_kept_value_zero_dropped() -> None:
    spec = vi(1, 0) + vi(5, 0) + vi(7, 0) + ld(4, b"")  # replicas (*int32), minReadySeconds, paused, strategy
    obj = decode_k8s_protobuf(envelope("apps/v1", "Deployment", meta("d") + ld(2, spec)))
    assert obj == {"kind": "Deployment", "apiVersion": "apps/v1", "metadata": {"name": "d"}, "spec": {"replicas": 0}}


def test_eviction_with_delete_options() -> None:
    # policy/v1 Eviction{metadata=1, deleteOptions=2}; meta/v1 DeleteOptions{gracePeriodSeconds=1,
    # preconditions=2{uid=1, resourceVersion=2}, orphanDependents=3, propagationPolicy=4, dryRun=5}
    options = vi(1, 0) + ld(2, ld(1, "uid-1") + ld(2, "42")) + ld(4, "Foreground") + ld(5, "All")
    obj = decode_k8s_protobuf(envelope("policy/v1", "Eviction", meta("p1", "default") + ld(2, options)))
    assert obj == {
        "kind": "Eviction", "apiVersion": "policy/v1",
        "metadata": {"name": "p1", "namespace": "default"},
        "deleteOptions": {
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": "uid-1", "resourceVersion": "42"},
            "propagationPolicy": "Foreground",
            "dryRun": ["All"],
        },
    }


def test_token_request_and_job() -> None:
    # authentication/v1 TokenRequestSpec{audiences=1, expirationSeconds=4, boundObjectRef=3{kind=1,
    # apiVersion=2, name=3, uID=4}}: `uID` is "uid" in JSON.
    spec = ld(1, "api") + vi(4, 3600) + ld(3, ld(1, "Pod") + ld(2, "v1") + ld(3, "p") + ld(4, "u-1"))
    obj = decode_k8s_protobuf(envelope("authentication.k8s.io/v1", "TokenRequest", ld(1, b"") + ld(2, spec)))
    assert obj["spec"] == {"audiences": ["api"], "expirationSeconds": 3600,
                           "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": "u-1"}}
    # batch/v1 JobSpec{parallelism=1, completions=2, activeDeadlineSeconds=3, template=6, backoffLimit=7}
    template = ld(2, ld(2, ld(1, "c") + ld(2, "busybox")) + ld(3, "Never"))
    spec = vi(7, 4) + vi(3, 1 << 40) + ld(6, template)
    job = decode_k8s_protobuf(envelope("batch/v1", "Job", meta("j") + ld(2, spec)))
    assert job["spec"] == {
        "activeDeadlineSeconds": 1 << 40,
        "template": {"spec": {"containers": [{"name": "c", "image": "busybox"}], "restartPolicy": "Never"}},
        "backoffLimit": 4,
    }


# --- special types -------------------------------------------------------------------------------


def test_time_and_micro_time() -> None:
    # core/v1 Event{firstTimestamp=6 (Time), lastTimestamp=7 (Time), eventTime=10 (MicroTime),
    # series=11{count=1, lastObservedTime=2 (MicroTime)}}
    t = 1767323045  # 2026-01-02T03:04:05Z
    raw = (meta("e") + ld(6, timestamp(t, 999_999_999)) + ld(7, b"") + ld(10, timestamp(t, 123_456_789))
           + ld(11, vi(1, 2) + ld(2, timestamp(0, 1_000))))
    obj = decode_k8s_protobuf(envelope("v1", "Event", raw))
    assert obj["firstTimestamp"] == "2026-01-02T03:04:05Z"  # Time keeps seconds only
    assert "lastTimestamp" not in obj  # a zero Time: null in Go's JSON, left out here
    assert obj["eventTime"] == "2026-01-02T03:04:05.123456Z"  # MicroTime truncates to microseconds
    assert obj["series"] == {"count": 2, "lastObservedTime": "1970-01-01T00:00:00.000001Z"}


def test_nullable_time_present_but_zero_is_null() -> None:
    obj = decode_message(f"{META}.ObjectMeta", ld(1, "x") + ld(9, b"") + vi(10, 0))
    assert obj == {"name": "x", "deletionTimestamp": None, "deletionGracePeriodSeconds": 0}


def test_time_out_of_range() -> None:
    with pytest.raises(ProtobufDecodeError, match="out of range"):
        decode_message(f"{META}.Time", timestamp(1 << 60))


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"), (1, "1ns"), (999, "999ns"), (1_000, "1µs"), (1_500, "1.5µs"), (1_500_000, "1.5ms"),
        (1_000_000_000, "1s"), (1_500_000_000, "1.5s"), (60_000_000_000, "1m0s"), (90_000_000_000, "1m30s"),
        (3_600_000_000_000, "1h0m0s"), (3_723_000_000_000, "1h2m3s"), (-1_500_000_000, "-1.5s"),
        (100 * 3_600_000_000_000 + 1, "100h0m0.000000001s"),
    ],
)
def test_duration(ns: int, text: str) -> None:
    assert decode_message(f"{META}.Duration", vi(1, ns)) == text


def test_int_or_string() -> None:
    ios = "k8s.io.apimachinery.pkg.util.intstr.IntOrString"
    assert decode_message(ios, vi(1, 0) + vi(2, -5)) == -5
    assert decode_message(ios, vi(1, 1) + ld(3, "25%")) == "25%"
    assert decode_message(ios, b"") == 0
    with pytest.raises(ProtobufDecodeError, match="impossible type 2"):
        decode_message(ios, vi(1, 2))


def test_quantity() -> None:
    assert decode_message("k8s.io.apimachinery.pkg.api.resource.Quantity", ld(1, "1Gi")) == "1Gi"
    assert decode_message("k8s.io.apimachinery.pkg.api.resource.Quantity", b"") == "0"


def test_raw_extension_and_fields_v1() -> None:
    raw_ext = "k8s.io.apimachinery.pkg.runtime.RawExtension"
    assert decode_message(raw_ext, ld(1, b'{"a": [1, "x"]}')) == {"a": [1, "x"]}
    assert decode_message(raw_ext, b"") is None
    nested = envelope("v1", "ConfigMap", meta("inner") + entry(2, "k", "v"))
    assert decode_message(raw_ext, ld(1, nested)) == {
        "kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "inner"}, "data": {"k": "v"}}
    with pytest.raises(ProtobufDecodeError, match="not JSON"):
        decode_message(raw_ext, ld(1, b"{nope"))
    assert decode_message(f"{META}.FieldsV1", ld(1, b'{"f:data":{}}')) == {"f:data": {}}


def test_string_list_wrappers() -> None:
    # meta/v1 APIResource.verbs is `Verbs` ([]string); authentication/v1 UserInfo.extra is map<string, ExtraValue>
    obj = decode_message(f"{META}.APIResource", ld(1, "pods") + ld(4, ld(1, "get") + ld(1, "list")))
    assert obj == {"name": "pods", "verbs": ["get", "list"]}
    user = decode_message("k8s.io.api.authentication.v1.UserInfo",
                          ld(1, "alice") + ld(4, ld(1, "scopes") + ld(2, ld(1, "a") + ld(1, "b"))))
    assert user == {"username": "alice", "extra": {"scopes": ["a", "b"]}}


# --- wire-format corners -------------------------------------------------------------------------


def test_negative_int32_is_a_ten_byte_varint() -> None:
    assert len(varint(-1)) == 10
    # core/v1 ContainerPort{name=1, hostPort=2, containerPort=3}
    assert decode_message("k8s.io.api.core.v1.ContainerPort", vi(3, -1) + vi(2, 1 << 33 | 7)) == {
        "hostPort": 7,  # Go accumulates into an int32: the value wraps
        "containerPort": -1,
    }


def test_packed_and_unpacked_repeated_scalars() -> None:
    # core/v1 PodPortForwardOptions{ports=1 repeated int32}
    msg = "k8s.io.api.core.v1.PodPortForwardOptions"
    assert decode_message(msg, vi(1, 80) + vi(1, 443)) == {"ports": [80, 443]}
    assert decode_message(msg, ld(1, varint(80) + varint(443)) + vi(1, 8080)) == {"ports": [80, 443, 8080]}


def test_split_message_fields_are_merged() -> None:
    body = envelope("v1", "ConfigMap", ld(1, ld(1, "c")) + ld(1, ld(3, "ns") + ld(11, ld(1, "a") + ld(2, "b"))))
    assert decode_k8s_protobuf(body)["metadata"] == {"name": "c", "namespace": "ns", "labels": {"a": "b"}}


def test_unknown_fields_are_skipped() -> None:
    unknown = vi(99, 1) + ld(98, b"junk") + varint(97 << 3 | 5) + b"\x00" * 4 + varint(96 << 3 | 1) + b"\x00" * 8
    body = envelope("v1", "Namespace", unknown + meta("foo") + unknown)
    assert decode_k8s_protobuf(body) == {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "foo"}}


def test_invalid_utf8_becomes_replacement_characters() -> None:
    obj = decode_k8s_protobuf(envelope("v1", "ConfigMap", meta("c") + entry(2, "k", b"a\xffb")))
    assert obj["data"] == {"k": "a\ufffdb"}


def test_field_order_follows_go_structs() -> None:
    # Container.envFrom is field 19, env field 7; Go writes envFrom first.
    container = ld(1, "c") + ld(7, ld(1, "A") + ld(2, "1")) + ld(19, ld(1, "P_"))
    obj = decode_message("k8s.io.api.core.v1.Container", container)
    assert list(obj) == ["name", "envFrom", "env"]


def test_json_inside_the_envelope() -> None:
    body = envelope("v1", "ConfigMap", json.dumps({"kind": "ConfigMap", "data": {"a": "b"}}).encode(),
                    content_type="application/json")
    assert decode_k8s_protobuf(body) == {"kind": "ConfigMap", "data": {"a": "b"}}


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "does not start with"),
        (b'{"kind": "Namespace"}', "does not start with"),
        (b"k8s\x00\x0a", "truncated"),
        (b"k8s\x00\x0a\x05ab", "truncated"),
        (b"k8s\x00" + b"\xff" * 11, "longer than 10 bytes"),
        (b"k8s\x00" + varint(0 << 3) + b"\x00", "field number 0"),
        (b"k8s\x00" + varint(1 << 3 | 3), "group"),
        (b"k8s\x00" + varint(1 << 3 | 6), "invalid wire type"),
        (envelope("", "", b""), "no apiVersion/kind"),
        (envelope("v1", "NoSuchKind", b""), "has no protobuf schema"),
        (envelope("kubevirt.io/v1", "VirtualMachine", b""), "application/json"),
        (envelope("batch.example.com/v1", "Job", b""), "has no protobuf schema"),
        (envelope("v1", "Namespace", meta("x"), encoding="gzip"), "content encoding"),
        (envelope("v1", "Namespace", b"", content_type="application/yaml"), "content type"),
        (envelope("v1", "Namespace", vi(1, 5)), "wire type 0 does not match its type message"),
        (envelope("v1", "Namespace", ld(1, vi(1, 5))), r"Namespace\.metadata\.name: wire type 0"),
        (envelope("v1", "Namespace", ld(1, b"\x0a\x09short")), "truncated"),
    ],
)
def test_malformed_bodies(body: bytes, match: str) -> None:
    with pytest.raises(ProtobufDecodeError, match=match):
        decode_k8s_protobuf(body)


def test_nesting_is_bounded() -> None:
    raw_ext = "k8s.io.apimachinery.pkg.runtime.RawExtension"
    # List{items=2 repeated RawExtension{raw=1}} nested in itself through k8s-protobuf raw extensions.
    body = envelope("v1", "List", b"")
    for _ in range(protobuf._MAX_DEPTH + 5):
        body = envelope("v1", "List", ld(2, ld(1, body)))
    with pytest.raises(ProtobufDecodeError, match="nested more than"):
        decode_message(raw_ext, ld(1, body))


def test_unknown_message_type() -> None:
    with pytest.raises(ProtobufDecodeError, match=r"no protobuf schema for message type x\.y\.Z"):
        decode_message("x.y.Z", b"")


# --- type resolution and the table ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_version", "kind", "message"),
    [
        ("v1", "Pod", "k8s.io.api.core.v1.Pod"),
        ("apps/v1", "Deployment", "k8s.io.api.apps.v1.Deployment"),
        ("policy/v1", "Eviction", "k8s.io.api.policy.v1.Eviction"),
        ("authentication.k8s.io/v1", "TokenRequest", "k8s.io.api.authentication.v1.TokenRequest"),
        ("rbac.authorization.k8s.io/v1", "Role", "k8s.io.api.rbac.v1.Role"),
        ("flowcontrol.apiserver.k8s.io/v1", "FlowSchema", "k8s.io.api.flowcontrol.v1.FlowSchema"),
        ("internal.apiserver.k8s.io/v1alpha1", "StorageVersion",
         "k8s.io.api.apiserverinternal.v1alpha1.StorageVersion"),
        ("networking.k8s.io/v1", "Ingress", "k8s.io.api.networking.v1.Ingress"),
        ("autoscaling/v1", "Scale", "k8s.io.api.autoscaling.v1.Scale"),
        ("metrics.k8s.io/v1beta1", "PodMetrics", "k8s.io.metrics.pkg.apis.metrics.v1beta1.PodMetrics"),
        # meta/v1 kinds are registered in every group version
        ("policy/v1", "DeleteOptions", f"{META}.DeleteOptions"),
        ("v1", "Status", f"{META}.Status"),
    ],
)
def test_message_type_for(api_version: str, kind: str, message: str) -> None:
    assert message_type_for(api_version, kind) == message


def test_the_table_is_closed_and_knows_its_sources() -> None:
    s = schema()
    assert len(s.messages) > 900
    assert s.sources and all(src["kubectl"].startswith("v1.") for src in s.sources)
    for msg in s.messages.values():
        for f in msg.fields:
            if f.type in ("message", "map") and f.type_name:
                assert f.type_name in s.messages, f"{msg.name}.{f.name} -> {f.type_name}"
    volume = {f.name: f for f in s.message("k8s.io.api.core.v1.Volume").fields}
    assert volume["volumeSource"].inline and not volume["name"].inline
    assert not {f.name: f for f in s.message("k8s.io.api.core.v1.PodSpec").fields}["containers"].nullable
    assert {f.name: f for f in s.message("k8s.io.api.apps.v1.DeploymentSpec").fields}["replicas"].nullable


def test_every_kind_in_the_table_decodes_from_empty() -> None:
    # Every top-level kind (a message with `metadata`) resolves and decodes an empty body.
    s = schema()
    kinds = [name for name, msg in s.messages.items() if msg.fields and msg.fields[0].name == "metadata"]
    assert len(kinds) > 300
    for name in kinds:
        assert decode_message(name, b"") == {}
