"""The RBAC evaluator (virtplane.apiserver.rbac): Kubernetes' rule matching, aggregation, the request
attributes kube-apiserver derives from a URL, the 403 wording, impersonation, validation of RBAC objects and
the signed tokens."""

from __future__ import annotations

import time
import types
from typing import Any

import pytest
from multidict import CIMultiDict

from virtplane.api import rbac_validation
from virtplane.apiserver import auth, errors, rbac, rbac_policy

ALICE = auth.authenticated("alice", groups=("devs",))
A = auth.Attributes


def allows(rule: dict[str, Any], attrs: auth.Attributes) -> bool:
    return rbac.Rule(rule).allows(attrs)


def test_rule_wildcards_subresources_and_names() -> None:
    r = rbac_policy.rule
    assert allows(r(["*"], ["*"], ["*"]), A("delete", True, "kubevirt.io", "virtualmachines", "start", "ns", "x"))
    assert allows(r(["kubevirt.io"], ["virtualmachines"], ["get"]), A("get", True, "kubevirt.io", "virtualmachines"))
    assert not allows(r(["kubevirt.io"], ["virtualmachines"], ["get"]), A("list", True, "kubevirt.io",
                                                                         "virtualmachines"))
    assert not allows(r([""], ["virtualmachines"], ["get"]), A("get", True, "kubevirt.io", "virtualmachines"))
    # a subresource needs its own entry (or */sub, or *): the resource alone does not cover it
    assert not allows(r([""], ["pods"], ["get"]), A("get", True, "", "pods", "log"))
    assert allows(r([""], ["pods/log"], ["get"]), A("get", True, "", "pods", "log"))
    assert allows(r([""], ["*/log"], ["get"]), A("get", True, "", "pods", "log"))
    assert not allows(r([""], ["*/log"], ["get"]), A("get", True, "", "pods"))
    assert allows(r(["cdi.kubevirt.io"], ["datavolumes/source"], ["create"]),
                  A("create", True, "cdi.kubevirt.io", "datavolumes", "source", "golden"))
    named = {**r([""], ["configmaps"], ["get", "update"]), "resourceNames": ["settings"]}
    assert allows(named, A("get", True, "", "configmaps", "", "ns", "settings"))
    assert not allows(named, A("get", True, "", "configmaps", "", "ns", "other"))
    assert not allows(named, A("list", True, "", "configmaps", "", "ns"))  # no name: never matches resourceNames
    # a resource rule never grants a path and a URL rule never a resource
    assert not allows(r(["*"], ["*"], ["*"]), A("get", False, path="/healthz"))
    assert not allows({"nonResourceURLs": ["*"], "verbs": ["*"]}, A("get", True, "", "pods"))


def test_non_resource_urls() -> None:
    rule = {"nonResourceURLs": ["/healthz", "/apis/*"], "verbs": ["get"]}
    assert allows(rule, A("get", False, path="/healthz"))
    assert allows(rule, A("get", False, path="/apis/kubevirt.io/v1"))
    assert not allows(rule, A("get", False, path="/apis"))
    assert not allows(rule, A("post", False, path="/healthz"))
    assert not allows(rule, A("get", False, path="/metrics"))


