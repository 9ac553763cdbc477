"""Server-side apply and field ownership (`metadata.managedFields`), as pure functions.

Model (Kubernetes' structured-merge-diff, reduced to what one-version-per-kind needs):

- A *field set* is a set of paths (see `virtplane.api.fieldpath`). An object's own field set holds its
  scalars, atomic lists/objects, empty objects, the items of associative (`map`) and `set` lists, and
  the keys of free-form maps; a plain object is a container, not a member, unless it is empty.
- Every manager entry in `metadata.managedFields` owns a field set. Identity of an entry: manager name,
  operation, subresource and, for Update entries only, apiVersion.
- `server_side_apply`: the applied configuration is merged into the live object (objects merge, atomic
  lists are replaced, associative lists merge item by item, sets union). The applier then owns exactly
  the configuration's field set. Fields it owned before and no longer applies are removed from the object
  unless some other manager owns them (or something beneath them). A field the apply changes that another
  manager owns is a conflict (409) unless `force`, which moves ownership to the applier. Applying the
  value another manager already set shares ownership.
- `update_managed_fields`: after any other write (create/update/patch, `operation="Update"`), the writer
  gains the fields whose value it changed or added, every other manager loses them, and everyone loses
  the fields the write removed, which is how a later apply can detect that someone else touched a field.

Simplified on purpose: no version conversion (one served version per kind; an entry recorded at another
apiVersion is compared as if it were the same); no per-field "reset" strategies beyond the `reset_fields`
prefixes the caller passes (status on the main resource, spec on /status); list items with duplicate keys
are matched to the first occurrence; free-form map entries whose values are objects are not marked as
members in FieldsV1 unless the MergeKeys say the object is a map (`maps=` / `additionalProperties`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from virtplane.api import fieldpath as fp
from virtplane.api.fieldpath import FieldSet, Path, PathElement
from virtplane.api.patch import EMPTY, JSON, ListRule, MergeKeys, PatchError, deep_copy, json_equal

LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"
BEFORE_FIRST_APPLY = "before-first-apply"
ANCIENT_CHANGES = "ancient-changes"
MAX_UPDATE_MANAGERS = 10
FIELD_MANAGER_MAX_LENGTH = 128
# Kubernetes' limit on the total size of an object's annotations.
_ANNOTATIONS_SIZE_LIMIT = 256 * 1024

# Fields nobody owns: identity and server-maintained metadata (Kubernetes' stripMetaManager).
_STRIPPED: frozenset[Path] = frozenset(
    {(("f", "apiVersion"),), (("f", "kind"),), (("f", "metadata"),)}
    | {
        (("f", "metadata"), ("f", name))
        for name in (
            "name",
            "namespace",
            "creationTimestamp",
            "selfLink",
            "uid",
            "clusterName",
            "generation",
            "managedFields",
            "resourceVersion",
        )
    }
)


class ApplyConflictError(PatchError):
    """An apply changed fields other managers own. `conflicts` lists (manager, field path) pairs;
    `causes` are ready-made `Status.details.causes` entries (reason FieldManagerConflict)."""

    def __init__(self, message: str, conflicts: list[tuple[str, str]], causes: list[JSON]) -> None:
        super().__init__(message, status=409, field=conflicts[0][1] if conflicts else "")
        self.conflicts = conflicts
        self.causes = causes


# ---------------------------------------------------------------------------------------------------------
# managers


@dataclasses.dataclass(slots=True)
class _Entry:
    manager: str
    operation: str
    api_version: str
    subresource: str
    time: str | None
    fields: FieldSet

    @property
    def ident(self) -> tuple[str, str, str, str]:
        # Apply entries are one per manager whatever the version it applied with (Kubernetes drops the
        # apiVersion from the identity of appliers).
        version = "" if self.operation == "Apply" else self.api_version
        return (self.manager, self.operation, version, self.subresource)

    def display(self) -> str:
        """The manager as Kubernetes names it in conflict messages."""
        text = f'"{self.manager}"'
        if self.subresource:
            text += f' with subresource "{self.subresource}"'
        if self.operation == "Update":
            text += f" using {self.api_version}"
        return text

    def encode(self) -> JSON:
        entry: JSON = {"manager": self.manager, "operation": self.operation, "apiVersion": self.api_version}
        if self.time:
            entry["time"] = self.time
        entry["fieldsType"] = "FieldsV1"
        entry["fieldsV1"] = fp.to_fieldsv1(self.fields)
        if self.subresource:
            entry["subresource"] = self.subresource
        return entry


_Managers = dict[tuple[str, str, str, str], _Entry]


def decode_managed_fields(entries: Any) -> _Managers:
    """Parse `metadata.managedFields`; raises PatchError (400) if it is malformed."""
    out: _Managers = {}
    if entries is None:
        return out
    if not isinstance(entries, list):
        raise PatchError("metadata.managedFields must be a list", field="metadata.managedFields")
    for n, raw in enumerate(entries):
        where = f"metadata.managedFields[{n}]"
        if not isinstance(raw, dict):
            raise PatchError(f"{where} must be an object", field=where)
        fields_type = raw.get("fieldsType", "FieldsV1")
        if fields_type != "FieldsV1":
            raise PatchError(f'{where}.fieldsType must be "FieldsV1", got {fields_type!r}', field=where)
        try:
            fields = fp.from_fieldsv1(raw.get("fieldsV1") or {})
        except (ValueError, orjson.JSONDecodeError) as e:
            raise PatchError(f"{where}.fieldsV1 is malformed: {e}", field=where) from None
        entry = _Entry(
            manager=str(raw.get("manager") or ""),
            operation=str(raw.get("operation") or "Update"),
            api_version=str(raw.get("apiVersion") or ""),
            subresource=str(raw.get("subresource") or ""),
            time=raw.get("time") if isinstance(raw.get("time"), str) else None,
            fields=fields,
        )
        if entry.operation not in ("Apply", "Update"):
            raise PatchError(f'{where}.operation must be "Apply" or "Update"', field=where)
        previous = out.get(entry.ident)
        if previous is not None:  # duplicated entries: merge, keep the latest time
            previous.fields |= entry.fields
            previous.time = max(filter(None, (previous.time, entry.time)), default=None)
        else:
            out[entry.ident] = entry
    return out


def encode_managed_fields(managers: _Managers) -> list[JSON]:
    """Entries sorted as Kubernetes sorts them: Apply before Update, then by time, manager, version."""
    ordered = sorted(
        (e for e in managers.values() if e.fields),
        key=lambda e: (e.operation, e.time or "", e.manager, e.api_version, e.subresource),
    )
    return [e.encode() for e in ordered]


def _cap_update_managers(managers: _Managers) -> None:
    """Keep at most MAX_UPDATE_MANAGERS Update entries: fold the oldest into `ancient-changes`."""
    updaters = sorted(
        (e for e in managers.values() if e.operation == "Update"),
        key=lambda e: (e.time or "", e.ident),
    )
    excess = len(updaters) - MAX_UPDATE_MANAGERS
    if excess <= 0:
        return
    # Folding n+1 oldest entries into one bucket removes n entries.
    fold = updaters[: excess + 1]
    newest = fold[-1]
    bucket = _Entry(ANCIENT_CHANGES, "Update", newest.api_version, "", newest.time, set())
    for e in fold:
        bucket.fields |= e.fields
        del managers[e.ident]
    existing = managers.pop(bucket.ident, None)
    if existing is not None:
        bucket.fields |= existing.fields
    managers[bucket.ident] = bucket


# ---------------------------------------------------------------------------------------------------------
# walking objects with their MergeKeys


class _BadItem(Exception):
    """A list item whose identity cannot be computed (not an object, missing key, ...)."""


def _rule_type(node: MergeKeys) -> str:
    rule = node.list_rule
    return rule.type if rule is not None else "atomic"


@functools.lru_cache(maxsize=1024)
def _key_plan(rule: ListRule) -> tuple[tuple[str, Any], ...]:
    """The rule's key fields in FieldsV1 order (sorted), each with its default (or _ABSENT)."""
    defaults = dict(rule.key_defaults)
    return tuple((k, defaults.get(k, _ABSENT)) for k in sorted(rule.keys))


