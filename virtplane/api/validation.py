"""Structural-schema validation, unknown-field detection and pruning, and ObjectMeta validation.

`compile_schema(schema)` turns an openAPIV3Schema (as CRDs carry it) into a tree of small node objects
once; `Validator.validate(obj)` then walks the object and the tree together, so a typical VM costs a few
dozen microseconds. Messages and field paths follow kube-apiserver's CRD validation, e.g.

    spec.running: Invalid value: "string": spec.running in body must be of type boolean: "string"

(`Cause.field` = "spec.running", `Cause.message` = everything after the first ": ").

Order of use in the API server, as in Kubernetes: `prune` (drops unknown fields, and nulls of
non-nullable fields as Kubernetes does before defaulting; returns the unknown fields' paths for
fieldValidation, in the same walk) -> `validate`. `unknown_fields` reports without pruning.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from virtplane.api.resources import Cause

JSON = dict[str, Any]

# Fields of metav1.ObjectMeta: what an object's top-level `metadata` may hold.
OBJECT_META_FIELDS = frozenset(
    {
        "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
        "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
        "ownerReferences", "finalizers", "managedFields",
    }
)

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _is_integer(v: Any) -> bool:
    # JSON has one number type; 3.0 is an integer to Kubernetes as well.
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and math.isfinite(v) and v.is_integer())


_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": _is_integer,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


_SIMPLE_TYPES: dict[str, frozenset[type]] = {
    "string": frozenset({str}),
    "boolean": frozenset({bool}),
    "integer": frozenset({int}),
    "number": frozenset({int, float}),
}


def format_value(v: Any) -> str:
    """A bad value as apimachinery's field errors print it (strings quoted, numbers bare)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if isinstance(v, float) else str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def invalid(path: str, value: Any, detail: str) -> Cause:
    return Cause("FieldValueInvalid", f"Invalid value: {format_value(value)}: {detail}", path)


def required(path: str, detail: str = "") -> Cause:
    return Cause("FieldValueRequired", "Required value" + (f": {detail}" if detail else ""), path)


def not_supported(path: str, value: Any, valid: list[Any]) -> Cause:
    detail = ", ".join(format_value(x) if isinstance(x, str) else json.dumps(x) for x in valid)
    return Cause("FieldValueNotSupported", f"Unsupported value: {format_value(value)}: supported values: {detail}",
                 path)


def duplicate(path: str, value: Any) -> Cause:
    return Cause("FieldValueDuplicate", f"Duplicate value: {format_value(value)}", path)


def forbidden(path: str, detail: str) -> Cause:
    return Cause("FieldValueForbidden", f"Forbidden: {detail}", path)


def too_long(path: str, max_len: int) -> Cause:
    return Cause("FieldValueTooLong", f"Too long: may not be more than {max_len} bytes", path)


def too_many(path: str, actual: int, max_items: int) -> Cause:
    return Cause("FieldValueTooMany", f"Too many: {actual}: must have at most {max_items} items", path)


