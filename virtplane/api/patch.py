"""The PATCH machinery of the Kubernetes API as pure functions.

- `json_merge_patch`: RFC 7386 (`application/merge-patch+json`; `kubectl patch --type merge`, and what
  `kubectl label/annotate/scale`, `kubectl edit` and client-side `kubectl apply` send for custom resources).
- `json_patch`: RFC 6902 (`application/json-patch+json`; `kubectl patch --type json`).
- `strategic_merge_patch`: Kubernetes' strategic merge patch (`application/strategic-merge-patch+json`;
  `kubectl patch` default, `kubectl edit` and client-side `kubectl apply` for built-in kinds). Which lists
  merge by key and which are replaced comes from a `MergeKeys` tree: `builtin_merge_keys(group, kind)` for
  built-ins, `merge_keys_from_schema(openAPIV3Schema)` for custom resources.

Every function returns a new object and never mutates its arguments. Errors are `PatchError`s carrying
the HTTP status the API server should answer with (400 malformed patch, 422 patch that does not apply).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import orjson

JSON = dict[str, Any]

ListType = Literal["atomic", "map", "set"]
PatchStrategy = Literal["merge", "replace"]


# ---------------------------------------------------------------------------------------------------------
# errors and JSON helpers


class PatchError(Exception):
    """A patch that cannot be applied. `status` is the HTTP status code for the API server's answer."""

    _REASONS: ClassVar[dict[int, str]] = {
        400: "BadRequest",
        409: "Conflict",
        415: "UnsupportedMediaType",
        422: "Invalid",
    }

    def __init__(self, message: str, *, status: int = 400, field: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    @property
    def reason(self) -> str:
        """The `Status.reason` Kubernetes uses for this status code."""
        return self._REASONS.get(self.status, "InternalError")


_MISSING: Any = object()


def deep_copy(value: Any) -> Any:
    """Copy a JSON value (dicts, lists and scalars): several times faster than copy.deepcopy."""
    if isinstance(value, dict):
        return {k: deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [deep_copy(v) for v in value]
    return value


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: 1 == 1.0, but true != 1 (Python's == says True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict):
        return isinstance(b, dict) and len(a) == len(b) and all(k in b and json_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _display(value: Any, limit: int = 120) -> str:
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dotted(path: Sequence[str | int]) -> str:
    """`("spec", "containers", 0, "env")` -> `spec.containers[0].env` (the Status cause field format)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


# ---------------------------------------------------------------------------------------------------------
# RFC 7386 JSON merge patch


def json_merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 merge patch: objects merge recursively, null deletes, anything else replaces.

    A non-object patch replaces the target wholesale (the RFC's rule); the API server rejects patches
    that are not objects before calling this. Arrays are always replaced, never merged.
    """
    if not isinstance(patch, dict):
        return deep_copy(patch)
    result = deep_copy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = json_merge_patch(result.get(k), v)
    return result


# ---------------------------------------------------------------------------------------------------------
# RFC 6902 JSON patch

_OPS = ("add", "remove", "replace", "move", "copy", "test")
_INDEX_RE = re.compile(r"0|[1-9][0-9]*")
_BAD_ESCAPE_RE = re.compile(r"~(?![01])")


def _pointer(ptr: Any, op: str, member: str) -> list[str]:
    if not isinstance(ptr, str):
        raise PatchError(f'{op} operation: "{member}" must be a string JSON pointer, got {_display(ptr)}')
    if ptr == "":
        return []
    if not ptr.startswith("/"):
        raise PatchError(f'{op} operation: invalid JSON pointer {ptr!r}: it must be empty or start with "/"')
    tokens = ptr[1:].split("/")
    for t in tokens:
        if _BAD_ESCAPE_RE.search(t):
            raise PatchError(f"{op} operation: invalid JSON pointer {ptr!r}: '~' must be followed by 0 or 1")
    # ~1 first: "~01" must decode to "~1", not "/".
    return [t.replace("~1", "/").replace("~0", "~") for t in tokens]


def _array_index(token: str, length: int, *, allow_end: bool, op: str, ptr: str) -> int:
    if allow_end and token == "-":
        return length
    if not _INDEX_RE.fullmatch(token):
        raise PatchError(
            f"{op} operation does not apply: {token!r} in path {ptr!r} is not a valid array index",
            status=422,
            field=ptr,
        )
    i = int(token)
    if i > length or (i == length and not allow_end):
        raise PatchError(
            f"{op} operation does not apply: index {i} in path {ptr!r} is out of range (array has {length} items)",
            status=422,
            field=ptr,
        )
    return i


def _resolve(doc: Any, tokens: list[str], op: str, ptr: str) -> Any:
    cur = doc
    for n, tok in enumerate(tokens):
        if isinstance(cur, dict):
            if tok not in cur:
                missing = "/" + "/".join(t.replace("~", "~0").replace("/", "~1") for t in tokens[: n + 1])
                where = "" if missing == ptr else f" ({missing} does not exist)"
                raise PatchError(
                    f"{op} operation does not apply: doc is missing path {ptr!r}{where}", status=422, field=ptr
                )
            cur = cur[tok]
        elif isinstance(cur, list):
            cur = cur[_array_index(tok, len(cur), allow_end=False, op=op, ptr=ptr)]
        else:
            raise PatchError(
                f"{op} operation does not apply: path {ptr!r} goes through a {type(cur).__name__} value",
                status=422,
                field=ptr,
            )
    return cur


def _container(doc: Any, tokens: list[str], op: str, ptr: str) -> Any:
    parent = _resolve(doc, tokens[:-1], op, ptr)
    if not isinstance(parent, dict | list):
        raise PatchError(
            f"{op} operation does not apply: the parent of {ptr!r} is not an object or array", status=422, field=ptr
        )
    return parent


def _add(doc: Any, tokens: list[str], value: Any, op: str, ptr: str) -> Any:
    if not tokens:
        return value
    parent = _container(doc, tokens, op, ptr)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    else:
        parent.insert(_array_index(last, len(parent), allow_end=True, op=op, ptr=ptr), value)
    return doc


def _remove(doc: Any, tokens: list[str], op: str, ptr: str) -> Any:
    if not tokens:
        raise PatchError(f"{op} operation does not apply: cannot remove the whole document", status=422, field=ptr)
    parent = _container(doc, tokens, op, ptr)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"{op} operation does not apply: doc is missing path {ptr!r}", status=422, field=ptr)
        return parent.pop(last)
    return parent.pop(_array_index(last, len(parent), allow_end=False, op=op, ptr=ptr))


def json_patch(target: Any, ops: Any) -> Any:
    """Apply an RFC 6902 JSON patch (add, remove, replace, move, copy, test) to a copy of `target`.

    The operations apply in order and atomically: on any error nothing is returned. Malformed operations
    raise 400, operations that do not apply to the document (missing path, failed test) raise 422.
    """
    if not isinstance(ops, list):
        raise PatchError(f"a JSON patch must be a JSON array of operations, got {_display(ops)}")
    doc = deep_copy(target)
    for n, operation in enumerate(ops):
        if not isinstance(operation, dict):
            raise PatchError(f"JSON patch operation #{n} must be an object, got {_display(operation)}")
        op = operation.get("op")
        if op not in _OPS:
            raise PatchError(
                f"JSON patch operation #{n}: unknown op {_display(op)} (expected one of {', '.join(_OPS)})"
            )
        if "path" not in operation:
            raise PatchError(f'JSON patch operation #{n} ({op}): missing "path"')
        ptr = operation["path"]
        tokens = _pointer(ptr, op, "path")
        if op in ("add", "replace", "test") and "value" not in operation:
            raise PatchError(f'{op} operation on {ptr!r}: missing "value"')
        if op in ("move", "copy") and "from" not in operation:
            raise PatchError(f'{op} operation on {ptr!r}: missing "from"')

        if op == "add":
            doc = _add(doc, tokens, deep_copy(operation["value"]), op, ptr)
        elif op == "remove":
            _remove(doc, tokens, op, ptr)
        elif op == "replace":
            if not tokens:
                doc = deep_copy(operation["value"])
                continue
            _resolve(doc, tokens, op, ptr)  # must exist; raises the "missing path" error otherwise
            parent = _container(doc, tokens, op, ptr)
            if isinstance(parent, dict):
                parent[tokens[-1]] = deep_copy(operation["value"])
            else:
                parent[_array_index(tokens[-1], len(parent), allow_end=False, op=op, ptr=ptr)] = deep_copy(
                    operation["value"]
                )
        elif op == "move":
            src = operation["from"]
            src_tokens = _pointer(src, op, "from")
            if src_tokens == tokens:
                _resolve(doc, tokens, op, src)
                continue
            if tokens[: len(src_tokens)] == src_tokens:
                raise PatchError(
                    f"move operation does not apply: cannot move {src!r} into its own child {ptr!r}",
                    status=422,
                    field=ptr,
                )
            moved = _remove(doc, src_tokens, op, src)
            doc = _add(doc, tokens, moved, op, ptr)
        elif op == "copy":
            src = operation["from"]
            copied = deep_copy(_resolve(doc, _pointer(src, op, "from"), op, src))
            doc = _add(doc, tokens, copied, op, ptr)
        else:  # test
            try:
                actual = _resolve(doc, tokens, op, ptr)
            except PatchError as e:
                raise PatchError(f"test operation failed: {e.message}", status=422, field=ptr) from None
            if not json_equal(actual, operation["value"]):
                raise PatchError(
                    f"test operation failed: value at {ptr!r} is {_display(actual)}, "
                    f"expected {_display(operation['value'])}",
                    status=422,
                    field=ptr,
                )
    return doc


# ---------------------------------------------------------------------------------------------------------
# merge keys: which lists merge by key, for strategic merge patch and server-side apply


@dataclasses.dataclass(frozen=True, slots=True)
class ListRule:
    """How one list field merges.

    `type`/`keys` are the server-side apply view (`x-kubernetes-list-type` and `-list-map-keys`): an
    atomic list is owned and replaced as a whole, a `map` list's items are identified by `keys`, a `set`
    list's items by their (scalar) value. `patch_strategy`/`patch_merge_keys` are the strategic merge
    patch view (`patchStrategy`/`patchMergeKey` tags): `merge` with keys merges items by key, `merge`
    without keys is a set of scalars, `replace` replaces the list. The two views usually agree but not
    always (container ports: SSA keys containerPort+protocol, SMP key containerPort only).
    """

    type: ListType = "atomic"
    keys: tuple[str, ...] = ()
    patch_strategy: PatchStrategy = "replace"
    patch_merge_keys: tuple[str, ...] = ()
    # Values for key fields an item may omit (ports' protocol defaults to TCP); SSA needs them to build
    # the item's identity.
    key_defaults: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def atomic(cls) -> ListRule:
        """Replaced as a whole by both patch kinds (the default for any list not described)."""
        return cls()

    @classmethod
    def keyed(
        cls,
        *keys: str,
        patch_key: str | None = None,
        defaults: Mapping[str, Any] | None = None,
        smp: bool = True,
        ssa: bool = True,
    ) -> ListRule:
        """A list of objects identified by `keys`. `patch_key` overrides the strategic merge key (default:
        all `keys`); `smp=False` makes strategic merge patch replace it, `ssa=False` makes apply treat it
        as atomic (Kubernetes has both kinds of mismatch)."""
        if not keys:
            raise ValueError("keyed lists need at least one key")
        return cls(
            type="map" if ssa else "atomic",
            keys=tuple(keys) if ssa else (),
            patch_strategy="merge" if smp else "replace",
            patch_merge_keys=((patch_key,) if patch_key else tuple(keys)) if smp else (),
            key_defaults=tuple(sorted((defaults or {}).items())),
        )

    @classmethod
    def scalar_set(cls, *, smp: bool = True, ssa: bool = True) -> ListRule:
        """A list of unique scalars (finalizers): strategic merge unions them, apply owns each value."""
        return cls(type="set" if ssa else "atomic", patch_strategy="merge" if smp else "replace")

    @property
    def merges(self) -> bool:
        return self.patch_strategy == "merge"


class MergeKeys:
    """Patch metadata for one position of an object tree, and (through `child`/`item`) for everything
    below it.

    A node describes a value: if the value is a list, `list_rule` says how it merges; `items` describes
    the list's items; `fields` describes named properties of an object; `values` describes the values
    of a map with arbitrary keys (`additionalProperties`, e.g. labels); `atomic` marks an object that
    is replaced and owned as a whole (`x-kubernetes-map-type: atomic`, LabelSelector).

    Positions are addressed by paths of segments where `"[]"` stands for "any item of this list" and
    `"*"` for "any key of this map": `("spec", "containers", "[]", "env")`, or in string form
    `"spec.containers[].env"`. Unknown positions resolve to an empty node: lists there are atomic.

    Build trees with `MergeKeys.build({"spec.containers": ListRule.keyed("name"), ...})`, combine them
    with `merged`. Nodes are treated as immutable once built and may be shared between trees.
    """

    __slots__ = ("atomic", "fields", "items", "list_rule", "values")

    def __init__(
        self,
        *,
        fields: dict[str, MergeKeys] | None = None,
        items: MergeKeys | None = None,
        values: MergeKeys | None = None,
        list_rule: ListRule | None = None,
        atomic: bool = False,
    ) -> None:
        self.fields: dict[str, MergeKeys] = fields if fields is not None else {}
        self.items = items
        self.values = values
        self.list_rule = list_rule
        self.atomic = atomic

    # -- navigation

    def child(self, name: str) -> MergeKeys:
        """The node of property `name` of the object this node describes."""
        node = self.fields.get(name)
        if node is not None:
            return node
        return self.values if self.values is not None else EMPTY

    def item(self) -> MergeKeys:
        """The node of the items of the list this node describes."""
        return self.items if self.items is not None else EMPTY

    def is_map_entry(self, name: str) -> bool:
        """True if `name` is a key of a free-form map (not a declared property)."""
        return self.values is not None and name not in self.fields

    def at(self, path: str | Sequence[str]) -> MergeKeys:
        """The node at `path` (`"[]"` = list item; a declared field wins over `"*"`)."""
        node = self
        for seg in _segments(path):
            node = node.item() if seg == "[]" else node.child(seg)
        return node

    def rule(self, path: str | Sequence[str]) -> ListRule | None:
        """The ListRule of the list at `path`, or None (atomic / replace) if none is declared."""
        return self.at(path).list_rule

    # -- construction

    @classmethod
    def build(
        cls,
        lists: Mapping[str, ListRule] | None = None,
        *,
        atomic: Iterable[str] = (),
        maps: Iterable[str] = (),
    ) -> MergeKeys:
        """A tree from dotted paths: `lists` maps list paths to their rules, `atomic` names objects
        that are replaced/owned whole, `maps` names free-form maps (their keys are owned one by one)."""
        root = cls()
        for path, rule in (lists or {}).items():
            root._make(path).list_rule = rule
        for path in atomic:
            root._make(path).atomic = True
        for path in maps:
            node = root._make(path)
            if node.values is None:
                node.values = cls()
        return root

    def _make(self, path: str | Sequence[str]) -> MergeKeys:
        node = self
        for seg in _segments(path):
            if seg == "[]":
                if node.items is None:
                    node.items = MergeKeys()
                node = node.items
            elif seg == "*":
                if node.values is None:
                    node.values = MergeKeys()
                node = node.values
            else:
                nxt = node.fields.get(seg)
                if nxt is None:
                    nxt = node.fields[seg] = MergeKeys()
                node = nxt
        return node

    def merged(self, other: MergeKeys) -> MergeKeys:
        """A new tree with the information of both; `other` wins where both describe a list or flag."""
        return _merge_nodes(self, other, {})

    def describe(self, prefix: str = "") -> dict[str, str]:
        """Flattened view for debugging and tests: `{"spec.containers": "map[name] merge(name)", ...}`."""
        out: dict[str, str] = {}
        self._describe(prefix, out, set())
        return out

    def _describe(self, prefix: str, out: dict[str, str], seen: set[int]) -> None:
        if id(self) in seen:
            return
        seen = seen | {id(self)}
        parts = []
        if self.list_rule is not None:
            r = self.list_rule
            ssa = f"map[{','.join(r.keys)}]" if r.type == "map" else r.type
            smp = (
                (f"merge({','.join(r.patch_merge_keys)})" if r.patch_merge_keys else "merge-set")
                if r.merges
                else "replace"
            )
            parts.append(f"{ssa} {smp}")
        if self.atomic:
            parts.append("atomic-object")
        if parts and prefix:
            out[prefix] = " ".join(parts)
        for name, node in self.fields.items():
            node._describe(f"{prefix}.{name}" if prefix else name, out, seen)
        if self.items is not None:
            self.items._describe(prefix + "[]", out, seen)
        if self.values is not None:
            self.values._describe(f"{prefix}.*" if prefix else "*", out, seen)

    def __repr__(self) -> str:
        return f"MergeKeys({self.describe()!r})"


EMPTY = MergeKeys()


def _segments(path: str | Sequence[str]) -> list[str]:
    if not isinstance(path, str):
        return list(path)
    out: list[str] = []
    for part in path.split("."):
        depth = 0
        while part.endswith("[]"):  # "a[]" is field a, then its items; "a[][]" a list of lists
            part = part[:-2]
            depth += 1
        if part:
            out.append(part)
        out.extend(["[]"] * depth)
    return out


def _merge_nodes(a: MergeKeys, b: MergeKeys, memo: dict[tuple[int, int], MergeKeys]) -> MergeKeys:
    ident = (id(a), id(b))
    if ident in memo:
        return memo[ident]
    out = MergeKeys(list_rule=b.list_rule or a.list_rule, atomic=a.atomic or b.atomic)
    memo[ident] = out
    for name in a.fields.keys() | b.fields.keys():
        if name in a.fields and name in b.fields:
            out.fields[name] = _merge_nodes(a.fields[name], b.fields[name], memo)
        else:
            out.fields[name] = a.fields.get(name) or b.fields[name]
    for attr in ("items", "values"):
        x, y = getattr(a, attr), getattr(b, attr)
        setattr(out, attr, _merge_nodes(x, y, memo) if x is not None and y is not None else (x or y))
    return out


# ---------------------------------------------------------------------------------------------------------
# strategic merge patch

_DIRECTIVE = "$patch"
_RETAIN_KEYS = "$retainKeys"
_DELETE_PRIMITIVES = "$deleteFromPrimitiveList/"
_SET_ORDER = "$setElementOrder/"
_DELETE: Any = object()  # result of merging a map that carries `$patch: delete`


def strategic_merge_patch(target: JSON, patch: JSON, merge_keys: MergeKeys | None = None) -> JSON:
    """Apply a Kubernetes strategic merge patch to a copy of `target`.

    Maps merge recursively and `null` deletes a key. Lists merge according to `merge_keys`: by merge key
    (items matched by key are merged, new items added), as a set of scalars (union), or by replacement
    (the default for lists not described). Directives:

    - `$patch: replace` in a map replaces the map; as a list item `{"$patch": "replace"}` replaces the list
      with the other items; `$patch: delete` in a map deletes it, as a list item (with the merge key)
      deletes the matching item; `$patch: merge` is the default and accepted anywhere.
    - `$retainKeys: [...]` clears every key of the target map not listed (kubectl sends it for fields with
      the retainKeys strategy, e.g. Deployment `spec.strategy` and pod volume sources).
    - `$deleteFromPrimitiveList/<field>: [...]` removes those values from a scalar list.
    - `$setElementOrder/<field>: [...]` gives the final order of the items it lists (merge-key objects or
      scalars); items not listed keep their place relative to the target's order.

    Without `$setElementOrder`, items in the patch keep the patch's order and come before target items
    they cannot be ordered against, which is what Kubernetes does: a container added by
    `kubectl patch` lands first, one added by `kubectl apply` (which sends `$setElementOrder`) lands where
    the manifest puts it.
    """
    if not isinstance(patch, dict):
        raise PatchError(f"a strategic merge patch must be a JSON object, got {_display(patch)}")
    base = deep_copy(target) if isinstance(target, dict) else {}
    result = _smp_map(base, patch, merge_keys or EMPTY, ())
    return {} if result is _DELETE else result


def _smp_map(orig: JSON, patch: JSON, node: MergeKeys, path: tuple[str | int, ...]) -> Any:
    """Merge `patch` into `orig` (a private copy, mutated) and return it, or _DELETE."""
    directive = patch.get(_DIRECTIVE, _MISSING)
    if directive is not _MISSING:
        if directive == "replace":
            rest = {k: v for k, v in patch.items() if k != _DIRECTIVE}
            return _smp_map({}, rest, node, path)
        if directive == "delete":
            return _DELETE
        if directive != "merge":
            raise PatchError(
                f"unknown {_DIRECTIVE} directive {_display(directive)} at {_dotted(path) or 'the top level'} "
                f"(expected replace, delete or merge)",
                field=_dotted(path),
            )

    retain = patch.get(_RETAIN_KEYS, _MISSING)
    if retain is not _MISSING:
        if not isinstance(retain, list) or not all(isinstance(k, str) for k in retain):
            raise PatchError(f"{_RETAIN_KEYS} at {_dotted(path)} must be a list of field names", field=_dotted(path))
        keep = set(retain)
        for k, v in patch.items():
            if v is None or k.startswith("$"):
                continue
            if k not in keep:
                raise PatchError(
                    f"the patch sets {_dotted((*path, k))} but {_RETAIN_KEYS} at {_dotted(path)} does not list {k!r}",
                    field=_dotted((*path, k)),
                )
        for k in [k for k in orig if k not in keep]:
            del orig[k]

    # Deletions from scalar lists go first; they never touch values the same patch adds.
    for k, v in patch.items():
        if not k.startswith(_DELETE_PRIMITIVES):
            continue
        name = k[len(_DELETE_PRIMITIVES) :]
        if not isinstance(v, list):
            raise PatchError(f"{k} at {_dotted(path) or 'the top level'} must be a list", field=_dotted((*path, name)))
        current = orig.get(name)
        if isinstance(current, list):
            orig[name] = [x for x in current if not any(json_equal(x, d) for d in v)]

    ordered: set[str] = set()
    for k, v in patch.items():
        if not k.startswith(_SET_ORDER):
            continue
        name = k[len(_SET_ORDER) :]
        if not isinstance(v, list):
            raise PatchError(f"{k} at {_dotted(path) or 'the top level'} must be a list", field=_dotted((*path, name)))
        child = node.child(name)
        rule = child.list_rule
        if rule is None or not rule.merges:
            continue  # order of a replaced list is the patch's own
        original = orig.get(name)
        original = original if isinstance(original, list) else None
        patch_list = patch.get(name, _MISSING)
        if isinstance(patch_list, list):
            _check_order(patch_list, v, rule, (*path, name))
            merged = _smp_list(original, patch_list, child, (*path, name))
        elif original is not None and patch_list is _MISSING:
            merged = original
        else:
            continue  # list deleted (null) or absent everywhere: nothing to order
        orig[name] = _enforce_order(merged, v, original or [], rule)
        ordered.add(name)

    for k, v in patch.items():
        if k.startswith("$") and (
            k in (_DIRECTIVE, _RETAIN_KEYS) or k.startswith(_DELETE_PRIMITIVES) or k.startswith(_SET_ORDER)
        ):
            continue
        if k in ordered:
            continue
        if v is None:
            orig.pop(k, None)
            continue
        child = node.child(k)
        current = orig.get(k, _MISSING)
        if isinstance(v, dict):
            merged = _smp_map(current if isinstance(current, dict) else {}, v, child, (*path, k))
            if merged is _DELETE:
                orig.pop(k, None)
            else:
                orig[k] = merged
        elif isinstance(v, list):
            orig[k] = _smp_list(current if isinstance(current, list) else None, v, child, (*path, k))
        else:
            orig[k] = v
    return orig


def _key_of(item: Any, keys: tuple[str, ...]) -> tuple[Any, ...] | None:
    """The merge-key values of a list item, or None if it is not an object or lacks a key."""
    if not isinstance(item, dict):
        return None
    try:
        return tuple(item[k] for k in keys)
    except KeyError:
        return None


def _ident(value: Any) -> Any:
    """A hashable stand-in for a JSON value such that json_equal values get equal stand-ins."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits and the like
        return repr(value)


def _identity_fn(keys: tuple[str, ...]) -> Any:
    """item -> identity: the merge-key values for keyed lists (None if absent), the value for scalars."""
    if not keys:
        return _ident

    def identity(item: Any) -> Any:
        kv = _key_of(item, keys)
        return None if kv is None else tuple(_ident(v) for v in kv)

    return identity


def _positions(items: Iterable[Any], identity: Any) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for i, item in enumerate(items):
        ident = identity(item)
        if ident is not None:
            out.setdefault(ident, i)
    return out


def _smp_list(original: list[Any] | None, patch: list[Any], node: MergeKeys, path: tuple[str | int, ...]) -> list[Any]:
    rule = node.list_rule
    if rule is None or not rule.merges:
        # Replace: the patch's list is the new value. Items are opaque, but nested maps of a list of
        # objects still drop directives a client might have sent ($patch: replace markers).
        return [
            item
            for item in (deep_copy(x) for x in patch)
            if not (isinstance(item, dict) and set(item) == {_DIRECTIVE} and item[_DIRECTIVE] == "replace")
        ]
    original = original or []
    keys = rule.patch_merge_keys
    if not keys:
        return _smp_scalar_list(original, patch, path)
    identity = _identity_fn(keys)

    items: list[JSON] = []
    replace = False
    deleted: set[Any] = set()
    for n, item in enumerate(patch):
        where = f"{_dotted(path)}[{n}]"
        if not isinstance(item, dict):
            raise PatchError(
                f"{where}: items of this list must be objects (merged by {', '.join(keys)}), got {_display(item)}",
                status=422,
                field=where,
            )
        directive = item.get(_DIRECTIVE, _MISSING)
        if directive is _MISSING or directive == "merge":
            if _key_of(item, keys) is None:
                raise PatchError(
                    f"{where}: item {_display(item)} does not contain the merge key "
                    f"{' and '.join(repr(k) for k in keys)}",
                    status=422,
                    field=where,
                )
            items.append(item if directive is _MISSING else {k: v for k, v in item.items() if k != _DIRECTIVE})
        elif directive == "delete":
            ident = identity(item)
            if ident is None:
                raise PatchError(
                    f"{where}: a {_DIRECTIVE}: delete item must name the merge key "
                    f"{' and '.join(repr(k) for k in keys)}",
                    status=422,
                    field=where,
                )
            deleted.add(ident)
        elif directive == "replace":
            replace = True
        else:
            raise PatchError(
                f"{where}: unknown {_DIRECTIVE} directive {_display(directive)} (expected replace, delete or merge)",
                field=where,
            )
    if replace:
        original = []
    elif deleted:
        original = [o for o in original if identity(o) not in deleted]

    server_order = _positions(original, identity)
    merged = [deep_copy(o) for o in original]
    at_index = dict(server_order)
    for item in items:
        ident = identity(item)
        at = at_index.get(ident)
        if at is None:
            result = _smp_map({}, item, node.item(), (*path, len(merged)))
            if result is not _DELETE:
                at_index[ident] = len(merged)
                merged.append(result)
        else:
            result = _smp_map(merged[at], item, node.item(), (*path, at))
            if result is not _DELETE:
                merged[at] = result
    return _interleave(merged, _positions(items, identity), server_order, identity)


def _smp_scalar_list(original: list[Any], patch: list[Any], path: tuple[str | int, ...]) -> list[Any]:
    for n, x in enumerate(patch):
        if isinstance(x, dict | list):
            raise PatchError(
                f"{_dotted(path)}[{n}]: this list merges as a set of scalars, got {_display(x)}",
                status=422,
                field=f"{_dotted(path)}[{n}]",
            )
    merged: list[Any] = []
    seen: set[Any] = set()
    for x in [*original, *patch]:
        ident = _ident(x)
        if ident not in seen:
            seen.add(ident)
            merged.append(deep_copy(x))
    return _interleave(merged, _positions(patch, _ident), _positions(original, _ident), _ident)


def _interleave(
    merged: list[Any], patch_order: dict[Any, int], server_order: dict[Any, int], identity: Any
) -> list[Any]:
    """Order a merged list: items named by the patch follow the patch's order, the others the target's,
    and the two runs are interleaved by the target's order where both sides know it (an item only the
    patch knows goes before the target items still waiting, as in Kubernetes)."""
    idents = [identity(x) for x in merged]
    patch_items = sorted(((patch_order[i], n) for n, i in enumerate(idents) if i in patch_order), key=lambda t: t[0])
    server_items = sorted(
        ((server_order.get(i, len(server_order)), n) for n, i in enumerate(idents) if i not in patch_order),
        key=lambda t: t[0],
    )
    out: list[Any] = []
    a = b = 0
    while a < len(server_items) or b < len(patch_items):
        if a >= len(server_items):
            out.append(merged[patch_items[b][1]])
            b += 1
        elif b >= len(patch_items):
            out.append(merged[server_items[a][1]])
            a += 1
        else:
            si = server_items[a][0]
            pj = server_order.get(idents[patch_items[b][1]], -1)
            # A target item goes first only if both are in the target and it was there before.
            if pj >= 0 and si < pj:
                out.append(merged[server_items[a][1]])
                a += 1
            else:
                out.append(merged[patch_items[b][1]])
                b += 1
    return out


def _check_order(patch_list: list[Any], order: list[Any], rule: ListRule, path: tuple[str | int, ...]) -> None:
    """Items the patch sets must appear in `$setElementOrder`, in the same relative order."""
    if not order:
        return  # as in Kubernetes: nothing to check against
    identity = _identity_fn(rule.patch_merge_keys)
    positions = _positions(order, identity)
    pos = -1
    for item in patch_list:
        if isinstance(item, dict) and _DIRECTIVE in item:
            continue
        at = positions.get(identity(item), -1)
        if at < 0 or at < pos:
            raise PatchError(
                f"the order of the items in {_dotted(path)} does not match {_SET_ORDER}{path[-1]}: "
                f"{_display(item)} is {'missing from it' if at < 0 else 'out of order'}",
                field=_dotted(path),
            )
        pos = at


def _enforce_order(merged: list[Any], order: list[Any], original: list[Any], rule: ListRule) -> list[Any]:
    identity = _identity_fn(rule.patch_merge_keys)
    return _interleave(merged, _positions(order, identity), _positions(original, identity), identity)


# ---------------------------------------------------------------------------------------------------------
# merge keys of built-in kinds


def _prefixed(prefix: str, rules: Mapping[str, ListRule]) -> dict[str, ListRule]:
    return {f"{prefix}.{path}": rule for path, rule in rules.items()}


_META_LISTS: dict[str, ListRule] = {
    "finalizers": ListRule.scalar_set(),
    "ownerReferences": ListRule.keyed("uid"),
    "managedFields": ListRule.atomic(),
}
_MAPS_OF_META = ("labels", "annotations")

_CONTAINER_LISTS: dict[str, ListRule] = {
    "ports": ListRule.keyed("containerPort", "protocol", patch_key="containerPort", defaults={"protocol": "TCP"}),
    "env": ListRule.keyed("name"),
    "volumeMounts": ListRule.keyed("mountPath"),
    "volumeDevices": ListRule.keyed("devicePath"),
    "resources.claims": ListRule.keyed("name", smp=False),
}

_POD_SPEC_LISTS: dict[str, ListRule] = {
    **{kind: ListRule.keyed("name") for kind in ("containers", "initContainers", "ephemeralContainers")},
    **{
        path: rule
        for kind in ("containers", "initContainers", "ephemeralContainers")
        for path, rule in _prefixed(f"{kind}[]", _CONTAINER_LISTS).items()
    },
    "volumes": ListRule.keyed("name"),
    "imagePullSecrets": ListRule.keyed("name"),
    "hostAliases": ListRule.keyed("ip"),
    "topologySpreadConstraints": ListRule.keyed("topologyKey", "whenUnsatisfiable", patch_key="topologyKey"),
    "resourceClaims": ListRule.keyed("name"),
    "schedulingGates": ListRule.keyed("name"),
    # tolerations, readinessGates, dnsConfig.*, affinity terms: atomic in Kubernetes (the default here)
}

_CONDITIONS = {"status.conditions": ListRule.keyed("type")}


def _pod_template(prefix: str) -> tuple[dict[str, ListRule], list[str], list[str]]:
    """List rules, atomic objects and free-form maps of a PodTemplateSpec at `prefix`."""
    lists = {
        **_prefixed(f"{prefix}.spec", _POD_SPEC_LISTS),
        **_prefixed(f"{prefix}.metadata", _META_LISTS),
    }
    atomic = [f"{prefix}.spec.nodeSelector"]
    maps = [f"{prefix}.metadata.{m}" for m in _MAPS_OF_META] + [f"{prefix}.spec.nodeSelector"]
    return lists, atomic, maps


def _builtin_rules(group: str, kind: str) -> tuple[dict[str, ListRule], list[str], list[str]]:
    lists: dict[str, ListRule] = dict(_prefixed("metadata", _META_LISTS))
    atomic: list[str] = []
    maps: list[str] = [f"metadata.{m}" for m in _MAPS_OF_META]

    def template(prefix: str) -> None:
        tl, ta, tm = _pod_template(prefix)
        lists.update(tl)
        atomic.extend(ta)
        maps.extend(tm)

    if group == "":
        if kind == "Pod":
            lists.update(_prefixed("spec", _POD_SPEC_LISTS))
            lists.update(_CONDITIONS)
            lists["status.podIPs"] = ListRule.keyed("ip")
            lists["status.hostIPs"] = ListRule.keyed("ip")
            lists["status.resourceClaimStatuses"] = ListRule.keyed("name")
            atomic.append("spec.nodeSelector")
            maps.append("spec.nodeSelector")
        elif kind == "PodTemplate":
            template("template")
        elif kind == "ReplicationController":
            template("spec.template")
            lists.update(_CONDITIONS)
            atomic.append("spec.selector")
        elif kind == "Service":
            lists["spec.ports"] = ListRule.keyed("port", "protocol", patch_key="port", defaults={"protocol": "TCP"})
            lists.update(_CONDITIONS)
            atomic.append("spec.selector")
            maps.append("spec.selector")
        elif kind == "Node":
            lists["spec.podCIDRs"] = ListRule.scalar_set()
            # spec.taints has no patch strategy in Kubernetes: replaced whole (kubectl taint sends the list).
            lists.update(_CONDITIONS)
            lists["status.addresses"] = ListRule.keyed("type", ssa=False)
        elif kind in ("Namespace", "PersistentVolumeClaim"):
            # Namespace spec.finalizers is atomic (replace) in Kubernetes.
            lists.update(_CONDITIONS)
        elif kind in ("ConfigMap", "Secret"):
            maps.extend(["data", "binaryData", "stringData"])
    elif group == "apps":
        if kind in ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"):
            template("spec.template")
            lists.update(_CONDITIONS)
            atomic.append("spec.selector")
    elif group == "batch":
        if kind == "Job":
            template("spec.template")
            lists["status.conditions"] = ListRule.keyed("type", ssa=False)
            atomic.append("spec.selector")
        elif kind == "CronJob":
            template("spec.jobTemplate.spec.template")
            atomic.append("spec.jobTemplate.spec.selector")
    elif group == "policy" and kind == "PodDisruptionBudget":
        lists.update(_CONDITIONS)
        atomic.append("spec.selector")
    elif group == "storage.k8s.io" and kind == "CSINode":
        lists["spec.drivers"] = ListRule.keyed("name")
    elif group == "apiextensions.k8s.io" and kind == "CustomResourceDefinition":
        lists.update(_CONDITIONS)
    return lists, atomic, maps


@functools.lru_cache(maxsize=128)
def builtin_merge_keys(group: str, kind: str) -> MergeKeys:
    """Strategic-merge and apply metadata of a built-in kind, as Kubernetes' Go struct tags declare it.

    Covered: ObjectMeta everywhere (finalizers as a set, ownerReferences by uid); Pod spec (containers,
    initContainers, ephemeralContainers by name; their env by name, ports by containerPort [apply:
    containerPort+protocol], volumeMounts by mountPath, volumeDevices by devicePath; volumes,
    imagePullSecrets, resourceClaims, schedulingGates by name; hostAliases by ip; topologySpreadConstraints
    by topologyKey) and the same under every pod template (Deployment, ReplicaSet, StatefulSet, DaemonSet,
    Job, CronJob, ReplicationController, PodTemplate); status.conditions by type where Kubernetes merges
    them; Service ports by port [apply: port+protocol]; Node podCIDRs as a set. Everything else is
    replaced, as in Kubernetes: tolerations, Node taints and Namespace spec.finalizers carry no patch
    strategy there.
    """
    lists, atomic, maps = _builtin_rules(group, kind)
    return MergeKeys.build(lists, atomic=atomic, maps=maps)


# ---------------------------------------------------------------------------------------------------------
# merge keys from OpenAPI schemas (CRDs)


def object_meta_merge_keys() -> MergeKeys:
    """The `metadata` node every object has (CRD schemas only say `type: object` for it)."""
    return MergeKeys.build(_prefixed("metadata", _META_LISTS), maps=[f"metadata.{m}" for m in _MAPS_OF_META])


def merge_keys_from_schema(schema: Mapping[str, Any] | None, definitions: Mapping[str, Any] | None = None) -> MergeKeys:
    """Merge metadata from an OpenAPI v3 schema (a CRD version's `openAPIV3Schema`).

    Lists: `x-kubernetes-list-type: map` with `x-kubernetes-list-map-keys` merge by those keys
    (strategic merge uses `x-kubernetes-patch-merge-key` when present, else all the map keys); `set`
    merges scalars; `atomic` or unmarked lists are replaced. A list with only the legacy
    `x-kubernetes-patch-strategy: merge` + `x-kubernetes-patch-merge-key` merges by that key for
    strategic merge patch and stays atomic for apply, as in Kubernetes. Objects marked
    `x-kubernetes-map-type: atomic` are owned whole; `additionalProperties` make a free-form map.
    `$ref`s (`#/definitions/X` or `#/components/schemas/X`) resolve against `definitions`, so a Swagger
    spec can be used directly. ObjectMeta's rules are always added under `metadata`.
    """
    defs = definitions or {}
    cache: dict[str, MergeKeys] = {}
    # The schema's own metadata rules (a Swagger ObjectMeta) win over the built-in ones.
    return object_meta_merge_keys().merged(_schema_node(schema or {}, defs, cache, 0))


def _schema_node(
    schema: Mapping[str, Any], defs: Mapping[str, Any], cache: dict[str, MergeKeys], depth: int
) -> MergeKeys:
    if depth > 200 or not isinstance(schema, Mapping):
        return EMPTY
    ref = schema.get("$ref")
    if ref is None:
        # OpenAPI v3 wraps references in allOf to attach defaults/descriptions.
        for sub in schema.get("allOf") or ():
            if isinstance(sub, Mapping) and "$ref" in sub:
                ref = sub["$ref"]
                break
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        if name in cache:
            base = cache[name]
        else:
            base = cache[name] = MergeKeys()  # placeholder first: schemas may be recursive
            target = defs.get(name)
            if isinstance(target, Mapping):
                built = _schema_node(target, defs, cache, depth + 1)
                base.fields, base.items, base.values = built.fields, built.items, built.values
                base.list_rule, base.atomic = built.list_rule, built.atomic
        local = {k: v for k, v in schema.items() if k not in ("$ref", "allOf")}
        if not any(k.startswith("x-kubernetes-") or k in ("properties", "items") for k in local):
            return base
        return base.merged(_schema_node(local, defs, cache, depth + 1))

    node = MergeKeys()
    for name, sub in (schema.get("properties") or {}).items():
        node.fields[name] = _schema_node(sub, defs, cache, depth + 1)
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        node.values = _schema_node(extra, defs, cache, depth + 1)
    elif extra is True:
        node.values = MergeKeys()
    items = schema.get("items")
    if isinstance(items, Mapping):
        node.items = _schema_node(items, defs, cache, depth + 1)
    if schema.get("x-kubernetes-map-type") == "atomic":
        node.atomic = True
    rule = _schema_list_rule(schema)
    if rule is not None:
        node.list_rule = rule
    return node


def _schema_list_rule(schema: Mapping[str, Any]) -> ListRule | None:
    list_type = schema.get("x-kubernetes-list-type")
    strategies = str(schema.get("x-kubernetes-patch-strategy") or "").split(",")
    patch_key = schema.get("x-kubernetes-patch-merge-key")
    if list_type == "map":
        keys = [k for k in schema.get("x-kubernetes-list-map-keys") or () if isinstance(k, str)]
        if not keys:
            return None
        defaults = {}
        item_props = (schema.get("items") or {}).get("properties") or {}
        for k in keys:
            default = (item_props.get(k) or {}).get("default", _MISSING)
            if isinstance(default, str | int | float | bool):  # key values are scalars (and hashed)
                defaults[k] = default
        return ListRule.keyed(*keys, patch_key=patch_key if isinstance(patch_key, str) else None, defaults=defaults)
    if list_type == "set":
        return ListRule.scalar_set()
    if "merge" in strategies and list_type in (None, "atomic"):
        if isinstance(patch_key, str) and patch_key:
            return ListRule.keyed(patch_key, ssa=False)
        return ListRule.scalar_set(ssa=False)
    if list_type == "atomic":
        return ListRule.atomic()
    return None
