"""The default RBAC policy the API server writes at start-up, as kube-apiserver's bootstrap policy does.

- Kubernetes' user-facing roles: `cluster-admin` (everything), `admin`, `edit`, `view` (aggregated from
  ClusterRoles labelled `rbac.authorization.k8s.io/aggregate-to-{admin,edit,view}: "true"`; `view`
  aggregates into `edit`, `edit` into `admin`), and their building blocks `system:aggregate-to-*` with
  Kubernetes' rules for the kinds virtplane serves.
- `system:discovery`, `system:public-info-viewer` and `system:basic-user` (SelfSubjectAccessReview,
  SelfSubjectRulesReview, SelfSubjectReview) for every authenticated user.
- KubeVirt's `kubevirt.io:{admin,edit,view}` and `kubevirt.io:default` (virt-operator's rules, for the
  subresources virtplane serves plus its `consolelog`), CDI's `cdi.kubevirt.io:{admin,edit,view}` (including
  `create datavolumes/source`, which the cross-namespace clone check asks for) and `config-reader`.
- `system:masters` and virtplane's components group are not bound here: the authorizer lets them through
  before any rule is evaluated (rbac.SUPERUSER_GROUPS).

Objects are reconciled as kube-apiserver does: created when missing; when present and annotated
`rbac.authorization.kubernetes.io/autoupdate: "true"` (the default) missing rules/subjects are put back; an
administrator who sets the annotation to "false" keeps their edits.
"""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]
RBAC_GROUP = "rbac.authorization.k8s.io"
AUTOUPDATE = "rbac.authorization.kubernetes.io/autoupdate"
AGGREGATE_TO = "rbac.authorization.k8s.io/aggregate-to-"
RW = ["create", "delete", "deletecollection", "patch", "update"]
READ = ["get", "list", "watch"]
ALL = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def rule(groups: list[str], resources: list[str], verbs: list[str]) -> JSON:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


def _meta(name: str, labels: dict[str, str] | None = None) -> JSON:
    return {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults", **(labels or {})},
            "annotations": {AUTOUPDATE: "true"}}


def cluster_role(name: str, rules: list[JSON], *, labels: dict[str, str] | None = None,
                 aggregate_from: str = "") -> JSON:
    role: JSON = {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "ClusterRole", "metadata": _meta(name, labels),
                  "rules": rules}
    if aggregate_from:
        role["aggregationRule"] = {"clusterRoleSelectors": [{"matchLabels": {AGGREGATE_TO + aggregate_from: "true"}}]}
        role["rules"] = []
    return role


def cluster_role_binding(name: str, role: str, groups: list[str]) -> JSON:
    return {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "ClusterRoleBinding", "metadata": _meta(name),
            "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": g} for g in groups]}


def _to(role: str) -> dict[str, str]:
    return {AGGREGATE_TO + role: "true"}


