"""Build-time generator: KubeVirt's and CDI's Swagger specs -> CustomResourceDefinition objects.

    python -m virtplane.api.gen_crds [--shared DIR] [--out DIR]

reads `DIR/api-specs/{kubevirt,cdi}-swagger.json` (default: `../shared` next to the repository) and
writes, deterministically:

- `virtplane/api/data/crds.json`: a JSON list of apiextensions.k8s.io/v1 CustomResourceDefinitions with
  structural `openAPIV3Schema`s (every `$ref` inlined, recursion cut with
  `x-kubernetes-preserve-unknown-fields`), names, scope, subresources and printer columns as the real
  KubeVirt/CDI CRDs declare them (kubevirt `pkg/virt-operator/resource/generate/components/crds.go`,
  CDI's kubebuilder markers in `containerized-data-importer-api/.../core/v1beta1/types.go`).
- `virtplane/api/data/openapi_meta.json`: the apimachinery definitions (ObjectMeta, ListMeta, Status,
  ...) under kube-apiserver's names, which `virtplane.api.openapi` serves so `kubectl explain` can
  describe `metadata`.

At runtime nothing reads the specs: `virtplane.api.builtin.bundled_crds()` loads the generated file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import pathlib
import re
import sys
from typing import Any

JSON = dict[str, Any]

DATA_DIR = pathlib.Path(__file__).parent / "data"
CRDS_FILE = "crds.json"
META_FILE = "openapi_meta.json"

# A schema that accepts any object; where a type refers to itself (or is free-form by nature).
_PRESERVE: JSON = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}

# apimachinery's Quantity regexp, as controller-gen emits it for resource.Quantity fields.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)"
    r"|(\.[0-9]+))))?$"
)

# Keys of a Swagger schema node that survive into a CRD schema. `default` is dropped on purpose:
# kube-openapi writes `default: ""`/`{}` for every non-pointer Go field, and a CRD default is
# *applied* by the API server, which would fill every object with empty strings.
_KEEP = frozenset(
    {
        "type", "format", "enum", "description", "required", "nullable", "pattern", "minimum", "maximum",
        "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems",
        "minProperties", "maxProperties", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
    }
)
# Formats Kubernetes' structural schemas know; others (e.g. Go's "byte" on a uint8) are dropped.
_FORMATS = frozenset({"int32", "int64", "float", "double", "date-time", "date", "byte", "binary", "password"})


def _col(name: str, type_: str, path: str, description: str = "", priority: int = 0) -> JSON:
    col: JSON = {"name": name, "type": type_, "jsonPath": path}
    if description:
        col["description"] = description
    if priority:
        col["priority"] = priority
    return col


_AGE = _col("Age", "date", ".metadata.creationTimestamp")
_PHASE = _col("Phase", "string", ".status.phase")


def _ready(cond: str = "Ready", name: str = "Ready", priority: int = 0) -> JSON:
    return _col(name, "string", f".status.conditions[?(@.type=='{cond}')].status", priority=priority)


@dataclasses.dataclass(frozen=True, slots=True)
class CrdSpec:
    """One CRD to generate. `spec_file` is "kubevirt"/"cdi" (schema from that Swagger spec, the
    definition found through the spec's REST paths) or "" (schema written by hand below)."""

    spec_file: str
    group: str
    version: str
    kind: str
    plural: str
    singular: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status: bool = True
    scale: bool = False
    columns: tuple[JSON, ...] = ()
    path_plural: str = ""  # the plural as the Swagger paths spell it, when they differ

    @property
    def name(self) -> str:
        return f"{self.plural}.{self.group}"


_ALL = ("all",)
_KV = "kubevirt.io"
_CDI = "cdi.kubevirt.io"
_IT = "instancetype.kubevirt.io"
_SNAP = "snapshot.kubevirt.io"
_REPLICAS = (
    ("Desired", "integer", ".spec.replicas", "Number of desired {}"),
    ("Current", "integer", ".status.replicas", "Number of managed and not final or deleted {}"),
    ("Ready", "integer", ".status.readyReplicas", "Number of managed {} which are ready to receive traffic"),
)


def _replica_columns(what: str) -> tuple[JSON, ...]:
    return (*(_col(n, t, p, d.format(what)) for n, t, p, d in _REPLICAS), _AGE)


# Names, scopes, subresources, categories and columns as upstream declares them (see module doc).
# KubeVirt gives the VMI, presets, instancetypes and preferences no status subresource, CDI none to
# DataSource, DataImportCron, CDI and CDIConfig: their controllers write status with a plain update.
CRD_SPECS: tuple[CrdSpec, ...] = (
    CrdSpec("kubevirt", _KV, "v1", "VirtualMachine", "virtualmachines", "virtualmachine",
            short_names=("vm", "vms"), categories=_ALL,
            columns=(_AGE, _col("Status", "string", ".status.printableStatus", "Human Readable Status"),
                     _ready())),
    CrdSpec("kubevirt", _KV, "v1", "VirtualMachineInstance", "virtualmachineinstances", "virtualmachineinstance",
            short_names=("vmi", "vmis"), categories=_ALL, status=False,
            columns=(_AGE, _PHASE, _col("IP", "string", ".status.interfaces[0].ipAddress"),
                     _col("NodeName", "string", ".status.nodeName"), _ready(),
                     _ready("LiveMigratable", "Live-Migratable", 1), _ready("Paused", "Paused", 1))),
    CrdSpec("kubevirt", _KV, "v1", "VirtualMachineInstanceMigration", "virtualmachineinstancemigrations",
            "virtualmachineinstancemigration", short_names=("vmim", "vmims"), categories=_ALL,
            columns=(_col("Phase", "string", ".status.phase", "The current phase of VM instance migration"),
                     _col("VMI", "string", ".spec.vmiName", "The name of the VMI to perform the migration on"))),
    CrdSpec("kubevirt", _KV, "v1", "VirtualMachineInstanceReplicaSet", "virtualmachineinstancereplicasets",
            "virtualmachineinstancereplicaset", short_names=("vmirs", "vmirss"), categories=_ALL, scale=True,
            columns=_replica_columns("VirtualMachineInstances")),
    CrdSpec("kubevirt", _KV, "v1", "VirtualMachineInstancePreset", "virtualmachineinstancepresets",
            "virtualmachineinstancepreset", short_names=("vmipreset", "vmipresets"), categories=_ALL,
            status=False),
    CrdSpec("kubevirt", _KV, "v1", "KubeVirt", "kubevirts", "kubevirt", short_names=("kv", "kvs"),
            categories=_ALL, columns=(_AGE, _PHASE), path_plural="kubevirt"),
    CrdSpec("kubevirt", _IT, "v1beta1", "VirtualMachineInstancetype", "virtualmachineinstancetypes",
            "virtualmachineinstancetype", short_names=("vminstancetype", "vminstancetypes", "vmf", "vmfs"),
            categories=_ALL, status=False),
    CrdSpec("kubevirt", _IT, "v1beta1", "VirtualMachineClusterInstancetype", "virtualmachineclusterinstancetypes",
            "virtualmachineclusterinstancetype", namespaced=False,
            short_names=("vmclusterinstancetype", "vmclusterinstancetypes", "vmcf", "vmcfs"), status=False),
    CrdSpec("kubevirt", _IT, "v1beta1", "VirtualMachinePreference", "virtualmachinepreferences",
            "virtualmachinepreference", short_names=("vmpref", "vmprefs", "vmp", "vmps"), categories=_ALL,
            status=False),
    CrdSpec("kubevirt", _IT, "v1beta1", "VirtualMachineClusterPreference", "virtualmachineclusterpreferences",
            "virtualmachineclusterpreference", namespaced=False, short_names=("vmcp", "vmcps"), status=False),
    CrdSpec("kubevirt", "migrations.kubevirt.io", "v1alpha1", "MigrationPolicy", "migrationpolicies",
            "migrationpolicy", namespaced=False),
    CrdSpec("kubevirt", _SNAP, "v1beta1", "VirtualMachineSnapshot", "virtualmachinesnapshots",
            "virtualmachinesnapshot", short_names=("vmsnapshot", "vmsnapshots"), categories=_ALL,
            columns=(_col("SourceKind", "string", ".spec.source.kind"),
                     _col("SourceName", "string", ".spec.source.name"), _PHASE,
                     _col("ReadyToUse", "boolean", ".status.readyToUse"),
                     _col("CreationTime", "date", ".status.creationTime"),
                     _col("Error", "string", ".status.error.message"))),
    CrdSpec("kubevirt", _SNAP, "v1beta1", "VirtualMachineSnapshotContent", "virtualmachinesnapshotcontents",
            "virtualmachinesnapshotcontent", short_names=("vmsnapshotcontent", "vmsnapshotcontents"),
            categories=_ALL,
            columns=(_col("ReadyToUse", "boolean", ".status.readyToUse"),
                     _col("CreationTime", "date", ".status.creationTime"),
                     _col("Error", "string", ".status.error.message"))),
    CrdSpec("kubevirt", _SNAP, "v1beta1", "VirtualMachineRestore", "virtualmachinerestores",
            "virtualmachinerestore", short_names=("vmrestore", "vmrestores"), categories=_ALL,
            columns=(_col("TargetKind", "string", ".spec.target.kind"),
                     _col("TargetName", "string", ".spec.target.name"),
                     _col("Complete", "boolean", ".status.complete"),
                     _col("RestoreTime", "date", ".status.restoreTime"))),
    CrdSpec("kubevirt", "clone.kubevirt.io", "v1beta1", "VirtualMachineClone", "virtualmachineclones",
            "virtualmachineclone", short_names=("vmclone", "vmclones"), categories=_ALL,
            columns=(_PHASE, _col("SourceVirtualMachine", "string", ".spec.source.name"),
                     _col("TargetVirtualMachine", "string", ".spec.target.name"))),
    CrdSpec("kubevirt", "pool.kubevirt.io", "v1beta1", "VirtualMachinePool", "virtualmachinepools",
            "virtualmachinepool", short_names=("vmpool", "vmpools"), categories=_ALL, scale=True,
            columns=_replica_columns("VirtualMachines")),
    CrdSpec("kubevirt", "export.kubevirt.io", "v1", "VirtualMachineExport", "virtualmachineexports",
            "virtualmachineexport", short_names=("vmexport", "vmexports"), categories=_ALL,
            columns=(_col("SourceKind", "string", ".spec.source.kind"),
                     _col("SourceName", "string", ".spec.source.name"), _PHASE)),
    CrdSpec("cdi", _CDI, "v1beta1", "DataVolume", "datavolumes", "datavolume", short_names=("dv", "dvs"),
            categories=_ALL,
            columns=(_col("Phase", "string", ".status.phase", "The phase the data volume is in"),
                     _col("Progress", "string", ".status.progress",
                          "Transfer progress in percentage if known, N/A otherwise"),
                     _col("Restarts", "integer", ".status.restartCount",
                          "The number of times the transfer has been restarted."),
                     _AGE)),
    CrdSpec("cdi", _CDI, "v1beta1", "DataSource", "datasources", "datasource", short_names=("das",),
            categories=_ALL, status=False),
    CrdSpec("cdi", _CDI, "v1beta1", "DataImportCron", "dataimportcrons", "dataimportcron",
            short_names=("dic", "dics"), categories=_ALL, status=False,
            columns=(_col("Format", "string", ".status.sourceFormat",
                          "The format in which created sources are saved"),)),
    CrdSpec("", _CDI, "v1beta1", "StorageProfile", "storageprofiles", "storageprofile", namespaced=False),
    CrdSpec("cdi", _CDI, "v1beta1", "CDI", "cdis", "cdi", namespaced=False, short_names=("cdi", "cdis"),
            status=False, columns=(_AGE, _PHASE)),
    CrdSpec("cdi", _CDI, "v1beta1", "CDIConfig", "cdiconfigs", "cdiconfig", namespaced=False, status=False),
    CrdSpec("", "k8s.cni.cncf.io", "v1", "NetworkAttachmentDefinition", "network-attachment-definitions",
            "network-attachment-definition", short_names=("net-attach-def",), status=False),
)

_API_VERSION_DESC = (
    "APIVersion defines the versioned schema of this representation of an object. Servers should convert "
    "recognized schemas to the latest internal value, and may reject unrecognized values. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"
)
_KIND_DESC = (
    "Kind is a string value representing the REST resource this object represents. Servers may infer this "
    "from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"
)


def _root(description: str, spec: JSON, status: JSON | None = None, required: tuple[str, ...] = ()) -> JSON:
    props: JSON = {
        "apiVersion": {"description": _API_VERSION_DESC, "type": "string"},
        "kind": {"description": _KIND_DESC, "type": "string"},
        "metadata": {"type": "object"},
        "spec": spec,
    }
    if status is not None:
        props["status"] = status
    out: JSON = {"description": description, "type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    return out


def _storage_profile_schema() -> JSON:
    """StorageProfile is not in CDI's published spec; written from CDI's v1beta1 Go types."""
    clone_strategy = {"description": "CloneStrategy defines the preferred method for performing a CDI clone",
                      "type": "string", "enum": ["copy", "snapshot", "csi-clone"]}
    cps = {
        "description": "ClaimPropertySet is a set of properties applicable to PVC",
        "type": "object",
        "required": ["accessModes", "volumeMode"],
        "properties": {
            "accessModes": {
                "description": "AccessModes contains the desired access modes the volume should have. More info: "
                "https://kubernetes.io/docs/concepts/storage/persistent-volumes#access-modes-1",
                "type": "array", "maxItems": 4,
                "items": {"type": "string", "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany",
                                                     "ReadWriteOncePod"]},
                "x-kubernetes-list-type": "atomic",
            },
            "volumeMode": {"description": "VolumeMode defines what type of volume is required by the claim. Value "
                           "of Filesystem is implied when not included in claim spec.",
                           "type": "string", "enum": ["Block", "Filesystem"]},
        },
    }

    def sets(desc: str) -> JSON:
        return {"description": desc, "type": "array", "maxItems": 8, "items": cps,
                "x-kubernetes-list-type": "atomic"}

    fmt = {"description": "DataImportCronSourceFormat defines the format of the DataImportCron-created disk "
           "image sources", "type": "string", "enum": ["snapshot", "pvc"]}
    snap = {"description": "SnapshotClass is optional specific VolumeSnapshotClass for CloneStrategySnapshot. If "
            "not set, a VolumeSnapshotClass is chosen according to the provisioner.", "type": "string"}
    spec = {"description": "StorageProfileSpec defines specification for StorageProfile", "type": "object",
            "properties": {"cloneStrategy": clone_strategy,
                           "claimPropertySets": sets("ClaimPropertySets is a provided set of properties "
                                                     "applicable to PVC"),
                           "dataImportCronSourceFormat": fmt, "snapshotClass": snap}}
    status = {"description": "StorageProfileStatus provides the most recently observed status of the "
              "StorageProfile", "type": "object",
              "properties": {"storageClass": {"description": "The StorageClass name for which capabilities are "
                                              "defined", "type": "string"},
                             "provisioner": {"description": "The Storage class provisioner plugin name",
                                             "type": "string"},
                             "cloneStrategy": clone_strategy,
                             "claimPropertySets": sets("ClaimPropertySets computed from the spec and detected in "
                                                       "the system"),
                             "dataImportCronSourceFormat": fmt, "snapshotClass": snap}}
    return _root("StorageProfile provides a CDI specific recommendation for storage parameters", spec, status,
                 ("spec",))


def _nad_schema() -> JSON:
    """Multus' NetworkAttachmentDefinition (Network Plumbing WG spec); not in either spec."""
    spec = {"description": "NetworkAttachmentDefinition spec defines the desired state of a network attachment",
            "type": "object",
            "properties": {"config": {"description": "NetworkAttachmentDefinition config is a JSON-formatted CNI "
                                      "configuration", "type": "string"}}}
    return _root("NetworkAttachmentDefinition is a CRD schema specified by the Network Plumbing Working Group to "
                 "express the intent for attaching pods to one or more logical or physical networks. More "
                 "information available at: https://github.com/k8snetworkplumbingwg/multi-net-spec", spec)


_MANUAL_SCHEMAS = {"StorageProfile": _storage_profile_schema, "NetworkAttachmentDefinition": _nad_schema}


class SchemaConverter:
    """Turns Swagger 2.0 definitions of one spec into structural, self-contained CRD schemas."""

    def __init__(self, swagger: JSON) -> None:
        self.swagger = swagger
        self.defs: JSON = swagger["definitions"]

    def definition_for(self, spec: CrdSpec) -> str:
        """The definition a kind's REST paths return; names like `v1beta1.VirtualMachine` are ambiguous
        across groups, the paths are not."""
        plural = re.escape(spec.path_plural or spec.plural)
        pat = re.compile(
            rf"^/apis/{re.escape(spec.group)}/{spec.version}/(?:namespaces/\{{namespace[^}}]*\}}/)?"
            rf"{plural}/\{{name[^}}]*\}}$"
        )
        for path, item in sorted(self.swagger["paths"].items()):
            if not pat.match(path):
                continue
            ref = item.get("get", {}).get("responses", {}).get("200", {}).get("schema", {}).get("$ref", "")
            if ref:
                return ref.rsplit("/", 1)[-1]
        raise LookupError(f"no GET path for {spec.group}/{spec.version} {spec.plural} in the spec")

    def root_schema(self, def_name: str) -> JSON:
        out = self._object(self.defs[def_name], (def_name,))
        props = out.setdefault("properties", {})
        # Top-level metadata is always ObjectMeta, which the API server validates itself; CRDs say so
        # with a bare object (a structural-schema rule: no other constraints at metadata).
        props["metadata"] = {"type": "object"}
        props.setdefault("apiVersion", {"description": _API_VERSION_DESC, "type": "string"})
        props.setdefault("kind", {"description": _KIND_DESC, "type": "string"})
        return out

    def _ref(self, name: str, stack: tuple[str, ...]) -> JSON:
        short = name.rsplit(".", 1)[-1]
        # Well-known leaf types: the definition's generic description is noise at every use site (and
        # Quantity's is 1.5 KB), the use site's own description is what `kubectl explain` should show.
        if short == "Quantity":
            return {"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": QUANTITY_PATTERN,
                    "x-kubernetes-int-or-string": True}
        if short == "IntOrString":
            return {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
        if short in ("Time", "MicroTime"):
            return {"type": "string", "format": "date-time"}
        if short == "Duration":
            return {"type": "string"}
        if short in ("RawExtension", "FieldsV1"):
            return dict(_PRESERVE)
        if short == "ObjectMeta":
            # Embedded templates' metadata: KubeVirt's CRDs keep it free-form (and nullable, since Go
            # marshals `creationTimestamp: null` into every template).
            return {"type": "object", "nullable": True, "x-kubernetes-preserve-unknown-fields": True}
        if name in stack:
            return dict(_PRESERVE)
        return self._convert(self.defs[name], (*stack, name))

    def _convert(self, node: JSON, stack: tuple[str, ...]) -> JSON:
        if "$ref" in node:
            out = self._ref(node["$ref"].rsplit("/", 1)[-1], stack)
            out = dict(out)
            if node.get("description"):
                out["description"] = node["description"]
            for k in ("x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type"):
                if k in node:
                    out[k] = node[k]
            return out
        if node.get("type") == "object" or "properties" in node or "additionalProperties" in node:
            return self._object(node, stack)
        out = {k: copy.deepcopy(v) for k, v in node.items() if k in _KEEP}
        if isinstance(out.get("type"), list):
            # KubeVirt's spec writes some types as lists (["string", "null"] for timestamps, ["string",
            # "number"] for probe ports); structural schemas need one type, or int-or-string.
            types = [t for t in out.pop("type") if t != "null"]
            if len(types) < len(node["type"]):
                out["nullable"] = True
            if set(types) in ({"string", "number"}, {"string", "integer"}):
                out.pop("format", None)
                out.update({"anyOf": [{"type": "integer"}, {"type": "string"}],
                            "x-kubernetes-int-or-string": True})
                return out
            if len(types) == 1:
                out["type"] = types[0]
        if "format" in out and (out["format"] not in _FORMATS or (out["format"] == "byte"
                                                                    and out.get("type") != "string")):
            del out["format"]
        if node.get("type") == "array":
            out["items"] = self._convert(node.get("items") or {}, stack) if node.get("items") else dict(_PRESERVE)
        if "type" not in out and "items" not in out:
            # An untyped leaf: structural schemas need a type, so accept anything.
            return {**{k: v for k, v in out.items() if k == "description"},
                    "x-kubernetes-preserve-unknown-fields": True}
        return out

    def _object(self, node: JSON, stack: tuple[str, ...]) -> JSON:
        out: JSON = {k: copy.deepcopy(v) for k, v in node.items() if k in _KEEP and k != "format"}
        out["type"] = "object"
        props = node.get("properties") or {}
        if props:
            out["properties"] = {k: self._convert(v, stack) for k, v in props.items()}
        if "required" in out:
            out["required"] = [r for r in out["required"] if r in props] or None
            if out["required"] is None:
                del out["required"]
        ap = node.get("additionalProperties")
        if isinstance(ap, dict):
            out["additionalProperties"] = self._convert(ap, stack)
        elif ap is True and not props:
            out["x-kubernetes-preserve-unknown-fields"] = True
        return out


def _meta_definitions(kubevirt: JSON) -> JSON:
    """apimachinery definitions kubectl needs to describe `metadata` and the REST operations, under the
    names kube-apiserver serves them with (`io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta`, ...)."""
    defs = kubevirt["definitions"]
    prefix = "k8s.io.apimachinery.pkg."
    wanted = [n for n in defs if n.startswith(prefix + "apis.meta.v1.") or n.startswith(prefix + "runtime.")
              or n.startswith(prefix + "util.intstr.") or n.startswith(prefix + "api.resource.")]
    out: JSON = {}

    def rename(name: str) -> str:
        # k8s.io.apimachinery.pkg.apis.meta.v1.X -> io.k8s.apimachinery.pkg.apis.meta.v1.X
        return "io.k8s." + name.removeprefix("k8s.io.")

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            res = {}
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str):
                    res[k] = "#/definitions/" + rename(v.rsplit("/", 1)[-1])
                elif k == "default" and "$ref" in node:
                    continue
                else:
                    res[k] = rewrite(v)
            return res
        if isinstance(node, list):
            return [rewrite(x) for x in node]
        return node

    for name in sorted(wanted):
        out[rename(name)] = rewrite(defs[name])
    # Not in KubeVirt's spec but used by Events and Leases.
    out["io.k8s.apimachinery.pkg.apis.meta.v1.MicroTime"] = {
        "description": "MicroTime is version of Time with microsecond level precision.",
        "type": "string", "format": "date-time",
    }
    return out


def build_crd(spec: CrdSpec, converters: dict[str, SchemaConverter]) -> JSON:
    if spec.spec_file:
        conv = converters[spec.spec_file]
        schema = conv.root_schema(conv.definition_for(spec))
    else:
        schema = _MANUAL_SCHEMAS[spec.kind]()
    names: JSON = {"kind": spec.kind, "listKind": f"{spec.kind}List", "plural": spec.plural,
                   "singular": spec.singular}
    if spec.short_names:
        names["shortNames"] = list(spec.short_names)
    if spec.categories:
        names["categories"] = list(spec.categories)
    version: JSON = {"name": spec.version, "served": True, "storage": True,
                     "schema": {"openAPIV3Schema": schema}}
    sub: JSON = {}
    if spec.status:
        sub["status"] = {}
    if spec.scale:
        sub["scale"] = {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                        "labelSelectorPath": ".status.labelSelector"}
    if sub:
        version["subresources"] = sub
    if spec.columns:
        version["additionalPrinterColumns"] = [dict(c) for c in spec.columns]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": spec.name},
        "spec": {"group": spec.group, "names": names, "scope": "Namespaced" if spec.namespaced else "Cluster",
                 "versions": [version]},
    }


