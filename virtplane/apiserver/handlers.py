"""HTTP → verbs: path parsing, content negotiation, query parameters, watch streaming."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
import yaml
from aiohttp import web

from virtplane.api import protobuf, resources
from virtplane.apiserver import auth, errors, objects, selectors, table

if TYPE_CHECKING:
    from virtplane.apiserver.server import APIServer

log = logging.getLogger(__name__)
JSON = dict[str, Any]
MAX_BODY = 3 * 1024 * 1024  # Kubernetes' request size limit
BOOKMARK_INTERVAL = 5.0

PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
}


@dataclasses.dataclass(slots=True)
class Target:
    """What a resource URL names."""

    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str
    watch_prefix: bool


@dataclasses.dataclass(slots=True)
class SubresourceRequest:
    """What a plugged-in subresource handler receives (start/stop/console/vnc ... later issues)."""

    request: web.Request
    server: APIServer
    resource: resources.Resource
    namespace: str | None
    name: str
    subresource: str  # e.g. "start", "vnc/screenshot", "portforward/22/tcp"


SubresourceHandler = Callable[[SubresourceRequest], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json",
                        headers=headers)


def status_response(exc: errors.StatusError) -> web.Response:
    return json_response(exc.status(), exc.code, exc.headers)


def success_status(details: JSON | None = None) -> JSON:
    body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
    if details:
        body["details"] = details
    return body


def parse_target(prefix: str, path: str) -> Target | None:
    """/api/v1/... or /apis/{group}/{version}/... → Target; None when not a resource URL."""
    segs = [s for s in path[len(prefix):].split("/") if s]
    if prefix == "/api":
        if len(segs) < 2:
            return None
        group, version, rest = "", segs[0], segs[1:]
    else:
        if len(segs) < 3:
            return None
        group, version, rest = segs[0], segs[1], segs[2:]
    watch_prefix = False
    if rest and rest[0] == "watch":
        watch_prefix, rest = True, rest[1:]
    if not rest:
        return None
    if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        ns, plural, tail = rest[1], rest[2], rest[3:]
    else:
        ns, plural, tail = None, rest[0], rest[1:]
    name = tail[0] if tail else None
    sub = "/".join(tail[1:])
    return Target(group, version, plural, ns, name, sub, watch_prefix)


def wants_table(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "as=Table" in accept


def bool_param(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


async def read_body(request: web.Request) -> Any:
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise errors.StatusError(413, "Request entity too large: limit is 3145728", reason="RequestEntityTooLarge")
    if not raw.strip():
        raise errors.bad_request("the request body is empty")
    ctype = request.content_type
    if ctype == "application/vnd.kubernetes.protobuf":
        # kubectl's typed clients (create namespace/configmap/secret, drain's evictions) send protobuf
        try:
            return protobuf.decode_k8s_protobuf(raw)
        except protobuf.ProtobufDecodeError as exc:
            raise errors.bad_request(f"error decoding protobuf request body: {exc}") from exc
    try:
        if "yaml" in ctype:
            return yaml.safe_load(raw)
        return orjson.loads(raw)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        if "json" in ctype:
            # kubectl sometimes sends YAML-ish bodies with a JSON type; be exact in the error
            raise errors.bad_request(f"error decoding request body as JSON: {exc}") from exc
        raise errors.bad_request(f"error decoding request body ({ctype or 'no content type'}): {exc}") from exc


def write_options(request: web.Request, user: auth.User) -> objects.WriteOptions:
    dry_run = request.query.getall("dryRun", [])
    for d in dry_run:
        if d != "All":
            raise errors.bad_request(f'Invalid dryRun value: "{d}": supported values: "All"')
    fv = request.query.get("fieldValidation", "Warn") or "Warn"
    if fv not in ("Strict", "Warn", "Ignore"):
        raise errors.bad_request(
            f'Invalid fieldValidation value: "{fv}": supported values: "Ignore", "Warn", "Strict"'
        )
    manager = request.query.get("fieldManager") or request.headers.get("User-Agent", "unknown").split("/")[0]
    return objects.WriteOptions(dry_run=bool(dry_run), field_manager=manager[:128], field_validation=fv,
                                user=user.name, privileged=auth.is_component(user),
                                check=request.get("vp_write_check"))


def warning_headers(warnings: list[str]) -> dict[str, str]:
    if not warnings:
        return {}
    # aiohttp joins repeated keys poorly; one Warning header with the first few is what kubectl prints
    return {"Warning": ", ".join(f'299 - "{w}"' for w in warnings[:10])}


class ResourceHandler:
    def __init__(self, server: APIServer) -> None:
        self.server = server
        self._tables: dict[int, table.TableConverter] = {}

    def converter(self, res: resources.Resource) -> table.TableConverter:
        conv = self._tables.get(id(res))
        if conv is None or conv.res is not res:
            conv = self._tables[id(res)] = table.TableConverter(res)
        return conv

    async def handle(self, request: web.Request, target: Target) -> web.StreamResponse:
        srv = self.server
        res = srv.registry.lookup(target.group, target.version, target.plural)
        if res is None:
            raise errors.StatusError(404, "the server could not find the requested resource",
                                     details={"group": target.group, "kind": target.plural})
        if target.namespace is not None and not res.namespaced:
            raise errors.StatusError(404, "the server could not find the requested resource")
        ns = target.namespace if res.namespaced else None
        method = request.method
        request["vp_resource"] = res.plural
        request["vp_group"] = res.group
        if target.watch_prefix or (method == "GET" and bool_param(request, "watch")):
            request["vp_verb"] = "WATCH"
            return await self.watch(request, res, ns, target.name)
        if target.subresource:
            return await self.subresource(request, res, ns, target)
        user = request["vp_user"]
        if target.name is None:
            if method == "GET":
                request["vp_verb"] = "LIST"
                return await self.list(request, res, ns)
            if method == "POST":
                body = await read_body(request)
                if not isinstance(body, dict):
                    raise errors.bad_request("the request body must be a JSON object")
                await srv.check_create(res, ns, body, user)
                result = await srv.objects.create(res, ns, body, write_options(request, user))
                return json_response(result.obj, 201, warning_headers(result.warnings))
            if method == "DELETE":
                return await self.delete_collection(request, res, ns)
            raise errors.StatusError(405, f"method {method} not allowed on a collection")
        name = target.name
        if method == "GET":
            st = await srv.objects.get_stored(res, ns, name)
            if wants_table(request):
                return self.render(request, res, st.obj)
            return web.Response(body=st.raw, content_type="application/json")
        if method == "PUT":
            body = await read_body(request)
            if not isinstance(body, dict):
                raise errors.bad_request("the request body must be a JSON object")
            result = await srv.objects.update(res, ns, name, body, write_options(request, user))
            return json_response(result.obj, 200, warning_headers(result.warnings))
        if method == "PATCH":
            return await self.patch(request, res, ns, name, "")
        if method == "DELETE":
            return await self.delete(request, res, ns, name)
        raise errors.StatusError(405, f"method {method} not allowed")

    def render(self, request: web.Request, res: resources.Resource, obj: JSON) -> web.Response:
        if wants_table(request):
            conv = self.converter(res)
            include = request.query.get("includeObject", "Metadata")
            return json_response(conv.table([obj], include, {"resourceVersion": obj["metadata"]["resourceVersion"]}))
        return json_response(obj)

    async def list(self, request: web.Request, res: resources.Resource, ns: str | None) -> web.Response:
        match = selectors.matcher(request.query.get("labelSelector"), request.query.get("fieldSelector"))
        try:
            limit = int(request.query.get("limit", "0") or 0)
        except ValueError as exc:
            raise errors.bad_request("limit must be an integer") from exc
        page = await self.server.objects.list(
            res, ns, match=match, limit=max(limit, 0), continue_token=request.query.get("continue", "")
        )
        list_meta: JSON = {"resourceVersion": str(page.revision)}
        if page.continue_token:
            list_meta["continue"] = page.continue_token
        if wants_table(request):
            include = request.query.get("includeObject", "Metadata")
            return json_response(self.converter(res).table([s.obj for s in page.items], include, list_meta))
        head = orjson.dumps({"kind": res.list_kind or f"{res.kind}List", "apiVersion": res.api_version,
                             "metadata": list_meta})
        # items are spliced in as stored, not parsed and re-serialized (see objects.with_resource_version)
        body = head[:-1] + b',"items":[' + b",".join(s.raw for s in page.items) + b"]}"
        return web.Response(body=body, content_type="application/json")

    async def patch(
        self, request: web.Request, res: resources.Resource, ns: str | None, name: str, sub: str
    ) -> web.Response:
        ptype = PATCH_TYPES.get(request.content_type)
        if ptype is None:
            raise errors.StatusError(
                415,
                f"the body of the request was in an unknown format - accepted media types include: "
                f"{', '.join(PATCH_TYPES)}",
            )
        body = await read_body(request)
        opts = write_options(request, request["vp_user"])
        if ptype == "apply" and not request.query.get("fieldManager"):
            raise errors.bad_request("PATCH, application/apply-patch+yaml requires fieldManager to be set")
        if ptype == "apply" and isinstance(body, dict) and self.server.creates_checked(res) \
                and await self.server.objects.try_get(res, ns, name) is None:
            await self.server.check_create(res, ns, body, request["vp_user"])  # a server-side-apply create
        result = await self.server.objects.patch(
            res, ns, name, ptype, body, opts, subresource=sub, force=bool_param(request, "force")
        )
        return json_response(result.obj, 200, warning_headers(result.warnings))

    async def delete_options(self, request: web.Request) -> JSON:
        options: JSON = {}
        if request.can_read_body:
            raw = await request.content.read(MAX_BODY)
            if raw.strip() and request.content_type == "application/vnd.kubernetes.protobuf":
                try:  # kubectl drain deletes with a protobuf DeleteOptions when it cannot evict
                    options = dict(protobuf.decode_k8s_protobuf(raw))
                except protobuf.ProtobufDecodeError as exc:
                    raise errors.bad_request(f"invalid DeleteOptions: {exc}") from exc
            elif raw.strip():
                try:
                    options = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise errors.bad_request(f"invalid DeleteOptions: {exc}") from exc
        for q in ("propagationPolicy", "gracePeriodSeconds"):
            if q in request.query:
                options[q] = request.query[q]
        if "orphanDependents" in request.query:
            options["orphanDependents"] = bool_param(request, "orphanDependents")
        if "dryRun" in request.query:
            options["dryRun"] = request.query.getall("dryRun")
        return options

    async def delete(self, request: web.Request, res: resources.Resource, ns: str | None, name: str) -> web.Response:
        options = await self.delete_options(request)
        opts = write_options(request, request["vp_user"])
        if options.get("dryRun"):
            opts.dry_run = True
        obj, finished = await self.server.objects.delete(res, ns, name, options, opts)
        # kube-apiserver (endpoints/handlers/delete.go) answers 200 for a pending deletion too (finalizers, a
        # pod's grace period, a namespace); 202 only when it is pending and the client sent orphanDependents: false
        accepted = not finished and options.get("orphanDependents") is False
        return json_response(obj, 202 if accepted else 200)

    async def delete_collection(self, request: web.Request, res: resources.Resource, ns: str | None) -> web.Response:
        options = await self.delete_options(request)
        opts = write_options(request, request["vp_user"])
        if options.get("dryRun"):
            opts.dry_run = True
        match = selectors.matcher(request.query.get("labelSelector"), request.query.get("fieldSelector"))
        page = await self.server.objects.list(res, ns, match=match)
        deleted = []
        for st in page.items:
            meta = st.obj["metadata"]
            with contextlib.suppress(errors.StatusError):
                d, _ = await self.server.objects.delete(res, meta.get("namespace"), meta["name"], options, opts)
                deleted.append(d)
        return json_response({"kind": res.list_kind or f"{res.kind}List", "apiVersion": res.api_version,
                              "metadata": {"resourceVersion": str(page.revision)}, "items": deleted})

    async def subresource(
        self, request: web.Request, res: resources.Resource, ns: str | None, target: Target
    ) -> web.StreamResponse:
        name, sub = target.name or "", target.subresource
        request["vp_verb"] = f"{request.method}:{sub}"
        srv = self.server
        user = request["vp_user"]
        if (sub == "status" and res.status_subresource) or (sub == "finalize" and res.plural == "namespaces"):
            if request.method == "GET":
                return self.render(request, res, await srv.objects.get(res, ns, name))
            store_sub = "status" if sub == "status" else "finalize"
            if request.method == "PUT":
                body = await read_body(request)
                if not isinstance(body, dict):
                    raise errors.bad_request("the request body must be a JSON object")
                if store_sub == "finalize":
                    return json_response(await self.finalize_namespace(res, name, body))
                result = await srv.objects.update(res, ns, name, body, write_options(request, user),
                                                  subresource="status")
                return json_response(result.obj)
            if request.method == "PATCH" and store_sub == "status":
                return await self.patch(request, res, ns, name, "status")
            raise errors.StatusError(405, f"method {request.method} not allowed on {sub}")
        if sub == "ephemeralcontainers" and res.group == "" and res.plural == "pods":
            # kubectl debug: a write here changes spec.ephemeralContainers only (additions; admission checks)
            if request.method == "GET":
                return self.render(request, res, await srv.objects.get(res, ns, name))
            if request.method == "PATCH":
                return await self.patch(request, res, ns, name, sub)
            if request.method == "PUT":
                body = await read_body(request)
                if not isinstance(body, dict):
                    raise errors.bad_request("the request body must be a JSON object")
                result = await srv.objects.update(res, ns, name, body, write_options(request, user), subresource=sub)
                return json_response(result.obj)
            raise errors.StatusError(405, f"method {request.method} not allowed on {sub}")
        if sub == "scale" and res.scale:
            return await self.scale(request, res, ns, name)
        if sub == "binding" and res.group == "" and res.plural == "pods" and request.method == "POST":
            return await self.bind_pod(request, res, ns, name)
        handler = srv.subresource_handler(res, sub)
        if handler is None:
            raise errors.StatusError(404, f"the server could not find the requested resource ({res.plural}/{sub})")
        return await handler(SubresourceRequest(request, srv, res, ns, name, sub))

    async def bind_pod(self, request: web.Request, res: resources.Resource, ns: str | None, name: str) -> web.Response:
        """pods/binding: the scheduler's one write, setting spec.nodeName exactly once."""
        body = await read_body(request)
        node = ((body or {}).get("target") or {}).get("name") if isinstance(body, dict) else None
        if not node:
            raise errors.invalid(res, "Binding", name, [resources.Cause(
                "FieldValueRequired", "Required value", "target.name")])

        def bind(pod: JSON) -> JSON:
            current = (pod.get("spec") or {}).get("nodeName")
            if current:
                raise errors.conflict(res, name, f"pod {name} is already assigned to node \"{current}\"")
            if pod["metadata"].get("deletionTimestamp"):
                raise errors.conflict(res, name, f"pod {name} is being deleted, cannot be assigned to a host")
            pod.setdefault("spec", {})["nodeName"] = node
            return pod

        def scheduled(pod: JSON) -> JSON:
            # as the Kubernetes binding does: the pod is scheduled now (a status write of its own)
            status = pod.setdefault("status", {})
            conds = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
            conds.append({"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                          "lastTransitionTime": objects.now_rfc3339()})
            status["conditions"] = conds
            return pod

        if await self.server.objects.guaranteed_update(res, ns, name, bind) is None:
            raise errors.not_found(res, name)
        await self.server.objects.guaranteed_update(res, ns, name, scheduled, subresource="status")
        return json_response(success_status(), 201)

    async def finalize_namespace(self, res: resources.Resource, name: str, body: JSON) -> JSON:
        finalizers = list((body.get("spec") or {}).get("finalizers") or [])

        def mutate(obj: JSON) -> JSON:
            obj.setdefault("spec", {})["finalizers"] = finalizers
            return obj

        result = await self.server.objects.guaranteed_update(res, None, name, mutate)
        if result is None:
            raise errors.not_found(res, name)
        return result

    async def scale(self, request: web.Request, res: resources.Resource, ns: str | None, name: str) -> web.Response:
        assert res.scale is not None
        spec_path, status_path, selector_path = res.scale
        steps = [table.compile_path(p) for p in (spec_path, status_path, selector_path)]

        def to_scale(obj: JSON) -> JSON:
            vals = [table.evaluate(s, obj) for s in steps]
            return {
                "kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {k: obj["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion",
                                                              "creationTimestamp") if k in obj["metadata"]},
                "spec": {"replicas": vals[0][0] if vals[0] else 0},
                "status": {"replicas": vals[1][0] if vals[1] else 0,
                           **({"selector": vals[2][0]} if vals[2] and isinstance(vals[2][0], str) else {})},
            }

        if request.method == "GET":
            return json_response(to_scale(await self.server.objects.get(res, ns, name)))
        body = await read_body(request)
        current = await self.server.objects.get(res, ns, name)
        if request.method == "PATCH":
            ptype = PATCH_TYPES.get(request.content_type, "merge")
            from virtplane.api import patch as patch_mod

            scale_obj = to_scale(current)
            scale_obj = (patch_mod.json_patch(scale_obj, body) if ptype == "json"
                         else patch_mod.json_merge_patch(scale_obj, body))
        elif request.method == "PUT":
            scale_obj = body
        else:
            raise errors.StatusError(405, "method not allowed on scale")
        replicas = (scale_obj.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise errors.invalid(res, "Scale", name, [resources.Cause(
                "FieldValueInvalid", "must be greater than or equal to 0", "spec.replicas")])
        keys = [k for kind, k in steps[0] if kind == "field"]

        def mutate(obj: JSON) -> JSON:
            cur = obj
            for k in keys[:-1]:
                cur = cur.setdefault(k, {})
            cur[keys[-1]] = replicas
            return obj

        updated = await self.server.objects.guaranteed_update(res, ns, name, mutate)
        if updated is None:
            raise errors.not_found(res, name)
        return json_response(to_scale(updated))

    async def watch(
        self, request: web.Request, res: resources.Resource, ns: str | None, name: str | None
    ) -> web.StreamResponse:
        field_sel = request.query.get("fieldSelector")
        if name:
            field_sel = f"metadata.name={name}" + (f",{field_sel}" if field_sel else "")
        match = selectors.matcher(request.query.get("labelSelector"), field_sel)
        rv = request.query.get("resourceVersion", "")
        send_initial = bool_param(request, "sendInitialEvents")
        bookmarks = bool_param(request, "allowWatchBookmarks")
        try:
            timeout = float(request.query.get("timeoutSeconds", "0") or 0)
        except ValueError as exc:
            raise errors.bad_request("timeoutSeconds must be a number") from exc
        if send_initial and rv not in ("", "0"):
            # sendInitialEvents with a resourceVersion: initial state as of "not older than" rv
            rv = "0"
        events = await self.server.objects.watch(
            res, ns, resource_version=rv, match=match, initial_end_marker=send_initial
        )
        as_table = wants_table(request)
        conv = self.converter(res) if as_table else None
        include = request.query.get("includeObject", "Metadata")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                       "Cache-Control": "no-cache, private"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        srv = self.server
        srv.metrics.watchers[res.plural] += 1
        me = asyncio.current_task()
        if me is not None:
            srv.watch_tasks.add(me)
        deadline = time.monotonic() + timeout if timeout > 0 else None
        last_rv = rv if rv not in ("", "0") else str(await srv.store.current_revision())
        it = events.__aiter__()
        next_ev: asyncio.Task[objects.WatchEvent] | None = None
        try:
            while True:
                if next_ev is None:
                    next_ev = asyncio.ensure_future(it.__anext__())
                wait = BOOKMARK_INTERVAL if bookmarks else None
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    wait = min(wait, remaining) if wait else remaining
                done, _ = await asyncio.wait({next_ev}, timeout=wait)
                if not done:
                    if bookmarks:
                        await self._write_bookmark(resp, res, last_rv)
                    continue
                try:
                    ev = next_ev.result()
                except StopAsyncIteration:
                    break
                next_ev = None
                if ev.type == "INITIAL_END":
                    last_rv = ev.obj["resourceVersion"]
                    await self._write_bookmark(resp, res, last_rv, initial_end=True)
                    continue
                if ev.type == "ERROR" or ev.stored is None:
                    await resp.write(orjson.dumps({"type": "ERROR", "object": ev.obj}) + b"\n")
                    break
                last_rv = str(ev.stored.kv.mod_revision)
                if conv is not None:
                    table_obj = conv.table([ev.obj], include, {"resourceVersion": last_rv})
                    await resp.write(orjson.dumps({"type": ev.type, "object": table_obj}) + b"\n")
                else:
                    await resp.write(b'{"type":"%s","object":%s}\n' % (ev.type.encode(), ev.stored.raw))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            srv.metrics.watchers[res.plural] -= 1
            if me is not None:
                srv.watch_tasks.discard(me)
            if next_ev is not None:
                next_ev.cancel()
                with contextlib.suppress(BaseException):
                    await next_ev
            with contextlib.suppress(BaseException):
                await events.aclose()  # type: ignore[attr-defined]
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await resp.write_eof()
        return resp

    async def _write_bookmark(
        self, resp: web.StreamResponse, res: resources.Resource, rv: str, initial_end: bool = False
    ) -> None:
        meta: JSON = {"resourceVersion": rv}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        obj = {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}
        await resp.write(orjson.dumps({"type": "BOOKMARK", "object": obj}) + b"\n")