class _Node:
    """One compiled schema node. Slots, and checks precomputed, because validation runs on every write."""

    __slots__ = (
        "additional",
        "additional_ok",
        "embedded",
        "enum",
        "enum_set",
        "excl_max",
        "excl_min",
        "int_or_string",
        "int_range",
        "items",
        "list_keys",
        "list_type",
        "max_items",
        "max_length",
        "max_props",
        "maximum",
        "min_items",
        "min_length",
        "min_props",
        "minimum",
        "nullable",
        "pattern",
        "pattern_src",
        "preserve",
        "properties",
        "required",
        "simple",
        "type",
        "type_check",
    )

    def __init__(self, schema: JSON) -> None:
        self.type: str | None = schema.get("type")
        self.type_check = _TYPE_CHECKS.get(self.type) if self.type else None
        self.nullable = bool(schema.get("nullable"))
        self.int_or_string = bool(schema.get("x-kubernetes-int-or-string"))
        self.preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        self.embedded = bool(schema.get("x-kubernetes-embedded-resource"))
        props = schema.get("properties") or {}
        self.properties: dict[str, _Node] = {k: _Node(v) for k, v in props.items()}
        self.required: tuple[str, ...] = tuple(schema.get("required") or ())
        ap = schema.get("additionalProperties")
        self.additional: _Node | None = _Node(ap) if isinstance(ap, dict) else None
        # additionalProperties: true (or a schema) means "a map"; unknown keys are not unknown fields.
        self.additional_ok = ap is True or isinstance(ap, dict)
        items = schema.get("items")
        self.items: _Node | None = _Node(items) if isinstance(items, dict) else None
        enum = schema.get("enum")
        self.enum: list[Any] | None = list(enum) if enum else None
        try:
            self.enum_set: frozenset[Any] | None = frozenset(enum) if enum else None
        except TypeError:  # enum of objects: fall back to list membership
            self.enum_set = None
        self.pattern_src: str | None = schema.get("pattern")
        self.pattern = re.compile(self.pattern_src) if self.pattern_src else None
        self.minimum = schema.get("minimum")
        self.maximum = schema.get("maximum")
        self.excl_min = bool(schema.get("exclusiveMinimum"))
        self.excl_max = bool(schema.get("exclusiveMaximum"))
        self.min_length = schema.get("minLength")
        self.max_length = schema.get("maxLength")
        self.min_items = schema.get("minItems")
        self.max_items = schema.get("maxItems")
        self.min_props = schema.get("minProperties")
        self.max_props = schema.get("maxProperties")
        self.int_range = _INT_RANGES.get(schema.get("format", "")) if self.type == "integer" else None
        self.list_type: str | None = schema.get("x-kubernetes-list-type")
        self.list_keys: tuple[str, ...] = tuple(schema.get("x-kubernetes-list-map-keys") or ())
        # Most nodes are unconstrained scalar leaves: their parent checks the value's exact Python type
        # against this set and skips the call entirely (the slow path still handles 3.0-as-integer etc.).
        self.simple: frozenset[type] | None = None
        if (self.type in _SIMPLE_TYPES and not self.int_or_string and self.enum is None and self.pattern is None
                and self.minimum is None and self.maximum is None and self.min_length is None
                and self.max_length is None and self.int_range is None):
            self.simple = _SIMPLE_TYPES[self.type]

    # ---- validation

    def check(self, v: Any, path: str, errs: list[Cause]) -> None:
        if v is None:
            if not self.nullable and (self.type or self.int_or_string):
                expected = "integer,string" if self.int_or_string else self.type
                errs.append(invalid(path, "null", f'{path or "body"} in body must be of type {expected}: "null"'))
            return
        if self.int_or_string:
            if not (isinstance(v, str) or _is_integer(v)):
                t = _json_type(v)
                errs.append(invalid(path, t, f'{path} in body must be of type integer,string: "{t}"'))
                return
        elif self.type_check is not None and not self.type_check(v):
            t = _json_type(v)
            errs.append(invalid(path, t, f'{path or "body"} in body must be of type {self.type}: "{t}"'))
            return
        if isinstance(v, dict):
            self._check_object(v, path, errs)
        elif isinstance(v, list):
            self._check_array(v, path, errs)
        elif isinstance(v, str):
            self._check_string(v, path, errs)
        elif not isinstance(v, bool):
            self._check_number(v, path, errs)
        if self.enum is not None:
            ok = (v in self.enum_set) if self.enum_set is not None and not isinstance(v, (dict, list)) \
                else (v in self.enum)
            if not ok:
                errs.append(not_supported(path, v, self.enum))

    def _check_object(self, v: JSON, path: str, errs: list[Cause]) -> None:
        props = self.properties
        add = self.additional
        for key, val in v.items():
            node = props.get(key)
            if node is None:
                node = add
                if node is None:
                    continue
            simple = node.simple
            if simple is not None and type(val) in simple:
                continue
            node.check(val, f"{path}.{key}" if path else key, errs)
        for r in self.required:
            if r not in v:
                errs.append(required(_child(path, r)))
        if self.max_props is not None and len(v) > self.max_props:
            errs.append(invalid(path, len(v), f"{path} in body should have at most {self.max_props} properties"))
        if self.min_props is not None and len(v) < self.min_props:
            errs.append(invalid(path, len(v), f"{path} in body should have at least {self.min_props} properties"))

    def _check_array(self, v: list[Any], path: str, errs: list[Cause]) -> None:
        items = self.items
        if items is not None:
            simple = items.simple
            for i, x in enumerate(v):
                if simple is None or type(x) not in simple:
                    items.check(x, f"{path}[{i}]", errs)
        if self.max_items is not None and len(v) > self.max_items:
            errs.append(too_many(path, len(v), self.max_items))
        if self.min_items is not None and len(v) < self.min_items:
            errs.append(invalid(path, len(v), f"{path} in body should have at least {self.min_items} items"))
        if self.list_type == "set":
            seen: list[Any] = []
            for i, x in enumerate(v):
                if x in seen:
                    errs.append(duplicate(f"{path}[{i}]", x))
                else:
                    seen.append(x)
        elif self.list_type == "map" and self.list_keys:
            seen_keys: set[str] = set()
            for i, x in enumerate(v):
                if not isinstance(x, dict):
                    continue
                key_val = {k: x.get(k) for k in self.list_keys}
                k = json.dumps(key_val, sort_keys=True)
                if k in seen_keys:
                    errs.append(duplicate(f"{path}[{i}]", key_val))
                seen_keys.add(k)

    def _check_string(self, v: str, path: str, errs: list[Cause]) -> None:
        if self.max_length is not None and len(v) > self.max_length:
            errs.append(too_long(path, self.max_length))
        if self.min_length is not None and len(v) < self.min_length:
            errs.append(invalid(path, v, f"{path} in body should be at least {self.min_length} chars long"))
        if self.pattern is not None and self.pattern.search(v) is None:
            errs.append(invalid(path, v, f"{path} in body should match '{self.pattern_src}'"))

    def _check_number(self, v: float, path: str, errs: list[Cause]) -> None:
        if self.minimum is not None:
            if self.excl_min and v <= self.minimum:
                errs.append(invalid(path, v, f"{path} in body should be greater than {self.minimum}"))
            elif v < self.minimum:
                errs.append(invalid(path, v, f"{path} in body should be greater than or equal to {self.minimum}"))
        if self.maximum is not None:
            if self.excl_max and v >= self.maximum:
                errs.append(invalid(path, v, f"{path} in body should be less than {self.maximum}"))
            elif v > self.maximum:
                errs.append(invalid(path, v, f"{path} in body should be less than or equal to {self.maximum}"))
        if self.int_range is not None:
            lo, hi = self.int_range
            if v < lo:
                errs.append(invalid(path, v, f"{path} in body should be greater than or equal to {lo}"))
            elif v > hi:
                errs.append(invalid(path, v, f"{path} in body should be less than or equal to {hi}"))

    # ---- unknown fields / pruning

    def walk_unknown(self, v: Any, path: str, out: list[str], prune: bool, *, is_root: bool = False) -> None:
        # Only containers can hold unknown fields: scalars are skipped without a call or a path string
        # (most of an object's keys), which is what keeps this walk cheap on the create path.
        if isinstance(v, dict):
            if self.preserve and not self.properties:
                return
            meta_like = is_root or self.embedded
            props = self.properties
            drop: list[str] = []
            for key, val in v.items():
                if meta_like:
                    if key == "metadata":
                        _walk_metadata(val, f"{path}.{key}" if path else key, out, drop_nulls=prune)
                        continue
                    if key in ("apiVersion", "kind"):
                        continue
                node = props.get(key)
                if node is None:
                    node = self.additional
                    if node is None:
                        if not (self.preserve or self.additional_ok):
                            out.append(f"{path}.{key}" if path else key)
                            drop.append(key)
                        continue
                if val is None:
                    if prune and not node.nullable:
                        drop.append(key)  # Kubernetes drops nulls of non-nullable fields, silently
                    continue
                if isinstance(val, (dict, list)):
                    node.walk_unknown(val, f"{path}.{key}" if path else key, out, prune)
            if prune:
                for key in drop:
                    del v[key]
        elif isinstance(v, list) and self.items is not None:
            items = self.items
            for i, x in enumerate(v):
                if isinstance(x, (dict, list)):
                    items.walk_unknown(x, f"{path}[{i}]", out, prune)


