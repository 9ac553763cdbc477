"""`kubectl get` output: meta.k8s.io/v1 Table responses built from printer columns."""

from __future__ import annotations

import datetime
import re
from typing import Any

from virtplane.api import builtin, resources

JSON = dict[str, Any]

_SEGMENT = re.compile(
    r"""\.(?P<field>[A-Za-z0-9_\-/]+)"""
    r"""|\[(?P<index>-?\d+|\*)\]"""
    r"""|\[\?\(@\.(?P<fpath>[A-Za-z0-9_.\-]+)\s*==\s*['"](?P<fval>[^'"]*)['"]\)\]"""
)


def compile_path(path: str) -> list[tuple[str, Any]]:
    """A JSONPath subset as CRD printer columns use it: .a.b, [0], [*], [?(@.type=='Ready')]."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    if path.startswith("$"):
        path = path[1:]
    if not path.startswith((".", "[")):
        path = "." + path
    steps: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(path):
        m = _SEGMENT.match(path, pos)
        if not m:
            raise ValueError(f"unsupported JSONPath {path!r} at {pos}")
        if m.group("field") is not None:
            steps.append(("field", m.group("field")))
        elif m.group("index") is not None:
            idx = m.group("index")
            steps.append(("all", None) if idx == "*" else ("index", int(idx)))
        else:
            steps.append(("filter", (m.group("fpath").split("."), m.group("fval"))))
        pos = m.end()
    return steps


def evaluate(steps: list[tuple[str, Any]], obj: Any) -> list[Any]:
    values = [obj]
    for kind, arg in steps:
        nxt: list[Any] = []
        for v in values:
            if kind == "field":
                if isinstance(v, dict) and arg in v:
                    nxt.append(v[arg])
            elif kind == "index":
                if isinstance(v, list) and -len(v) <= arg < len(v):
                    nxt.append(v[arg])
            elif kind == "all":
                if isinstance(v, list):
                    nxt.extend(v)
            else:
                fpath, fval = arg
                if isinstance(v, list):
                    for item in v:
                        cur = item
                        for p in fpath:
                            cur = cur.get(p) if isinstance(cur, dict) else None
                        if cur is not None and str(cur) == fval:
                            nxt.append(item)
        values = nxt
    return values


def age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    """Kubernetes' human duration (`5s`, `3m12s`, `2d3h`, `4y`), as `kubectl get` shows AGE."""
    if not timestamp:
        return "<unknown>"
    try:
        t = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return "<invalid>"
    now = now or datetime.datetime.now(datetime.UTC)
    s = int((now - t).total_seconds())
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    d = h // 24
    if d < 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    if d < 365 * 2:
        return f"{d}d"
    y = d // 365
    return f"{y}y{d % 365}d" if y < 8 and d % 365 else f"{y}y"


class TableConverter:
    """Built once per resource; converts objects to rows."""

    def __init__(self, res: resources.Resource) -> None:
        self.res = res
        cols = list(res.printer_columns)
        has_age = any(c.json_path.strip() in (".metadata.creationTimestamp",) for c in cols)
        if not cols and not res.from_crd:
            cols = []
        self.columns = [resources.PrinterColumn("Name", "string", ".metadata.name",
                                                "Name must be unique within a namespace.")]
        self.columns.extend(cols)
        if not has_age:
            self.columns.append(resources.PrinterColumn("Age", "date", ".metadata.creationTimestamp"))
        self._paths = [_try_compile(c.json_path) for c in self.columns]

    def column_definitions(self) -> list[JSON]:
        return [
            {
                "name": c.name,
                "type": c.type,
                "format": c.format or ("name" if c.name == "Name" else ""),
                "description": c.description,
                "priority": c.priority,
            }
            for c in self.columns
        ]

    def cells(self, obj: JSON, now: datetime.datetime) -> list[Any]:
        computed = builtin.builtin_table_row(self.res, obj) if not self.res.from_crd else None
        if computed is not None:
            raw = [obj.get("metadata", {}).get("name", ""), *computed]
        else:
            raw = []
            for path in self._paths:
                vals = evaluate(path, obj) if path is not None else []
                raw.append(vals[0] if vals else None)
        out: list[Any] = []
        for col, value in zip(self.columns, raw, strict=False):
            if col.type == "date":
                out.append(age(value, now) if value else "<unknown>")
            elif value is None:
                out.append("<none>" if col.type == "string" else None)
            elif isinstance(value, (dict, list)):
                out.append(str(value))
            else:
                out.append(value)
        return out

    def row(self, obj: JSON, include: str, now: datetime.datetime) -> JSON:
        row: JSON = {"cells": self.cells(obj, now)}
        if include == "Object":
            row["object"] = obj
        elif include != "None":
            row["object"] = partial_metadata(obj)
        return row

    def table(self, objs: list[JSON], include: str, list_meta: JSON) -> JSON:
        now = datetime.datetime.now(datetime.UTC)
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": list_meta,
            "columnDefinitions": self.column_definitions(),
            "rows": [self.row(o, include, now) for o in objs],
        }


def _try_compile(path: str) -> list[tuple[str, Any]] | None:
    """Columns computed in code (built-ins) may carry paths no JSONPath subset can express."""
    try:
        return compile_path(path)
    except ValueError:
        return None


def partial_metadata(obj: JSON) -> JSON:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}
