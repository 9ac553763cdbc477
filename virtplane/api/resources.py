"""What the API server knows about a resource type: names, scope, subresources, columns, schema.

Built-in kinds (core/v1, storage.k8s.io, ...) are described in `virtplane.api.builtin`; every other
kind, KubeVirt's and CDI's included, comes from a CustomResourceDefinition object, exactly as in
Kubernetes (`resources_from_crd`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

JSON = dict[str, Any]

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclasses.dataclass(frozen=True, slots=True)
class PrinterColumn:
    """One `additionalPrinterColumns` entry; json_path is a simple `.a.b[0].c` path."""

    name: str
    type: str
    json_path: str
    description: str = ""
    priority: int = 0
    format: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Cause:
    """A field cause of a `Status` error (metav1.StatusCause)."""

    type: str  # FieldValueInvalid, FieldValueRequired, FieldValueNotSupported, FieldValueDuplicate, ...
    message: str
    field: str  # e.g. "spec.template.spec.domain.devices.disks[0].name"

    def to_json(self) -> JSON:
        return {"reason": self.type, "message": self.message, "field": self.field}


@dataclasses.dataclass(frozen=True, slots=True)
class Resource:
    group: str  # "" for the core group
    version: str
    kind: str
    plural: str
    singular: str
    namespaced: bool
    list_kind: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    status_subresource: bool = True
    # scale subresource: (specReplicasPath, statusReplicasPath, labelSelectorPath) or None
    scale: tuple[str, str, str] | None = None
    printer_columns: tuple[PrinterColumn, ...] = ()
    # openAPIV3Schema of the whole object; None means "anything goes" (no structural checks)
    schema: JSON | None = dataclasses.field(default=None, compare=False, hash=False)
    # True for kinds served from a CRD object (their schema and columns come from it)
    from_crd: bool = False

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def api_version(self) -> str:
        return self.group_version

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def storage_prefix(self) -> str:
        """Store key prefix for all objects of this resource (all versions share it)."""
        return f"/registry/{self.group or 'core'}/{self.plural}/"

    def key(self, namespace: str | None, name: str) -> str:
        if self.namespaced:
            return f"{self.storage_prefix()}{namespace}/{name}"
        return f"{self.storage_prefix()}{name}"

    def namespace_prefix(self, namespace: str | None) -> str:
        if self.namespaced and namespace:
            return f"{self.storage_prefix()}{namespace}/"
        return self.storage_prefix()
