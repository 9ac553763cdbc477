"""Build-time generator: Kubernetes protobuf message descriptors, extracted from a kubectl binary.

    python -m virtplane.api.gen_protobuf [--kubectl PATH]... [--out FILE]

kubectl's typed clientsets send request bodies as Kubernetes protobuf (`virtplane.api.protobuf`
decodes them). No Kubernetes source is installable here, but every Go program linking k8s.io/api
registers the gzipped `FileDescriptorProto` of each `generated.proto` it uses
(`proto.RegisterFile("k8s.io/api/core/v1/generated.proto", <gzip>)`), so kubectl carries the
schema of every built-in type. This script:

1. scans the binary for gzip streams (1f 8b 08), gunzips them and keeps those that parse as a
   `google.protobuf.FileDescriptorProto` named `k8s.io/...` (the PyPI `protobuf` package is needed
   here, at build time only: `pip install protobuf==7.36.2`);
2. reads go-to-protobuf's gogoproto field options (unknown extensions to the stock
   `FieldOptions`): `nullable=false` marks a non-pointer Go field, whose zero value is always on the
   wire and must not be mistaken for "set"; `customname` is the Go field name;
3. reads the Go struct tags the binary keeps for reflection (`json:"uid,omitempty"
   protobuf:"bytes,4,opt,name=uID"`): a handful of proto field names differ from the JSON names
   (`uID`/`uid`, `aPIGroup`/`apiGroup`, `Webhooks`/`webhooks`), and embedded structs marked
   `json:",inline"` (`Volume.VolumeSource`, `Probe.ProbeHandler`, ...) are a nested message in
   protobuf but flattened in JSON;
4. writes a compact, deterministic table to `virtplane/api/data/k8s-proto-descriptors.json`:

       {"sources": [...], "messages": {"k8s.io.api.core.v1.Volume": [FIELD, ...], ...}}
       FIELD = [number, json name, type, flags]            scalars
             | [number, json name, type, flags, type name]  "message"/"enum"
             | [number, json name, "map", flags, [key type, value type, value type name or null]]
       flags: 1 repeated, 2 nullable (Go pointer: presence is meaningful), 4 inline (JSON-embedded)

   Fields are listed in Go struct order (the order Go's JSON encoder uses). Map entry types are
   folded into their "map" field.

By default it reads the `kubectl` on PATH and, when it is Google Cloud SDK's version dispatcher, the
versioned `kubectl.1.NN` binaries next to it: the dispatcher runs the one matching the server's
version, so any of them may send the request. Tables are merged oldest to newest by `kubectl version`
(Kubernetes never reuses a field number; a newer definition wins, fields only older ones know stay).

At runtime nothing reads kubectl or needs the protobuf package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

DATA_DIR = pathlib.Path(__file__).parent / "data"
OUT_FILE = DATA_DIR / "k8s-proto-descriptors.json"
PROTOBUF_PIN = "protobuf==7.36.2"

F_REPEATED, F_NULLABLE, F_INLINE = 1, 2, 4

# gogoproto (github.com/gogo/protobuf/gogoproto/gogo.proto) FieldOptions extension numbers.
_GOGO_NULLABLE = 65001
_GOGO_CUSTOMNAME = 65004

_GZIP_MAGIC = b"\x1f\x8b\x08"
# FileDescriptorProtos are small; bounding the input keeps a bogus match from inflating gigabytes.
_MAX_GZIP_INPUT = 4 << 20
_MAX_GUNZIPPED = 16 << 20

_TYPE_NAMES = {
    1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64", 7: "fixed32", 8: "bool",
    9: "string", 10: "group", 11: "message", 12: "bytes", 13: "uint32", 14: "enum", 15: "sfixed32",
    16: "sfixed64", 17: "sint32", 18: "sint64",
}
_LABEL_REPEATED = 3

_IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
_IDENT_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_TAG_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_]*):"((?:[^"\\]|\\.)*)"')


class GenerateError(RuntimeError):
    pass


# --- locating kubectl ---------------------------------------------------------------------------


def _version_key(path: pathlib.Path) -> tuple[int, ...]:
    m = re.search(r"\.(\d+)\.(\d+)$", path.name)
    return (int(m.group(1)), int(m.group(2))) if m else (1 << 30,)


def default_kubectl_binaries() -> list[pathlib.Path]:
    found = shutil.which("kubectl")
    if not found:
        raise GenerateError("no kubectl on PATH; pass --kubectl PATH (Debian: apt-get install kubernetes-client)")
    real = pathlib.Path(os.path.realpath(found))
    siblings = sorted(real.parent.glob("kubectl.[0-9]*.[0-9]*"), key=_version_key)
    # The dispatcher is a full kubectl too (the version it reports decides its place in the merge).
    return [*siblings, real]


def kubectl_version(path: pathlib.Path) -> str:
    try:
        out = subprocess.run(
            [str(path), "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        return str(json.loads(out)["clientVersion"]["gitVersion"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        return f"unknown ({exc.__class__.__name__})"


# --- FileDescriptorProtos -----------------------------------------------------------------------


def _gunzip_prefix(data: bytes, start: int) -> bytes | None:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data[start : start + _MAX_GZIP_INPUT], _MAX_GUNZIPPED)
    except zlib.error:
        return None
    return out if d.eof else None


def extract_file_descriptors(data: bytes) -> dict[str, Any]:
    """name -> FileDescriptorProto for every gzipped `k8s.io/...` descriptor embedded in `data`."""
    try:
        from google.protobuf import descriptor_pb2
        from google.protobuf.message import DecodeError
    except ImportError as exc:  # pragma: no cover - depends on the build environment
        raise GenerateError(f"generating the table needs the protobuf package: pip install {PROTOBUF_PIN}") from exc
    files: dict[str, Any] = {}
    pos = data.find(_GZIP_MAGIC)
    while pos != -1:
        raw = _gunzip_prefix(data, pos)
        if raw:
            fd = descriptor_pb2.FileDescriptorProto()
            try:
                fd.ParseFromString(raw)
            except DecodeError:
                fd = None
            if fd is not None and fd.name.startswith("k8s.io/") and fd.name.endswith(".proto"):
                files.setdefault(fd.name, fd)
        pos = data.find(_GZIP_MAGIC, pos + 1)
    return files


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _raw_options(options: Any) -> dict[int, int | bytes]:
    """The options' fields by number, including extensions unknown to the stock descriptor.proto."""
    buf = options.SerializeToString()
    out: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            out[number], pos = _read_varint(buf, pos)
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            out[number] = buf[pos : pos + n]
            pos += n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            out[number] = int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        else:
            raise GenerateError(f"unexpected wire type {wire} in field options")
    return out


