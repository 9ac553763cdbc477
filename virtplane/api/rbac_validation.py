"""Kubernetes' validation of RBAC objects (pkg/apis/rbac/validation), wording and field paths included:
rules need verbs, and either apiGroups + resources or nonResourceURLs (never both; a Role's never);
bindings name a Role/ClusterRole of rbac.authorization.k8s.io that may not change, and subjects of kind
User, Group (apiGroup rbac.authorization.k8s.io) or ServiceAccount (apiGroup "", a namespace in a
ClusterRoleBinding)."""

from __future__ import annotations

from typing import Any

from virtplane.api import validation
from virtplane.api.resources import Cause

RBAC_GROUP = "rbac.authorization.k8s.io"
SUBJECT_KINDS = ["ServiceAccount", "User", "Group"]


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _rule_causes(path: str, rule: Any, namespaced: bool) -> list[Cause]:
    if not isinstance(rule, dict):
        return []
    causes: list[Cause] = []
    if not _list(rule.get("verbs")):
        causes.append(validation.required(f"{path}.verbs", "verbs must contain at least one value"))
    urls = _list(rule.get("nonResourceURLs"))
    if urls:
        if namespaced:
            causes.append(validation.invalid(f"{path}.nonResourceURLs", urls,
                                             "namespaced rules cannot apply to non-resource URLs"))
        if _list(rule.get("apiGroups")) or _list(rule.get("resources")) or _list(rule.get("resourceNames")):
            causes.append(validation.invalid(f"{path}.nonResourceURLs", urls,
                                             "rules cannot apply to both regular resources and non-resource URLs"))
        return causes
    if not _list(rule.get("apiGroups")):
        causes.append(validation.required(f"{path}.apiGroups", "resource rules must supply at least one api group"))
    if not _list(rule.get("resources")):
        causes.append(validation.required(f"{path}.resources", "resource rules must supply at least one resource"))
    return causes


def _role(req: Any, namespaced: bool) -> list[Cause]:
    causes: list[Cause] = []
    for i, rule in enumerate(_list(req.obj.get("rules"))):
        causes.extend(_rule_causes(f"rules[{i}]", rule, namespaced))
    return causes


def validate_role(req: Any) -> list[Cause]:
    return _role(req, True)


def validate_cluster_role(req: Any) -> list[Cause]:
    causes = _role(req, False)
    agg = req.obj.get("aggregationRule")
    if isinstance(agg, dict):
        sels = _list(agg.get("clusterRoleSelectors"))
        if not sels:
            causes.append(validation.required("aggregationRule.clusterRoleSelectors",
                                              "at least one clusterRoleSelector required if aggregationRule is "
                                              "non-nil"))
    return causes


def _binding(req: Any, namespaced: bool) -> list[Cause]:
    obj = req.obj
    causes: list[Cause] = []
    ref = obj.get("roleRef") if isinstance(obj.get("roleRef"), dict) else {}
    if ref.get("apiGroup") != RBAC_GROUP:
        causes.append(validation.not_supported("roleRef.apiGroup", ref.get("apiGroup", ""), [RBAC_GROUP]))
    kinds = ["Role", "ClusterRole"] if namespaced else ["ClusterRole"]
    if ref.get("kind") not in kinds:
        causes.append(validation.not_supported("roleRef.kind", ref.get("kind", ""), kinds))
    if not ref.get("name"):
        causes.append(validation.required("roleRef.name"))
    else:
        for msg in validation.is_path_segment_name(str(ref["name"])):
            causes.append(validation.invalid("roleRef.name", ref["name"], msg))
    for i, s in enumerate(_list(obj.get("subjects"))):
        path = f"subjects[{i}]"
        if not isinstance(s, dict):
            continue
        kind, name, group = s.get("kind"), s.get("name") or "", s.get("apiGroup") or ""
        if not name:
            causes.append(validation.required(f"{path}.name"))
        if kind == "ServiceAccount":
            if group:
                causes.append(validation.not_supported(f"{path}.apiGroup", group, [""]))
            if name:
                for msg in validation.is_dns1123_subdomain(name):
                    causes.append(validation.invalid(f"{path}.name", name, msg))
            if not s.get("namespace") and not namespaced:
                causes.append(validation.required(f"{path}.namespace"))
        elif kind in ("User", "Group"):
            if group != RBAC_GROUP:
                causes.append(validation.not_supported(f"{path}.apiGroup", group, [RBAC_GROUP]))
        else:
            causes.append(validation.not_supported(f"{path}.kind", kind or "", SUBJECT_KINDS))
    if req.update and isinstance(req.old, dict) and req.old.get("roleRef") != obj.get("roleRef"):
        causes.append(validation.invalid("roleRef", obj.get("roleRef"), "cannot change roleRef"))
    return causes


def validate_role_binding(req: Any) -> list[Cause]:
    return _binding(req, True)


def validate_cluster_role_binding(req: Any) -> list[Cause]:
    return _binding(req, False)
