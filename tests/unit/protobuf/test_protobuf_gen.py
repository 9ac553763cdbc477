"""virtplane.api.gen_protobuf: the Go struct tag scan (on synthetic binaries) and, when the protobuf
package is installed, that the committed table is what the installed kubectl produces."""

from __future__ import annotations

import json

import pytest

from virtplane.api import gen_protobuf
from virtplane.api.gen_protobuf import GoTag, go_struct_tags


def uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def go_name(name: str, tag: str, embedded: bool = False) -> bytes:
    """A reflect field name record as Go >= 1.17 lays it out: flags, varint len, name, varint len, tag."""
    flags = 0x1 | 0x2 | (0x8 if embedded else 0)
    return bytes([flags]) + uvarint(len(name)) + name.encode() + uvarint(len(tag)) + tag.encode()


def old_go_name(name: str, tag: str) -> bytes:
    """Go < 1.17: two big-endian length bytes instead of varints."""
    return b"\x03" + len(name).to_bytes(2, "big") + name.encode() + len(tag).to_bytes(2, "big") + tag.encode()


def test_go_struct_tags() -> None:
    # Longer than 127 bytes: a two-byte varint length.
    long_tag = 'json:"overhead,omitempty" protobuf:"bytes,32,rep,name=overhead,castkey=' + "X" * 80 + '"'
    blob = b"".join([
        b"\x00\x01garbage json:\"\x17",
        go_name("VolumeSource", 'json:",inline" protobuf:"bytes,2,opt,name=volumeSource"', embedded=True),
        b"*v1.Volume\x00",
        go_name("UID", 'json:"uid,omitempty" protobuf:"bytes,4,opt,name=uID,casttype=k8s.io/.../types.UID"'),
        go_name("EphemeralContainerCommon", 'json:",inline" protobuf:"bytes,1,req"', embedded=True),
        go_name("Overhead", long_tag),
        go_name("Name", 'json:"name"'),  # no protobuf key: not an API type field
        go_name("Items", 'json:"items" patchStrategy:"merge" patchMergeKey:"key" protobuf:"bytes,2,rep,name=items"'),
        old_go_name("Spec", 'json:"spec,omitempty" protobuf:"bytes,2,opt,name=spec"'),
        b'\x05json:"broken',
    ])
    assert sorted(go_struct_tags(blob), key=lambda t: t.go_name) == [
        GoTag("EphemeralContainerCommon", "", True, None, 1),
        GoTag("Items", "items", False, "items", 2),
        GoTag("Overhead", "overhead", False, "overhead", 32),
        GoTag("Spec", "spec", False, "spec", 2),
        GoTag("UID", "uid", False, "uID", 4),
        GoTag("VolumeSource", "", True, "volumeSource", 2),
    ]


def test_merge_keeps_older_fields_newer_wins() -> None:
    older = [[1, "a", "string", 0], [2, "b", "int32", 2]]
    newer = [[1, "a", "string", 2], [3, "c", "bool", 2]]
    assert gen_protobuf._merge(older, newer) == [[1, "a", "string", 2], [3, "c", "bool", 2], [2, "b", "int32", 2]]


def test_dumps_is_json_with_one_message_per_line() -> None:
    doc = {"comment": "c", "format": {}, "sources": [{"kubectl": "v1.33.1"}],
           "messages": {"a.B": [[1, "x", "string", 0]], "a.C": []}}
    text = gen_protobuf.dumps(doc)
    assert json.loads(text) == doc
    assert '"a.B": [[1,"x","string",0]],\n"a.C": []\n' in text


def test_committed_table_matches_the_installed_kubectl() -> None:
    pytest.importorskip("google.protobuf", reason="generating the table needs `pip install protobuf`")
    try:
        binaries = gen_protobuf.default_kubectl_binaries()
    except gen_protobuf.GenerateError as exc:
        pytest.skip(str(exc))
    doc, _ = gen_protobuf.generate(binaries)
    committed = json.loads(gen_protobuf.OUT_FILE.read_text())
    if doc["sources"] != committed["sources"]:
        pytest.skip("the installed kubectl builds differ from the ones the table was generated from")
    assert gen_protobuf.dumps(doc) == gen_protobuf.OUT_FILE.read_text()
