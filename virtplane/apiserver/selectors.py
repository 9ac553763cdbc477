"""Label and field selectors, parsed once per request and matched against decoded objects."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from virtplane.apiserver import errors

_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_SET_OP = re.compile(r"^\s*(!?)\s*([^\s!=<>()]+)\s*(?:\b(in|notin)\s*\(([^)]*)\))?\s*$")

Matcher = Callable[[dict[str, Any]], bool]


@dataclasses.dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # =, !=, in, notin, exists, !
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        # != and notin match objects without the key, as Kubernetes does
        return not present or labels[self.key] not in self.values


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside an `in (...)` value list."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> list[Requirement]:
    if not text:
        return []
    reqs: list[Requirement] = []
    for part in _split_top_level(text):
        req = _parse_requirement(part)
        if req is None or not _LABEL_KEY.match(req.key):
            raise errors.bad_request(f"unable to parse requirement: invalid label selector: {part!r}")
        reqs.append(req)
    return reqs


def _parse_requirement(part: str) -> Requirement | None:
    for op in ("!=", "==", "="):
        if op in part:
            key, _, value = part.partition(op)
            return Requirement(key.strip(), "!=" if op == "!=" else "=", frozenset([value.strip()]))
    m = _SET_OP.match(part)
    if not m:
        return None
    neg, key, setop, values = m.groups()
    if setop:
        if neg:
            return None
        return Requirement(key, setop, frozenset(v.strip() for v in values.split(",") if v.strip()))
    return Requirement(key, "!" if neg else "exists")


def label_selector_from_object(selector: dict[str, Any] | None) -> list[Requirement]:
    """A metav1.LabelSelector (matchLabels + matchExpressions) as requirements."""
    if not selector:
        return []
    reqs = [Requirement(k, "=", frozenset([v])) for k, v in (selector.get("matchLabels") or {}).items()]
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    for expr in selector.get("matchExpressions") or []:
        reqs.append(Requirement(expr["key"], ops[expr["operator"]], frozenset(expr.get("values") or [])))
    return reqs


def labels_match(reqs: list[Requirement], obj: dict[str, Any]) -> bool:
    if not reqs:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(r.matches(labels) for r in reqs)


@dataclasses.dataclass(frozen=True, slots=True)
class FieldRequirement:
    path: tuple[str, ...]
    negate: bool
    value: str

    def matches(self, obj: dict[str, Any]) -> bool:
        cur: Any = obj
        for p in self.path:
            cur = cur.get(p) if isinstance(cur, dict) else None
        if cur is None:
            actual = ""
        elif isinstance(cur, bool):
            actual = "true" if cur else "false"
        else:
            actual = str(cur)
        return (actual == self.value) != self.negate


def parse_field_selector(text: str | None) -> list[FieldRequirement]:
    """Equality field selectors (`a.b=c`, `a.b==c`, `a.b!=c`) on any dotted field path.

    Kubernetes accepts only a fixed set of fields per kind; accepting any dotted path is a strict
    superset that never changes the answer for the supported ones.
    """
    if not text:
        return []
    out = []
    for part in _split_top_level(text):
        for op in ("!=", "==", "="):
            if op in part:
                key, _, value = part.partition(op)
                key = key.strip()
                if not key or not re.match(r"^[A-Za-z0-9_.-]+$", key):
                    raise errors.bad_request(f"invalid field selector: {part!r}")
                out.append(FieldRequirement(tuple(key.split(".")), op == "!=", value.strip()))
                break
        else:
            raise errors.bad_request(f"invalid field selector: {part!r}: expected key=value or key!=value")
    return out


def fields_match(reqs: list[FieldRequirement], obj: dict[str, Any]) -> bool:
    return all(r.matches(obj) for r in reqs)


def matcher(label_selector: str | None, field_selector: str | None) -> Matcher | None:
    """One predicate for both selectors; None when the request selects everything."""
    lreqs = parse_label_selector(label_selector)
    freqs = parse_field_selector(field_selector)
    if not lreqs and not freqs:
        return None
    return lambda obj: labels_match(lreqs, obj) and fields_match(freqs, obj)