def _walk_metadata(meta: Any, path: str, out: list[str], *, drop_nulls: bool) -> None:
    if not isinstance(meta, dict):
        return
    drop = []
    for key, val in meta.items():
        if key not in OBJECT_META_FIELDS:
            out.append(f"{path}.{key}")
            drop.append(key)
        elif val is None:
            drop.append(key)
    if drop_nulls:
        for key in drop:
            del meta[key]


class Validator:
    """A compiled openAPIV3Schema of a whole object. Thread-safe and reusable; holds no object state."""

    __slots__ = ("_root", "schema")

    def __init__(self, schema: JSON) -> None:
        self.schema = schema
        self._root = _Node(schema)

    def validate(self, obj: Any) -> list[Cause]:
        """Schema violations (type, required, enum, pattern, bounds, lengths, int32/int64 range)."""
        errs: list[Cause] = []
        root = self._root
        if not isinstance(obj, dict):
            t = _json_type(obj)
            return [invalid("", t, f'body must be of type object: "{t}"')]
        # The root's metadata is ObjectMeta, validated by validate_object_meta, not by the schema.
        for key, val in obj.items():
            if key == "metadata":
                continue
            node = root.properties.get(key) or root.additional
            if node is not None:
                node.check(val, key, errs)
        for r in root.required:
            if r not in obj:
                errs.append(required(r))
        return errs

    def unknown_fields(self, obj: Any) -> list[str]:
        """Paths (`spec.template.spec.domain.devices.disks[0].foo`) of fields the schema does not know,
        honouring x-kubernetes-preserve-unknown-fields and additionalProperties."""
        out: list[str] = []
        self._root.walk_unknown(obj, "", out, False, is_root=True)
        return out

    def prune(self, obj: Any) -> list[str]:
        """Removes unknown fields in place (and nulls of non-nullable fields, as Kubernetes does);
        returns the unknown fields' paths."""
        out: list[str] = []
        self._root.walk_unknown(obj, "", out, True, is_root=True)
        return out


