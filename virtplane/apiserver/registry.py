"""The set of resource types this API server serves: built-ins plus one entry per CRD version.

CRDs arrive through the store like any object (the API server watches them), so several API
servers over one store serve the same types without talking to each other.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

import orjson

from virtplane.api import builtin, resources, validation


class Registry:
    def __init__(self) -> None:
        self._by_gvr: dict[tuple[str, str, str], resources.Resource] = {}
        self._by_gvk: dict[tuple[str, str, str], resources.Resource] = {}
        self._crd_resources: dict[str, list[resources.Resource]] = {}
        self._validators: dict[int, validation.Validator] = {}
        self._generation = 0  # bumped on every change, for discovery/OpenAPI caches
        for res in builtin.builtin_resources():
            self._add(res)

    @property
    def generation(self) -> int:
        return self._generation

    def _add(self, res: resources.Resource) -> None:
        self._by_gvr[(res.group, res.version, res.plural)] = res
        self._by_gvk[(res.group, res.version, res.kind)] = res
        self._generation += 1

    def _remove(self, res: resources.Resource) -> None:
        self._by_gvr.pop((res.group, res.version, res.plural), None)
        self._by_gvk.pop((res.group, res.version, res.kind), None)
        self._validators.pop(id(res.schema), None)
        self._generation += 1

    def set_crd(self, name: str, crd: dict[str, Any] | None) -> list[resources.Resource]:
        """Serve what `crd` defines (replacing its previous versions); None stops serving it."""
        for res in self._crd_resources.pop(name, []):
            self._remove(res)
        if crd is None:
            return []
        new = builtin.resources_from_crd(crd)
        for res in new:
            existing = self._by_gvr.get((res.group, res.version, res.plural))
            if existing is not None and not existing.from_crd:
                continue  # a CRD may not shadow a built-in type
            self._add(res)
        self._crd_resources[name] = new
        return new

    def lookup(self, group: str, version: str, plural: str) -> resources.Resource | None:
        return self._by_gvr.get((group, version, plural))

    def by_kind(self, group: str, version: str, kind: str) -> resources.Resource | None:
        return self._by_gvk.get((group, version, kind))

    def by_group_kind(self, group: str, kind: str) -> resources.Resource | None:
        for (g, _v, k), res in self._by_gvk.items():
            if g == group and k == kind:
                return res
        return None

    def all(self) -> list[resources.Resource]:
        return list(self._by_gvr.values())

    def groups(self) -> dict[str, dict[str, list[resources.Resource]]]:
        """group -> version -> resources, versions in Kubernetes priority order."""
        out: dict[str, dict[str, list[resources.Resource]]] = defaultdict(lambda: defaultdict(list))
        for res in sorted(self._by_gvr.values(), key=lambda r: (r.group, r.plural)):
            out[res.group][res.version].append(res)
        return {
            g: dict(sorted(vs.items(), key=lambda kv: version_priority(kv[0])))
            for g, vs in sorted(out.items())
        }

    def validator(self, res: resources.Resource) -> validation.Validator | None:
        if res.schema is None:
            return None
        v = self._validators.get(id(res.schema))
        if v is None:
            v = validation.compile_schema(res.schema)
            self._validators[id(res.schema)] = v
        return v

    def etag(self) -> str:
        names = sorted(f"{r.group}/{r.version}/{r.plural}" for r in self._by_gvr.values())
        return hashlib.sha256(orjson.dumps(names)).hexdigest()[:32]


def version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version ordering: GA > beta > alpha, higher numbers first."""
    import re

    m = re.match(r"^v(\d+)(?:(alpha|beta)(\d+))?$", version)
    if not m:
        return (3, 0, 0)
    major, stage, minor = int(m.group(1)), m.group(2), int(m.group(3) or 0)
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -major, -minor)