def load_specs(shared: pathlib.Path) -> dict[str, JSON]:
    specs = shared / "api-specs"
    return {
        "kubevirt": json.loads((specs / "kubevirt-swagger.json").read_text()),
        "cdi": json.loads((specs / "cdi-swagger.json").read_text()),
    }


def generate(shared: pathlib.Path) -> dict[str, str]:
    """File name -> content, exactly as committed under `virtplane/api/data/`."""
    swagger = load_specs(shared)
    converters = {k: SchemaConverter(v) for k, v in swagger.items()}
    crds = sorted((build_crd(s, converters) for s in CRD_SPECS), key=lambda c: c["metadata"]["name"])
    return {CRDS_FILE: _dump_list(crds), META_FILE: _dump_obj(_meta_definitions(swagger["kubevirt"]))}


def _dump_list(items: list[JSON]) -> str:
    # One compact line per CRD: small on disk, still a readable `git diff` when one CRD changes.
    lines = [json.dumps(i, sort_keys=True, separators=(",", ":"), ensure_ascii=False) for i in items]
    return "[\n" + ",\n".join(lines) + "\n]\n"


def _dump_obj(obj: JSON) -> str:
    lines = [
        json.dumps(k) + ":" + json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        for k, v in sorted(obj.items())
    ]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def default_shared_dir() -> pathlib.Path:
    repo_root = pathlib.Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m virtplane.api.gen_crds", description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=pathlib.Path, default=default_shared_dir(),
                    help="directory holding api-specs/ (default: ../shared next to the repository)")
    ap.add_argument("--out", type=pathlib.Path, default=DATA_DIR, help="output directory")
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed files are stale")
    args = ap.parse_args(argv)
    files = generate(args.shared)
    stale = [n for n, text in files.items()
             if not (args.out / n).exists() or (args.out / n).read_text() != text]
    if args.check:
        for n in stale:
            print(f"stale: {args.out / n}", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for n, text in files.items():
        (args.out / n).write_text(text)
        print(f"wrote {args.out / n} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