# --- Go struct tags -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GoTag:
    go_name: str
    json_name: str  # "" when the field is inlined (`json:",inline"`)
    inline: bool
    proto_name: str | None
    number: int


def _name_before(data: bytes, end: int) -> str | None:
    """The Go identifier ending at `end` in a runtime name record, checked against its length prefix.

    Go >= 1.17 encodes a struct field's name as flags, varint length, name, varint tag length,
    tag; Go < 1.17 used two big-endian length bytes instead of varints.
    """
    start = end
    while start > 0 and data[start - 1] in _IDENT_BYTES and end - start < 128:
        start -= 1
    # A length byte may itself be a digit or letter: walk forward until the prefix matches.
    for s in range(start, end):
        n = end - s
        if data[s] in b"0123456789":
            continue
        if data[s - 1] == n or (data[s - 2] == n >> 8 and data[s - 1] == n & 0xFF):
            name = data[s:end]
            if _IDENT.fullmatch(name):
                return name.decode()
    return None


def go_struct_tags(data: bytes) -> Iterator[GoTag]:
    """Every Go struct field of the binary whose tag carries both `json` and `protobuf` keys."""
    for m in re.finditer(rb'json:"', data):
        p = m.start()
        # The tag's length precedes it: one or two varint bytes, or two big-endian bytes (old Go).
        for length, prefix in (
            (data[p - 1], 1) if data[p - 1] < 0x80 else (-1, 0),
            ((data[p - 2] & 0x7F) | (data[p - 1] << 7), 2) if data[p - 2] >= 0x80 else (-1, 0),
            ((data[p - 2] << 8) | data[p - 1], 2),
        ):
            if length <= 0 or length > 4096 or data[p + length - 1 : p + length] != b'"':
                continue
            try:
                tag = data[p : p + length].decode("ascii")
            except UnicodeDecodeError:
                continue
            pairs = dict(_TAG_PAIR.findall(tag))
            if "protobuf" not in pairs or _TAG_PAIR.sub("", tag).strip():
                continue
            go_name = _name_before(data, p - prefix)
            if go_name is None:
                continue
            json_parts = pairs["json"].split(",")
            pb_parts = pairs["protobuf"].split(",")
            if len(pb_parts) < 2 or not pb_parts[1].isdigit():
                continue
            proto_name = next((x[5:] for x in pb_parts if x.startswith("name=")), None)
            yield GoTag(
                go_name=go_name,
                json_name=json_parts[0],
                inline=json_parts[0] == "" and "inline" in json_parts[1:],
                proto_name=proto_name,
                number=int(pb_parts[1]),
            )
            break