def _item_pe(item: Any, rule: ListRule) -> PathElement:
    if rule.type == "set":
        if isinstance(item, dict | list):
            raise _BadItem("items of a set list must be scalars")
        return fp.value(item)
    if not isinstance(item, dict):
        raise _BadItem("items of an associative list must be objects")
    parts = []
    for k, default in _key_plan(rule):
        v = item.get(k)
        if v is None:
            if default is _ABSENT:
                raise _BadItem(f"item omits key field {k!r} (and it has no default)")
            v = default
        parts.append((k, fp.canonical_json(v)))
    return ("k", tuple(parts))


def _index_items(items: list[Any], rule: ListRule) -> list[tuple[PathElement, Any]]:
    """(path element, item) for each item, first occurrence of a duplicated key only."""
    out: list[tuple[PathElement, Any]] = []
    seen: set[PathElement] = set()
    for item in items:
        pe = _item_pe(item, rule)
        if pe not in seen:
            seen.add(pe)
            out.append((pe, item))
    return out


def _granular_list(value: Any, node: MergeKeys) -> bool:
    return isinstance(value, list) and _rule_type(node) in ("map", "set")


def object_fields(obj: Any, node: MergeKeys, *, strict: bool = False) -> FieldSet:
    """The field set of a (partial) object: what an applier of `obj` owns.

    With `strict`, list items without a usable identity raise PatchError (an apply configuration must be
    well-formed); otherwise such a list counts as one atomic field.
    """
    out: FieldSet = set()
    _collect(obj, node, (), out, strict)
    return out


