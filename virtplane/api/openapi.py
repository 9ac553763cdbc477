"""OpenAPI documents for the served resources, shaped like kube-apiserver's.

- `openapi_v2(resources)`: the Swagger 2.0 document at `/openapi/v2`.
- `openapi_v3_index(resources)`: `/openapi/v3`, one entry per group-version with a content hash.
- `openapi_v3(resources, group_version)`: `/openapi/v3/apis/<group>/<version>` (or `api/v1`).

What kubectl 1.32 relies on, and is therefore here:
- `kubectl explain` (v3 by default) finds the GVK through the `x-kubernetes-group-version-kind` of the
  operations under `/apis/<g>/<v>/[namespaces/{namespace}/]<plural>`, then the component schema carrying
  the same GVK, and follows `$ref`/`allOf` (our `metadata` is `allOf: [ObjectMeta]` as for real CRDs).
- `kubectl apply/create/replace` send `fieldValidation=Strict` (server-side validation) only when the
  PATCH operation of the GVK in the group-version's v3 document lists a `fieldValidation` query
  parameter (kubectl's `resource.queryParamVerifierV3.HasSupport`); otherwise they validate client-side.

Definition names follow kube-apiserver: built-ins `io.k8s.api.core.v1.Pod`, CRDs the reversed group
(`io.kubevirt.v1.VirtualMachine`, `io.kubevirt.cdi.v1beta1.DataVolume`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import pathlib
from typing import Any

import orjson

from virtplane.api.resources import Resource

JSON = dict[str, Any]

META_PATH = pathlib.Path(__file__).parent / "data" / "openapi_meta.json"
META = "io.k8s.apimachinery.pkg.apis.meta.v1."
OBJECT_META = META + "ObjectMeta"
LIST_META = META + "ListMeta"
STATUS = META + "Status"
DELETE_OPTIONS = META + "DeleteOptions"
PATCH = META + "Patch"
WATCH_EVENT = META + "WatchEvent"
SCALE = "io.k8s.api.autoscaling.v1.Scale"

_METADATA_DESC = (
    "Standard object's metadata. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"
)
_LIST_METADATA_DESC = (
    "Standard list metadata. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"
)

# Built-in groups as kube-apiserver names their definitions (everything else is a CRD: reversed group).
_BUILTIN_PREFIX = {
    "": "io.k8s.api.core",
    "apps": "io.k8s.api.apps",
    "storage.k8s.io": "io.k8s.api.storage",
    "coordination.k8s.io": "io.k8s.api.coordination",
    "discovery.k8s.io": "io.k8s.api.discovery",
    "events.k8s.io": "io.k8s.api.events",
    "autoscaling": "io.k8s.api.autoscaling",
    "apiextensions.k8s.io": "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions",
}


@functools.cache
def _meta_bytes() -> bytes:
    return META_PATH.read_bytes()


def _meta_definitions() -> JSON:
    """ObjectMeta & co (v2 form, `#/definitions/` refs), plus autoscaling/v1 Scale for /scale."""
    defs: JSON = orjson.loads(_meta_bytes())
    i32 = {"type": "integer", "format": "int32"}
    defs[SCALE] = {
        "description": "Scale represents a scaling request for a resource.",
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion defines the versioned schema of this "
                           "representation of an object."},
            "kind": {"type": "string", "description": "Kind is a string value representing the REST resource "
                     "this object represents."},
            "metadata": {"$ref": "#/definitions/" + OBJECT_META, "description": _METADATA_DESC},
            "spec": {"$ref": "#/definitions/io.k8s.api.autoscaling.v1.ScaleSpec",
                     "description": "spec defines the behavior of the scale."},
            "status": {"$ref": "#/definitions/io.k8s.api.autoscaling.v1.ScaleStatus",
                       "description": "status is the current status of the scale."},
        },
        "x-kubernetes-group-version-kind": [{"group": "autoscaling", "kind": "Scale", "version": "v1"}],
    }
    defs["io.k8s.api.autoscaling.v1.ScaleSpec"] = {
        "description": "ScaleSpec describes the attributes of a scale subresource.",
        "type": "object",
        "properties": {"replicas": {**i32, "description": "replicas is the desired number of instances for the "
                                    "scaled object."}},
    }
    defs["io.k8s.api.autoscaling.v1.ScaleStatus"] = {
        "description": "ScaleStatus represents the current status of a scale subresource.",
        "type": "object",
        "required": ["replicas"],
        "properties": {
            "replicas": {**i32, "description": "replicas is the actual number of observed instances of the scaled "
                         "object."},
            "selector": {"type": "string", "description": "selector is the label query over pods that should "
                         "match the replicas count."},
        },
    }
    return defs


def definition_name(res: Resource, kind: str | None = None) -> str:
    kind = kind or res.kind
    prefix = _BUILTIN_PREFIX.get(res.group) if not res.from_crd else None
    if prefix is None:
        prefix = ".".join(reversed(res.group.split("."))) if res.group else "io.k8s.api.core"
    return f"{prefix}.{res.version}.{kind}"


def _gvk(res: Resource, kind: str | None = None) -> JSON:
    return {"group": res.group, "kind": kind or res.kind, "version": res.version}


def _api_prefix(res: Resource) -> str:
    return f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"


def gv_key(res: Resource) -> str:
    """The /openapi/v3 index key of a resource's group-version (`api/v1`, `apis/kubevirt.io/v1`)."""
    return _api_prefix(res).lstrip("/")