def test_aggregation_is_transitive_and_ignores_the_role_itself() -> None:
    def role(name: str, labels: dict[str, str], rules: list[Any], agg: str = "") -> dict[str, Any]:
        obj: dict[str, Any] = {"metadata": {"name": name, "labels": labels}, "rules": rules}
        if agg:
            obj["aggregationRule"] = {"clusterRoleSelectors": [{"matchLabels": {agg: "true"}}]}
        return obj

    r1 = rbac_policy.rule(["a"], ["x"], ["get"])
    r2 = rbac_policy.rule(["b"], ["y"], ["list"])
    roles = {
        "view": role("view", {"to-edit": "true"}, [], "to-view"),
        "edit": role("edit", {}, [], "to-edit"),
        "v1": role("v1", {"to-view": "true"}, [r1]),
        "e1": role("e1", {"to-edit": "true"}, [r2, r1]),
        "loner": role("loner", {}, [rbac_policy.rule(["c"], ["z"], ["*"])]),
    }
    out = rbac.aggregate(roles)
    assert out["view"] == [r1]
    assert out["edit"] == [r2, r1]  # e1 first (name order), then view's r1 already there: no duplicate
    assert out["loner"] == roles["loner"]["rules"]
    # the default policy: view aggregates into edit into admin, KubeVirt's and CDI's roles into each
    defaults = {o["metadata"]["name"]: o for o in rbac_policy.default_objects() if o["kind"] == "ClusterRole"}
    agg = rbac.aggregate(defaults)
    index = rbac.PolicyIndex(cluster_roles=defaults, role_bindings={("ns1", "b"): {
        "roleRef": {"kind": "ClusterRole", "name": "edit"}, "subjects": [{"kind": "User", "name": "alice"}]}})
    assert all(r in agg["admin"] for r in agg["edit"]) and all(r in agg["edit"] for r in agg["view"])
    az = rbac.RBACAuthorizer()
    az.set_index(index)
    assert az.authorize(ALICE, A("update", True, "subresources.kubevirt.io", "virtualmachines", "start", "ns1", "v"))
    assert az.authorize(ALICE, A("get", True, "", "pods", "log", "ns1", "p"))  # view's, via edit
    assert not az.authorize(ALICE, A("create", True, "rbac.authorization.k8s.io", "rolebindings", "", "ns1"))
    assert not az.authorize(ALICE, A("get", True, "kubevirt.io", "virtualmachines", "", "ns2", "v"))


def test_bindings_subjects_and_superusers() -> None:
    crs = {"view": {"metadata": {"name": "view"}, "rules": [rbac_policy.rule(["kubevirt.io"], ["*"], ["get"])]}}
    roles = {("ns1", "cm-writer"): {"rules": [rbac_policy.rule([""], ["configmaps"], ["create"])]}}
    rbs = {("ns1", "sa"): {"roleRef": {"kind": "Role", "name": "cm-writer"},
                           "subjects": [{"kind": "ServiceAccount", "name": "bot"}]},
           ("ns1", "devs"): {"roleRef": {"kind": "ClusterRole", "name": "view"},
                             "subjects": [{"kind": "Group", "name": "devs", "apiGroup": "rbac.authorization.k8s.io"}]}}
    crbs = {"all-view": {"roleRef": {"kind": "ClusterRole", "name": "view"},
                         "subjects": [{"kind": "User", "name": "carol"}]}}
    az = rbac.RBACAuthorizer()
    az.set_index(rbac.PolicyIndex(roles, crs, rbs, crbs))
    vm = A("get", True, "kubevirt.io", "virtualmachines", "", "ns1", "v")
    assert az.authorize(ALICE, vm)  # through the group
    assert not az.authorize(ALICE, A("get", True, "kubevirt.io", "virtualmachines", "", "ns2", "v"))
    carol = auth.authenticated("carol")
    assert az.authorize(carol, A("get", True, "kubevirt.io", "virtualmachines", "", "ns9", "v"))
    assert az.authorize(carol, A("get", True, "kubevirt.io", "virtualmachines"))  # cluster scope too
    bot = auth.service_account_user("ns1", "bot")
    assert az.authorize(bot, A("create", True, "", "configmaps", "", "ns1"))
    assert not az.authorize(auth.service_account_user("ns2", "bot"), A("create", True, "", "configmaps", "", "ns1"))
    assert az.index.why(ALICE, vm) == 'RoleBinding "devs/ns1" of ClusterRole "view" to Group "devs"'
    for group in auth.SUPERUSER_GROUPS:
        assert az.authorize(auth.authenticated("root", groups=(group,)), A("delete", True, "x", "y", "", "z"))
    rules, urls = az.rules(ALICE, "ns1")
    assert rules == [{"verbs": ["get"], "apiGroups": ["kubevirt.io"], "resources": ["*"]}] and urls == []
    # a new index forgets cached decisions
    az.set_index(rbac.PolicyIndex())
    assert not az.authorize(ALICE, vm)