def _collect(value: Any, node: MergeKeys, path: Path, out: FieldSet, strict: bool) -> None:
    if isinstance(value, dict) and not node.atomic:
        for k, v in value.items():
            child_path = (*path, ("f", k))
            _collect(v, node.child(k), child_path, out, strict)
            if v is None or v == {} or node.is_map_entry(k):
                out.add(child_path)
        return
    if _granular_list(value, node):
        rule = node.list_rule
        assert rule is not None
        try:
            indexed = _index_items(value, rule)
            if strict and len(indexed) != len(value):
                raise _BadItem("duplicate entries for the same key")
        except _BadItem as e:
            if strict:
                raise PatchError(f"{fp.path_to_string(path)}: {e}", field=fp.path_to_string(path)) from None
            out.add(path)
            return
        for pe, item in indexed:
            item_path = (*path, pe)
            _collect(item, node.item(), item_path, out, strict)
            out.add(item_path)
        return
    if path:
        out.add(path)


@dataclasses.dataclass(slots=True)
class _Comparison:
    added: FieldSet = dataclasses.field(default_factory=set)
    modified: FieldSet = dataclasses.field(default_factory=set)
    removed: FieldSet = dataclasses.field(default_factory=set)


def _empty(v: Any) -> bool:
    return v is _ABSENT or v is None or v == {} or v == []


_ABSENT: Any = object()


def compare(lhs: Any, rhs: Any, node: MergeKeys) -> _Comparison:
    """Paths added, modified and removed going from `lhs` to `rhs` (containers included in
    added/removed, as structured-merge-diff reports them)."""
    out = _Comparison()
    _compare(lhs, rhs, node, (), out)
    return out


def _compare(lhs: Any, rhs: Any, node: MergeKeys, path: Path, out: _Comparison) -> None:
    if lhs is _ABSENT and rhs is _ABSENT:
        return
    if _is_map(lhs, rhs, node):
        left = lhs if isinstance(lhs, dict) else {}
        right = rhs if isinstance(rhs, dict) else {}
        for k in left.keys() | right.keys():
            _compare(left.get(k, _ABSENT), right.get(k, _ABSENT), node.child(k), (*path, ("f", k)), out)
    else:
        items = _list_items(lhs, rhs, node)
        if items is None:  # a leaf: scalar, null, atomic value, empty on both sides, or mismatched shapes
            if not path:
                return
            if lhs is _ABSENT:
                out.added.add(path)
            elif rhs is _ABSENT:
                out.removed.add(path)
            elif not json_equal(lhs, rhs):
                out.modified.add(path)
            return
        left_items, right_items = items
        item_node = node.item()
        for pe in left_items.keys() | right_items.keys():
            _compare(left_items.get(pe, _ABSENT), right_items.get(pe, _ABSENT), item_node, (*path, pe), out)
    # Containers that appear or disappear are reported too (structured-merge-diff's post-item hook).
    if path:
        if lhs is _ABSENT:
            out.added.add(path)
        elif rhs is _ABSENT:
            out.removed.add(path)


def _added_paths(value: Any, node: MergeKeys, path: Path, out: FieldSet) -> None:
    """Exactly what `compare(absent, value)` reports as added, in one read-only pass, without copies."""
    if _is_map(_ABSENT, value, node):
        for k, v in value.items():
            if not path and k == "metadata" and isinstance(v, dict) and "managedFields" in v:
                v = {mk: mv for mk, mv in v.items() if mk != "managedFields"}  # ownership is not content
            _added_paths(v, node.child(k), (*path, ("f", k)), out)
    else:
        items = _list_items(_ABSENT, value, node)
        if items is not None:
            item_node = node.item()
            for pe, item in items[1].items():
                _added_paths(item, item_node, (*path, pe), out)
    if path:
        out.add(path)


