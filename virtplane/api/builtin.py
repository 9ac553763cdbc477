"""The built-in kinds (core/v1, apps/v1, storage.k8s.io, ...), the bundled CRDs, and table rows.

- `builtin_resources()`: what a Kubernetes API server serves without any CRD, reduced to the kinds
  virtplane needs. Their schemas are structural but shallow (top-level fields typed, nested specs
  free-form) because the full core schemas are not available offline.
- `bundled_crds()` / `resources_from_crd()`: KubeVirt's, CDI's and Multus' kinds arrive as CRD objects
  (generated into `data/crds.json` by `virtplane.api.gen_crds`) and become `Resource`s like any CRD.
- `builtin_table_row()`: the computed cells `kubectl get` shows for built-ins (pod READY "1/1", node
  ROLES, ...), which JSON paths cannot express.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import orjson

from virtplane.api import resources

JSON = dict[str, Any]
Col = resources.PrinterColumn

CRDS_PATH = pathlib.Path(__file__).parent / "data" / "crds.json"

_AGE = Col("Age", "date", ".metadata.creationTimestamp")
_NAME_DESC = "Name must be unique within a namespace."


# --------------------------------------------------------------------------------------------------
# CRDs


@functools.cache
def _crds_bytes() -> bytes:
    return CRDS_PATH.read_bytes()


def bundled_crds() -> list[JSON]:
    """The CRDs virtplane installs at startup (KubeVirt, CDI, Multus kinds).

    The file is read once; each call parses it again so callers own (and may mutate) the result.
    """
    crds: list[JSON] = orjson.loads(_crds_bytes())
    return crds


def resources_from_crd(crd: JSON) -> list[resources.Resource]:
    """One `Resource` per served version of an apiextensions.k8s.io/v1 CustomResourceDefinition."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group = spec.get("group", "")
    kind = names.get("kind", "")
    plural = names.get("plural", "")
    out: list[resources.Resource] = []
    for ver in spec.get("versions") or []:
        if not ver.get("served", True):
            continue
        sub = ver.get("subresources") or {}
        scale = sub.get("scale")
        columns = tuple(
            Col(
                name=c.get("name", ""),
                type=c.get("type", "string"),
                json_path=c.get("jsonPath", ""),
                description=c.get("description", ""),
                priority=int(c.get("priority", 0) or 0),
                format=c.get("format", ""),
            )
            for c in ver.get("additionalPrinterColumns") or []
        )
        out.append(
            resources.Resource(
                group=group,
                version=ver.get("name", ""),
                kind=kind,
                plural=plural,
                singular=names.get("singular") or kind.lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                list_kind=names.get("listKind") or f"{kind}List",
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                status_subresource="status" in sub,
                scale=(
                    (scale.get("specReplicasPath", ""), scale.get("statusReplicasPath", ""),
                     scale.get("labelSelectorPath", "") or "")
                    if isinstance(scale, dict)
                    else None
                ),
                printer_columns=columns,
                schema=(ver.get("schema") or {}).get("openAPIV3Schema"),
                from_crd=True,
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# Built-in schemas: typed where it is cheap and useful, free-form below that.


def _free(description: str = "") -> JSON:
    s: JSON = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if description:
        s["description"] = description
    return s


def _str(description: str = "", **extra: Any) -> JSON:
    return {"type": "string", **({"description": description} if description else {}), **extra}


def _map_of_str(description: str, **item: Any) -> JSON:
    return {"type": "object", "description": description, "additionalProperties": {"type": "string", **item}}


def _root(description: str, props: JSON, required: tuple[str, ...] = ()) -> JSON:
    base: JSON = {
        "apiVersion": _str("APIVersion defines the versioned schema of this representation of an object."),
        "kind": _str("Kind is a string value representing the REST resource this object represents."),
        "metadata": {"type": "object"},
    }
    out: JSON = {"type": "object", "description": description, "properties": {**base, **props}}
    if required:
        out["required"] = list(required)
    return out


def _spec_status(description: str, spec: str = "", status: str = "") -> JSON:
    return _root(description, {"spec": _free(spec), "status": _free(status)})


def _namespace_schema() -> JSON:
    return _root(
        "Namespace provides a scope for Names. Use of multiple namespaces is optional.",
        {
            "spec": {
                "type": "object",
                "description": "Spec defines the behavior of the Namespace.",
                "properties": {
                    "finalizers": {
                        "type": "array",
                        "description": "Finalizers is an opaque list of values that must be empty to permanently "
                        "remove object from storage.",
                        "items": {"type": "string"},
                        "x-kubernetes-list-type": "atomic",
                    }
                },
            },
            "status": {
                "type": "object",
                "description": "Status describes the current status of a Namespace.",
                "properties": {
                    "phase": _str("Phase is the current lifecycle phase of the namespace.",
                                  enum=["Active", "Terminating"]),
                    "conditions": {"type": "array", "items": _free()},
                },
            },
        },
    )


def _configmap_schema() -> JSON:
    return _root(
        "ConfigMap holds configuration data for pods to consume.",
        {
            "data": _map_of_str("Data contains the configuration data. Each key must consist of alphanumeric "
                                "characters, '-', '_' or '.'."),
            "binaryData": _map_of_str("BinaryData contains the binary data (base64).", format="byte"),
            "immutable": {"type": "boolean", "description": "Immutable, if set to true, ensures that data stored "
                          "in the ConfigMap cannot be updated (only object metadata can be modified)."},
        },
    )


def _secret_schema() -> JSON:
    return _root(
        "Secret holds secret data of a certain type. The total bytes of the values in the Data field must be "
        "less than MaxSecretSize bytes.",
        {
            "data": _map_of_str("Data contains the secret data. The serialized form of the secret data is a "
                                "base64 encoded string.", format="byte"),
            "stringData": _map_of_str("stringData allows specifying non-binary secret data in string form. It "
                                      "is provided as a write-only input field for convenience."),
            "type": _str("Used to facilitate programmatic handling of secret data."),
            "immutable": {"type": "boolean", "description": "Immutable, if set to true, ensures that data stored "
                          "in the Secret cannot be updated (only object metadata can be modified)."},
        },
    )


def _event_schema() -> JSON:
    ts = {"type": "string", "format": "date-time"}
    return _root(
        "Event is a report of an event somewhere in the cluster.",
        {
            "involvedObject": _free("The object that this event is about."),
            "reason": _str("This should be a short, machine understandable string that gives the reason for "
                           "the transition into the object's current status."),
            "message": _str("A human-readable description of the status of this operation."),
            "source": _free("The component reporting this event."),
            "firstTimestamp": {**ts, "description": "The time at which the event was first recorded."},
            "lastTimestamp": {**ts, "description": "The time at which the most recent occurrence of this event "
                              "was recorded."},
            "count": {"type": "integer", "format": "int32",
                      "description": "The number of times this event has occurred."},
            "type": _str("Type of this event (Normal, Warning), new types could be added in the future"),
            "eventTime": {**ts, "description": "Time when this Event was first observed."},
            "series": _free("Data about the Event series this event represents or nil if it's a singleton "
                            "Event."),
            "action": _str("What action was taken/failed regarding to the Regarding object."),
            "related": _free("Optional secondary object for more complex actions."),
            "reportingComponent": _str("Name of the controller that emitted this Event."),
            "reportingInstance": _str("ID of the controller instance."),
        },
        ("involvedObject",),
    )


def _service_account_schema() -> JSON:
    return _root(
        "ServiceAccount binds together: a name, understood by users, and perhaps by peripheral systems, for an "
        "identity; a principal that can be authenticated and authorized; a set of secrets.",
        {
            "secrets": {"type": "array", "items": _free()},
            "imagePullSecrets": {"type": "array", "items": _free()},
            "automountServiceAccountToken": {"type": "boolean"},
        },
    )


def _storage_class_schema() -> JSON:
    return _root(
        "StorageClass describes the parameters for a class of storage for which PersistentVolumes can be "
        "dynamically provisioned.",
        {
            "provisioner": _str("provisioner indicates the type of the provisioner."),
            "parameters": _map_of_str("parameters holds the parameters for the provisioner that should create "
                                      "volumes of this storage class."),
            "reclaimPolicy": _str("reclaimPolicy controls the reclaimPolicy for dynamically provisioned "
                                  "PersistentVolumes of this storage class. Defaults to Delete.",
                                  enum=["Delete", "Recycle", "Retain"]),
            "mountOptions": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "atomic"},
            "allowVolumeExpansion": {"type": "boolean",
                                     "description": "allowVolumeExpansion shows whether the storage class allow "
                                     "volume expand."},
            "volumeBindingMode": _str("volumeBindingMode indicates how PersistentVolumeClaims should be "
                                      "provisioned and bound. When unset, VolumeBindingImmediate is used.",
                                      enum=["Immediate", "WaitForFirstConsumer"]),
            "allowedTopologies": {"type": "array", "items": _free(), "x-kubernetes-list-type": "atomic"},
        },
        ("provisioner",),
    )


def _lease_schema() -> JSON:
    ts = {"type": "string", "format": "date-time"}
    return _root(
        "Lease defines a lease concept.",
        {
            "spec": {
                "type": "object",
                "description": "spec contains the specification of the Lease.",
                "properties": {
                    "holderIdentity": _str("holderIdentity contains the identity of the holder of a current "
                                           "lease."),
                    "leaseDurationSeconds": {"type": "integer", "format": "int32"},
                    "acquireTime": ts,
                    "renewTime": ts,
                    "leaseTransitions": {"type": "integer", "format": "int32"},
                    "strategy": _str(),
                    "preferredHolder": _str(),
                },
            }
        },
    )


def _endpoint_slice_schema() -> JSON:
    return _root(
        "EndpointSlice represents a subset of the endpoints that implement a service.",
        {
            "addressType": _str("addressType specifies the type of address carried by this EndpointSlice.",
                                enum=["IPv4", "IPv6", "FQDN"]),
            "endpoints": {"type": "array", "items": _free(), "x-kubernetes-list-type": "atomic"},
            "ports": {"type": "array", "items": _free(), "x-kubernetes-list-type": "atomic"},
        },
        ("addressType", "endpoints"),
    )


def _replicated_schema(description: str) -> JSON:
    return _root(
        description,
        {
            "spec": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"replicas": {"type": "integer", "format": "int32", "minimum": 0}},
            },
            "status": _free(),
        },
    )