def _camel(group: str) -> str:
    """Operation-id spelling of a group: core -> Core, storage.k8s.io -> Storage, cdi.kubevirt.io ->
    CdiKubevirtIo."""
    if not group:
        return "Core"
    g = group.removesuffix(".k8s.io")
    return "".join(p[:1].upper() + p[1:] for p in g.replace("-", ".").split("."))


def _tag(res: Resource) -> str:
    c = _camel(res.group)
    return f"{c[:1].lower()}{c[1:]}_{res.version}"


# --------------------------------------------------------------------------------------------------
# Schemas


def _object_schema(res: Resource, v3: bool) -> JSON:
    schema = copy.deepcopy(res.schema) if res.schema else {
        "type": "object", "x-kubernetes-preserve-unknown-fields": True}
    schema.setdefault("type", "object")
    props = schema.setdefault("properties", {})
    ref = _ref(OBJECT_META, v3)
    # A $ref cannot carry siblings in v3, hence kube-apiserver's allOf wrapper.
    props["metadata"] = ({"allOf": [ref], "default": {}, "description": _METADATA_DESC} if v3
                         else {**ref, "description": _METADATA_DESC})
    props.setdefault("apiVersion", {"type": "string", "description": "APIVersion defines the versioned schema "
                                    "of this representation of an object."})
    props.setdefault("kind", {"type": "string", "description": "Kind is a string value representing the REST "
                              "resource this object represents."})
    if not v3:
        schema = _to_v2(schema)
    schema["x-kubernetes-group-version-kind"] = [_gvk(res)]
    return schema


def _list_schema(res: Resource, v3: bool) -> JSON:
    kind = res.list_kind or f"{res.kind}List"
    meta = _ref(LIST_META, v3)
    return {
        "description": f"{kind} is a list of {res.kind}",
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion defines the versioned schema of this "
                           "representation of an object."},
            "items": {"type": "array", "description": f"List of {res.plural}.",
                      "items": _ref(definition_name(res), v3)},
            "kind": {"type": "string", "description": "Kind is a string value representing the REST resource "
                     "this object represents."},
            "metadata": ({"allOf": [meta], "default": {}, "description": _LIST_METADATA_DESC} if v3
                         else {**meta, "description": _LIST_METADATA_DESC}),
        },
        "x-kubernetes-group-version-kind": [_gvk(res, kind)],
    }