def _added_tree(value: Any, node: MergeKeys) -> dict[str, Any]:
    """FieldsV1 of what `value` sets below it: `to_fieldsv1(_added_paths(value))` for one subtree, built
    directly. Every container below is a member, hence its `"."`."""
    out: dict[str, Any] = {}
    if _is_map(_ABSENT, value, node):
        for k in sorted(value):  # all "f:" elements: FieldsV1 order is the name order
            child = _added_tree(value[k], node.child(k))
            out[f"f:{k}"] = {".": {}, **child} if child else {}
        return out
    items = _list_items(_ABSENT, value, node)
    if items is not None:
        item_node = node.item()
        by_element = items[1]
        for pe in sorted(by_element, key=fp.sort_key):
            child = _added_tree(by_element[pe], item_node)
            out[fp.element_to_fieldsv1(pe)] = {".": {}, **child} if child else {}
    return out


def _created_fieldsv1(obj: JSON, node: MergeKeys) -> dict[str, Any]:
    """The FieldsV1 a create's manager owns: the whole object less what nobody owns (`_STRIPPED`,
    metadata.managedFields), exactly as `to_fieldsv1(_strip(added))` would encode it."""
    out: dict[str, Any] = {}
    for k in sorted(obj):
        v = obj[k]
        if k in ("apiVersion", "kind"):
            continue
        if k == "metadata" and isinstance(v, dict) and not node.child(k).atomic:
            meta_node = node.child(k)
            meta: dict[str, Any] = {}
            for mk in sorted(v):
                if (("f", "metadata"), ("f", mk)) in _STRIPPED:
                    continue
                child = _added_tree(v[mk], meta_node.child(mk))
                meta[f"f:{mk}"] = {".": {}, **child} if child else {}
            if meta:
                out["f:metadata"] = meta
            continue
        child = _added_tree(v, node.child(k))
        out[f"f:{k}"] = {".": {}, **child} if child else {}
    return out


def _is_map(lhs: Any, rhs: Any, node: MergeKeys) -> bool:
    """Both sides objects (or absent), granular, and not both empty: compare field by field."""
    if node.atomic:
        return False
    if not (isinstance(lhs, dict) or lhs is _ABSENT) or not (isinstance(rhs, dict) or rhs is _ABSENT):
        return False
    return not (_empty(lhs) and _empty(rhs))


def _list_items(lhs: Any, rhs: Any, node: MergeKeys) -> tuple[dict[PathElement, Any], dict[PathElement, Any]] | None:
    """Both sides keyed/set lists (or absent), not both empty, items identifiable: the items by path
    element. None means: compare as one leaf."""
    rule = node.list_rule
    if rule is None or rule.type not in ("map", "set"):
        return None
    if not (isinstance(lhs, list) or lhs is _ABSENT) or not (isinstance(rhs, list) or rhs is _ABSENT):
        return None
    if _empty(lhs) and _empty(rhs):
        return None
    try:
        left = dict(_index_items(lhs, rule)) if isinstance(lhs, list) else {}
        right = dict(_index_items(rhs, rule)) if isinstance(rhs, list) else {}
    except _BadItem:
        return None
    return left, right


# An applied null over a live value: the field is owned and unset. It stays in the merged object as this
# marker until ownership is settled, so that it counts as a modification (a conflict with its owner), as
# the null does in Kubernetes before the typed object drops it.
_UNSET: Any = object()


def _merge(live: Any, applied: Any, node: MergeKeys) -> Any:
    """Structured merge of an apply configuration into the live value (new object; inputs untouched)."""
    if live is _ABSENT:
        return _without_nulls(applied)
    if isinstance(applied, dict) and isinstance(live, dict) and not node.atomic:
        out = dict(live)
        for k, v in applied.items():
            if v is None:
                if live.get(k) is not None:
                    out[k] = _UNSET
            else:
                out[k] = _merge(live.get(k, _ABSENT), v, node.child(k))
        return out
    if isinstance(applied, list) and isinstance(live, list) and _rule_type(node) in ("map", "set"):
        rule = node.list_rule
        assert rule is not None
        try:
            left = _index_items(live, rule)
        except _BadItem:
            return _without_nulls(applied)  # a malformed live list is replaced by the configuration
        right = _index_items(applied, rule)
        return [item for _, item in _merge_items(left, right, node.item())]
    return _without_nulls(applied)


