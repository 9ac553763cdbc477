"""CDI's upload API on the API server's port: UploadTokenRequests and the upload proxy endpoints.

- `POST /apis/upload.cdi.kubevirt.io/v1beta1/namespaces/{ns}/uploadtokenrequests` with
  `{"apiVersion": "upload.cdi.kubevirt.io/v1beta1", "kind": "UploadTokenRequest", "spec": {"pvcName": NAME}}`
  (an authenticated user allowed to `create uploadtokenrequests` in ns) → 201 with `status.token`: a token
  for that PVC, valid five minutes. Not stored, as CDI's aggregated API does not store it either.
- `POST|PUT /v1beta1/upload`, `/v1beta1/upload-async` (raw body), `/v1beta1/upload-form`,
  `/v1beta1/upload-form-async` (multipart, field `file`) with `Authorization: Bearer <upload token>`: the
  token is the only credential (no API token), as with CDI's upload proxy. The request is streamed to the
  upload server that owns the volume (the PVC's `upload.virtplane.io/endpoint` annotation, written by the
  DataVolume controller when the DataVolume becomes UploadReady) and its answer relayed: 200 when the image
  is in place (sync) or received (async), 400 with the reason for a bad image, 401 for a bad token, 503
  while the DataVolume is not UploadReady yet.

`register(server)` installs one middleware in front of the server's own (which would demand an API token
for these paths); everything else passes through untouched.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from virtplane.apiserver import errors, handlers
from virtplane.storage import upload as upload_store

if TYPE_CHECKING:
    from virtplane.apiserver.server import APIServer

log = logging.getLogger(__name__)
JSON = dict[str, Any]

GROUP = "upload.cdi.kubevirt.io"
VERSION = "v1beta1"
_TOKEN_PATH = re.compile(rf"^/apis/{re.escape(GROUP)}/{VERSION}/namespaces/([a-z0-9][a-z0-9-]*)/uploadtokenrequests/?$")
_PROXY_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)


def register(server: APIServer) -> None:
    """CDI's upload endpoints (authorized by upload tokens, not API tokens) and UploadTokenRequests."""

    async def upload(request: web.Request) -> web.StreamResponse:
        return await proxy_upload(server, request)

    async def token_requests(request: web.Request) -> web.StreamResponse:
        return await _api(server, request)

    for path in upload_store.UPLOAD_PATHS:
        server.add_route("*", path, upload, public=True)
    server.add_route("*", f"/apis/{GROUP}" + "{tail:.*}", token_requests)


async def token_key(server: APIServer) -> bytes:
    """The shared HMAC key (Secret kube-system/virtplane-upload-token-key), created on first use."""
    return await server.objects.shared_key(*upload_store.TOKEN_SECRET)


async def _api(server: APIServer, request: web.Request) -> web.StreamResponse:
    user = request.get("vp_user")  # authenticated (any kind of token) and authorized by the server's middleware
    if user is None:
        raise errors.StatusError(401, "Unauthorized")
    path = request.path.rstrip("/")
    if path == f"/apis/{GROUP}" and request.method == "GET":
        gv = {"groupVersion": f"{GROUP}/{VERSION}", "version": VERSION}
        return handlers.json_response({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [gv],
                                       "preferredVersion": gv})
    if path == f"/apis/{GROUP}/{VERSION}" and request.method == "GET":
        return handlers.json_response({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{GROUP}/"
                                       f"{VERSION}", "resources": [{"name": "uploadtokenrequests", "singularName": "",
                                                                    "namespaced": True, "kind": "UploadTokenRequest",
                                                                    "verbs": ["create"]}]})
    m = _TOKEN_PATH.match(request.path)
    if m is None or request.method != "POST":
        raise errors.StatusError(404, "the server could not find the requested resource")
    ns = m.group(1)
    if not server.authorizer.allowed(user, "create", GROUP, "uploadtokenrequests", ns):
        raise errors.StatusError(403, f'uploadtokenrequests.{GROUP} is forbidden: User "{user.name}" cannot create '
                                 f'resource "uploadtokenrequests" in API group "{GROUP}" in the namespace "{ns}"',
                                 reason="Forbidden")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise errors.bad_request(f"invalid request body: {exc}") from exc
    pvc_name = ((body or {}).get("spec") or {}).get("pvcName") if isinstance(body, dict) else None
    if not pvc_name or not isinstance(pvc_name, str):
        raise errors.bad_request("spec.pvcName is required")
    pvc_res = server.registry.lookup("", "v1", "persistentvolumeclaims")
    assert pvc_res is not None
    if await server.objects.try_get(pvc_res, ns, pvc_name) is None:
        raise errors.StatusError(404, f'persistentvolumeclaims "{pvc_name}" not found', reason="NotFound")
    token = upload_store.issue_token(await token_key(server), ns, pvc_name)
    meta = {**((body.get("metadata") or {}) if isinstance(body, dict) else {}), "namespace": ns}
    out = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "UploadTokenRequest", "metadata": meta,
           "spec": {"pvcName": pvc_name}, "status": {"token": token}}
    return handlers.json_response(out, 201)


async def proxy_upload(server: APIServer, request: web.Request) -> web.StreamResponse:
    token = upload_store.bearer(request.headers.get("Authorization"))
    try:
        ns, pvc_name = upload_store.verify_token(await token_key(server), token)
    except upload_store.TokenError as exc:
        return web.Response(status=401, text=str(exc))
    pvc_res = server.registry.lookup("", "v1", "persistentvolumeclaims")
    assert pvc_res is not None
    pvc = await server.objects.try_get(pvc_res, ns, pvc_name)
    if pvc is None:
        return web.Response(status=404, text=f"PVC {ns}/{pvc_name} not found")
    endpoint = ((pvc.get("metadata") or {}).get("annotations") or {}).get(upload_store.ANN_ENDPOINT)
    if not endpoint:
        return web.Response(status=503, text=f"PVC {ns}/{pvc_name} is not ready for an upload yet (wait for the "
                            "DataVolume to be UploadReady)")
    headers = {"Authorization": f"Bearer {token}"}
    for h in ("Content-Type", "Content-Length"):
        if h in request.headers:
            headers[h] = request.headers[h]
    try:
        async with aiohttp.ClientSession(timeout=_PROXY_TIMEOUT) as session, session.request(
                request.method, endpoint.rstrip("/") + request.path, data=request.content.iter_chunked(1 << 20),
                headers=headers) as resp:
            text = await resp.text()
            return web.Response(status=resp.status, text=text)
    except aiohttp.ClientError as exc:
        return web.Response(status=502, text=f"the upload server of PVC {ns}/{pvc_name} is unreachable: {exc}")
