"""Kubernetes RBAC (rbac.authorization.k8s.io/v1) as kube-apiserver's RBAC authorizer evaluates it.

    attrs = request_attributes(method, path, query)      # kube-apiserver's RequestInfo: verb, group, ...
    authorizer.authorize(user, attrs) -> bool             # RBACAuthorizer over a PolicyIndex
    forbidden(user, attrs) -> StatusError                 # 403 worded as Kubernetes words it

- Rule matching is Kubernetes' (rbac/v1 helpers): `*` verbs/groups/resources, `*/sub` and `res/sub`
  resources, `resourceNames` (never matching a request without a name: list, create), non-resource URLs
  exact or `prefix*`.
- The `PolicyIndex` is built from all Roles, ClusterRoles, RoleBindings and ClusterRoleBindings at once:
  subject -> rules of the ClusterRoleBindings, (namespace, subject) -> rules of the RoleBindings, so one
  decision looks at the user's own rules only. Aggregated ClusterRoles (`aggregationRule`) get the union of
  the rules of the ClusterRoles their selectors match (transitively), which the `PolicyController` also
  writes back into the object, as the clusterrole-aggregation controller does.
- `RBACAuthorizer` answers `SUPERUSER_GROUPS` members before anything else and caches decisions per
  (user, groups, attributes) until the index changes; the `PolicyController` rebuilds the index from a
  watch of the four kinds, and right away after a write of one through this server (so `kubectl create
  rolebinding` is in force when it returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from virtplane.apiserver import auth, errors, objects, rbac_policy, selectors

if TYPE_CHECKING:
    from virtplane.api import resources
    from virtplane.apiserver.server import APIServer

log = logging.getLogger(__name__)
JSON = dict[str, Any]
GROUP = rbac_policy.RBAC_GROUP
KINDS = ("roles", "clusterroles", "rolebindings", "clusterrolebindings")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_SPECIAL_VERBS = frozenset({"proxy", "watch"})
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
_METHOD_VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_DECISION_CACHE_SIZE = 8192
OPTS = objects.WriteOptions(field_manager="virtplane-apiserver", field_validation="Ignore", privileged=True)


# --------------------------------------------------------------------------------------------------
# Request attributes


def request_attributes(method: str, path: str, query: Mapping[str, str]) -> auth.Attributes:
    """kube-apiserver's RequestInfoFactory: /api/v1/... and /apis/g/v/... are resource requests (the watch
    prefix, namespaces, name, the first subresource segment; GET without a name is list or watch, DELETE
    without one deletecollection); anything else is a non-resource request with the lower-case method."""
    parts = [p for p in path.split("/") if p]
    if len(parts) < 3 or parts[0] not in ("api", "apis") or (parts[0] == "apis" and len(parts) < 4):
        return auth.Attributes(method.lower(), False, path=path)
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    if rest[0] in _SPECIAL_VERBS and len(rest) >= 2:
        verb, rest = rest[0], rest[1:]
        by_method = False
    else:
        verb, by_method = _METHOD_VERBS.get(method, ""), True
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) >= 2 else ""
    subresource = rest[2] if len(rest) >= 3 else ""
    if by_method and verb == "get" and query.get("watch", "").lower() in ("1", "true"):
        verb = "watch"  # a watch of one object (?watch on a named GET) is a watch too
    elif not name and verb == "get":
        verb = "list"
    if not name and verb in ("list", "watch") and "fieldSelector" in query:
        with contextlib.suppress(errors.StatusError):  # the handler answers a bad selector itself
            for req in selectors.parse_field_selector(query.get("fieldSelector")):
                if req.path == ("metadata", "name") and not req.negate and req.value and "/" not in req.value:
                    name = req.value
    if not name and verb == "delete":
        verb = "deletecollection"
    return auth.Attributes(verb, True, group, resource, subresource, namespace, name)


def forbidden(user: auth.User, a: auth.Attributes, reason: str = "") -> errors.StatusError:
    """The 403 kube-apiserver answers a denied request with (responsewriters.forbiddenMessage)."""
    suffix = f": {reason}" if reason else ""
    if not a.resource_request:
        return errors.StatusError(403, f'forbidden: User "{user.name}" cannot {a.verb} path "{a.path}"{suffix}',
                                  reason="Forbidden")
    res = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
    where = f'in the namespace "{a.namespace}"' if a.namespace else "at the cluster scope"
    why = f'User "{user.name}" cannot {a.verb} resource "{res}" in API group "{a.group}" {where}{suffix}'
    qualified = f"{a.resource}.{a.group}" if a.group else a.resource
    details: JSON = {"kind": a.resource}
    if a.group:
        details["group"] = a.group
    if a.name:
        details["name"] = a.name
    msg = f'{qualified} "{a.name}" is forbidden: {why}' if a.name else f"{qualified} is forbidden: {why}"
    return errors.StatusError(403, msg, reason="Forbidden", details=details)


# --------------------------------------------------------------------------------------------------
# Rules


def _strings(v: Any) -> tuple[str, ...]:
    return tuple(str(x) for x in v) if isinstance(v, list) else ()


class Rule:
    """One compiled PolicyRule."""

    __slots__ = ("groups", "names", "raw", "resources", "urls", "verbs")

    def __init__(self, raw: JSON) -> None:
        self.raw = raw
        self.verbs = frozenset(_strings(raw.get("verbs")))
        self.groups = frozenset(_strings(raw.get("apiGroups")))
        self.resources = frozenset(_strings(raw.get("resources")))
        self.names = frozenset(_strings(raw.get("resourceNames")))
        self.urls = _strings(raw.get("nonResourceURLs"))

    def allows(self, a: auth.Attributes) -> bool:
        if "*" not in self.verbs and a.verb not in self.verbs:
            return False
        if not a.resource_request:
            return any(u == "*" or u == a.path or (u.endswith("*") and a.path.startswith(u[:-1]))
                       for u in self.urls)
        if "*" not in self.groups and a.group not in self.groups:
            return False
        combined = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
        if "*" not in self.resources and combined not in self.resources and \
                not (a.subresource and f"*/{a.subresource}" in self.resources):
            return False
        return not self.names or a.name in self.names


def subject_keys(user: auth.User) -> list[tuple[str, str]]:
    """The index keys a user is found under: its name, then each of its groups (ServiceAccount subjects are
    indexed under the user name `system:serviceaccount:NS:NAME` they stand for)."""
    return [("User", user.name), *(("Group", g) for g in user.groups)]


def _subject_key(subject: Any, binding_ns: str) -> tuple[str, str] | None:
    if not isinstance(subject, dict):
        return None
    kind, name = subject.get("kind"), str(subject.get("name") or "")
    if kind == "ServiceAccount":
        return ("User", f"{auth.SERVICE_ACCOUNT_PREFIX}{subject.get('namespace') or binding_ns}:{name}")
    if kind in ("User", "Group"):
        return (str(kind), name)
    return None


def _labels(obj: JSON) -> JSON:
    return (obj.get("metadata") or {}).get("labels") or {}


def aggregate(cluster_roles: Mapping[str, JSON]) -> dict[str, list[JSON]]:
    """The rules each ClusterRole grants: its own, or for one with an aggregationRule the union (first seen
    first, no duplicates) of the rules of the ClusterRoles its selectors match, themselves aggregated."""
    out: dict[str, list[JSON]] = {}

    def rules_of(name: str, stack: tuple[str, ...]) -> list[JSON]:
        if name in out:
            return out[name]
        role = cluster_roles[name]
        selectors_ = ((role.get("aggregationRule") or {}).get("clusterRoleSelectors") or []) \
            if isinstance(role.get("aggregationRule"), dict) else []
        if not selectors_:
            out[name] = [r for r in role.get("rules") or [] if isinstance(r, dict)]
            return out[name]
        if name in stack:  # a cycle: what is stored
            return [r for r in role.get("rules") or [] if isinstance(r, dict)]
        matchers = [selectors.label_selector_from_object(s) for s in selectors_ if isinstance(s, dict)]
        rules: list[JSON] = []
        seen: set[bytes] = set()
        for other in sorted(cluster_roles):
            if other == name:
                continue
            other_obj = cluster_roles[other]
            if not any(selectors.labels_match(m, other_obj) for m in matchers):
                continue
            for r in rules_of(other, (*stack, name)):
                key = orjson.dumps(r, option=orjson.OPT_SORT_KEYS)
                if key not in seen:
                    seen.add(key)
                    rules.append(r)
        out[name] = rules
        return rules

    for n in cluster_roles:
        rules_of(n, ())
    return out


class PolicyIndex:
    """Every binding's rules, indexed by subject (cluster-wide) and by (namespace, subject)."""

    def __init__(self, roles: Mapping[tuple[str, str], JSON] | None = None,
                 cluster_roles: Mapping[str, JSON] | None = None,
                 role_bindings: Mapping[tuple[str, str], JSON] | None = None,
                 cluster_role_bindings: Mapping[str, JSON] | None = None) -> None:
        roles, cluster_roles = roles or {}, cluster_roles or {}
        self.roles = roles
        self.cluster_role_rules = aggregate(cluster_roles)
        compiled: dict[tuple[str, str, str], list[Rule]] = {}

        def role_rules(kind: str, ns: str, name: str) -> list[Rule]:
            key = (kind, "" if kind == "ClusterRole" else ns, name)  # a ClusterRole is compiled once
            if key not in compiled:
                if kind == "ClusterRole":
                    raw = self.cluster_role_rules.get(name, [])
                else:
                    raw = [r for r in (roles.get((ns, name)) or {}).get("rules") or [] if isinstance(r, dict)]
                compiled[key] = [Rule(r) for r in raw]
            return compiled[key]

        self.cluster: dict[tuple[str, str], list[tuple[Rule, str]]] = {}
        self.namespaced: dict[tuple[str, tuple[str, str]], list[tuple[Rule, str]]] = {}
        for name, crb in sorted((cluster_role_bindings or {}).items()):
            ref = crb.get("roleRef") or {}
            if ref.get("kind") != "ClusterRole":
                continue
            rules = role_rules("ClusterRole", "", str(ref.get("name") or ""))
            for s in crb.get("subjects") or []:
                key = _subject_key(s, "")
                if key is not None:
                    via = f'ClusterRoleBinding "{name}" of ClusterRole "{ref.get("name")}" to {key[0]} "{key[1]}"'
                    self.cluster.setdefault(key, []).extend((r, via) for r in rules)
        for (ns, name), rb in sorted((role_bindings or {}).items()):
            ref = rb.get("roleRef") or {}
            kind = ref.get("kind")
            if kind not in ("Role", "ClusterRole"):
                continue
            rules = role_rules(str(kind), ns, str(ref.get("name") or ""))
            for s in rb.get("subjects") or []:
                key = _subject_key(s, ns)
                if key is not None:
                    via = f'RoleBinding "{name}/{ns}" of {kind} "{ref.get("name")}" to {key[0]} "{key[1]}"'
                    self.namespaced.setdefault((ns, key), []).extend((r, via) for r in rules)

    def rules_for(self, user: auth.User, namespace: str) -> Iterable[tuple[Rule, str]]:
        keys = subject_keys(user)
        for k in keys:
            yield from self.cluster.get(k, ())
        if namespace:
            for k in keys:
                yield from self.namespaced.get((namespace, k), ())

    def why(self, user: auth.User, a: auth.Attributes) -> str | None:
        """The binding that allows the request (kube's "RBAC: allowed by ..." reason), None when none does."""
        for rule, via in self.rules_for(user, a.namespace):
            if rule.allows(a):
                return via
        return None