def _merge_items(
    left: list[tuple[PathElement, Any]], right: list[tuple[PathElement, Any]], node: MergeKeys
) -> list[tuple[PathElement, Any]]:
    """Merge two keyed item lists. The result keeps the configuration's order for the items it names
    and puts live-only items where they were (the order structured-merge-diff produces): new items land
    after the live items that precede them, reordered items follow the configuration."""
    lmap = dict(left)
    rmap = dict(right)
    shared = [pe for pe, _ in right if pe in lmap]
    out: list[tuple[PathElement, Any]] = []
    done: set[PathElement] = set()
    next_shared = 0
    li = ri = 0

    def take(pe: PathElement) -> None:
        nonlocal next_shared
        out.append((pe, _merge(lmap.get(pe, _ABSENT), rmap[pe], node) if pe in rmap else lmap[pe]))
        done.add(pe)
        if next_shared < len(shared) and shared[next_shared] == pe:
            next_shared += 1

    while li < len(left) or ri < len(right):
        if li < len(left) and ri < len(right):
            lpe = left[li][0]
            if lpe == right[ri][0]:
                take(lpe)
                li += 1
                ri += 1
                continue
            if lpe in rmap and (next_shared >= len(shared) or shared[next_shared] != lpe):
                li += 1  # a shared item the configuration places later: wait for it
                continue
        if li < len(left):
            lpe = left[li][0]
            if lpe not in rmap:
                take(lpe)
                li += 1
                continue
            if lpe in done:
                li += 1
                continue
        if ri < len(right):
            rpe = right[ri][0]
            if rpe not in done:
                take(rpe)
            ri += 1
    return out


def _drop_unset(value: Any) -> None:
    if isinstance(value, dict):
        for k in [k for k, v in value.items() if v is _UNSET]:
            del value[k]
        for v in value.values():
            _drop_unset(v)
    elif isinstance(value, list):
        for v in value:
            _drop_unset(v)


def _without_nulls(value: Any) -> Any:
    """Deep copy without null-valued object keys (a null in an apply configuration unsets a field)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _remove_paths(obj: Any, paths: Iterable[Path], node: MergeKeys) -> None:
    """Delete the values at `paths` from `obj` in place (paths under another removed path are moot)."""
    todo = sorted(set(paths), key=len)
    removed: list[Path] = []
    for path in todo:
        if any(fp.has_prefix(path, r) for r in removed):
            continue
        if _remove_one(obj, path, node):
            removed.append(path)


def _remove_one(value: Any, path: Path, node: MergeKeys) -> bool:
    parent = value
    for depth, (kind, data) in enumerate(path):
        last = depth == len(path) - 1
        if kind == "f":
            if not isinstance(parent, dict) or data not in parent:
                return False
            if last:
                del parent[data]
                return True
            parent, node = parent[data], node.child(data)
            continue
        if not isinstance(parent, list):
            return False
        if kind == "i":
            at = data if 0 <= data < len(parent) else None
        else:
            rule = node.list_rule
            if rule is None:
                return False
            at = None
            for i, item in enumerate(parent):
                try:
                    if _item_pe(item, rule) == (kind, data):
                        at = i
                        break
                except _BadItem:
                    continue
        if at is None:
            return False
        if last:
            del parent[at]
            return True
        parent, node = parent[at], node.item()
    return False


def _get_path(obj: Any, path: Path) -> Any:
    cur = obj
    for kind, data in path:
        if kind != "f" or not isinstance(cur, dict) or data not in cur:
            return _ABSENT
        cur = cur[data]
    return cur


def _restore(merged: JSON, live: JSON, prefixes: list[Path]) -> None:
    """Put back the live value (or absence) of fields the caller's strategy resets."""
    for prefix in prefixes:
        parent = _get_path(merged, prefix[:-1])
        if not isinstance(parent, dict):
            continue
        value = _get_path(live, prefix)
        if value is _ABSENT:
            parent.pop(prefix[-1][1], None)
        else:
            parent[prefix[-1][1]] = deep_copy(value)


def _without_prefixes(fields: FieldSet, prefixes: list[Path]) -> FieldSet:
    return {p for p in fields if not any(fp.has_prefix(p, r) for r in prefixes)}