def _kubernetes() -> list[JSON]:
    view = [
        rule([""], ["configmaps", "endpoints", "persistentvolumeclaims", "persistentvolumeclaims/status", "pods",
                    "replicationcontrollers", "replicationcontrollers/scale", "serviceaccounts", "services",
                    "services/status"], READ),
        rule([""], ["bindings", "events", "limitranges", "namespaces/status", "pods/log", "pods/status",
                    "replicationcontrollers/status", "resourcequotas", "resourcequotas/status"], READ),
        rule([""], ["namespaces"], READ),
        rule(["discovery.k8s.io"], ["endpointslices"], READ),
        rule(["apps"], ["controllerrevisions", "daemonsets", "daemonsets/status", "deployments", "deployments/scale",
                        "deployments/status", "replicasets", "replicasets/scale", "replicasets/status",
                        "statefulsets", "statefulsets/scale", "statefulsets/status"], READ),
        rule(["autoscaling"], ["horizontalpodautoscalers", "horizontalpodautoscalers/status"], READ),
        rule(["batch"], ["cronjobs", "cronjobs/status", "jobs", "jobs/status"], READ),
        rule(["policy"], ["poddisruptionbudgets", "poddisruptionbudgets/status"], READ),
        rule(["networking.k8s.io"], ["ingresses", "ingresses/status", "networkpolicies"], READ),
    ]
    edit = [
        rule([""], ["pods/attach", "pods/exec", "pods/portforward", "pods/proxy", "secrets", "services/proxy"],
             READ),
        rule([""], ["serviceaccounts"], ["impersonate"]),
        rule([""], ["pods", "pods/attach", "pods/exec", "pods/portforward", "pods/proxy"], RW),
        rule([""], ["pods/eviction"], ["create"]),
        rule([""], ["configmaps", "events", "persistentvolumeclaims", "replicationcontrollers",
                    "replicationcontrollers/scale", "secrets", "serviceaccounts", "services", "services/proxy"], RW),
        rule([""], ["serviceaccounts/token"], ["create"]),
        rule(["apps"], ["daemonsets", "deployments", "deployments/rollback", "deployments/scale", "replicasets",
                        "replicasets/scale", "statefulsets", "statefulsets/scale"], RW),
        rule(["autoscaling"], ["horizontalpodautoscalers"], RW),
        rule(["batch"], ["cronjobs", "jobs"], RW),
        rule(["policy"], ["poddisruptionbudgets"], RW),
        rule(["networking.k8s.io"], ["ingresses", "networkpolicies"], RW),
        rule(["coordination.k8s.io"], ["leases"], ALL),
    ]
    admin = [
        rule(["authorization.k8s.io"], ["localsubjectaccessreviews"], ["create"]),
        rule([RBAC_GROUP], ["rolebindings", "roles"], ALL),
    ]
    discovery = ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz",
                 "/version", "/version/"]
    public = ["/healthz", "/livez", "/readyz", "/version", "/version/"]
    return [
        cluster_role("cluster-admin", [rule(["*"], ["*"], ["*"]), {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        cluster_role("admin", [], aggregate_from="admin"),
        cluster_role("edit", [], labels=_to("admin"), aggregate_from="edit"),
        cluster_role("view", [], labels=_to("edit"), aggregate_from="view"),
        cluster_role("system:aggregate-to-admin", admin, labels=_to("admin")),
        cluster_role("system:aggregate-to-edit", edit, labels=_to("edit")),
        cluster_role("system:aggregate-to-view", view, labels=_to("view")),
        cluster_role("system:discovery", [{"nonResourceURLs": discovery, "verbs": ["get"]}]),
        cluster_role("system:public-info-viewer", [{"nonResourceURLs": public, "verbs": ["get"]}]),
        cluster_role("system:basic-user", [
            rule(["authorization.k8s.io"], ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], ["create"]),
            rule(["authentication.k8s.io"], ["selfsubjectreviews"], ["create"]),
            # as OpenShift's basic-user: a user choosing a disk's storage class may see the classes
            rule(["storage.k8s.io"], ["storageclasses"], ["get", "list"]),
        ]),
        cluster_role_binding("cluster-admin", "cluster-admin", ["system:masters"]),
        cluster_role_binding("system:discovery", "system:discovery", ["system:authenticated"]),
        cluster_role_binding("system:public-info-viewer", "system:public-info-viewer",
                             ["system:authenticated", "system:unauthenticated"]),
        cluster_role_binding("system:basic-user", "system:basic-user", ["system:authenticated"]),
    ]


SUB = "subresources.kubevirt.io"
VMI_READ_SUBS = ["virtualmachineinstances/guestosinfo", "virtualmachineinstances/filesystemlist",
                 "virtualmachineinstances/userlist"]
VMI_ACCESS_SUBS = ["virtualmachineinstances/console", "virtualmachineinstances/vnc",
                   "virtualmachineinstances/vnc/screenshot", "virtualmachineinstances/portforward",
                   "virtualmachineinstances/consolelog", *VMI_READ_SUBS]
VMI_ACTION_SUBS = ["virtualmachineinstances/pause", "virtualmachineinstances/unpause",
                   "virtualmachineinstances/addvolume", "virtualmachineinstances/removevolume",
                   "virtualmachineinstances/freeze", "virtualmachineinstances/unfreeze",
                   "virtualmachineinstances/softreboot", "virtualmachineinstances/reset"]
VM_ACTION_SUBS = ["virtualmachines/start", "virtualmachines/stop", "virtualmachines/restart",
                  "virtualmachines/addvolume", "virtualmachines/removevolume", "virtualmachines/migrate",
                  "virtualmachines/memorydump"]
KUBEVIRT_KINDS = ["virtualmachines", "virtualmachineinstances", "virtualmachineinstancepresets",
                  "virtualmachineinstancereplicasets", "virtualmachineinstancemigrations"]
KUBEVIRT_GROUPS = (
    ("snapshot.kubevirt.io", ["virtualmachinesnapshots", "virtualmachinesnapshotcontents", "virtualmachinerestores"]),
    ("export.kubevirt.io", ["virtualmachineexports"]),
    ("clone.kubevirt.io", ["virtualmachineclones"]),
    ("instancetype.kubevirt.io", ["virtualmachineinstancetypes", "virtualmachineclusterinstancetypes",
                                  "virtualmachinepreferences", "virtualmachineclusterpreferences"]),
    ("pool.kubevirt.io", ["virtualmachinepools"]),
)


def _kubevirt() -> list[JSON]:
    def writer(verbs: list[str]) -> list[JSON]:
        return [
            rule([SUB], VMI_ACCESS_SUBS, ["get"]),
            rule([SUB], VMI_ACTION_SUBS, ["update"]),
            rule([SUB], ["virtualmachines/expand-spec", "virtualmachines/portforward"], ["get"]),
            rule([SUB], VM_ACTION_SUBS, ["update"]),
            rule([SUB], ["expand-vm-spec"], ["update"]),
            rule(["kubevirt.io"], KUBEVIRT_KINDS, verbs),
            *(rule([g], r, verbs) for g, r in KUBEVIRT_GROUPS),
            rule(["migrations.kubevirt.io"], ["migrationpolicies"], READ),
        ]

    view = [
        rule([SUB], ["virtualmachines/expand-spec", *VMI_READ_SUBS], ["get"]),
        rule([SUB], ["expand-vm-spec"], ["update"]),
        rule(["kubevirt.io"], KUBEVIRT_KINDS, READ),
        *(rule([g], r, READ) for g, r in KUBEVIRT_GROUPS),
        rule(["migrations.kubevirt.io"], ["migrationpolicies"], READ),
    ]
    edit = [*writer(["get", "delete", "create", "update", "patch", "list", "watch"]),
            rule(["kubevirt.io"], ["kubevirts"], ["get", "list"])]
    nad = "network-attachment-definitions"
    return [
        cluster_role("kubevirt.io:default", [rule([SUB], ["version", "guestfs"], ["get", "list"])],
                     labels={"kubevirt.io": ""}),
        cluster_role_binding("kubevirt.io:default", "kubevirt.io:default",
                             ["system:authenticated", "system:unauthenticated"]),
        cluster_role("kubevirt.io:admin", writer(ALL), labels={"kubevirt.io": "", **_to("admin")}),
        cluster_role("kubevirt.io:edit", edit, labels={"kubevirt.io": "", **_to("edit")}),
        cluster_role("kubevirt.io:view", view, labels={"kubevirt.io": "", **_to("view")}),
        # Multus ships no roles; users pick NADs when they add a NIC (virtplane's own aggregation).
        cluster_role("k8s.cni.cncf.io:edit", [rule(["k8s.cni.cncf.io"], [nad], ALL)], labels=_to("edit")),
        cluster_role("k8s.cni.cncf.io:view", [rule(["k8s.cni.cncf.io"], [nad], READ)], labels=_to("view")),
    ]


def _cdi() -> list[JSON]:
    kinds = ["datavolumes", "dataimportcrons", "datasources", "volumeimportsources", "volumeuploadsources",
             "volumeclonesources"]
    writer = [rule(["cdi.kubevirt.io"], kinds, ["*"]),
              rule(["cdi.kubevirt.io"], ["datavolumes/source"], ["create"]),
              rule(["upload.cdi.kubevirt.io"], ["uploadtokenrequests"], ["*"])]
    view = [rule(["cdi.kubevirt.io"], ["cdiconfigs", "dataimportcrons", "datasources", "datavolumes", "objecttransfers",
                                       "storageprofiles", "volumeimportsources", "volumeuploadsources",
                                       "volumeclonesources"], READ),
            rule(["cdi.kubevirt.io"], ["datavolumes/source"], ["create"])]
    return [
        cluster_role("cdi.kubevirt.io:admin", writer, labels={"cdi.kubevirt.io": "", **_to("admin")}),
        cluster_role("cdi.kubevirt.io:edit", writer, labels={"cdi.kubevirt.io": "", **_to("edit")}),
        cluster_role("cdi.kubevirt.io:view", view, labels={"cdi.kubevirt.io": "", **_to("view")}),
        cluster_role("cdi.kubevirt.io:config-reader",
                     [rule(["cdi.kubevirt.io"], ["cdiconfigs", "storageprofiles"], READ)],
                     labels={"cdi.kubevirt.io": ""}),
        cluster_role_binding("cdi.kubevirt.io:config-reader", "cdi.kubevirt.io:config-reader",
                             ["system:authenticated"]),
    ]


def default_objects() -> list[JSON]:
    """ClusterRoles first, then ClusterRoleBindings (a binding may name a role before it exists, but a user
    reading them in this order sees no dangling reference)."""
    objs = [*_kubernetes(), *_kubevirt(), *_cdi()]
    return [o for o in objs if o["kind"] == "ClusterRole"] + [o for o in objs if o["kind"] == "ClusterRoleBinding"]