def _strings(description: str) -> JSON:
    return {"type": "array", "description": description, "items": {"type": "string"},
            "x-kubernetes-list-type": "atomic"}


def _policy_rules() -> JSON:
    rule = {
        "type": "object",
        "description": "PolicyRule holds information that describes a policy rule, but does not contain "
        "information about who the rule applies to or which namespace the rule applies to.",
        "required": ["verbs"],
        "properties": {
            "verbs": _strings("Verbs is a list of Verbs that apply to ALL the ResourceKinds contained in this "
                              "rule. '*' represents all verbs."),
            "apiGroups": _strings("APIGroups is the name of the APIGroup that contains the resources. \"\" "
                                  "represents the core API group and \"*\" represents all API groups."),
            "resources": _strings("Resources is a list of resources this rule applies to. '*' represents all "
                                  "resources."),
            "resourceNames": _strings("ResourceNames is an optional white list of names that the rule applies "
                                      "to. An empty set means that everything is allowed."),
            "nonResourceURLs": _strings("NonResourceURLs is a set of partial urls that a user should have "
                                        "access to. *s are allowed, but only as the full, final step in the "
                                        "path."),
        },
    }
    return {"type": "array", "description": "Rules holds all the PolicyRules for this Role", "items": rule,
            "x-kubernetes-list-type": "atomic"}