def _to_v2(node: Any) -> Any:
    """What OpenAPI v2 cannot say is dropped, as kube-apiserver does for CRDs: nullable (with the type,
    so v2 clients accept null), anyOf/oneOf/allOf/not."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in ("anyOf", "oneOf", "allOf", "not", "nullable"):
                continue
            if k in ("properties", "patternProperties", "definitions"):
                out[k] = {pk: _to_v2(pv) for pk, pv in v.items()}
            elif k in ("items", "additionalProperties"):
                out[k] = _to_v2(v)
            else:
                out[k] = v
        if node.get("nullable"):
            out.pop("type", None)
        return out
    return node


def _ref(name: str, v3: bool) -> JSON:
    return {"$ref": ("#/components/schemas/" if v3 else "#/definitions/") + name}


def _meta_v3(defs: JSON) -> JSON:
    """Rewrites the v2 meta definitions' refs to v3 form."""

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str):
                    out[k] = v.replace("#/definitions/", "#/components/schemas/")
                else:
                    out[k] = fix(v)
            # $ref with siblings is not allowed in v3 schemas: wrap as kube-apiserver does.
            if "$ref" in out and len(out) > 1:
                ref = out.pop("$ref")
                out["allOf"] = [{"$ref": ref}]
            return out
        if isinstance(node, list):
            return [fix(x) for x in node]
        return node

    return {k: fix(v) for k, v in defs.items()}


# --------------------------------------------------------------------------------------------------
# Parameters and operations

_P = {
    "allowWatchBookmarks": ("boolean", "allowWatchBookmarks requests watch events with type \"BOOKMARK\". "
                            "Servers that do not implement bookmarks may ignore this flag."),
    "continue": ("string", "The continue option should be set when retrieving more results from the server."),
    "fieldSelector": ("string", "A selector to restrict the list of returned objects by their fields. "
                      "Defaults to everything."),
    "labelSelector": ("string", "A selector to restrict the list of returned objects by their labels. "
                      "Defaults to everything."),
    "limit": ("integer", "limit is a maximum number of responses to return for a list call."),
    "resourceVersion": ("string", "resourceVersion sets a constraint on what resource versions a request may "
                        "be served from. Defaults to unset"),
    "resourceVersionMatch": ("string", "resourceVersionMatch determines how resourceVersion is applied to list "
                             "calls. Defaults to unset"),
    "sendInitialEvents": ("boolean", "`sendInitialEvents=true` may be set together with `watch=true`. In that "
                          "case, the watch stream will begin with synthetic events to produce the current "
                          "state of objects in the collection."),
    "timeoutSeconds": ("integer", "Timeout for the list/watch call. This limits the duration of the call, "
                       "regardless of any activity or inactivity."),
    "watch": ("boolean", "Watch for changes to the described resources and return them as a stream of add, "
              "update, and remove notifications. Specify resourceVersion."),
    "dryRun": ("string", "When present, indicates that modifications should not be persisted. An invalid or "
               "unrecognized dryRun directive will result in an error response and no further processing of "
               "the request. Valid values are: - All: all dry run stages will be processed"),
    "fieldManager": ("string", "fieldManager is a name associated with the actor or entity that is making "
                     "these changes. The value must be less than or 128 characters long, and only contain "
                     "printable characters, as defined by https://golang.org/pkg/unicode/#IsPrint."),
    "fieldValidation": ("string", "fieldValidation instructs the server on how to handle objects in the request "
                        "(POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore: "
                        "This will ignore any unknown fields that are silently dropped from the object, and "
                        "will ignore all but the last duplicate field that the decoder encounters. - Warn: This "
                        "will send a warning via the standard warning response header for each unknown field "
                        "that is dropped from the object, and for each duplicate field that is encountered. - "
                        "Strict: This will fail the request with a BadRequest error if any unknown fields would "
                        "be dropped from the object, or if any duplicate fields are present. The error returned "
                        "from the server will contain all unknown and duplicate fields encountered."),
    "force": ("boolean", "Force is going to \"force\" Apply requests. It means user will re-acquire conflicting "
              "fields owned by other people. Force flag must be unset for non-apply patch requests."),
    "gracePeriodSeconds": ("integer", "The duration in seconds before the object should be deleted. Value must "
                           "be non-negative integer. The value zero indicates delete immediately."),
    "orphanDependents": ("boolean", "Deprecated: please use the PropagationPolicy, this field will be "
                         "deprecated in 1.7. Should the dependent objects be orphaned."),
    "propagationPolicy": ("string", "Whether and how garbage collection will be performed. Acceptable values "
                          "are: 'Orphan', 'Background', 'Foreground'."),
    "pretty": ("string", "If 'true', then the output is pretty printed. Defaults to 'false' unless the "
               "user-agent indicates a browser or command-line HTTP tool (curl and wget)."),
}
_LIST_Q = ("allowWatchBookmarks", "continue", "fieldSelector", "labelSelector", "limit", "resourceVersion",
           "resourceVersionMatch", "sendInitialEvents", "timeoutSeconds", "watch")