class RBACAuthorizer(auth.Authorizer):
    def __init__(self) -> None:
        self.index = PolicyIndex()
        self._decisions: dict[tuple[str, tuple[str, ...], auth.Attributes], bool] = {}
        self.requests: dict[tuple[Any, ...], bool] = {}  # allowed requests, by user and URL (check_request)

    def set_index(self, index: PolicyIndex) -> None:
        self.index = index
        self._decisions = {}
        self.requests = {}

    def authorize(self, user: auth.User, attrs: auth.Attributes) -> bool:
        if not auth.SUPERUSER_GROUPS.isdisjoint(user.groups):
            return True
        key = (user.name, user.groups, attrs)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self.index.why(user, attrs) is not None
            if len(self._decisions) >= _DECISION_CACHE_SIZE:
                self._decisions = {}
            self._decisions[key] = decision
        return decision

    def rules(self, user: auth.User, namespace: str) -> tuple[list[JSON], list[JSON]]:
        """SelfSubjectRulesReview's resourceRules and nonResourceRules for `user` in `namespace`."""
        if auth.is_superuser(user):
            return ([{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
                    [{"verbs": ["*"], "nonResourceURLs": ["*"]}])
        res_rules: list[JSON] = []
        url_rules: list[JSON] = []
        seen: set[bytes] = set()
        for rule, _via in self.index.rules_for(user, namespace):
            key = orjson.dumps(rule.raw, option=orjson.OPT_SORT_KEYS)
            if key in seen:
                continue
            seen.add(key)
            if rule.urls:
                url_rules.append({"verbs": sorted(rule.verbs), "nonResourceURLs": list(rule.urls)})
            else:
                out: JSON = {"verbs": list(_strings(rule.raw.get("verbs"))),
                             "apiGroups": list(_strings(rule.raw.get("apiGroups"))),
                             "resources": list(_strings(rule.raw.get("resources")))}
                if rule.names:
                    out["resourceNames"] = list(_strings(rule.raw.get("resourceNames")))
                res_rules.append(out)
        return res_rules, url_rules


# --------------------------------------------------------------------------------------------------
# Per request: impersonation and the authorization check


def impersonate(authorizer: auth.Authorizer, user: auth.User, headers: Any) -> auth.User:
    """kube-apiserver's impersonation filter: `Impersonate-User` (and `Impersonate-Group`s) replace the
    requester, who needs `impersonate` on users (or serviceaccounts) and groups."""
    name = headers.get("Impersonate-User", "")
    groups = tuple(headers.getall("Impersonate-Group", ()))
    if not name:
        raise errors.bad_request(f"requested {list(groups)} without impersonating a user")
    if name.startswith(auth.SERVICE_ACCOUNT_PREFIX) and name.count(":") == 3:
        _, _, ns, sa = name.split(":")
        checks = [auth.Attributes("impersonate", True, "", "serviceaccounts", "", ns, sa)]
        base = auth.service_account_user(ns, sa).groups
    else:
        checks = [auth.Attributes("impersonate", True, "", "users", "", "", name)]
        base = ()
    checks += [auth.Attributes("impersonate", True, "", "groups", "", "", g) for g in groups]
    for attrs in checks:
        if not authorizer.authorize(user, attrs):
            raise forbidden(user, attrs)
    merged = tuple(dict.fromkeys((*groups, *base)))
    if name != auth.ANONYMOUS.name:
        return auth.authenticated(name, "", merged)
    return auth.User(name, "", merged)


def check_request(authorizer: auth.Authorizer, user: auth.User, method: str, path: str,
                  query: Mapping[str, str]) -> None:
    """Raises the 403 when `user` may not make this request (the caller has let superusers through).
    With the RBAC authorizer an allowed request seen before costs one dict lookup (no URL parsing)."""
    cache = authorizer.requests if isinstance(authorizer, RBACAuthorizer) else None
    key = (user.name, user.groups, method, path, query.get("watch"), query.get("fieldSelector"))
    if cache is not None and key in cache:
        return
    attrs = request_attributes(method, path, query)
    if not authorizer.authorize(user, attrs):
        raise forbidden(user, attrs)
    if cache is not None:
        if len(cache) >= _DECISION_CACHE_SIZE:
            cache.clear()
        cache[key] = True


def authorize_request(authorizer: auth.Authorizer, user: auth.User, request: Any) -> None:
    """The middleware's check for a user who is no superuser; a write of an RBAC object also gets the
    escalation check, run on the object about to be stored (objects.WriteOptions.check)."""
    check_request(authorizer, user, request.method, request.path, request.query)
    if request.method in WRITE_METHODS and isinstance(authorizer, RBACAuthorizer) and f"/{GROUP}/" in request.path:
        request["vp_write_check"] = EscalationCheck(authorizer, user)


def _breakdown(rule: JSON, namespace: str) -> Iterable[auth.Attributes]:
    """One request per verb x group x resource x name (or URL) a rule grants."""
    verbs = _strings(rule.get("verbs"))
    urls = _strings(rule.get("nonResourceURLs"))
    if urls:
        for verb in verbs:
            for url in urls:
                yield auth.Attributes(verb, False, path=url)
        return
    for verb in verbs:
        for group in _strings(rule.get("apiGroups")):
            for combined in _strings(rule.get("resources")):
                resource, _, sub = combined.partition("/")
                for name in _strings(rule.get("resourceNames")) or ("",):
                    yield auth.Attributes(verb, True, group, resource, sub, namespace, name)


class EscalationCheck:
    """Kubernetes' privilege-escalation prevention: a user may write a Role/ClusterRole only with rules it
    holds itself (in that namespace; cluster-wide for a ClusterRole) or the `escalate` verb, and a binding
    only to a role whose rules it holds or with the `bind` verb on that role. An aggregated ClusterRole needs
    `escalate`."""

    def __init__(self, authorizer: RBACAuthorizer, user: auth.User) -> None:
        self.authorizer = authorizer
        self.user = user

    def _may(self, verb: str, plural: str, namespace: str, name: str) -> bool:
        return self.authorizer.authorize(self.user, auth.Attributes(verb, True, GROUP, plural, "", namespace, name))

    def _missing(self, rules: Iterable[Any], namespace: str) -> list[JSON]:
        return [r for r in rules if isinstance(r, dict)
                and not all(self.authorizer.authorize(self.user, a) for a in _breakdown(r, namespace))]

    def _refuse(self, res: resources.Resource, name: str, missing: list[JSON]) -> errors.StatusError:
        groups = " ".join(f'"{g}"' for g in self.user.groups)
        held = "\n".join(orjson.dumps(r, option=orjson.OPT_SORT_KEYS).decode() for r in missing)
        return errors.StatusError(
            403, f'{res.plural}.{GROUP} "{name}" is forbidden: user "{self.user.name}" (groups=[{groups}]) is '
                 f"attempting to grant RBAC permissions not currently held:\n{held}",
            reason="Forbidden", details={"group": GROUP, "kind": res.plural, "name": name})

    def __call__(self, res: resources.Resource, obj: JSON, old: JSON | None) -> None:
        if res.group != GROUP:
            return
        meta = obj.get("metadata") or {}
        ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        if res.plural in ("roles", "clusterroles"):
            if self._may("escalate", res.plural, ns, name):
                return
            if isinstance(obj.get("aggregationRule"), dict):
                raise errors.StatusError(403, f'{res.plural}.{GROUP} "{name}" is forbidden: must have cluster-admin '
                                         "privileges to write aggregated cluster roles", reason="Forbidden")
            missing = self._missing(obj.get("rules") or [], ns)
            if missing:
                raise self._refuse(res, name, missing)
            return
        ref = obj.get("roleRef") or {}
        kind, role = ref.get("kind"), str(ref.get("name") or "")
        plural = "clusterroles" if kind == "ClusterRole" else "roles"
        if self._may("bind", plural, ns, role):
            return
        index = self.authorizer.index
        if kind == "ClusterRole":
            rules = index.cluster_role_rules.get(role)
        else:
            found = index.roles.get((ns, role))
            rules = None if found is None else found.get("rules") or []
        if rules is None:
            raise errors.StatusError(404, f'{plural}.{GROUP} "{role}" not found', reason="NotFound",
                                     details={"group": GROUP, "kind": plural, "name": role})
        missing = self._missing(rules, ns)
        if missing:
            raise self._refuse(res, name, missing)


# --------------------------------------------------------------------------------------------------
# The controller: bootstrap policy, index rebuilds from a watch, aggregation write-back


class PolicyController:
    def __init__(self, server: APIServer, authorizer: RBACAuthorizer) -> None:
        self.server = server
        self.authorizer = authorizer
        self._wanted = 0
        self._done = 0
        self._changed = asyncio.Event()
        self._built = asyncio.Condition()
        self._tasks: list[asyncio.Task[Any]] = []

    def _res(self, plural: str) -> resources.Resource:
        res = self.server.registry.lookup(GROUP, "v1", plural)
        assert res is not None
        return res

    async def start(self) -> None:
        await self.reconcile_defaults()
        revision = await self._rebuild()
        self._tasks.append(asyncio.create_task(self._builder()))
        for plural in KINDS:
            self._tasks.append(asyncio.create_task(self._watch(plural, revision)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t

    async def reconcile_defaults(self) -> None:
        """kube-apiserver's bootstrap-roles post-start hook: missing default objects are created; with
        `autoupdate: "true"` missing rules, selectors and subjects are added back."""
        for want in rbac_policy.default_objects():
            res = self._res("clusterroles" if want["kind"] == "ClusterRole" else "clusterrolebindings")
            name = want["metadata"]["name"]
            try:
                have = await self.server.objects.try_get(res, None, name)
                if have is None:
                    await self.server.objects.create(res, None, orjson.loads(orjson.dumps(want)), OPTS)
                elif ((have.get("metadata") or {}).get("annotations") or {}).get(rbac_policy.AUTOUPDATE) != "false":
                    merged = _reconciled(have, want)
                    if merged is not None:
                        await self.server.objects.guaranteed_update(res, None, name, lambda o, m=merged: {**o, **m})
            except errors.StatusError as exc:
                if exc.code != 409:  # another API server did it first
                    log.warning("cannot reconcile default RBAC object %s: %s", name, exc)

    async def _list(self) -> tuple[int, list[dict[Any, JSON]]]:
        revision = 0
        out: list[dict[Any, JSON]] = []
        for plural in KINDS:
            page = await self.server.objects.list(self._res(plural), None)
            revision = max(revision, page.revision)
            objs: dict[Any, JSON] = {}
            for st in page.items:
                meta = st.obj["metadata"]
                objs[(meta.get("namespace") or "", meta["name"]) if plural.startswith("role") else meta["name"]] \
                    = st.obj
            out.append(objs)
        return revision, out

    async def _rebuild(self) -> int:
        revision, (roles, cluster_roles, role_bindings, crbs) = await self._list()
        index = PolicyIndex(roles, cluster_roles, role_bindings, crbs)
        self.authorizer.set_index(index)
        await self._write_aggregates(cluster_roles, index)
        return revision

    async def _write_aggregates(self, cluster_roles: Mapping[str, JSON], index: PolicyIndex) -> None:
        res = self._res("clusterroles")
        for name, role in cluster_roles.items():
            if not isinstance(role.get("aggregationRule"), dict):
                continue
            rules = index.cluster_role_rules.get(name, [])
            if (role.get("rules") or []) != rules:
                with contextlib.suppress(errors.StatusError):
                    await self.server.objects.guaranteed_update(res, None, name,
                                                                lambda o, r=rules: {**o, "rules": r})

    async def _builder(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            target = self._wanted
            await asyncio.sleep(0.02)  # a burst of events (kubectl apply -f of many roles) is one rebuild
            try:
                await self._rebuild()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("RBAC index rebuild failed; retrying")
                await asyncio.sleep(1)
                self._changed.set()
                continue
            async with self._built:
                self._done = max(self._done, target)
                self._built.notify_all()

    def changed(self) -> int:
        self._wanted += 1
        self._changed.set()
        return self._wanted

    async def refresh(self) -> None:
        """Rebuild now and wait for it (5 s at most): the RBAC write just made through this server is then in
        force."""
        ticket = self.changed()
        async with self._built:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._built.wait_for(lambda: self._done >= ticket), 5.0)

    async def _watch(self, plural: str, revision: int) -> None:
        res = self._res(plural)
        rv = str(revision)
        while True:
            try:
                events = await self.server.objects.watch(res, None, resource_version=rv, match=None)
                async for ev in events:
                    if ev.type == "ERROR":
                        raise errors.gone("watch expired")
                    rv = ev.obj["metadata"]["resourceVersion"]
                    self.changed()
            except asyncio.CancelledError:
                raise
            except errors.StatusError:
                rv = str(await self.server.store.current_revision())
                self.changed()
            except Exception:
                log.exception("RBAC watch of %s failed; restarting", plural)
                await asyncio.sleep(1)


def _reconciled(have: JSON, want: JSON) -> JSON | None:
    """The fields to write so `have` has everything `want` has (None when it does)."""
    out: JSON = {}
    if want["kind"] == "ClusterRole":
        if "aggregationRule" in want:
            sels = list(((have.get("aggregationRule") or {}).get("clusterRoleSelectors")) or [])
            missing = [s for s in want["aggregationRule"]["clusterRoleSelectors"] if s not in sels]
            if missing:
                out["aggregationRule"] = {"clusterRoleSelectors": sels + missing}
        else:
            rules = list(have.get("rules") or [])
            missing = [r for r in want["rules"] if r not in rules]
            if missing:
                out["rules"] = rules + missing
    else:
        subjects = list(have.get("subjects") or [])
        missing = [s for s in want["subjects"] if s not in subjects]
        if missing:
            out["subjects"] = subjects + missing
    labels = dict((have.get("metadata") or {}).get("labels") or {})
    if any(labels.get(k) != v for k, v in want["metadata"]["labels"].items()):
        out["metadata"] = {**have["metadata"], "labels": {**labels, **want["metadata"]["labels"]}}
    return out or None