def _strip(fields: FieldSet) -> FieldSet:
    return {
        p for p in fields if p not in _STRIPPED and not fp.has_prefix(p, (("f", "metadata"), ("f", "managedFields")))
    }


def _body(obj: JSON | None) -> JSON:
    """A deep copy without metadata.managedFields (ownership is not part of the compared content)."""
    if obj is None:
        return {}
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or "managedFields" not in meta:
        return deep_copy(obj)
    # Skip copying managedFields (often the biggest part of an object) only to drop it.
    out = {k: deep_copy(v) for k, v in obj.items() if k != "metadata"}
    out["metadata"] = {k: deep_copy(v) for k, v in meta.items() if k != "managedFields"}
    return {k: out[k] for k in obj}  # keep the key order


def _set_managed_fields(obj: JSON, managers: _Managers) -> None:
    encoded = encode_managed_fields(managers)
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        if not encoded:
            return
        meta = obj["metadata"] = {}
    if encoded:
        meta["managedFields"] = encoded
    else:
        meta.pop("managedFields", None)


# ---------------------------------------------------------------------------------------------------------
# apply


def server_side_apply(
    live: JSON | None,
    applied: JSON,
    *,
    manager: str,
    force: bool,
    list_keys: MergeKeys | None,
    now: str,
    subresource: str = "",
    reset_fields: Iterable[str] = (),
) -> JSON:
    """Apply `applied` (an `application/apply-patch+yaml` body, already parsed) for field manager
    `manager` onto `live` (None: the object does not exist yet and is created from the configuration).

    Returns the new object with `metadata.managedFields` updated. Raises ApplyConflictError (409) when
    the apply changes fields other managers own and `force` is false, PatchError 400 for a malformed
    configuration (`metadata.managedFields` set, list items without their keys, duplicates, ...) and 422
    when `manager` is empty.

    `reset_fields`: dotted prefixes the resource's strategy resets on this endpoint, e.g. `("status",)` on
    the main resource of a kind with a status subresource, `("spec",)` on /status. Their live values are
    kept and the applier does not own them, as with Kubernetes' per-strategy reset fields.

    Like Kubernetes, when `manager == "kubectl"` and the live object carries
    `kubectl.kubernetes.io/last-applied-configuration` (it was client-side applied before), conflicts on
    fields whose live value still equals the last-applied one are not reported (ownership is taken), and
    the annotation is rewritten to the new configuration, so switching to `--server-side` just works.
    """
    if not manager:
        # Kubernetes' PatchOptions validation; kubectl always sends one ("kubectl").
        raise PatchError(
            'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch',
            status=422,
            field="fieldManager",
        )
    if not isinstance(applied, dict):
        raise PatchError(f"an apply configuration must be an object, got {type(applied).__name__}")
    meta = applied.get("metadata")
    if isinstance(meta, dict) and meta.get("managedFields") is not None:
        raise PatchError("metadata.managedFields must be nil", field="metadata.managedFields")
    node = list_keys or EMPTY
    resets = [fp.parse_dotted(r) for r in reset_fields]
    version = str(applied.get("apiVersion") or (live or {}).get("apiVersion") or "")

    base = _body(live)
    config = deep_copy(applied)
    managers: _Managers = {}
    if live is not None:
        try:
            managers = decode_managed_fields((live.get("metadata") or {}).get("managedFields"))
        except PatchError:
            managers = {}  # unreadable ownership: start over as if the object had none
        if not managers:
            # Someone created the object without recording ownership: whatever is there belongs to
            # "before-first-apply", so the first apply conflicts instead of silently taking it over.
            fields = _strip(_without_prefixes(_update_gain(compare({}, base, node)), resets))
            if fields:
                pre = _Entry(BEFORE_FIRST_APPLY, "Update", version, "", None, fields)
                managers[pre.ident] = pre

    me = _Entry(manager, "Apply", version, subresource, None, set())
    previous = managers.get(me.ident)
    config_fields = _without_prefixes(object_fields(config, node, strict=True), resets)
    me.fields = config_fields

    # _merge shares untouched subtrees with `base`; pruning below edits in place, so detach first.
    merged = deep_copy(_merge(base, config, node))
    _restore(merged, base, resets)

    if previous is not None and previous.fields:
        # Prune: what we applied last time and nobody (us included) still owns goes away. A path stays
        # while anything under it is owned; identity fields never go.
        owned = set(config_fields)
        for ident, entry in managers.items():
            if ident != me.ident:
                owned |= entry.fields
        candidates = previous.fields - owned
        if candidates:  # usually empty: a re-apply of the same configuration
            gone = fp.with_prefixes(candidates) - fp.with_prefixes(owned)
            gone = {p for p in gone if p not in _STRIPPED and p[0] not in (("f", "apiVersion"), ("f", "kind"))}
            _remove_paths(merged, _without_prefixes(gone, resets), node)

    diff = compare(base, merged, node)
    changed = diff.modified | diff.added
    conflicts = {
        ident: entry.fields & changed
        for ident, entry in managers.items()
        if ident != me.ident and entry.fields & changed
    }
    if conflicts and not force:
        remaining = conflicts
        if manager == "kubectl" and live is not None:
            allowed = _allowed_from_last_applied(base, node)
            remaining = {i: s - allowed for i, s in conflicts.items() if s - allowed}
        if remaining:
            raise _conflict_error(managers, remaining)

    _drop_unset(merged)
    for ident, lost in conflicts.items():
        managers[ident].fields -= lost
    if diff.removed:
        for ident, entry in managers.items():
            if ident != me.ident:
                entry.fields -= diff.removed
    me.fields = _strip(me.fields)
    object_changed = bool(changed or diff.removed)
    me.time = now if object_changed or previous is None or not previous.time else previous.time
    managers[me.ident] = me
    for ident in [i for i, e in managers.items() if not e.fields]:
        del managers[ident]

    if manager == "kubectl" and LAST_APPLIED_ANNOTATION in ((base.get("metadata") or {}).get("annotations") or {}):
        _sync_last_applied(merged, applied)
    _cap_update_managers(managers)
    _set_managed_fields(merged, managers)
    return merged