_WRITE_Q = ("dryRun", "fieldManager", "fieldValidation")
_PATCH_Q = ("dryRun", "fieldManager", "fieldValidation", "force")
_DELETE_Q = ("dryRun", "gracePeriodSeconds", "orphanDependents", "propagationPolicy")

_JSON_YAML = ["application/json", "application/yaml"]
_LIST_PRODUCES = ["application/json", "application/yaml", "application/json;stream=watch"]
_PATCH_TYPES = ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"]


def _param(name: str, where: str, v3: bool, *, required: bool = False) -> JSON:
    typ, desc = _P.get(name, ("string", f"name of the {name}"))
    if name == "name" and where == "path":
        desc = "name of the resource"
    elif name == "namespace":
        desc = "object name and auth scope, such as for teams and projects"
    p: JSON = {"name": name, "in": where, "description": desc}
    if v3:
        p["schema"] = {"type": typ, "uniqueItems": True}
    else:
        p["type"] = typ
        p["uniqueItems"] = True
    if required or where == "path":
        p["required"] = True
    return p


def _body(schema_name: str, v3: bool, content_types: list[str] | None = None) -> JSON:
    if v3:
        return {"content": {ct: {"schema": _ref(schema_name, True)} for ct in (content_types or ["*/*"])},
                "required": True}
    return {"name": "body", "in": "body", "required": True, "schema": _ref(schema_name, False)}


def _responses(codes: dict[str, str], v3: bool, produces: list[str]) -> JSON:
    out: JSON = {}
    for code, schema_name in codes.items():
        desc = {"200": "OK", "201": "Created", "202": "Accepted"}.get(code, "OK")
        if v3:
            out[code] = {"description": desc,
                         "content": {ct: {"schema": _ref(schema_name, True)} for ct in produces}}
        else:
            out[code] = {"description": desc, "schema": _ref(schema_name, False)}
    out["401"] = {"description": "Unauthorized"}
    return out


class _Ops:
    """Builds the operations of one resource, in v2 or v3 form."""

    def __init__(self, res: Resource, v3: bool) -> None:
        self.res = res
        self.v3 = v3
        self.ns = "Namespaced" if res.namespaced else ""
        self.base = f"{_camel(res.group)}{res.version[:1].upper()}{res.version[1:]}"

    def op(self, verb_id: str, action: str, description: str, query: tuple[str, ...], responses: dict[str, str],
           *, body: str = "", consumes: list[str] | None = None, produces: list[str] | None = None,
           kind_suffix: str = "", gvk: JSON | None = None, for_all_ns: bool = False) -> JSON:
        res, v3 = self.res, self.v3
        produces = produces or _JSON_YAML
        scope = "ForAllNamespaces" if for_all_ns else self.ns
        if verb_id in ("list", "deletecollection") or for_all_ns:
            op_kind = f"{res.kind}{kind_suffix}{'ForAllNamespaces' if for_all_ns else ''}"
            op_id = f"{'deleteCollection' if verb_id == 'deletecollection' else verb_id}{self.base}" \
                f"{'' if for_all_ns else self.ns}{op_kind}"
        else:
            op_id = f"{verb_id}{self.base}{scope}{res.kind}{kind_suffix}"
        o: JSON = {
            "description": description,
            "operationId": op_id,
            "tags": [_tag(res)],
            "parameters": [_param(q, "query", v3) for q in query],
            "responses": _responses(responses, v3, produces),
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk or _gvk(res),
        }
        if body:
            if v3:
                o["requestBody"] = _body(body, True, consumes)
            else:
                o["parameters"].append(_body(body, False))
        if not v3:
            o["consumes"] = consumes or ["*/*"]
            o["produces"] = produces
            o["schemes"] = ["https"]
        return o

    def path_params(self, *, name: bool, namespaced: bool) -> list[JSON]:
        ps = []
        if name:
            ps.append(_param("name", "path", self.v3))
        if namespaced:
            ps.append(_param("namespace", "path", self.v3))
        ps.append(_param("pretty", "query", self.v3))
        return ps