# --- the table ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
    fields: int = 0
    renamed: list[str] = dataclasses.field(default_factory=list)
    inline: list[str] = dataclasses.field(default_factory=list)
    untagged: list[str] = dataclasses.field(default_factory=list)
    conflicts: list[str] = dataclasses.field(default_factory=list)


def _json_name(
    msg: str, field: Any, go_name: str, tags: dict[tuple[str, int], set[tuple[str, bool, str | None]]], stats: Stats
) -> tuple[str, bool]:
    """(JSON name, inline?) of a descriptor field, from the Go struct tags matching it."""
    found = {
        (json_name, inline)
        for json_name, inline, proto_name in tags.get((go_name, field.number), ())
        if proto_name in (None, field.name)
    }
    if not found:
        stats.untagged.append(f"{msg}.{field.name}")
        return field.name, False
    if len(found) > 1:
        # Two Go structs share a field name, number and proto name but disagree on JSON; keep the
        # proto name (which go-to-protobuf derived from the JSON name) and say so.
        stats.conflicts.append(f"{msg}.{field.name}: {sorted(found)}")
        return field.name, False
    json_name, inline = found.pop()
    if inline:
        stats.inline.append(f"{msg}.{field.name}")
        return field.name, True
    if json_name == "-":
        # Not in JSON at all: the type marshals itself (RawExtension, FieldsV1); the runtime handles those.
        return field.name, False
    if json_name != field.name:
        stats.renamed.append(f"{msg}.{field.name} -> {json_name}")
    return json_name, False


def build_messages(
    files: Iterable[Any], tags: dict[tuple[str, int], set[tuple[str, bool, str | None]]], stats: Stats
) -> dict[str, list[list[Any]]]:
    messages: dict[str, list[list[Any]]] = {}
    for fd in files:
        for msg in fd.message_type:
            full = f"{fd.package}.{msg.name}"
            entries = {f".{full}.{n.name}": n for n in msg.nested_type if n.options.map_entry}
            if len(entries) != len(msg.nested_type) or msg.enum_type or msg.oneof_decl:
                raise GenerateError(f"{full}: nested messages, enums or oneofs are not expected in Kubernetes types")
            fields: list[list[Any]] = []
            for f in msg.field:
                stats.fields += 1
                opts = _raw_options(f.options)
                go_name = opts.get(_GOGO_CUSTOMNAME)
                go_name = go_name.decode() if isinstance(go_name, bytes) else f.name[:1].upper() + f.name[1:]
                name, inline = _json_name(full, f, go_name, tags, stats)
                ftype = _TYPE_NAMES[f.type]
                flags = 0
                if f.label == _LABEL_REPEATED:
                    flags |= F_REPEATED
                elif opts.get(_GOGO_NULLABLE) != 0:
                    flags |= F_NULLABLE
                if inline:
                    flags |= F_INLINE
                entry: list[Any] = [f.number, name, ftype, flags]
                if f.type_name in entries:
                    key, value = sorted(entries[f.type_name].field, key=lambda x: x.number)
                    entry[2:] = ["map", flags & ~F_REPEATED, [_TYPE_NAMES[key.type], _TYPE_NAMES[value.type],
                                                               value.type_name.lstrip(".") or None]]
                elif ftype in ("message", "enum", "group"):
                    entry.append(f.type_name.lstrip("."))
                fields.append(entry)
            messages[full] = fields
    return messages


def _merge(older: list[list[Any]], newer: list[list[Any]]) -> list[list[Any]]:
    seen = {f[0] for f in newer}
    return newer + [f for f in older if f[0] not in seen]