def _update_gain(diff: _Comparison) -> FieldSet:
    return diff.modified | diff.added


def _conflict_error(managers: _Managers, conflicts: Mapping[tuple[str, str, str, str], FieldSet]) -> ApplyConflictError:
    pairs: list[tuple[str, str]] = []
    causes: list[JSON] = []
    lines: list[str] = []
    total = sum(len(s) for s in conflicts.values())
    # Group by manager in a stable order (Kubernetes sorts by the encoded manager identity).
    for ident in sorted(conflicts):
        entry = managers[ident]
        paths = [fp.path_to_string(p) for p in fp.sort_paths(conflicts[ident])]
        if total > 1:
            lines.append(f"conflicts with {entry.display()}:")
            lines.extend(f"- {p}" for p in paths)
        for p in paths:
            pairs.append((entry.manager, p))
            causes.append({"reason": "FieldManagerConflict", "message": f"conflict with {entry.display()}", "field": p})
    if total == 1:
        (ident,) = conflicts
        message = f"Apply failed with 1 conflict: conflict with {managers[ident].display()}: {pairs[0][1]}"
    else:
        message = f"Apply failed with {total} conflicts: " + "\n".join(lines)
    return ApplyConflictError(message, pairs, causes)


def _allowed_from_last_applied(live: JSON, node: MergeKeys) -> FieldSet:
    """Fields of the last client-side applied configuration whose live value is still what it set."""
    text = ((live.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED_ANNOTATION)
    if not isinstance(text, str) or not text:
        return set()
    try:
        last = orjson.loads(text)
    except orjson.JSONDecodeError:
        return set()
    if not isinstance(last, dict) or last.get("apiVersion") != live.get("apiVersion"):
        return set()
    diff = compare(last, live, node)
    return object_fields(last, node) - diff.modified - diff.added - diff.removed


def _sync_last_applied(obj: JSON, applied: JSON) -> None:
    config = deep_copy(applied)
    annotations = (config.get("metadata") or {}).get("annotations")
    if isinstance(annotations, dict):
        annotations.pop(LAST_APPLIED_ANNOTATION, None)
        if not annotations:
            del config["metadata"]["annotations"]
    text = orjson.dumps(config, option=orjson.OPT_SORT_KEYS).decode() + "\n"
    annotations = obj.setdefault("metadata", {}).setdefault("annotations", {})
    annotations[LAST_APPLIED_ANNOTATION] = text
    if sum(len(k) + len(v) for k, v in annotations.items() if isinstance(v, str)) > _ANNOTATIONS_SIZE_LIMIT:
        del annotations[LAST_APPLIED_ANNOTATION]  # too big to keep, as Kubernetes does


# ---------------------------------------------------------------------------------------------------------
# update


def _is_reset(entries: Any) -> bool:
    """`managedFields: []` or `[{}]` in a write asks to clear ownership."""
    return isinstance(entries, list) and (entries == [] or entries == [{}])


def update_managed_fields(
    old: JSON | None,
    new: JSON,
    *,
    manager: str,
    operation: str = "Update",
    subresource: str = "",
    now: str,
    list_keys: MergeKeys | None = None,
) -> None:
    """Record, in place on `new`, the ownership change of a non-apply write from `old` (None: create).

    Call it after the write's content is final (defaults applied, reset fields restored). `manager` is
    the request's `fieldManager` or the name Kubernetes derives from the User-Agent (kubectl sends
    `kubectl-edit`, `kubectl-patch`, `kubectl-label`, `kubectl-client-side-apply`, `kubectl-create`, ...).
    Pass the kind's `list_keys` so list items are tracked one by one; without them lists count as one
    field each.

    Which ownership the write starts from follows Kubernetes: a main-resource write may carry its own
    `metadata.managedFields` (used when non-empty; `[]` or `[{}]` clears them); otherwise, and always for a
    subresource, the live object's entries are used.
    """
    node = list_keys or EMPTY
    new_meta = new.get("metadata") if isinstance(new.get("metadata"), dict) else None
    new_entries = (new_meta or {}).get("managedFields")
    old_entries = ((old or {}).get("metadata") or {}).get("managedFields")

    def decode_or_empty(entries: Any) -> _Managers:
        try:
            return decode_managed_fields(entries)
        except PatchError:
            return {}

    if subresource:
        managers = decode_or_empty(old_entries)
    elif _is_reset(new_entries):
        managers = {}
    else:
        managers = decode_or_empty(new_entries) or decode_or_empty(old_entries)

    if old is None and not managers and not subresource:
        # The usual create: one manager owns everything written. Encode its FieldsV1 straight from the
        # object (no path set, no strip pass, no trie): the create path's hottest step otherwise.
        tree = _created_fieldsv1(new, node)
        if tree:
            if new_meta is None:
                new_meta = new["metadata"] = {}
            new_meta["managedFields"] = [{
                "manager": manager, "operation": operation, "apiVersion": str(new.get("apiVersion") or ""),
                "time": now, "fieldsType": "FieldsV1", "fieldsV1": tree,
            }]
        elif new_meta is not None:
            new_meta.pop("managedFields", None)
        return
    if old is None:
        # A create owns everything it wrote: walk the new object once, read-only, instead of a
        # two-sided comparison over deep copies.
        added: FieldSet = set()
        _added_paths(new, node, (), added)
        gained, removed = _strip(added), set()
    else:
        diff = compare(_body(old), _body(new), node)
        gained = _strip(diff.modified | diff.added)
        removed = diff.removed
    version = str(new.get("apiVersion") or "")
    me = _Entry(manager, operation, version, subresource, None, set())
    for ident, entry in managers.items():
        if ident != me.ident:
            entry.fields -= gained
            entry.fields -= removed
    previous = managers.get(me.ident)
    me.fields = _strip(((previous.fields - removed) if previous else set()) | gained)
    me.time = now if gained or previous is None else previous.time
    managers[me.ident] = me
    for ident in [i for i, e in managers.items() if not e.fields]:
        del managers[ident]
    _cap_update_managers(managers)
    _set_managed_fields(new, managers)


def manager_from_user_agent(user_agent: str) -> str:
    """The field manager Kubernetes records for a write without `fieldManager`: the User-Agent up to the
    first "/" (`kubectl/v1.32.4 (linux/amd64) ...` -> `kubectl`), printable characters only, at most
    128 bytes."""
    out = ""
    size = 0
    for ch in user_agent.split("/", 1)[0]:
        if not ch.isprintable():
            continue
        size += len(ch.encode())
        if size > FIELD_MANAGER_MAX_LENGTH:
            break
        out += ch
    return out


def managed_field_paths(obj: JSON, manager: str, operation: str = "Apply", subresource: str = "") -> list[str]:
    """The paths `manager` owns in `obj`, printed like Kubernetes prints them (for tests and debugging)."""
    managers = decode_managed_fields((obj.get("metadata") or {}).get("managedFields"))
    out: FieldSet = set()
    for entry in managers.values():
        if entry.manager == manager and entry.operation == operation and entry.subresource == subresource:
            out |= entry.fields
    return [fp.path_to_string(p) for p in fp.sort_paths(out)]