def _resource_paths(res: Resource, v3: bool) -> JSON:
    ops = _Ops(res, v3)
    k = res.kind
    obj = definition_name(res)
    lst = definition_name(res, res.list_kind or f"{k}List")
    verbs = set(res.verbs)
    prefix = _api_prefix(res)
    coll = f"{prefix}/namespaces/{{namespace}}/{res.plural}" if res.namespaced else f"{prefix}/{res.plural}"
    item = f"{coll}/{{name}}"
    patch_types = [*_PATCH_TYPES[:2], "application/strategic-merge-patch+json", _PATCH_TYPES[2]] \
        if not res.from_crd else _PATCH_TYPES
    paths: JSON = {}

    c: JSON = {}
    if "list" in verbs:
        c["get"] = ops.op("list", "list", f"list or watch objects of kind {k}", _LIST_Q, {"200": lst},
                          produces=_LIST_PRODUCES)
    if "create" in verbs:
        c["post"] = ops.op("create", "post", f"create a {k}", _WRITE_Q,
                           {"200": obj, "201": obj, "202": obj}, body=obj)
    if "deletecollection" in verbs:
        c["delete"] = ops.op("deletecollection", "deletecollection", f"delete collection of {k}",
                             (*_LIST_Q, *_DELETE_Q), {"200": STATUS}, body=DELETE_OPTIONS)
    if c:
        c["parameters"] = ops.path_params(name=False, namespaced=res.namespaced)
        paths[coll] = c

    i: JSON = {}
    if "get" in verbs:
        i["get"] = ops.op("read", "get", f"read the specified {k}", (), {"200": obj})
    if "update" in verbs:
        i["put"] = ops.op("replace", "put", f"replace the specified {k}", _WRITE_Q, {"200": obj, "201": obj},
                          body=obj)
    if "patch" in verbs:
        i["patch"] = ops.op("patch", "patch", f"partially update the specified {k}", _PATCH_Q,
                            {"200": obj, "201": obj}, body=PATCH, consumes=patch_types)
    if "delete" in verbs:
        i["delete"] = ops.op("delete", "delete", f"delete a {k}", _DELETE_Q,
                             {"200": STATUS, "202": STATUS}, body=DELETE_OPTIONS)
    if i:
        i["parameters"] = ops.path_params(name=True, namespaced=res.namespaced)
        paths[item] = i

    if res.status_subresource:
        paths[f"{item}/status"] = {
            "get": ops.op("read", "get", f"read status of the specified {k}", (), {"200": obj},
                          kind_suffix="Status"),
            "put": ops.op("replace", "put", f"replace status of the specified {k}", _WRITE_Q,
                          {"200": obj, "201": obj}, body=obj, kind_suffix="Status"),
            "patch": ops.op("patch", "patch", f"partially update status of the specified {k}", _PATCH_Q,
                            {"200": obj, "201": obj}, body=PATCH, consumes=patch_types, kind_suffix="Status"),
            "parameters": ops.path_params(name=True, namespaced=res.namespaced),
        }
    if res.scale is not None:
        scale_gvk = {"group": "autoscaling", "kind": "Scale", "version": "v1"}
        paths[f"{item}/scale"] = {
            "get": ops.op("read", "get", f"read scale of the specified {k}", (), {"200": SCALE},
                          kind_suffix="Scale", gvk=scale_gvk),
            "put": ops.op("replace", "put", f"replace scale of the specified {k}", _WRITE_Q,
                          {"200": SCALE, "201": SCALE}, body=SCALE, kind_suffix="Scale", gvk=scale_gvk),
            "patch": ops.op("patch", "patch", f"partially update scale of the specified {k}", _PATCH_Q,
                            {"200": SCALE, "201": SCALE}, body=PATCH, consumes=patch_types, kind_suffix="Scale",
                            gvk=scale_gvk),
            "parameters": ops.path_params(name=True, namespaced=res.namespaced),
        }
    if res.namespaced and "list" in verbs:
        paths[f"{prefix}/{res.plural}"] = {
            "get": ops.op("list", "list", f"list or watch objects of kind {k}", _LIST_Q, {"200": lst},
                          produces=_LIST_PRODUCES, for_all_ns=True),
            "parameters": ops.path_params(name=False, namespaced=False),
        }
    return paths