@pytest.mark.parametrize("method,path,query,expect", [
    ("GET", "/api/v1/namespaces/ns1/pods", {}, A("list", True, "", "pods", "", "ns1")),
    ("GET", "/api/v1/namespaces/ns1/pods", {"watch": "true"}, A("watch", True, "", "pods", "", "ns1")),
    ("GET", "/api/v1/watch/namespaces/ns1/pods", {}, A("watch", True, "", "pods", "", "ns1")),
    ("GET", "/api/v1/namespaces/ns1/pods", {"fieldSelector": "metadata.name=p"},
     A("list", True, "", "pods", "", "ns1", "p")),
    ("GET", "/api/v1/namespaces/ns1/pods/p/log", {}, A("get", True, "", "pods", "log", "ns1", "p")),
    ("POST", "/api/v1/namespaces/ns1/pods/p/eviction", {}, A("create", True, "", "pods", "eviction", "ns1", "p")),
    ("DELETE", "/apis/kubevirt.io/v1/namespaces/ns1/virtualmachines", {},
     A("deletecollection", True, "kubevirt.io", "virtualmachines", "", "ns1")),
    ("PUT", "/apis/subresources.kubevirt.io/v1/namespaces/ns1/virtualmachines/v/start", {},
     A("update", True, "subresources.kubevirt.io", "virtualmachines", "start", "ns1", "v")),
    ("GET", "/apis/subresources.kubevirt.io/v1/namespaces/ns1/virtualmachineinstances/v/vnc/screenshot", {},
     A("get", True, "subresources.kubevirt.io", "virtualmachineinstances", "vnc", "ns1", "v")),
    ("GET", "/api/v1/namespaces/ns1", {}, A("get", True, "", "namespaces", "", "ns1", "ns1")),
    ("PUT", "/api/v1/namespaces/ns1/finalize", {}, A("update", True, "", "namespaces", "finalize", "ns1", "ns1")),
    ("PATCH", "/api/v1/nodes/n1/status", {}, A("patch", True, "", "nodes", "status", "", "n1")),
    ("GET", "/apis/kubevirt.io/v1", {}, A("get", False, path="/apis/kubevirt.io/v1")),
    ("GET", "/api/v1", {}, A("get", False, path="/api/v1")),
    ("GET", "/metrics", {}, A("get", False, path="/metrics")),
])
def test_request_attributes(method: str, path: str, query: dict[str, str], expect: auth.Attributes) -> None:
    got = rbac.request_attributes(method, path, query)
    assert got == (expect if expect.resource_request else A(expect.verb, False, path=path))


def test_forbidden_messages_are_kubernetes_own() -> None:
    exc = rbac.forbidden(ALICE, A("get", True, "kubevirt.io", "virtualmachines", "", "ns1", "x"))
    assert exc.code == 403 and exc.reason == "Forbidden"
    assert exc.message == ('virtualmachines.kubevirt.io "x" is forbidden: User "alice" cannot get resource '
                           '"virtualmachines" in API group "kubevirt.io" in the namespace "ns1"')
    assert exc.details == {"kind": "virtualmachines", "group": "kubevirt.io", "name": "x"}
    assert rbac.forbidden(ALICE, A("list", True, "", "nodes")).message == (
        'nodes is forbidden: User "alice" cannot list resource "nodes" in API group "" at the cluster scope')
    assert rbac.forbidden(ALICE, A("update", True, "subresources.kubevirt.io", "virtualmachines", "start", "n",
                                   "v")).message.endswith('cannot update resource "virtualmachines/start" in API '
                                                          'group "subresources.kubevirt.io" in the namespace "n"')
    assert rbac.forbidden(ALICE, A("get", False, path="/metrics")).message == (
        'forbidden: User "alice" cannot get path "/metrics"')