def _semver(version: str) -> tuple[int, ...]:
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(x) for x in m.groups()) if m else (0,)


def generate(binaries: list[pathlib.Path]) -> tuple[dict[str, Any], list[str]]:
    messages: dict[str, list[list[Any]]] = {}
    sources: list[dict[str, Any]] = []
    report: list[str] = []
    # Oldest first, so that a newer kubectl's definition of a message wins the merge.
    versioned = sorted(((kubectl_version(p), p) for p in binaries), key=lambda vp: (_semver(vp[0]), str(vp[1])))
    for version, path in versioned:
        data = path.read_bytes()
        files = extract_file_descriptors(data)
        if not files:
            raise GenerateError(f"{path}: no gzipped k8s.io/... FileDescriptorProtos found")
        tags: dict[tuple[str, int], set[tuple[str, bool, str | None]]] = {}
        for t in go_struct_tags(data):
            tags.setdefault((t.go_name, t.number), set()).add((t.json_name, t.inline, t.proto_name))
        stats = Stats()
        table = build_messages((files[n] for n in sorted(files)), tags, stats)
        # go-to-protobuf flattens these in every Kubernetes release; if the tag scan found none of
        # them the binary's layout is not understood and the table would silently be wrong.
        for must in ("k8s.io.api.core.v1.Volume.volumeSource", "k8s.io.api.core.v1.Probe.handler"):
            if must.rsplit(".", 1)[0] in table and must not in stats.inline:
                raise GenerateError(f"{path}: could not read Go struct tags ({must} not found to be inline)")
        for name, fields in table.items():
            messages[name] = _merge(messages[name], fields) if name in messages else fields
        sources.append({"kubectl": version, "binary": path.name, "files": len(files), "messages": len(table)})
        report.append(
            f"{path} ({version}): {len(files)} descriptor files, {len(table)} messages, {stats.fields} fields, "
            f"{len(stats.inline)} inline, {len(stats.renamed)} renamed, {len(stats.untagged)} without a Go tag, "
            f"{len(stats.conflicts)} conflicts"
        )
        report += [f"  renamed {r}" for r in stats.renamed] + [f"  conflict {c}" for c in stats.conflicts]
        report += [f"  inline {r}" for r in stats.inline] + [f"  untagged {r}" for r in stats.untagged]
    doc = {
        "comment": "Generated by `python -m virtplane.api.gen_protobuf` from the FileDescriptorProtos and Go struct "
        "tags embedded in kubectl; do not edit. Read by virtplane.api.protobuf.",
        "format": {
            "field": "[number, jsonName, type, flags] + [typeName] for message/enum "
            "| [number, jsonName, 'map', flags, [keyType, valueType, valueTypeName|null]]",
            "flags": {"repeated": F_REPEATED, "nullable": F_NULLABLE, "inline": F_INLINE},
        },
        "sources": sources,
        "messages": {name: messages[name] for name in sorted(messages)},
    }
    return doc, report


def dumps(doc: dict[str, Any]) -> str:
    """One message per line: small diffs when kubectl changes, still compact."""
    lines = ["{"]
    for key in ("comment", "format", "sources"):
        lines.append(f"{json.dumps(key)}: {json.dumps(doc[key], sort_keys=True)},")
    lines.append('"messages": {')
    items = list(doc["messages"].items())
    for i, (name, fields) in enumerate(items):
        sep = "," if i < len(items) - 1 else ""
        lines.append(f"{json.dumps(name)}: {json.dumps(fields, separators=(',', ':'))}{sep}")
    lines += ["}", "}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kubectl", action="append", type=pathlib.Path,
                    help="kubectl binary to read (repeatable; default: kubectl on PATH and its kubectl.1.NN siblings)")
    ap.add_argument("--out", type=pathlib.Path, default=OUT_FILE)
    args = ap.parse_args(argv)
    try:
        binaries = args.kubectl or default_kubectl_binaries()
        doc, report = generate(binaries)
    except GenerateError as exc:
        print(f"gen_protobuf: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(doc))
    print("\n".join(report))
    print(f"wrote {args.out}: {len(doc['messages'])} messages")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["GenerateError", "GoTag", "extract_file_descriptors", "generate", "go_struct_tags", "main"]