def _role_schema(cluster: bool) -> JSON:
    props: JSON = {"rules": _policy_rules()}
    if cluster:
        props["aggregationRule"] = {
            "type": "object",
            "description": "AggregationRule is an optional field that describes how to build the Rules for "
            "this ClusterRole. If AggregationRule is set, then the Rules are controller managed and direct "
            "changes to Rules will be stomped by the controller.",
            "properties": {"clusterRoleSelectors": {
                "type": "array", "items": _free("a label selector"), "x-kubernetes-list-type": "atomic",
                "description": "ClusterRoleSelectors holds a list of selectors which will be used to find "
                "ClusterRoles and create the rules. If any of the selectors match, then the ClusterRole's "
                "permissions will be added"}},
        }
    what = "ClusterRole is a cluster level, logical grouping of PolicyRules that can be referenced as a unit " \
        "by a RoleBinding or ClusterRoleBinding." if cluster else \
        "Role is a namespaced, logical grouping of PolicyRules that can be referenced as a unit by a RoleBinding."
    return _root(what, props)


def _binding_schema(cluster: bool) -> JSON:
    subject = {
        "type": "object",
        "description": "Subject contains a reference to the object or user identities a role binding applies to.",
        "required": ["kind", "name"],
        "properties": {
            "kind": _str("Kind of object being referenced. Values defined by this API group are \"User\", "
                         "\"Group\", and \"ServiceAccount\"."),
            "apiGroup": _str("APIGroup holds the API group of the referenced subject."),
            "name": _str("Name of the object being referenced."),
            "namespace": _str("Namespace of the referenced object."),
        },
        "x-kubernetes-map-type": "atomic",
    }
    role_ref = {
        "type": "object",
        "description": "RoleRef contains information that points to the role being used",
        "required": ["apiGroup", "kind", "name"],
        "properties": {"apiGroup": _str("APIGroup is the group for the resource being referenced"),
                       "kind": _str("Kind is the type of resource being referenced"),
                       "name": _str("Name is the name of resource being referenced")},
        "x-kubernetes-map-type": "atomic",
    }
    what = "ClusterRoleBinding references a ClusterRole, but not contain it." if cluster else \
        "RoleBinding references a role, but does not contain it."
    return _root(what, {"subjects": {"type": "array", "items": subject, "x-kubernetes-list-type": "atomic",
                                     "description": "Subjects holds references to the objects the role applies "
                                     "to."},
                        "roleRef": role_ref}, ("roleRef",))


def _review_schema(description: str) -> JSON:
    return _root(description, {"spec": _free("Spec holds information about the request being evaluated"),
                               "status": _free("Status is filled in by the server")}, ("spec",))


def rbac_resources() -> list[resources.Resource]:
    """rbac.authorization.k8s.io/v1, and the create-only review kinds of authorization.k8s.io/v1 and
    authentication.k8s.io/v1 (served by virtplane.apiserver.rbac_reviews, never stored)."""
    s = "string"
    created = (Col("Created At", s, ".metadata.creationTimestamp", "The time the role was created.",
                   format="date-time"),)
    bound = (Col("Role", s, "", "The role the binding refers to."), _AGE,
             Col("Users", s, "", "The users the binding applies to.", 1),
             Col("Groups", s, "", "The groups the binding applies to.", 1),
             Col("ServiceAccounts", s, "", "The service accounts the binding applies to.", 1))
    g = "rbac.authorization.k8s.io"
    create = ("create",)
    return [
        _r(g, "v1", "Role", "roles", status=False, schema=_role_schema(False), cols=created),
        _r(g, "v1", "ClusterRole", "clusterroles", namespaced=False, status=False, schema=_role_schema(True),
           cols=created),
        _r(g, "v1", "RoleBinding", "rolebindings", status=False, schema=_binding_schema(False), cols=bound),
        _r(g, "v1", "ClusterRoleBinding", "clusterrolebindings", namespaced=False, status=False,
           schema=_binding_schema(True), cols=bound),
        _r("authorization.k8s.io", "v1", "SelfSubjectAccessReview", "selfsubjectaccessreviews", namespaced=False,
           status=False, verbs=create, schema=_review_schema("SelfSubjectAccessReview checks whether or the "
                                                              "current user can perform an action.")),
        _r("authorization.k8s.io", "v1", "SelfSubjectRulesReview", "selfsubjectrulesreviews", namespaced=False,
           status=False, verbs=create, schema=_review_schema("SelfSubjectRulesReview enumerates the set of "
                                                              "actions the current user can perform within a "
                                                              "namespace.")),
        _r("authorization.k8s.io", "v1", "SubjectAccessReview", "subjectaccessreviews", namespaced=False,
           status=False, verbs=create, schema=_review_schema("SubjectAccessReview checks whether or not a user "
                                                              "or group can perform an action.")),
        _r("authorization.k8s.io", "v1", "LocalSubjectAccessReview", "localsubjectaccessreviews", status=False,
           verbs=create, schema=_review_schema("LocalSubjectAccessReview checks whether or not a user or group "
                                               "can perform an action in a given namespace.")),
        _r("authentication.k8s.io", "v1", "SelfSubjectReview", "selfsubjectreviews", namespaced=False,
           status=False, verbs=create, schema=_root("SelfSubjectReview contains the user information that the "
                                                    "kube-apiserver has about the user making this request.",
                                                    {"status": _free("Status is filled in by the server")})),
    ]


