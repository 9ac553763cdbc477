"""Kubernetes protobuf request bodies -> the JSON object the same request would have sent as JSON.

kubectl >= 1.32's typed clientsets (`kubectl create namespace|configmap|secret|deployment|service|job|
token|...`, `kubectl create job --from`, `kubectl debug --copy-to`, and PUTs such as `kubectl certificate
approve`), like any client-go program configured for protobuf, send `application/vnd.kubernetes.protobuf`:
the magic `k8s\\x00`, then a `runtime.Unknown` (typeMeta{apiVersion=1, kind=2}=1, raw=2,
contentEncoding=3, contentType=4) whose `raw` is the Go object in protobuf. (`kubectl run`, `expose`,
`apply`, `create -f` and `drain`'s evictions still send JSON.) Clients accept JSON answers, so the API
server only needs to decode:

    obj = decode_k8s_protobuf(body)   # {"kind": "Namespace", "apiVersion": "v1", "metadata": {...}}

The schema is the table `virtplane.api.gen_protobuf` extracts from kubectl's embedded descriptors
(`data/k8s-proto-descriptors.json`); the wire format is decoded by hand, so the protobuf package is not
needed at runtime. The output is what Go's encoding/json writes for the decoded Go object:

- field names are the JSON names (the proto names, except the few the table renames: `uID` -> `uid`);
  `json:",inline"` embedded structs (`Volume.volumeSource`, `Probe.handler`) are flattened;
- maps become objects, `bytes` base64 (Secret data), int64 plain numbers;
- types with their own JSON form: `Time`/`MicroTime` (RFC 3339, UTC), `Duration` ("1m30s"),
  `Quantity` ("100m"), `IntOrString` (8080 or "http"), `RawExtension`/`FieldsV1`/apiextensions `JSON`
  (the embedded JSON document), `Verbs`/`ExtraValue` (string lists).

One deliberate difference from Go: protobuf always carries a non-pointer field, even at its zero value
("", 0, false, an empty struct, a zero Time), and Go cannot tell that from "unset" either; such fields are
left out instead of written as `""`/`0`/`null`, which is what kubectl's own JSON does for every
`omitempty` field. Pointer fields keep their zero values (`replicas: 0`,
`automountServiceAccountToken: false`): there, presence means something. Fields this table does not know
(a newer kubectl) are skipped, as Go's generated Unmarshal does.

Anything else -> `ProtobufDecodeError`, which the API server answers with 400 Bad Request.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import math
import pathlib
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"
DATA_FILE = pathlib.Path(__file__).parent / "data" / "k8s-proto-descriptors.json"

# Flags of a field in the table (see gen_protobuf).
_F_REPEATED, _F_NULLABLE, _F_INLINE = 1, 2, 4

# Wire types.
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_WIRE_OF = {
    "int32": _VARINT, "int64": _VARINT, "uint32": _VARINT, "uint64": _VARINT, "sint32": _VARINT,
    "sint64": _VARINT, "bool": _VARINT, "enum": _VARINT, "fixed64": _I64, "sfixed64": _I64, "double": _I64,
    "fixed32": _I32, "sfixed32": _I32, "float": _I32, "string": _LEN, "bytes": _LEN, "message": _LEN,
    "map": _LEN,
}
_PACKABLE = frozenset(t for t, w in _WIRE_OF.items() if w != _LEN)

# Objects nest a few levels deep (Deployment > PodTemplateSpec > PodSpec > Container > Probe ...); a
# bound keeps a hostile body from exhausting the interpreter's stack.
_MAX_DEPTH = 100

_META = "k8s.io.apimachinery.pkg.apis.meta.v1"
_TIME = f"{_META}.Time"
_MICRO_TIME = f"{_META}.MicroTime"
_DURATION = f"{_META}.Duration"
_FIELDS_V1 = f"{_META}.FieldsV1"
_QUANTITY = "k8s.io.apimachinery.pkg.api.resource.Quantity"
_QUANTITY_VALUE = "k8s.io.apimachinery.pkg.api.resource.QuantityValue"
_INT_OR_STRING = "k8s.io.apimachinery.pkg.util.intstr.IntOrString"
_RAW_EXTENSION = "k8s.io.apimachinery.pkg.runtime.RawExtension"
_UNKNOWN = "k8s.io.apimachinery.pkg.runtime.Unknown"
_APIEXTENSIONS_JSON = frozenset(
    f"k8s.io.apiextensions-apiserver.pkg.apis.apiextensions.{v}.JSON" for v in ("v1", "v1beta1")
)
# Go types that are string slices (`type Verbs []string`): a message with `repeated string items = 1`
# in protobuf, a plain list in JSON.
_STRING_LISTS = frozenset(
    {f"{_META}.Verbs"}
    | {
        f"k8s.io.api.{group}.{v}.ExtraValue"
        for group in ("authentication", "authorization", "certificates")
        for v in ("v1", "v1beta1", "v1alpha1")
    }
)

# API groups whose proto package is not `k8s.io.api.<first label>` (see message_type_for).
_GROUP_PACKAGES = {
    "": "k8s.io.api.core",
    "apps": "k8s.io.api.apps",
    "batch": "k8s.io.api.batch",
    "autoscaling": "k8s.io.api.autoscaling",
    "policy": "k8s.io.api.policy",
    "extensions": "k8s.io.api.extensions",
    "rbac.authorization.k8s.io": "k8s.io.api.rbac",
    "flowcontrol.apiserver.k8s.io": "k8s.io.api.flowcontrol",
    "internal.apiserver.k8s.io": "k8s.io.api.apiserverinternal",
    "metrics.k8s.io": "k8s.io.metrics.pkg.apis.metrics",
    "meta.k8s.io": "k8s.io.apimachinery.pkg.apis.meta",
    "apiextensions.k8s.io": "k8s.io.apiextensions-apiserver.pkg.apis.apiextensions",
    "apiregistration.k8s.io": "k8s.io.kube-aggregator.pkg.apis.apiregistration",
}


class ProtobufDecodeError(ValueError):
    """The body is not a Kubernetes protobuf object this server can read (the API server: 400)."""


# --- the schema ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FieldSpec:
    number: int
    name: str  # the JSON name
    type: str  # int32, int64, bool, string, bytes, double, float, ..., message, enum, map
    repeated: bool
    nullable: bool  # a Go pointer: present on the wire only when set, so zero values are kept
    inline: bool  # a `json:",inline"` embedded struct: its fields go into the parent object
    type_name: str | None = None  # message/enum type; for maps the value's message type
    map_key: str | None = None
    map_value: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class MessageSpec:
    name: str
    fields: tuple[FieldSpec, ...]  # in Go struct order, the order Go's JSON encoder writes them
    by_number: Mapping[int, FieldSpec]


@dataclasses.dataclass(frozen=True)
class Schema:
    messages: Mapping[str, MessageSpec]
    sources: tuple[Mapping[str, Any], ...]  # the kubectl builds the table came from

    def message(self, name: str) -> MessageSpec:
        try:
            return self.messages[name]
        except KeyError:
            raise ProtobufDecodeError(f"no protobuf schema for message type {name}") from None


def _field_spec(entry: list[Any]) -> FieldSpec:
    number, name, ftype, flags, *ref = entry
    spec = FieldSpec(number, name, ftype, bool(flags & _F_REPEATED), bool(flags & _F_NULLABLE),
                     bool(flags & _F_INLINE))
    if ftype == "map":
        key, value, value_type = ref[0]
        return dataclasses.replace(spec, map_key=key, map_value=value, type_name=value_type)
    if ref:
        return dataclasses.replace(spec, type_name=ref[0])
    return spec


def load_schema(path: pathlib.Path) -> Schema:
    doc = orjson.loads(path.read_bytes())
    messages = {}
    for name, entries in doc["messages"].items():
        fields = tuple(_field_spec(e) for e in entries)
        messages[name] = MessageSpec(name, fields, {f.number: f for f in fields})
    return Schema(messages, tuple(doc.get("sources", ())))


@functools.cache
def schema() -> Schema:
    """The bundled table, loaded on first use."""
    return load_schema(DATA_FILE)


# --- the wire format ----------------------------------------------------------------------------


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise ProtobufDecodeError("truncated protobuf: a varint runs past the end of its message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ProtobufDecodeError("malformed protobuf: a varint is longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value): an unsigned int for VARINT/I64/I32, a memoryview for LEN."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtobufDecodeError("malformed protobuf: field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ProtobufDecodeError(f"truncated protobuf: field {number} needs {size} bytes, {end - pos} left")
            value = buf[pos : pos + size]
            pos += size
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if pos + size > end:
                raise ProtobufDecodeError(f"truncated protobuf: fixed-size field {number} runs past the end")
            value = int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        elif wire in (_SGROUP, _EGROUP):
            raise ProtobufDecodeError(f"unsupported protobuf: field {number} is a group (Kubernetes uses none)")
        else:
            raise ProtobufDecodeError(f"malformed protobuf: field {number} has invalid wire type {wire}")
        yield number, wire, value


def _signed(value: int, bits: int) -> int:
    # Go's generated Unmarshal accumulates varints into the field's type: the value wraps, never fails.
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _scalar(ftype: str, value: Any, where: str) -> Any:
    if ftype == "string":
        # Go's JSON encoder writes invalid UTF-8 as U+FFFD; do the same rather than fail.
        return bytes(value).decode("utf-8", errors="replace")
    if ftype == "bytes":
        return base64.b64encode(value).decode("ascii")
    if ftype in ("int32", "enum"):
        return _signed(value, 32)
    if ftype == "int64":
        return _signed(value, 64)
    if ftype == "uint32":
        return value & 0xFFFFFFFF
    if ftype == "uint64":
        return value & 0xFFFFFFFFFFFFFFFF
    if ftype == "bool":
        return value != 0
    if ftype in ("sint32", "sint64"):
        bits = 32 if ftype == "sint32" else 64
        value &= (1 << bits) - 1
        return (value >> 1) ^ -(value & 1)
    if ftype in ("fixed32", "fixed64"):
        return value
    if ftype == "sfixed32":
        return _signed(value, 32)
    if ftype == "sfixed64":
        return _signed(value, 64)
    if ftype in ("float", "double"):
        fmt = "<f" if ftype == "float" else "<d"
        number = struct.unpack(fmt, value.to_bytes(struct.calcsize(fmt), "little"))[0]
        if not math.isfinite(number):
            raise ProtobufDecodeError(f"{where}: {number} cannot be represented in JSON")
        return number
    raise ProtobufDecodeError(f"{where}: unsupported protobuf type {ftype}")


def _unpack(ftype: str, buf: memoryview, where: str) -> list[Any]:
    """A packed repeated scalar (proto2 allows either encoding; Go's Unmarshal accepts both)."""
    out = []
    pos, end = 0, len(buf)
    wire = _WIRE_OF[ftype]
    while pos < end:
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        else:
            size = 8 if wire == _I64 else 4
            if pos + size > end:
                raise ProtobufDecodeError(f"{where}: truncated packed field")
            value = int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        out.append(_scalar(ftype, value, where))
    return out


def _zero_scalar(ftype: str) -> Any:
    if ftype == "string" or ftype == "bytes":
        return ""
    if ftype == "bool":
        return False
    if ftype in ("float", "double"):
        return 0.0
    return 0


def _is_zero(value: Any) -> bool:
    """Go's zero value, as it appears once converted to JSON."""
    if value is None or value is False or value == "" or value == {} or value == []:
        return True
    return type(value) in (int, float) and value == 0


# --- Go's JSON forms of the special types -------------------------------------------------------


def _go_duration(ns: int) -> str:
    """time.Duration.String(): "1h2m3.5s", "1.5ms", "0s"."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)

    def frac(v: int, prec: int) -> tuple[str, int]:
        digits = str(v % 10**prec).rjust(prec, "0").rstrip("0")
        return ("." + digits if digits else ""), v // 10**prec

    if u < 1_000_000_000:
        if u < 1_000:
            return f"{sign}{u}ns"
        unit, prec = ("µs", 3) if u < 1_000_000 else ("ms", 6)
        f, whole = frac(u, prec)
        return f"{sign}{whole}{f}{unit}"
    f, secs = frac(u, 9)
    out = f"{secs % 60}{f}s"
    minutes = secs // 60
    if minutes:
        out = f"{minutes % 60}m{out}"
        if minutes // 60:
            out = f"{minutes // 60}h{out}"
    return sign + out


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _rfc3339(seconds: int, micros: int | None, where: str) -> str:
    try:
        t = _EPOCH + datetime.timedelta(seconds=seconds)
    except OverflowError:
        raise ProtobufDecodeError(f"{where}: time {seconds}s since the epoch is out of range") from None
    out = f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    if micros is not None:
        out += f".{micros:06d}"
    return out + "Z"


def _small_message(buf: memoryview, types: Mapping[int, str], where: str) -> dict[int, Any]:
    """The few fields of a special type, checked against their expected types (last one wins)."""
    out: dict[int, Any] = {}
    for number, wire, value in _fields(buf):
        ftype = types.get(number)
        if ftype is None:
            continue
        if wire != _WIRE_OF[ftype]:
            raise ProtobufDecodeError(f"{where}: field {number} has wire type {wire}, expected {_WIRE_OF[ftype]}")
        out[number] = value if ftype == "bytes" else _scalar(ftype, value, where)
    return out


def _time(buf: memoryview, where: str, micro: bool) -> str | None:
    # metav1.Time/MicroTime marshal a zero time as an empty message, and JSON as null.
    if not len(buf):
        return None
    f = _small_message(buf, {1: "int64", 2: "int32"}, where)
    seconds, nanos = f.get(1, 0), f.get(2, 0)
    if not micro:
        # Time's Unmarshal drops the nanoseconds (its JSON form only has seconds).
        return _rfc3339(seconds, None, where)
    seconds, nanos = divmod(seconds * 1_000_000_000 + nanos, 1_000_000_000)
    return _rfc3339(seconds, nanos // 1_000, where)


def _embedded_json(raw: memoryview, where: str, depth: int) -> Any:
    if not len(raw):
        return None
    data = bytes(raw)
    if data.startswith(MAGIC):
        return _decode_envelope(data, depth + 1)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtobufDecodeError(f"{where}: the embedded object is not JSON: {exc}") from None


def _special(type_name: str, buf: memoryview, where: str, depth: int) -> tuple[bool, Any]:
    """(handled?, JSON value) for the types whose Go JSON form is not a plain object."""
    if type_name == _TIME or type_name == _MICRO_TIME:
        return True, _time(buf, where, micro=type_name == _MICRO_TIME)
    if type_name == _DURATION:
        return True, _go_duration(_small_message(buf, {1: "int64"}, where).get(1, 0))
    if type_name == _QUANTITY or type_name == _QUANTITY_VALUE:
        # Both the protobuf and the JSON form are Quantity.String(); a zero Quantity is "0".
        return True, _small_message(buf, {1: "string"}, where).get(1) or "0"
    if type_name == _INT_OR_STRING:
        f = _small_message(buf, {1: "int64", 2: "int32", 3: "string"}, where)
        kind = f.get(1, 0)
        if kind == 0:
            return True, f.get(2, 0)
        if kind == 1:
            return True, f.get(3, "")
        raise ProtobufDecodeError(f"{where}: IntOrString has impossible type {kind}")
    if type_name == _RAW_EXTENSION or type_name == _FIELDS_V1 or type_name in _APIEXTENSIONS_JSON:
        return True, _embedded_json(_small_message(buf, {1: "bytes"}, where).get(1, memoryview(b"")), where, depth)
    if type_name in _STRING_LISTS:
        items = []
        for number, wire, value in _fields(buf):
            if number == 1:
                if wire != _LEN:
                    raise ProtobufDecodeError(f"{where}: list item has wire type {wire}, expected {_LEN}")
                items.append(_scalar("string", value, where))
        return True, items
    return False, None


# --- messages -----------------------------------------------------------------------------------


def _map_entry(f: FieldSpec, buf: memoryview, where: str, depth: int) -> tuple[str, Any]:
    key: Any = None
    value: Any = None
    for number, wire, raw in _fields(buf):
        ftype = f.map_key if number == 1 else f.map_value if number == 2 else None
        if ftype is None:
            continue
        if wire != _WIRE_OF[ftype]:
            raise ProtobufDecodeError(f"{where}: map entry field {number} has wire type {wire}")
        if number == 1:
            key = _scalar(ftype, raw, where)
        else:
            value = raw
    # A missing key or value is that type's zero value, as in Go.
    key = _zero_scalar(f.map_key or "string") if key is None else key
    if f.map_value == "message":
        value = _decode(f.type_name or "", value if value is not None else memoryview(b""), where, depth + 1)
    else:
        value = _zero_scalar(f.map_value or "string") if value is None else _scalar(f.map_value or "", value, where)
    # Go's JSON writes map keys as strings (and sorted); Kubernetes' maps are keyed by strings anyway.
    return str(key), value


def _decode(type_name: str, buf: memoryview, where: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ProtobufDecodeError(f"{where}: objects nested more than {_MAX_DEPTH} levels deep")
    handled, value = _special(type_name, buf, where, depth)
    if handled:
        return value
    msg = schema().message(type_name)
    values: dict[int, Any] = {}
    # A singular message field may come in several pieces, which protobuf merges; merging is the
    # same as decoding the concatenated pieces.
    pieces: dict[int, list[memoryview]] = {}
    for number, wire, raw in _fields(buf):
        f = msg.by_number.get(number)
        if f is None:
            continue  # a field newer than the table: Go's Unmarshal skips unknown fields too
        fwhere = f"{where}.{f.name}"
        if f.repeated and wire == _LEN and f.type in _PACKABLE:
            values.setdefault(number, []).extend(_unpack(f.type, raw, fwhere))
            continue
        if wire != _WIRE_OF.get(f.type):
            raise ProtobufDecodeError(f"{fwhere}: wire type {wire} does not match its type {f.type}")
        if f.type == "map":
            k, v = _map_entry(f, raw, fwhere, depth)
            values.setdefault(number, {})[k] = v
        elif f.type == "message" and not f.repeated:
            pieces.setdefault(number, []).append(raw)
        elif f.type == "message":
            values.setdefault(number, []).append(_decode(f.type_name or "", raw, fwhere, depth + 1))
        elif f.repeated:
            values.setdefault(number, []).append(_scalar(f.type, raw, fwhere))
        else:
            values[number] = _scalar(f.type, raw, fwhere)
    for number, parts in pieces.items():
        f = msg.by_number[number]
        raw = parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
        values[number] = _decode(f.type_name or "", raw, f"{where}.{f.name}", depth + 1)

    out: dict[str, Any] = {}
    for f in msg.fields:
        if f.number not in values:
            continue
        value = values[f.number]
        if f.type == "map":
            value = dict(sorted(value.items()))
        elif not f.repeated and not f.nullable and _is_zero(value):
            continue  # a non-pointer Go field at its zero value: the same as unset (module docstring)
        if f.inline:
            if not isinstance(value, dict):
                raise ProtobufDecodeError(f"{where}.{f.name}: an inline field must be an object")
            out.update(value)
        else:
            out[f.name] = value
    return out


def decode_message(type_name: str, data: bytes) -> Any:
    """The JSON form of one protobuf message of type `type_name` (e.g. "k8s.io.api.core.v1.PodSpec")."""
    return _decode(type_name, memoryview(data), type_name.rsplit(".", 1)[-1], 0)


def message_type_for(api_version: str, kind: str) -> str:
    """The protobuf message of a Kubernetes kind: ("apps/v1", "Deployment") -> k8s.io.api.apps.v1.Deployment.

    DeleteOptions, CreateOptions, Status, ... are registered in every group version (client-go
    encodes them as e.g. policy/v1 DeleteOptions), so meta/v1 is the fallback.
    """
    group, _, version = api_version.rpartition("/")
    if not version or not kind:
        raise ProtobufDecodeError(f"the object has no apiVersion/kind (apiVersion={api_version!r}, kind={kind!r})")
    package = _GROUP_PACKAGES.get(group)
    if package is None and group.endswith(".k8s.io") and group.count(".") == 2:
        package = f"k8s.io.api.{group.split('.')[0]}"
    messages = schema().messages
    for candidate in (f"{package}.{version}.{kind}" if package else None, f"{_META}.{kind}"):
        if candidate and candidate in messages:
            return candidate
    raise ProtobufDecodeError(
        f"{api_version}, Kind={kind} has no protobuf schema here; send it as application/json"
    )


def _decode_envelope(body: bytes, depth: int) -> dict[str, Any]:
    if not body.startswith(MAGIC):
        raise ProtobufDecodeError("the body is not Kubernetes protobuf: it does not start with 'k8s\\x00'")
    f = _small_message(memoryview(body)[len(MAGIC) :], {1: "bytes", 2: "bytes", 3: "string", 4: "string"}, "Unknown")
    type_meta = _small_message(f.get(1, memoryview(b"")), {1: "string", 2: "string"}, "Unknown.typeMeta")
    api_version, kind = type_meta.get(1, ""), type_meta.get(2, "")
    raw = f.get(2, memoryview(b""))
    if f.get(3):
        raise ProtobufDecodeError(f"unsupported protobuf content encoding {f[3]!r}")
    content_type = f.get(4, "")
    if content_type == "application/json":
        # runtime.Unknown may carry another serialization; JSON is the one worth accepting.
        obj = _embedded_json(raw, "Unknown.raw", depth)
        if not isinstance(obj, dict):
            raise ProtobufDecodeError("the embedded JSON document is not an object")
        return obj
    if content_type not in ("", CONTENT_TYPE):
        raise ProtobufDecodeError(f"unsupported content type {content_type!r} inside the protobuf envelope")
    type_name = message_type_for(api_version, kind)
    obj = _decode(type_name, raw, kind, depth)
    return {"kind": kind, "apiVersion": api_version, **obj}


def decode_k8s_protobuf(body: bytes) -> dict[str, Any]:
    """`application/vnd.kubernetes.protobuf` request body -> the object as Kubernetes JSON.

    Raises ProtobufDecodeError for anything that is not a well-formed Kubernetes protobuf object of a
    type in the bundled table.
    """
    return _decode_envelope(bytes(body), 0)


__all__ = [
    "CONTENT_TYPE",
    "MAGIC",
    "FieldSpec",
    "MessageSpec",
    "ProtobufDecodeError",
    "Schema",
    "decode_k8s_protobuf",
    "decode_message",
    "message_type_for",
    "schema",
]