def test_impersonation_needs_the_impersonate_verb() -> None:
    az = rbac.RBACAuthorizer()
    admin = auth.authenticated("admin", groups=(auth.MASTERS,))
    headers = CIMultiDict([("Impersonate-User", "bob"), ("Impersonate-Group", "g1"), ("Impersonate-Group", "g2")])
    bob = rbac.impersonate(az, admin, headers)
    assert bob.name == "bob" and bob.groups == ("g1", "g2", auth.AUTHENTICATED)
    sa = rbac.impersonate(az, admin, CIMultiDict([("Impersonate-User", "system:serviceaccount:ns1:bot")]))
    assert "system:serviceaccounts:ns1" in sa.groups
    with pytest.raises(errors.StatusError) as exc:
        rbac.impersonate(az, ALICE, headers)
    assert exc.value.code == 403 and 'cannot impersonate resource "users"' in exc.value.message
    with pytest.raises(errors.StatusError) as exc:
        rbac.impersonate(az, admin, CIMultiDict([("Impersonate-Group", "g1")]))
    assert exc.value.code == 400


class _Req:
    def __init__(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> None:
        self.obj, self.old, self.update = obj, old, old is not None


def _fields(causes: list[Any]) -> list[str]:
    return [c.field for c in causes]


def test_validation_of_rbac_objects() -> None:
    ok_rule = rbac_policy.rule([""], ["pods"], ["get"])
    assert rbac_validation.validate_role(_Req({"rules": [ok_rule]})) == []
    bad = [{"apiGroups": [""], "resources": ["pods"]}, {"verbs": ["get"]},
           {"verbs": ["get"], "nonResourceURLs": ["/x"]}]
    assert _fields(rbac_validation.validate_role(_Req({"rules": bad}))) == [
        "rules[0].verbs", "rules[1].apiGroups", "rules[1].resources", "rules[2].nonResourceURLs"]
    assert rbac_validation.validate_cluster_role(_Req({"rules": [bad[2]]})) == []
    both = {"verbs": ["get"], "nonResourceURLs": ["/x"], "resources": ["pods"]}
    assert "both regular resources" in rbac_validation.validate_cluster_role(_Req({"rules": [both]}))[0].message
    ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"}
    good = {"roleRef": ref, "subjects": [{"kind": "User", "name": "a", "apiGroup": "rbac.authorization.k8s.io"},
                                         {"kind": "ServiceAccount", "name": "bot"}]}
    assert rbac_validation.validate_role_binding(_Req(good)) == []
    # a ClusterRoleBinding's ServiceAccount needs its namespace; subjects' kinds and groups are checked
    assert _fields(rbac_validation.validate_cluster_role_binding(_Req(good))) == ["subjects[1].namespace"]
    weird = {"roleRef": {**ref, "kind": "Role"}, "subjects": [{"kind": "Robot", "name": "r"},
                                                              {"kind": "Group", "name": "g"}]}
    causes = rbac_validation.validate_cluster_role_binding(_Req(weird))
    assert _fields(causes) == ["roleRef.kind", "subjects[0].kind", "subjects[1].apiGroup"]
    assert 'supported values: "ServiceAccount", "User", "Group"' in causes[1].message
    changed = {**good, "roleRef": {**ref, "name": "edit"}}
    causes = rbac_validation.validate_role_binding(_Req(changed, good))
    assert _fields(causes) == ["roleRef"] and "cannot change roleRef" in causes[0].message


def test_signed_tokens() -> None:
    key = b"k" * 32
    now = time.time()
    token = auth.sign_token(key, auth.service_account_claims("ns1", "bot", "uid-1", 600, now))
    claims = auth.verify_token(key, token, now)
    assert claims is not None
    user, sa = auth.user_from_claims(claims)
    assert user.name == "system:serviceaccount:ns1:bot" and sa == ("ns1", "bot", "uid-1")
    assert set(user.groups) == {"system:serviceaccounts", "system:serviceaccounts:ns1", auth.AUTHENTICATED}
    assert auth.verify_token(key, token, now + 601) is None  # expired
    assert auth.verify_token(b"x" * 32, token, now) is None  # another key
    head, body, sig = token.split(".")
    assert auth.verify_token(key, f"{head}.{body}x.{sig}", now) is None
    person = auth.verify_token(key, auth.sign_token(key, auth.user_claims("alice", ("devs",), 60, now)), now)
    assert person is not None
    user, sa = auth.user_from_claims(person)
    assert sa is None and user.name == "alice" and user.groups == ("devs", auth.AUTHENTICATED)


def test_escalation_check() -> None:
    defaults = {o["metadata"]["name"]: o for o in rbac_policy.default_objects() if o["kind"] == "ClusterRole"}
    rbs = {("ns1", "erin-admin"): {"roleRef": {"kind": "ClusterRole", "name": "admin"},
                                   "subjects": [{"kind": "User", "name": "erin"}]}}
    roles = {("ns1", "small"): {"rules": [rbac_policy.rule([""], ["pods"], ["get"])]}}
    az = rbac.RBACAuthorizer()
    az.set_index(rbac.PolicyIndex(roles, defaults, rbs, {}))
    check = rbac.EscalationCheck(az, auth.authenticated("erin"))
    res = {p: types.SimpleNamespace(group=rbac.GROUP, plural=p) for p in rbac.KINDS}

    def binding(kind: str, role: str, ns: str = "ns1") -> dict[str, Any]:
        return {"metadata": {"name": "b", "namespace": ns}, "roleRef": {"kind": kind, "name": role}}

    check(res["rolebindings"], binding("ClusterRole", "edit"), None)  # admin holds all of edit
    check(res["rolebindings"], binding("Role", "small"), None)
    with pytest.raises(errors.StatusError) as exc:
        check(res["rolebindings"], binding("ClusterRole", "cluster-admin"), None)
    assert exc.value.code == 403 and "attempting to grant RBAC permissions not currently held" in exc.value.message
    with pytest.raises(errors.StatusError) as exc:
        check(res["rolebindings"], binding("ClusterRole", "edit", "ns2"), None)  # nothing held in ns2
    with pytest.raises(errors.StatusError) as exc:
        check(res["rolebindings"], binding("ClusterRole", "no-such-role"), None)
    assert exc.value.code == 404
    role = {"metadata": {"name": "r", "namespace": "ns1"}, "rules": [rbac_policy.rule(["kubevirt.io"],
                                                                                       ["virtualmachines"], ["get"])]}
    check(res["roles"], role, None)
    role["rules"].append(rbac_policy.rule(["*"], ["*"], ["*"]))
    with pytest.raises(errors.StatusError) as exc:
        check(res["roles"], role, None)
    assert '{"apiGroups":["*"],"resources":["*"],"verbs":["*"]}' in exc.value.message
    # `bind` on a role lets one bind it without holding it
    rbs[("ns1", "erin-bind")] = {"roleRef": {"kind": "Role", "name": "binder"},
                                 "subjects": [{"kind": "User", "name": "erin"}]}
    roles[("ns1", "binder")] = {"rules": [{**rbac_policy.rule([rbac.GROUP], ["clusterroles"], ["bind"]),
                                           "resourceNames": ["cluster-admin"]}]}
    az.set_index(rbac.PolicyIndex(roles, defaults, rbs, {}))
    check(res["rolebindings"], binding("ClusterRole", "cluster-admin"), None)