# --------------------------------------------------------------------------------------------------
# Built-in resources


def _r(group: str, version: str, kind: str, plural: str, *, namespaced: bool = True,
       short: tuple[str, ...] = (), categories: tuple[str, ...] = (), status: bool = True,
       scale: tuple[str, str, str] | None = None, cols: tuple[Col, ...] = (), schema: JSON | None = None,
       verbs: tuple[str, ...] = resources.ALL_VERBS) -> resources.Resource:
    return resources.Resource(
        group=group, version=version, kind=kind, plural=plural, singular=kind.lower(), namespaced=namespaced,
        list_kind=f"{kind}List", short_names=short, categories=categories, verbs=verbs,
        status_subresource=status, scale=scale, printer_columns=cols, schema=schema,
    )


def builtin_resources() -> list[resources.Resource]:
    """Built-in kinds with the names, short names, categories and columns Kubernetes gives them."""
    s, i, d = "string", "integer", "date"
    no_dc = tuple(v for v in resources.ALL_VERBS if v != "deletecollection")  # as Kubernetes for namespaces
    return [
        _r("", "v1", "Namespace", "namespaces", namespaced=False, short=("ns",), schema=_namespace_schema(),
           verbs=no_dc,
           cols=(Col("Status", s, ".status.phase", "The status of the namespace"), _AGE)),
        _r("", "v1", "Node", "nodes", namespaced=False, short=("no",),
           schema=_spec_status("Node is a worker node in Kubernetes."),
           cols=(Col("Status", s, "", "The status of the node"), Col("Roles", s, "", "The roles of the node"),
                 _AGE, Col("Version", s, ".status.nodeInfo.kubeletVersion", "Kubelet Version reported by the "
                           "node."),
                 Col("Internal-IP", s, "", "List of internal IPs for the node.", 1),
                 Col("External-IP", s, "", "List of external IPs for the node.", 1),
                 Col("OS-Image", s, ".status.nodeInfo.osImage", "OS Image reported by the node.", 1),
                 Col("Kernel-Version", s, ".status.nodeInfo.kernelVersion", "Kernel Version reported by the "
                     "node.", 1),
                 Col("Container-Runtime", s, ".status.nodeInfo.containerRuntimeVersion",
                     "Container Runtime Version reported by the node.", 1))),
        _r("", "v1", "Pod", "pods", short=("po",), categories=("all",),
           schema=_spec_status("Pod is a collection of containers that can run on a host."),
           cols=(Col("Ready", s, "", "The aggregate readiness state of this pod for accepting traffic."),
                 Col("Status", s, "", "The aggregate status of the containers in this pod."),
                 Col("Restarts", s, "", "The number of times the containers in this pod have been restarted "
                     "and when the last container in this pod has restarted."),
                 _AGE,
                 Col("IP", s, ".status.podIP", "IP address allocated to the pod. Routable at least within the "
                     "cluster. Empty if not yet allocated.", 1),
                 Col("Node", s, ".spec.nodeName", "Name of the Node this pod is assigned to.", 1),
                 Col("Nominated Node", s, ".status.nominatedNodeName", "Name of the node this pod is nominated "
                     "to run on.", 1),
                 Col("Readiness Gates", s, "", "Pod readiness gates.", 1))),
        _r("", "v1", "Service", "services", short=("svc",), categories=("all",),
           schema=_spec_status("Service is a named abstraction of software service (for example, mysql) "
                               "consisting of local port (for example 3306) that the proxy listens on, and "
                               "the selector that determines which pods will answer requests sent through the "
                               "proxy."),
           cols=(Col("Type", s, ".spec.type", "The type of service."),
                 Col("Cluster-IP", s, ".spec.clusterIP", "The cluster IP of the service."),
                 Col("External-IP", s, "", "The external IP of the service."),
                 Col("Port(s)", s, "", "The ports of the service."), _AGE,
                 Col("Selector", s, "", "The selector of the service.", 1))),
        _r("", "v1", "Endpoints", "endpoints", short=("ep",), status=False,
           schema=_root("Endpoints is a collection of endpoints that implement the actual service.",
                        {"subsets": {"type": "array", "items": _free(), "x-kubernetes-list-type": "atomic"}}),
           cols=(Col("Endpoints", s, "", "Endpoints of the service."), _AGE)),
        _r("", "v1", "PersistentVolume", "persistentvolumes", namespaced=False, short=("pv",),
           schema=_spec_status("PersistentVolume (PV) is a storage resource provisioned by an administrator."),
           cols=(Col("Capacity", s, ".spec.capacity.storage", "The capacity of the volume."),
                 Col("Access Modes", s, "", "The access modes of the volume."),
                 Col("Reclaim Policy", s, ".spec.persistentVolumeReclaimPolicy", "The reclaim policy."),
                 Col("Status", s, ".status.phase", "The phase of the volume."),
                 Col("Claim", s, "", "The claim bound to the volume."),
                 Col("StorageClass", s, ".spec.storageClassName", "The storage class of the volume."),
                 Col("VolumeAttributesClass", s, ".spec.volumeAttributesClassName",
                     "VolumeAttributesClass of the volume."),
                 Col("Reason", s, ".status.reason", "Reason why the volume is in its phase."), _AGE,
                 Col("VolumeMode", s, ".spec.volumeMode", "The volume mode of the volume.", 1))),
        _r("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", short=("pvc",),
           schema=_spec_status("PersistentVolumeClaim is a user's request for and claim to a persistent "
                               "volume."),
           cols=(Col("Status", s, ".status.phase", "The phase of the claim."),
                 Col("Volume", s, ".spec.volumeName", "The volume bound to the claim."),
                 Col("Capacity", s, ".status.capacity.storage", "The capacity of the bound volume."),
                 Col("Access Modes", s, "", "The access modes of the bound volume."),
                 Col("StorageClass", s, ".spec.storageClassName", "The storage class of the claim."),
                 Col("VolumeAttributesClass", s, ".spec.volumeAttributesClassName",
                     "VolumeAttributesClass of the claim."), _AGE,
                 Col("VolumeMode", s, ".spec.volumeMode", "The volume mode of the claim.", 1))),
        _r("", "v1", "ConfigMap", "configmaps", short=("cm",), status=False, schema=_configmap_schema(),
           cols=(Col("Data", i, "", "Number of data entries."), _AGE)),
        _r("", "v1", "Secret", "secrets", status=False, schema=_secret_schema(),
           cols=(Col("Type", s, ".type", "The type of the secret."),
                 Col("Data", i, "", "Number of data entries."), _AGE)),
        _r("", "v1", "Event", "events", short=("ev",), status=False, schema=_event_schema(),
           cols=(Col("Last Seen", d, "", "Time the event was last seen."),
                 Col("Type", s, ".type", "The type of the event."),
                 Col("Reason", s, ".reason", "Why the event happened."),
                 Col("Object", s, "", "The object the event is about."),
                 Col("Subobject", s, ".involvedObject.fieldPath", "The part of the object concerned.", 1),
                 Col("Source", s, "", "The component reporting the event.", 1),
                 Col("Message", s, ".message", "A human-readable description of the event."),
                 Col("First Seen", d, ".firstTimestamp", "Time the event was first seen.", 1),
                 Col("Count", i, ".count", "How many times the event happened.", 1),
                 Col("Name", s, ".metadata.name", "Name of the event.", 1))),
        _r("", "v1", "ServiceAccount", "serviceaccounts", short=("sa",), status=False,
           schema=_service_account_schema(),
           cols=(Col("Secrets", i, "", "Number of secrets."), _AGE)),
        _r("storage.k8s.io", "v1", "StorageClass", "storageclasses", namespaced=False, short=("sc",),
           status=False, schema=_storage_class_schema(),
           cols=(Col("Provisioner", s, ".provisioner", "Indicates the type of the provisioner."),
                 Col("ReclaimPolicy", s, "", "Indicates the type of the reclaim policy."),
                 Col("VolumeBindingMode", s, "", "Indicates how PersistentVolumeClaims should be bound."),
                 Col("AllowVolumeExpansion", s, "", "Indicates whether the storage class allows volume "
                     "expansion."), _AGE)),
        _r("coordination.k8s.io", "v1", "Lease", "leases", status=False, schema=_lease_schema(),
           cols=(Col("Holder", s, ".spec.holderIdentity", "The holder of the lease."), _AGE)),
        _r("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions",
           namespaced=False, short=("crd", "crds"),
           schema=_spec_status("CustomResourceDefinition represents a resource that should be exposed on the "
                               "API server."),
           cols=(Col("Created At", d, ".metadata.creationTimestamp",
                     "CreationTimestamp is a timestamp representing the server time when this object was "
                     "created."),)),
        _r("apps", "v1", "Deployment", "deployments", short=("deploy",), categories=("all",),
           scale=(".spec.replicas", ".status.replicas", ".status.selector"),
           schema=_replicated_schema("Deployment enables declarative updates for Pods and ReplicaSets."),
           cols=(Col("Ready", s, "", "Number of the pod with ready state"),
                 Col("Up-to-date", i, ".status.updatedReplicas", "Total number of non-terminated pods targeted "
                     "by this deployment that have the desired template spec."),
                 Col("Available", i, ".status.availableReplicas", "Total number of available pods (ready for at "
                     "least minReadySeconds) targeted by this deployment."), _AGE,
                 Col("Containers", s, "", "Names of each container in the template.", 1),
                 Col("Images", s, "", "Images referenced by each container in the template.", 1),
                 Col("Selector", s, "", "Label selector for pods.", 1))),
        _r("apps", "v1", "ReplicaSet", "replicasets", short=("rs",), categories=("all",),
           scale=(".spec.replicas", ".status.replicas", ".status.selector"),
           schema=_replicated_schema("ReplicaSet ensures that a specified number of pod replicas are running "
                                     "at any given time."),
           cols=(Col("Desired", i, ".spec.replicas", "Number of desired pods."),
                 Col("Current", i, ".status.replicas", "Number of actually running pods."),
                 Col("Ready", i, ".status.readyReplicas", "Number of ready pods."), _AGE,
                 Col("Containers", s, "", "Names of each container in the template.", 1),
                 Col("Images", s, "", "Images referenced by each container in the template.", 1),
                 Col("Selector", s, "", "Label selector for pods.", 1))),
        _r("apps", "v1", "ControllerRevision", "controllerrevisions", status=False,
           schema=_root("ControllerRevision implements an immutable snapshot of state data.",
                        {"data": _free("Data is the serialized representation of the state."),
                         "revision": {"type": "integer", "format": "int64",
                                      "description": "Revision indicates the revision of the state represented "
                                                     "by Data."}}, ("revision",)),
           cols=(Col("Controller", s, "", "The controller of the revision."),
                 Col("Revision", i, ".revision", "The revision number."), _AGE)),
        _r("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", status=False,
           schema=_endpoint_slice_schema(),
           cols=(Col("AddressType", s, ".addressType", "The IP protocol for this slice."),
                 Col("Ports", s, "", "The ports for this slice."),
                 Col("Endpoints", s, "", "The addresses of this slice."), _AGE)),
        *rbac_resources(),
    ]