def compile_schema(schema: JSON) -> Validator:
    return Validator(schema)


# --------------------------------------------------------------------------------------------------
# ObjectMeta (apimachinery's ValidateObjectMeta and the name/label rules it uses)

DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN_FMT = DNS1123_LABEL_FMT + r"(\." + DNS1123_LABEL_FMT + ")*"
DNS1035_LABEL_FMT = "[a-z]([-a-z0-9]*[a-z0-9])?"
QUALIFIED_NAME_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
LABEL_VALUE_FMT = "(" + QUALIFIED_NAME_FMT + ")?"

_DNS1123_LABEL_RE = re.compile(f"^{DNS1123_LABEL_FMT}$")
_DNS1123_SUBDOMAIN_RE = re.compile(f"^{DNS1123_SUBDOMAIN_FMT}$")
_DNS1035_LABEL_RE = re.compile(f"^{DNS1035_LABEL_FMT}$")
_QUALIFIED_NAME_RE = re.compile(f"^{QUALIFIED_NAME_FMT}$")
_LABEL_VALUE_RE = re.compile(f"^{LABEL_VALUE_FMT}$")

TOTAL_ANNOTATION_SIZE_LIMIT = 256 * 1024
STANDARD_FINALIZERS = frozenset({"kubernetes", "orphan", "foregroundDeletion"})


def regex_error(msg: str, fmt: str, *examples: str) -> str:
    """apimachinery's RegexError wording, including its double space between examples."""
    if not examples:
        return f"{msg} (regex used for validation is '{fmt}')"
    ex = "".join(("" if i == 0 else " or ") + f"'{e}', " for i, e in enumerate(examples))
    return f"{msg} (e.g. {ex}regex used for validation is '{fmt}')"


def max_len_error(n: int) -> str:
    return f"must be no more than {n} characters"


