"""Field paths and field sets as server-side apply records them (`metadata.managedFields[].fieldsV1`).

A path is a tuple of path elements; each element is a small tagged tuple so paths are hashable and
cheap to compare:

- `("f", "spec")`                                  a field of an object       FieldsV1 `f:spec`
- `("k", (("name", '"c"'),))`                      an associative list item   FieldsV1 `k:{"name":"c"}`
- `("v", '"foo"')`                                 a member of a set list     FieldsV1 `v:"foo"`
- `("i", 3)`                                       a list item by position    FieldsV1 `i:3`

Key and set values are kept as canonical JSON text (what FieldsV1 embeds), which makes `80` and `"80"`
different keys, as they are in Kubernetes. A field set is a plain `set[Path]`; FieldsV1 is its trie
with `"."` marking a node that is itself a member.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

PathElement = tuple[str, Any]
Path = tuple[PathElement, ...]
FieldSet = set[Path]

# Order of element kinds in sorted output (structured-merge-diff sorts fields, then keys, values, indexes).
_KIND_ORDER = {"f": 0, "k": 1, "v": 2, "i": 3}


def canonical_json(value: Any) -> str:
    """JSON text with sorted keys and no spaces: the form FieldsV1 keys and values use."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def field(name: str) -> PathElement:
    return ("f", name)


def key(fields: Mapping[str, Any]) -> PathElement:
    """An associative-list item identified by its key fields (order-insensitive)."""
    if len(fields) == 1:
        ((name, v),) = fields.items()
        return ("k", ((name, canonical_json(v)),))
    return ("k", tuple(sorted((k, canonical_json(v)) for k, v in fields.items())))


def value(v: Any) -> PathElement:
    return ("v", canonical_json(v))


def index(i: int) -> PathElement:
    return ("i", i)


def element_to_fieldsv1(pe: PathElement) -> str:
    kind, data = pe
    if kind == "f":
        return f"f:{data}"
    if kind == "k":
        # Rebuild the object text by hand so the (already canonical) value JSON is embedded verbatim.
        inner = ",".join(f"{canonical_json(name)}:{text}" for name, text in data)
        return "k:{" + inner + "}"
    if kind == "v":
        return f"v:{data}"
    return f"i:{data}"


def element_from_fieldsv1(text: str) -> PathElement:
    """Parse one FieldsV1 key (`f:name`, `k:{...}`, `v:...`, `i:N`); raises ValueError if malformed."""
    kind, sep, rest = text.partition(":")
    if not sep:
        raise ValueError(f"invalid FieldsV1 path element {text!r}")
    if kind == "f":
        return ("f", rest)
    if kind == "k":
        obj = orjson.loads(rest)
        if not isinstance(obj, dict) or not obj:
            raise ValueError(f"invalid FieldsV1 key element {text!r}")
        return key(obj)
    if kind == "v":
        return value(orjson.loads(rest))
    if kind == "i":
        return ("i", int(rest))
    raise ValueError(f"invalid FieldsV1 path element {text!r}")


def element_to_string(pe: PathElement) -> str:
    """The element as Kubernetes prints it in conflict messages: `.image`, `[name="c"]`, `[="x"]`, `[0]`."""
    kind, data = pe
    if kind == "f":
        return f".{data}"
    if kind == "k":
        return "[" + ",".join(f"{name}={text}" for name, text in data) + "]"
    if kind == "v":
        return f"[={data}]"
    return f"[{data}]"


def path_to_string(path: Path) -> str:
    return "".join(element_to_string(pe) for pe in path)


def sort_key(pe: PathElement) -> tuple[int, Any]:
    """FieldsV1 order of path elements: by kind (f, k, v, i), then by content."""
    kind, data = pe
    if kind == "k":
        return (1, [(name, text) for name, text in data])
    return (_KIND_ORDER.get(kind, 9), data)


def sort_paths(paths: Iterable[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: [sort_key(pe) for pe in p])


def to_fieldsv1(paths: Iterable[Path]) -> dict[str, Any]:
    """Encode a field set as a FieldsV1 object (sorted, `"."` first, like the Go encoder)."""
    trie: dict[PathElement, Any] = {}
    members: set[Path] = set()
    for path in paths:
        if not path:
            continue
        node = trie
        for pe in path:
            node = node.setdefault(pe, {})
        members.add(path)

    def encode(node: dict[PathElement, Any], prefix: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for pe in sorted(node, key=sort_key):
            child_path = (*prefix, pe)
            children = node[pe]
            if children:
                inner = encode(children, child_path)
                if child_path in members:
                    inner = {".": {}, **inner}
                out[element_to_fieldsv1(pe)] = inner
            else:
                out[element_to_fieldsv1(pe)] = {}
        return out

    return encode(trie, ())


def from_fieldsv1(obj: Mapping[str, Any]) -> FieldSet:
    """Decode a FieldsV1 object into a field set; raises ValueError if malformed."""
    out: FieldSet = set()

    def walk(node: Mapping[str, Any], prefix: Path) -> None:
        if not isinstance(node, Mapping):
            raise ValueError("FieldsV1 nodes must be objects")
        for text, child in node.items():
            if text == ".":
                if prefix:
                    out.add(prefix)
                continue
            path = (*prefix, element_from_fieldsv1(text))
            if not isinstance(child, Mapping):
                raise ValueError("FieldsV1 nodes must be objects")
            if not child:
                out.add(path)
            else:
                walk(child, path)

    walk(obj, ())
    return out


def with_prefixes(paths: Iterable[Path]) -> FieldSet:
    """The set plus every proper prefix of its paths (parents count as present)."""
    out: FieldSet = set()
    for path in paths:
        # Longest first: once a prefix is known, all shorter ones are too (siblings share parents).
        for n in range(len(path), 0, -1):
            prefix = path[:n]
            if prefix in out:
                break
            out.add(prefix)
    return out


def parse_dotted(path: str) -> Path:
    """`"status"` or `"metadata.labels"` -> a path of field elements (no list syntax)."""
    return tuple(("f", part) for part in path.split(".") if part)


def has_prefix(path: Path, prefix: Path) -> bool:
    return path[: len(prefix)] == prefix