# --------------------------------------------------------------------------------------------------
# Table rows for built-ins (the cells after NAME, one per `printer_columns` entry)


def _get(obj: Any, *path: str | int) -> Any:
    cur = obj
    for p in path:
        if isinstance(p, int):
            cur = cur[p] if isinstance(cur, list) and -len(cur) <= p < len(cur) else None
        else:
            cur = cur.get(p) if isinstance(cur, dict) else None
        if cur is None:
            return None
    return cur


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _dict(v: Any) -> JSON:
    return v if isinstance(v, dict) else {}


def _access_modes(modes: Any) -> str:
    """kubectl's short form (`RWO,RWX`), in Kubernetes' fixed order."""
    order = (("ReadWriteOnce", "RWO"), ("ReadOnlyMany", "ROX"), ("ReadWriteMany", "RWX"),
             ("ReadWriteOncePod", "RWOP"))
    have = set(_list(modes))
    return ",".join(short for long, short in order if long in have)


def _pod_status(pod: JSON) -> str:
    """The STATUS column, following kubectl's printPod (simplified: no sidecar special cases)."""
    status = _dict(pod.get("status"))
    reason = status.get("reason") or status.get("phase") or ""
    initializing = False
    init_statuses = _list(status.get("initContainerStatuses"))
    n_init = len(_list(_get(pod, "spec", "initContainers")))
    for i, cs in enumerate(init_statuses):
        term = _get(cs, "state", "terminated")
        waiting = _get(cs, "state", "waiting")
        if term is not None and term.get("exitCode", 0) == 0:
            continue
        if term is not None:
            if term.get("reason"):
                reason = f"Init:{term['reason']}"
            elif term.get("signal"):
                reason = f"Init:Signal:{term['signal']}"
            else:
                reason = f"Init:ExitCode:{term.get('exitCode', 0)}"
        elif waiting is not None and waiting.get("reason") and waiting["reason"] != "PodInitializing":
            reason = f"Init:{waiting['reason']}"
        else:
            reason = f"Init:{i}/{n_init}"
        initializing = True
        break
    if not initializing:
        has_running = False
        for cs in reversed(_list(status.get("containerStatuses"))):
            waiting = _get(cs, "state", "waiting")
            term = _get(cs, "state", "terminated")
            if waiting is not None and waiting.get("reason"):
                reason = waiting["reason"]
            elif term is not None and term.get("reason"):
                reason = term["reason"]
            elif term is not None:
                reason = (f"Signal:{term['signal']}" if term.get("signal")
                          else f"ExitCode:{term.get('exitCode', 0)}")
            elif cs.get("ready") and _get(cs, "state", "running") is not None:
                has_running = True
        if reason == "Completed" and has_running:
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in _list(status.get("conditions")))
            reason = "Running" if ready else "NotReady"
    if _get(pod, "metadata", "deletionTimestamp") is not None:
        reason = "Unknown" if status.get("reason") == "NodeLost" else "Terminating"
    return reason