def is_dns1123_label(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append(max_len_error(63))
    if not _DNS1123_LABEL_RE.match(value):
        errs.append(regex_error(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
            "start and end with an alphanumeric character", DNS1123_LABEL_FMT, "my-name", "123-abc"))
    return errs


def is_dns1123_subdomain(value: str) -> list[str]:
    errs = []
    if len(value) > 253:
        errs.append(max_len_error(253))
    if not _DNS1123_SUBDOMAIN_RE.match(value):
        errs.append(regex_error(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
            "and must start and end with an alphanumeric character", DNS1123_SUBDOMAIN_FMT, "example.com"))
    return errs


def is_dns1035_label(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append(max_len_error(63))
    if not _DNS1035_LABEL_RE.match(value):
        errs.append(regex_error(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
            "alphabetic character, and end with an alphanumeric character", DNS1035_LABEL_FMT, "my-name",
            "abc-123"))
    return errs


_QN_MSG = ("must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
           "alphanumeric character")


def is_qualified_name(value: str) -> list[str]:
    errs: list[str] = []
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            errs.append("prefix part must be non-empty")
        else:
            errs.extend("prefix part " + m for m in is_dns1123_subdomain(prefix))
    else:
        return [
            "a qualified name " + regex_error(_QN_MSG, QUALIFIED_NAME_FMT, "MyName", "my.name", "123-abc")
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        errs.append("name part must be non-empty")
    elif len(name) > 63:
        errs.append("name part " + max_len_error(63))
    if not _QUALIFIED_NAME_RE.match(name):
        errs.append("name part " + regex_error(_QN_MSG, QUALIFIED_NAME_FMT, "MyName", "my.name", "123-abc"))
    return errs


def is_valid_label_value(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append(max_len_error(63))
    if not _LABEL_VALUE_RE.match(value):
        errs.append(regex_error(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and "
            "must start and end with an alphanumeric character", LABEL_VALUE_FMT, "MyValue", "my_value",
            "12345"))
    return errs


def is_path_segment_name(value: str) -> list[str]:
    """apimachinery's IsValidPathSegmentName: the names of RBAC objects (`kubevirt.io:admin`)."""
    if value in (".", ".."):
        return [f"may not be '{value}'"]
    return [f"may not contain '{c}'" for c in ("/", "%") if c in value]


_NAME_FUNCS: dict[str, Callable[[str], list[str]]] = {
    "subdomain": is_dns1123_subdomain,
    "path": is_path_segment_name,
    "label": is_dns1123_label,
    "dns1035": is_dns1035_label,
}


def _name_errors(fn: Callable[[str], list[str]], value: str, prefix: bool) -> list[str]:
    # generateName is a prefix: a trailing '-' is fine since a random suffix follows (maskTrailingDash).
    if prefix and len(value) > 1 and value.endswith("-"):
        value = value[:-1] + "a"
    return fn(value)


def validate_labels(labels: Any, path: str) -> list[Cause]:
    causes: list[Cause] = []
    if labels is None:
        return causes
    if not isinstance(labels, dict):
        return [invalid(path, _json_type(labels), f'{path} in body must be of type object: "{_json_type(labels)}"')]
    for k, v in labels.items():
        for msg in is_qualified_name(k):
            causes.append(invalid(path, k, msg))
        if not isinstance(v, str):
            causes.append(invalid(f"{path}.{k}", _json_type(v),
                                  f'{path}.{k} in body must be of type string: "{_json_type(v)}"'))
            continue
        for msg in is_valid_label_value(v):
            causes.append(invalid(path, v, msg))
    return causes


def validate_annotations(annotations: Any, path: str) -> list[Cause]:
    causes: list[Cause] = []
    if annotations is None:
        return causes
    if not isinstance(annotations, dict):
        t = _json_type(annotations)
        return [invalid(path, t, f'{path} in body must be of type object: "{t}"')]
    total = 0
    for k, v in annotations.items():
        for msg in is_qualified_name(k.lower()):
            causes.append(invalid(path, k, msg))
        if not isinstance(v, str):
            causes.append(invalid(f"{path}.{k}", _json_type(v),
                                  f'{path}.{k} in body must be of type string: "{_json_type(v)}"'))
            continue
        total += len(k.encode()) + len(v.encode())
    if total > TOTAL_ANNOTATION_SIZE_LIMIT:
        causes.append(too_long(path, TOTAL_ANNOTATION_SIZE_LIMIT))
    return causes


def _validate_finalizers(finalizers: Any, path: str, strict: bool = True) -> list[Cause]:
    causes: list[Cause] = []
    if not isinstance(finalizers, list):
        return causes
    seen: set[str] = set()
    for i, f in enumerate(finalizers):
        p = f"{path}[{i}]"
        if not isinstance(f, str):
            causes.append(invalid(p, _json_type(f), f'{p} in body must be of type string: "{_json_type(f)}"'))
            continue
        msgs = is_qualified_name(f)
        for msg in msgs:
            causes.append(invalid(path, f, msg))
        # Only built-in kinds insist on qualified finalizer names; for custom resources Kubernetes
        # merely warns (KubeVirt's VMIs carry `foregroundDeleteVirtualMachine`).
        if strict and not msgs and "/" not in f and f not in STANDARD_FINALIZERS:
            causes.append(invalid(path, f, "name is neither a standard finalizer name nor is it fully qualified"))
        if f in seen:
            causes.append(duplicate(path, f))
        seen.add(f)
    return causes


def _validate_owner_refs(refs: Any, path: str) -> list[Cause]:
    causes: list[Cause] = []
    if not isinstance(refs, list):
        return causes
    controllers = 0
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            continue
        p = f"{path}[{i}]"
        for f in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(f):
                causes.append(invalid(f"{p}.{f}", ref.get(f, ""), f"{f} must not be empty"))
        if ref.get("controller") is True:
            controllers += 1
    if controllers > 1:
        causes.append(invalid(path, refs, "Only one reference can have Controller set to true"))
    return causes


def validate_object_meta(
    obj: JSON, namespaced: bool, *, is_namespace_kind: bool = False, name_format: str = "",
    custom_resource: bool = False,
) -> list[Cause]:
    """apimachinery's ValidateObjectMeta for `obj["metadata"]`.

    Names are DNS-1123 subdomains (CRDs and most kinds), DNS-1123 labels for Namespaces
    (`is_namespace_kind`) or per `name_format` ("subdomain", "label", "dns1035" as for Services).
    A namespaced object needs a namespace; a cluster-scoped one must not have one (Kubernetes clears
    it from the request before validation: the API server should do the same).
    """
    path = "metadata"
    meta = obj.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        t = _json_type(meta)
        return [invalid(path, t, f'metadata in body must be of type object: "{t}"')]
    fn = _NAME_FUNCS.get(name_format or ("label" if is_namespace_kind else "subdomain"), is_dns1123_subdomain)
    causes: list[Cause] = []
    name = meta.get("name")
    gen = meta.get("generateName")
    for key, val in (("name", name), ("generateName", gen), ("namespace", meta.get("namespace"))):
        if val is not None and not isinstance(val, str):
            t = _json_type(val)
            causes.append(invalid(f"{path}.{key}", t, f'{path}.{key} in body must be of type string: "{t}"'))
    if causes:
        return causes
    if gen:
        for msg in _name_errors(fn, gen, True):
            causes.append(invalid(f"{path}.generateName", gen, msg))
    if not name:
        if not gen:
            causes.append(required(f"{path}.name", "name or generateName is required"))
    else:
        for msg in _name_errors(fn, name, False):
            causes.append(invalid(f"{path}.name", name, msg))
    ns = meta.get("namespace")
    if namespaced:
        if not ns:
            causes.append(required(f"{path}.namespace"))
        else:
            for msg in is_dns1123_label(ns):
                causes.append(invalid(f"{path}.namespace", ns, msg))
    elif ns:
        causes.append(forbidden(f"{path}.namespace", "not allowed on this type"))
    gen_num = meta.get("generation")
    if isinstance(gen_num, int) and not isinstance(gen_num, bool) and gen_num < 0:
        causes.append(invalid(f"{path}.generation", gen_num, "must be greater than or equal to 0"))
    causes.extend(validate_labels(meta.get("labels"), f"{path}.labels"))
    causes.extend(validate_annotations(meta.get("annotations"), f"{path}.annotations"))
    causes.extend(_validate_owner_refs(meta.get("ownerReferences"), f"{path}.ownerReferences"))
    causes.extend(_validate_finalizers(meta.get("finalizers"), f"{path}.finalizers", strict=not custom_resource))
    return causes
