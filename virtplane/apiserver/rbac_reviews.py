"""The review APIs (create-only, never stored) and the ServiceAccount TokenRequest:

    POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews       kubectl auth can-i VERB RESOURCE
    POST /apis/authorization.k8s.io/v1/selfsubjectrulesreviews        kubectl auth can-i --list
    POST /apis/authorization.k8s.io/v1/subjectaccessreviews           (another user's access)
    POST /apis/authorization.k8s.io/v1/namespaces/NS/localsubjectaccessreviews
    POST /apis/authentication.k8s.io/v1/selfsubjectreviews            kubectl auth whoami
    POST /api/v1/namespaces/NS/serviceaccounts/NAME/token             kubectl create token NAME -n NS

Who may call them is decided by RBAC like any request (system:basic-user grants the self reviews to every
authenticated user); the answers come from the same authorizer the API server enforces with.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from virtplane.apiserver import auth, errors, handlers, objects, rbac

if TYPE_CHECKING:
    from virtplane.apiserver.server import APIServer

JSON = dict[str, Any]
AUTHZ = "/apis/authorization.k8s.io/v1"
DEFAULT_TOKEN_SECONDS = 3600
MIN_TOKEN_SECONDS = 600
MAX_TOKEN_SECONDS = 365 * 24 * 3600  # `kubectl create token --duration` beyond this is cut to it


def register(server: APIServer) -> None:
    def route(path: str, fn: Any) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            if request.method != "POST":
                raise errors.StatusError(405, "the server does not allow this method on the requested resource")
            body = await handlers.read_body(request)
            if not isinstance(body, dict):
                raise errors.bad_request("the request body must be a JSON object")
            return handlers.json_response(await fn(server, request, body), 201)

        server.add_route("*", path, handler)

    route(f"{AUTHZ}/selfsubjectaccessreviews", _self_access)
    route(f"{AUTHZ}/subjectaccessreviews", _subject_access)
    route(f"{AUTHZ}/namespaces/{{namespace}}/localsubjectaccessreviews", _local_access)
    route(f"{AUTHZ}/selfsubjectrulesreviews", _self_rules)
    route("/apis/authentication.k8s.io/v1/selfsubjectreviews", _whoami)
    server.register_subresource("", "serviceaccounts", "token", _token_request)


def _attributes(spec: JSON, default_ns: str = "") -> auth.Attributes:
    ra = spec.get("resourceAttributes")
    if isinstance(ra, dict):
        return auth.Attributes(str(ra.get("verb") or ""), True, str(ra.get("group") or ""),
                               str(ra.get("resource") or ""), str(ra.get("subresource") or ""),
                               str(ra.get("namespace") or default_ns), str(ra.get("name") or ""))
    na = spec.get("nonResourceAttributes")
    if isinstance(na, dict):
        return auth.Attributes(str(na.get("verb") or ""), False, path=str(na.get("path") or ""))
    raise errors.StatusError(422, "spec.resourceAttributes or spec.nonResourceAttributes is required",
                             reason="Invalid")


def _review(server: APIServer, kind: str, body: JSON, user: auth.User, attrs: auth.Attributes) -> JSON:
    az = server.authorizer
    allowed = az.authorize(user, attrs)
    status: JSON = {"allowed": allowed}
    if allowed and isinstance(az, rbac.RBACAuthorizer):
        why = "user is a member of a privileged group" if auth.is_superuser(user) else az.index.why(user, attrs)
        if why:
            status["reason"] = f"RBAC: allowed by {why}" if not auth.is_superuser(user) else why
    meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    return {"kind": kind, "apiVersion": "authorization.k8s.io/v1", "metadata": {**meta, "creationTimestamp": None},
            "spec": body.get("spec") or {}, "status": status}


async def _self_access(server: APIServer, request: web.Request, body: JSON) -> JSON:
    return _review(server, "SelfSubjectAccessReview", body, request["vp_user"],
                   _attributes(body.get("spec") or {}))


def _spec_user(spec: JSON) -> auth.User:
    name = str(spec.get("user") or "")
    groups = tuple(str(g) for g in spec.get("groups") or [] if isinstance(g, str))
    if not name and not groups:
        raise errors.StatusError(422, "at least one of user or group must be specified", reason="Invalid")
    return auth.User(name, str(spec.get("uid") or ""), groups)


async def _subject_access(server: APIServer, request: web.Request, body: JSON) -> JSON:
    spec = body.get("spec") or {}
    return _review(server, "SubjectAccessReview", body, _spec_user(spec), _attributes(spec))


async def _local_access(server: APIServer, request: web.Request, body: JSON) -> JSON:
    ns = request.match_info["namespace"]
    spec = body.get("spec") or {}
    ra = spec.get("resourceAttributes") if isinstance(spec.get("resourceAttributes"), dict) else None
    if ra is None or (ra.get("namespace") or ns) != ns:
        raise errors.StatusError(422, f"spec.resourceAttributes.namespace must match metadata.namespace: {ns}",
                                 reason="Invalid")
    out = _review(server, "LocalSubjectAccessReview", body, _spec_user(spec), _attributes(spec, ns))
    out["metadata"]["namespace"] = ns
    return out


async def _self_rules(server: APIServer, request: web.Request, body: JSON) -> JSON:
    ns = str((body.get("spec") or {}).get("namespace") or "")
    az = server.authorizer
    user = request["vp_user"]
    if isinstance(az, rbac.RBACAuthorizer):
        res_rules, url_rules = az.rules(user, ns)
        incomplete = False
    else:
        res_rules, url_rules, incomplete = [], [], True
    return {"kind": "SelfSubjectRulesReview", "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None}, "spec": {"namespace": ns},
            "status": {"resourceRules": res_rules, "nonResourceRules": url_rules, "incomplete": incomplete}}


async def _whoami(server: APIServer, request: web.Request, body: JSON) -> JSON:
    user: auth.User = request["vp_user"]
    info: JSON = {"username": user.name, "groups": list(user.groups)}
    if user.uid:
        info["uid"] = user.uid
    return {"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": objects.now_rfc3339()}, "status": {"userInfo": info}}


# --------------------------------------------------------------------------------------------------
# ServiceAccount tokens


async def signing_key(server: APIServer) -> bytes:
    """The key of the Secret kube-system/virtplane-token-signing-key (created on first use), read once per
    API server: every server over the store signs and checks with the same key."""
    cached: bytes | None = getattr(server, "_vp_signing_key", None)
    if cached:
        return cached
    key = await server.objects.shared_key(*auth.SIGNING_KEY_SECRET)
    server._vp_signing_key = key  # type: ignore[attr-defined]
    return key


async def token_user(server: APIServer, authorization: str | None) -> auth.User | None:
    """The user of a signed token (ServiceAccount or `virtplane user add`); a ServiceAccount token only while
    its ServiceAccount exists with the same uid, as Kubernetes checks bound tokens."""
    token = (authorization or "").removeprefix("Bearer ").strip()
    if token.count(".") != 2 or not token.startswith("eyJ"):
        return None
    claims = auth.verify_token(await signing_key(server), token, time.time())
    if claims is None:
        return None
    user, sa = auth.user_from_claims(claims)
    if auth.is_superuser(user):
        return None  # a signed token never carries the privileged groups (see `virtplane user add`)
    if sa is not None:
        res = server.registry.lookup("", "v1", "serviceaccounts")
        obj = await server.objects.try_get(res, sa[0], sa[1]) if res is not None else None
        if obj is None or (sa[2] and obj["metadata"].get("uid") != sa[2]):
            return None
    return user


async def _token_request(req: handlers.SubresourceRequest) -> web.StreamResponse:
    if req.request.method != "POST":
        raise errors.StatusError(405, "token takes POST")
    body = await handlers.read_body(req.request)
    if not isinstance(body, dict):
        raise errors.bad_request("the request body must be a JSON object")
    sa = await req.server.objects.get(req.resource, req.namespace, req.name)
    spec = body.get("spec") if isinstance(body.get("spec"), dict) else {}
    seconds = spec.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS
    if not isinstance(seconds, int) or seconds < MIN_TOKEN_SECONDS:
        raise errors.StatusError(422, f"TokenRequest.authentication.k8s.io \"{req.name}\" is invalid: "
                                 f"spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration "
                                 f"less than {MIN_TOKEN_SECONDS} seconds", reason="Invalid")
    seconds = min(seconds, MAX_TOKEN_SECONDS)
    now = time.time()
    audiences = [str(a) for a in spec.get("audiences") or [] if isinstance(a, str)]
    claims = auth.service_account_claims(str(req.namespace), req.name, sa["metadata"]["uid"], seconds, now,
                                         audiences)
    token = auth.sign_token(await signing_key(req.server), claims)
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims["exp"]))
    return handlers.json_response({
        "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": req.name, "namespace": req.namespace, "creationTimestamp": objects.now_rfc3339()},
        "spec": {"audiences": claims["aud"], "expirationSeconds": seconds,
                 **({"boundObjectRef": spec["boundObjectRef"]} if spec.get("boundObjectRef") else {})},
        "status": {"token": token, "expirationTimestamp": expires}}, 201)