def _pod_row(pod: JSON) -> list[Any]:
    status = _dict(pod.get("status"))
    containers = _list(_get(pod, "spec", "containers"))
    statuses = _list(status.get("containerStatuses"))
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount", 0) or 0) for c in statuses)
    restarts += sum(int(c.get("restartCount", 0) or 0) for c in _list(status.get("initContainerStatuses")))
    gates = _list(_get(pod, "spec", "readinessGates"))
    if gates:
        conds = {c.get("type"): c.get("status") for c in _list(status.get("conditions"))}
        ok = sum(1 for g in gates if conds.get(g.get("conditionType")) == "True")
        gates_cell = f"{ok}/{len(gates)}"
    else:
        gates_cell = "<none>"
    return [
        f"{ready}/{len(containers)}",
        _pod_status(pod),
        str(restarts),
        _get(pod, "metadata", "creationTimestamp"),
        status.get("podIP") or "<none>",
        _get(pod, "spec", "nodeName") or "<none>",
        status.get("nominatedNodeName") or "<none>",
        gates_cell,
    ]


def _node_row(node: JSON) -> list[Any]:
    conds = _list(_get(node, "status", "conditions"))
    ready = next((c.get("status") for c in conds if c.get("type") == "Ready"), None)
    state = {"True": "Ready", "False": "NotReady"}.get(ready or "", "Unknown")
    if _get(node, "spec", "unschedulable"):
        state += ",SchedulingDisabled"
    labels = _dict(_get(node, "metadata", "labels"))
    roles = sorted(
        {k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/") and "/" in k}
        | ({labels["kubernetes.io/role"]} if labels.get("kubernetes.io/role") else set())
    )
    addrs = _list(_get(node, "status", "addresses"))

    def addr(kind: str) -> str:
        found = [a.get("address", "") for a in addrs if a.get("type") == kind]
        return ",".join(found) if found else "<none>"

    info = _dict(_get(node, "status", "nodeInfo"))
    return [
        state,
        ",".join(r for r in roles if r) or "<none>",
        _get(node, "metadata", "creationTimestamp"),
        info.get("kubeletVersion", ""),
        addr("InternalIP"),
        addr("ExternalIP"),
        info.get("osImage") or "<unknown>",
        info.get("kernelVersion") or "<unknown>",
        info.get("containerRuntimeVersion") or "<unknown>",
    ]


def _service_ports(svc: JSON) -> str:
    parts = []
    for p in _list(_get(svc, "spec", "ports")):
        s = str(p.get("port", ""))
        if p.get("nodePort"):
            s += f":{p['nodePort']}"
        parts.append(f"{s}/{p.get('protocol', 'TCP')}")
    return ",".join(parts) or "<none>"


def _service_row(svc: JSON) -> list[Any]:
    spec = _dict(svc.get("spec"))
    typ = spec.get("type") or "ClusterIP"
    ext = list(_list(spec.get("externalIPs")))
    if typ == "LoadBalancer":
        ext += [i.get("ip") or i.get("hostname") for i in _list(_get(svc, "status", "loadBalancer", "ingress"))]
        ext_cell = ",".join(e for e in ext if e) or "<pending>"
    elif typ == "ExternalName":
        ext_cell = spec.get("externalName") or "<none>"
    else:
        ext_cell = ",".join(ext) or "<none>"
    selector = _dict(spec.get("selector"))
    return [
        typ,
        spec.get("clusterIP") or "<none>",
        ext_cell,
        _service_ports(svc),
        _get(svc, "metadata", "creationTimestamp"),
        ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "<none>",
    ]


def _endpoints_row(ep: JSON) -> list[Any]:
    out = []
    for subset in _list(ep.get("subsets")):
        ports = [p.get("port") for p in _list(subset.get("ports"))] or [None]
        for a in _list(subset.get("addresses")):
            for port in ports:
                out.append(f"{a.get('ip')}:{port}" if port is not None else str(a.get("ip")))
    cell = ",".join(out[:3]) + (f" + {len(out) - 3} more..." if len(out) > 3 else "")
    return [cell or "<none>", _get(ep, "metadata", "creationTimestamp")]


def _pv_row(pv: JSON) -> list[Any]:
    claim = _dict(_get(pv, "spec", "claimRef"))
    claim_cell = f"{claim.get('namespace', '')}/{claim.get('name', '')}" if claim.get("name") else ""
    spec = _dict(pv.get("spec"))
    return [
        _get(spec, "capacity", "storage") or "",
        _access_modes(spec.get("accessModes")),
        spec.get("persistentVolumeReclaimPolicy") or "",
        _get(pv, "status", "phase") or "",
        claim_cell,
        spec.get("storageClassName") or "",
        spec.get("volumeAttributesClassName") or "<unset>",
        _get(pv, "status", "reason") or "",
        _get(pv, "metadata", "creationTimestamp"),
        spec.get("volumeMode") or "Filesystem",
    ]


def _pvc_row(pvc: JSON) -> list[Any]:
    spec = _dict(pvc.get("spec"))
    status = _dict(pvc.get("status"))
    bound = status.get("phase") == "Bound"
    return [
        status.get("phase") or "",
        spec.get("volumeName") or "",
        (_get(status, "capacity", "storage") or "") if bound else "",
        _access_modes(status.get("accessModes")) if bound else "",
        spec.get("storageClassName") or "",
        spec.get("volumeAttributesClassName") or "<unset>",
        _get(pvc, "metadata", "creationTimestamp"),
        spec.get("volumeMode") or "Filesystem",
    ]


def _event_row(ev: JSON) -> list[Any]:
    io = _dict(ev.get("involvedObject"))
    src = _dict(ev.get("source"))
    last = ev.get("lastTimestamp") or ev.get("eventTime") or _get(ev, "series", "lastObservedTime") \
        or ev.get("firstTimestamp") or _get(ev, "metadata", "creationTimestamp")
    first = ev.get("firstTimestamp") or ev.get("eventTime") or _get(ev, "metadata", "creationTimestamp")
    source = src.get("component") or ev.get("reportingComponent") or ""
    if src.get("host"):
        source += f", {src['host']}"
    return [
        last,
        ev.get("type") or "",
        ev.get("reason") or "",
        f"{str(io.get('kind', '')).lower()}/{io.get('name', '')}",
        io.get("fieldPath") or "",
        source,
        ev.get("message") or "",
        first,
        int(ev.get("count") or 1),
        _get(ev, "metadata", "name") or "",
    ]


def _template_containers(obj: JSON) -> tuple[str, str, str]:
    containers = _list(_get(obj, "spec", "template", "spec", "containers"))
    names = ",".join(str(c.get("name", "")) for c in containers) or "<none>"
    images = ",".join(str(c.get("image", "")) for c in containers) or "<none>"
    sel = _dict(_get(obj, "spec", "selector", "matchLabels"))
    return names, images, ",".join(f"{k}={v}" for k, v in sorted(sel.items())) or "<none>"


def _deployment_row(dep: JSON) -> list[Any]:
    status = _dict(dep.get("status"))
    desired = _get(dep, "spec", "replicas")
    desired = 1 if desired is None else desired
    return [
        f"{status.get('readyReplicas', 0) or 0}/{desired}",
        int(status.get("updatedReplicas", 0) or 0),
        int(status.get("availableReplicas", 0) or 0),
        _get(dep, "metadata", "creationTimestamp"),
        *_template_containers(dep),
    ]


def _replicaset_row(rs: JSON) -> list[Any]:
    status = _dict(rs.get("status"))
    desired = _get(rs, "spec", "replicas")
    return [
        1 if desired is None else desired,
        int(status.get("replicas", 0) or 0),
        int(status.get("readyReplicas", 0) or 0),
        _get(rs, "metadata", "creationTimestamp"),
        *_template_containers(rs),
    ]


def _storage_class_row(sc: JSON) -> list[Any]:
    return [
        sc.get("provisioner") or "",
        sc.get("reclaimPolicy") or "Delete",
        sc.get("volumeBindingMode") or "Immediate",
        "true" if sc.get("allowVolumeExpansion") else "false",
        _get(sc, "metadata", "creationTimestamp"),
    ]


def _endpoint_slice_row(es: JSON) -> list[Any]:
    ports = ",".join(str(p.get("port", "")) for p in _list(es.get("ports")) if p.get("port") is not None)
    addrs = [a for e in _list(es.get("endpoints")) for a in _list(e.get("addresses"))]
    cell = ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")
    return [es.get("addressType") or "", ports or "<unset>", cell or "<unset>",
            _get(es, "metadata", "creationTimestamp")]


def _count_row(field: str, *extra: str) -> Any:
    def row(obj: JSON) -> list[Any]:
        n = len(_dict(obj.get(field))) + sum(len(_dict(obj.get(e))) for e in extra)
        return [n, _get(obj, "metadata", "creationTimestamp")]

    return row


def _secret_row(sec: JSON) -> list[Any]:
    return [sec.get("type") or "Opaque", len(_dict(sec.get("data"))), _get(sec, "metadata", "creationTimestamp")]


def _service_account_row(sa: JSON) -> list[Any]:
    return [len(_list(sa.get("secrets"))), _get(sa, "metadata", "creationTimestamp")]


def _controller_revision_row(cr: JSON) -> list[Any]:
    owner = next((r for r in _list(_get(cr, "metadata", "ownerReferences")) if r.get("controller")), None)
    controller = f"{owner.get('kind', '').lower()}.{owner.get('apiVersion', '').split('/')[0]}/{owner.get('name')}" \
        if owner else "<none>"
    return [controller, cr.get("revision"), _get(cr, "metadata", "creationTimestamp")]


def _binding_row(b: JSON) -> list[Any]:
    ref = _dict(b.get("roleRef"))
    subjects = [x for x in _list(b.get("subjects")) if isinstance(x, dict)]

    def names(kind: str) -> str:
        return ", ".join((f"{x.get('namespace', '')}/{x.get('name', '')}" if kind == "ServiceAccount"
                          else str(x.get("name", ""))) for x in subjects if x.get("kind") == kind)

    return [f"{ref.get('kind', '')}/{ref.get('name', '')}", _get(b, "metadata", "creationTimestamp"),
            names("User"), names("Group"), names("ServiceAccount")]


_ROWS = {
    ("", "Pod"): _pod_row,
    ("", "Node"): _node_row,
    ("", "Service"): _service_row,
    ("", "Endpoints"): _endpoints_row,
    ("", "PersistentVolume"): _pv_row,
    ("", "PersistentVolumeClaim"): _pvc_row,
    ("", "ConfigMap"): _count_row("data", "binaryData"),
    ("", "Secret"): _secret_row,
    ("", "Event"): _event_row,
    ("", "ServiceAccount"): _service_account_row,
    ("storage.k8s.io", "StorageClass"): _storage_class_row,
    ("apps", "Deployment"): _deployment_row,
    ("apps", "ReplicaSet"): _replicaset_row,
    ("apps", "ControllerRevision"): _controller_revision_row,
    ("discovery.k8s.io", "EndpointSlice"): _endpoint_slice_row,
    ("rbac.authorization.k8s.io", "RoleBinding"): _binding_row,
    ("rbac.authorization.k8s.io", "ClusterRoleBinding"): _binding_row,
}


def builtin_table_row(resource: resources.Resource, obj: JSON) -> list[Any] | None:
    """Cells for `resource.printer_columns` (NAME excluded) when some are computed; None when every
    column is a plain JSON path the caller can evaluate. "date" cells are RFC 3339 timestamps."""
    if resource.from_crd:
        return None
    fn = _ROWS.get((resource.group, resource.kind))
    return fn(obj) if fn is not None else None