def _definitions(resources: list[Resource], v3: bool) -> JSON:
    defs: JSON = {}
    for res in resources:
        defs[definition_name(res)] = _object_schema(res, v3)
        defs[definition_name(res, res.list_kind or f"{res.kind}List")] = _list_schema(res, v3)
    return defs


def _sorted(resources: list[Resource]) -> list[Resource]:
    return sorted(resources, key=lambda r: (r.group, r.version, r.plural))


# --------------------------------------------------------------------------------------------------
# Documents


def openapi_v2(resources: list[Resource]) -> JSON:
    res = _sorted(resources)
    paths: JSON = {}
    for r in res:
        paths.update(_resource_paths(r, False))
    defs = _meta_definitions()
    defs.update(_definitions(res, False))
    return {
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": dict(sorted(paths.items())),
        "definitions": dict(sorted(defs.items())),
        "securityDefinitions": {"BearerToken": {"description": "Bearer Token authentication", "type": "apiKey",
                                                "name": "authorization", "in": "header"}},
        "security": [{"BearerToken": []}],
    }


def _normalize_gv(group_version: str) -> str:
    gv = group_version.strip("/")
    if gv.startswith("api/") or gv.startswith("apis/"):
        return gv
    return f"apis/{gv}" if "/" in gv else f"api/{gv}"


def openapi_v3(resources: list[Resource], group_version: str) -> JSON:
    """The v3 document of one group-version: `api/v1`, `apis/kubevirt.io/v1` (or `v1`, `kubevirt.io/v1`)."""
    key = _normalize_gv(group_version)
    res = [r for r in _sorted(resources) if gv_key(r) == key]
    paths: JSON = {}
    for r in res:
        paths.update(_resource_paths(r, True))
    schemas = _meta_v3(_meta_definitions())
    schemas.update(_definitions(res, True))
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {"BearerToken": {"type": "apiKey", "description": "Bearer Token authentication",
                                                "name": "authorization", "in": "header"}},
        },
    }


def openapi_v3_index(resources: list[Resource]) -> JSON:
    """`{"paths": {"apis/kubevirt.io/v1": {"serverRelativeURL": "/openapi/v3/apis/kubevirt.io/v1?hash=..."}}}`.

    The hash is over the group-version's document, so it changes exactly when the document does
    (kubectl caches documents by this URL)."""
    out: JSON = {}
    for key in sorted({gv_key(r) for r in resources}):
        digest = hashlib.sha512(orjson.dumps(openapi_v3(resources, key), option=orjson.OPT_SORT_KEYS))
        out[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={digest.hexdigest().upper()}"}
    return {"paths": out}
