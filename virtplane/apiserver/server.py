"""The API server: an aiohttp application over one `Store`, stateless apart from caches."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web

import virtplane
from virtplane.api import builtin, openapi, resources
from virtplane.apiserver import (
    auth,
    clone_auth,
    consoles,
    discovery,
    errors,
    eviction,
    handlers,
    hotplug,
    kubevirt,
    metrics,
    objects,
    podproxy,
    rbac,
    rbac_reviews,
    registry,
    serviceips,
    upload,
)
from virtplane.store import interface as store_api
from virtplane.web import serve as web_console

log = logging.getLogger(__name__)
access_log = logging.getLogger("virtplane.apiserver.access")
JSON = dict[str, Any]
CreateCheck = Callable[["APIServer", auth.User, str | None, JSON], Awaitable[None]]

KUBE_VERSION = {"major": "1", "minor": "32"}
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
PUBLIC_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/version"})
CRD_RESOURCE = ("apiextensions.k8s.io", "v1", "customresourcedefinitions")
# kubeadm's discovery object: readable without credentials (GET only), it hands a joining node the CA, which
# the node then checks against the hash it was given.
CLUSTER_INFO_PATH = "/api/v1/namespaces/kube-public/configmaps/cluster-info"


@dataclasses.dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 6443
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None
    advertise_address: str = ""  # host:port clients use, for discovery's serverAddressByClientCIDRs
    # more addresses on the same port: the cluster bridge, where node agents in their own netns reach us
    extra_hosts: tuple[str, ...] = ()
    service_cidr: str = serviceips.DEFAULT_SERVICE_CIDR  # kube-apiserver's --service-cluster-ip-range
    ca_cert: Path | None = None  # published in kube-public/cluster-info for nodes joining with a token


class APIServer:
    def __init__(self, store: store_api.Store, config: ServerConfig) -> None:
        self.store = store
        self.config = config
        self.registry = registry.Registry()
        self.objects = objects.ObjectStore(store, self.registry, serviceips.ServiceNetwork(config.service_cidr))
        self.metrics = metrics.Metrics()
        self.authenticator = (
            auth.TokenAuthenticator.from_file(config.token_file) if config.token_file else auth.TokenAuthenticator({})
        )
        self.authorizer = rbac.RBACAuthorizer()
        self.rbac = rbac.PolicyController(self, self.authorizer)
        self.resource_handler = handlers.ResourceHandler(self)
        self._subresources: dict[tuple[str, str, str], handlers.SubresourceHandler] = {}
        self._routes: list[tuple[str, str, Any]] = []  # extra endpoints other components plug in
        self._public_paths: set[str] = set(PUBLIC_PATHS)
        self._public_prefixes: list[str] = []  # from public routes that end in a {tail:...} variable
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._runner: web.AppRunner | None = None
        self._openapi_cache: dict[Any, bytes] = {}
        self.watch_tasks: set[asyncio.Task[Any]] = set()  # open watch streams, ended on shutdown
        self.bound_port: int = 0
        # Per-resource checks of a user's create that need the user (authorization beyond the verb): see
        # register_create_check.
        self._create_checks: dict[tuple[str, str], list[CreateCheck]] = {}
        kubevirt.register(self)
        clone_auth.register(self)
        hotplug.register(self)
        upload.register(self)
        consoles.register(self)
        eviction.register(self)
        web_console.register(self)
        podproxy.register(self)
        rbac_reviews.register(self)

    # --------------------------------------------------------------- plug-ins

    def register_subresource(self, group: str, plural: str, name: str, handler: handlers.SubresourceHandler) -> None:
        """Later components plug in start/stop/console/vnc/...; `name` is the first path segment."""
        self._subresources[(group, plural, name)] = handler

    def register_create_check(self, group: str, plural: str, check: CreateCheck) -> None:
        """`check(server, user, namespace, body)` runs before a user's POST creates a `group/plural` object;
        it raises a StatusError to refuse (e.g. CDI's clone authorization in another namespace)."""
        self._create_checks.setdefault((group, plural), []).append(check)

    def creates_checked(self, res: resources.Resource) -> bool:
        return (res.group, res.plural) in self._create_checks

    async def check_create(self, res: resources.Resource, ns: str | None, body: JSON, user: auth.User) -> None:
        for check in self._create_checks.get((res.group, res.plural), ()):
            await check(self, user, ns, body)

    def add_route(self, method: str, path: str, handler: Any, *, public: bool = False) -> None:
        """An extra endpoint (e.g. CDI's upload proxy). `public` ones skip API-token authentication:
        they authorize requests themselves (upload tokens)."""
        self._routes.append((method, path, handler))
        if public and path.endswith(".*}") and "{" in path:
            self._public_prefixes.append(path[: path.index("{")])
        elif public:
            self._public_paths.add(path)

    def _is_public(self, path: str) -> bool:
        return path in self._public_paths or any(path.startswith(p) for p in self._public_prefixes)

    def subresource_handler(self, res: resources.Resource, sub: str) -> handlers.SubresourceHandler | None:
        return self._subresources.get((res.group, res.plural, sub.split("/")[0]))

    # --------------------------------------------------------------- lifecycle

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=handlers.MAX_BODY + 1024)
        r = app.router
        r.add_get("/healthz", self._health)
        r.add_get("/livez", self._health)
        r.add_get("/readyz", self._readyz)
        r.add_get("/version", self._version)
        r.add_get("/metrics", self._metrics)
        r.add_get("/api", self._api)
        r.add_get("/apis", self._apis)
        r.add_get("/openapi/v2", self._openapi_v2)
        r.add_get("/openapi/v3", self._openapi_v3_index)
        r.add_get("/openapi/v3/{path:.*}", self._openapi_v3)
        for method, path, handler in self._routes:
            r.add_route(method, path, handler)
        r.add_route("*", "/api/{tail:.*}", self._dispatch_core)
        r.add_route("*", "/apis/{tail:.*}", self._dispatch_apis)
        r.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def start(self) -> None:
        await self.store.start()
        await self._bootstrap()
        self._tasks.append(asyncio.create_task(self.objects.namespaces.run(), name="namespace states"))
        app = self.build_app()
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        ssl_ctx = None
        if self.config.tls_cert and self.config.tls_key:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
            ssl_ctx.set_alpn_protocols(["http/1.1"])
        site = web.TCPSite(self._runner, self.config.host, self.config.port, ssl_context=ssl_ctx,
                           reuse_address=True, backlog=1024)
        await site.start()
        server = site._server
        if server is not None and server.sockets:  # type: ignore[attr-defined]
            self.bound_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        for host in self.config.extra_hosts:
            extra = web.TCPSite(self._runner, host, self.bound_port, ssl_context=ssl_ctx, reuse_address=True,
                                backlog=1024)
            await extra.start()
        await self._ensure_kubernetes_service()
        await self._ensure_cluster_info()
        self._ready.set()
        log.info("API server listening", extra={"host": self.config.host, "port": self.bound_port})

    async def stop(self) -> None:
        self._ready.clear()
        for t in [*self._tasks, *self.watch_tasks]:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        await self.rbac.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.store.close()

    async def _bootstrap(self) -> None:
        """Default namespaces and virtplane's own CRDs, then serve every CRD in the store."""
        ns_res = self.registry.lookup("", "v1", "namespaces")
        crd_res = self.registry.lookup(*CRD_RESOURCE)
        assert ns_res is not None and crd_res is not None
        sys_opts = objects.WriteOptions(field_manager="virtplane-apiserver", field_validation="Ignore")
        for ns in DEFAULT_NAMESPACES:
            with contextlib.suppress(errors.StatusError):  # AlreadyExists on every restart
                await self.objects.create(ns_res, None, {"metadata": {"name": ns}}, sys_opts)
        for crd in builtin.bundled_crds():
            name = crd["metadata"]["name"]
            existing = await self.objects.try_get(crd_res, None, name)
            try:
                if existing is None:
                    await self.objects.create(crd_res, None, crd, sys_opts)
                elif existing.get("spec") != crd.get("spec"):
                    await self.objects.guaranteed_update(
                        crd_res, None, name, lambda o, spec=crd["spec"]: {**o, "spec": spec}
                    )
            except errors.StatusError as exc:
                if exc.code != 409:
                    raise
        page = await self.objects.list(crd_res, None)
        for st in page.items:
            await self._serve_crd(crd_res, st.obj)
        await kubevirt.ensure_proxy_secret(self)
        await self.rbac.start()
        await rbac_reviews.signing_key(self)  # before any `virtplane user add` reads it
        self._tasks.append(asyncio.create_task(self._watch_crds(crd_res, page.revision)))

    def _endpoint_address(self) -> str:
        """Where in-cluster clients reach this server: the cluster bridge address when node agents live in their
        own network namespaces, else the bind address (loopback on a single host: reachable from the host)."""
        for host in (*self.config.extra_hosts, self.config.host):
            if host not in ("0.0.0.0", "::", ""):
                return host
        return "127.0.0.1"

    async def _ensure_cluster_info(self) -> None:
        """kube-public/cluster-info (kubeadm's shape: `data.kubeconfig`, a kubeconfig with the server and the CA,
        no credentials), rewritten when the address, port or CA changed."""
        cm_res = self.registry.lookup("", "v1", "configmaps")
        if cm_res is None or self.config.ca_cert is None:
            return
        server = f"https://{self._endpoint_address()}:{self.bound_port}"
        kubeconfig = yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "preferences": {}, "users": None, "contexts": None,
            "clusters": [{"name": "", "cluster": {
                "server": server,
                "certificate-authority-data": base64.b64encode(self.config.ca_cert.read_bytes()).decode()}}],
        }, sort_keys=False)
        data = {"kubeconfig": kubeconfig}
        opts = objects.WriteOptions(field_manager="virtplane-apiserver", field_validation="Ignore")
        try:
            existing = await self.objects.try_get(cm_res, "kube-public", "cluster-info")
            if existing is None:
                await self.objects.create(cm_res, "kube-public", {
                    "apiVersion": "v1", "kind": "ConfigMap", "data": data,
                    "metadata": {"name": "cluster-info", "namespace": "kube-public"}}, opts)
            elif existing.get("data") != data:
                await self.objects.guaranteed_update(cm_res, "kube-public", "cluster-info",
                                                     lambda o: {**o, "data": data})
        except errors.StatusError as exc:
            log.warning("cannot maintain kube-public/cluster-info: %s", exc)

    async def _ensure_kubernetes_service(self) -> None:
        """kube-apiserver's bootstrap controller: `default/kubernetes`, a ClusterIP Service on the range's first
        address, port 443 (`https`), with Endpoints and an EndpointSlice naming this server, so pods and guests
        find the API by `kubernetes.default.svc` (cluster DNS) or the ClusterIP. Written on every start: the
        port or address may have changed. With several API servers the last one started is named."""
        svc_res = self.registry.lookup("", "v1", "services")
        ep_res = self.registry.lookup("", "v1", "endpoints")
        slice_res = self.registry.lookup("discovery.k8s.io", "v1", "endpointslices")
        if svc_res is None or ep_res is None or slice_res is None:
            return
        opts = objects.WriteOptions(field_manager="virtplane-apiserver", field_validation="Ignore")
        labels = {"component": "apiserver", "provider": "kubernetes"}
        service = {"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "kubernetes", "namespace": "default", "labels": labels},
                   "spec": {"type": "ClusterIP", "sessionAffinity": "None",
                            "clusterIP": serviceips.kubernetes_service_ip(self.config.service_cidr),
                            "ports": [{"name": "https", "port": 443, "protocol": "TCP",
                                       "targetPort": self.bound_port}]}}  # fmt: skip
        ip, port = self._endpoint_address(), self.bound_port
        endpoints = {"apiVersion": "v1", "kind": "Endpoints",
                     "metadata": {"name": "kubernetes", "namespace": "default",
                                  "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
                     "subsets": [{"addresses": [{"ip": ip}],
                                  "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}]}  # fmt: skip
        endpoint_slice = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                          "metadata": {"name": "kubernetes", "namespace": "default",
                                       "labels": {"kubernetes.io/service-name": "kubernetes"}},
                          "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
                          "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}  # fmt: skip
        # what each object's content is; the rest (metadata, a Service's allocated addresses) stays as stored
        wanted = ((svc_res, service, {"ports": service["spec"]["ports"]}, "spec"),
                  (ep_res, endpoints, {"subsets": endpoints["subsets"]}, ""),
                  (slice_res, endpoint_slice, {"endpoints": endpoint_slice["endpoints"],
                                               "ports": endpoint_slice["ports"]}, ""))
        try:
            for res, obj, fields, under in wanted:
                existing = await self.objects.try_get(res, "default", "kubernetes")
                if existing is None:
                    await self.objects.create(res, "default", copy.deepcopy(obj), opts)
                    continue
                part = (existing.get(under) or {}) if under else existing
                if all(part.get(k) == v for k, v in fields.items()):
                    continue

                def update(o: JSON, fields: JSON = fields, under: str = under) -> JSON:
                    (o.setdefault(under, {}) if under else o).update(copy.deepcopy(fields))
                    return o

                await self.objects.guaranteed_update(res, "default", "kubernetes", update)
        except errors.StatusError as exc:
            # e.g. the address is taken by a user's Service created before this existed: say so, serve anyway
            log.warning("cannot maintain the default/kubernetes Service: %s", exc)

    async def _serve_crd(self, crd_res: resources.Resource, crd: JSON) -> None:
        name = crd["metadata"]["name"]
        if crd["metadata"].get("deletionTimestamp"):
            self.registry.set_crd(name, None)
            return
        try:
            served = self.registry.set_crd(name, crd)
        except Exception as exc:  # a broken user CRD must not take the server down
            log.warning("cannot serve CRD %s: %s", name, exc)
            return
        conds = {c.get("type"): c.get("status") for c in (crd.get("status") or {}).get("conditions") or []}
        if served and (conds.get("Established") != "True" or conds.get("NamesAccepted") != "True"):
            now = objects.now_rfc3339()

            def establish(obj: JSON) -> JSON:
                obj["status"] = {
                    "acceptedNames": obj["spec"]["names"],
                    "storedVersions": [v["name"] for v in obj["spec"]["versions"] if v.get("storage")],
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                         "message": "no conflicts found", "lastTransitionTime": now},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                         "message": "the initial names have been accepted", "lastTransitionTime": now},
                    ],
                }
                return obj

            with contextlib.suppress(errors.StatusError):
                await self.objects.guaranteed_update(crd_res, None, name, establish, subresource="status")

    async def _watch_crds(self, crd_res: resources.Resource, revision: int) -> None:
        rv = str(revision)
        while True:
            try:
                events = await self.objects.watch(crd_res, None, resource_version=rv, match=None)
                async for ev in events:
                    if ev.type == "ERROR":
                        break
                    rv = ev.obj["metadata"]["resourceVersion"]
                    if ev.type == "DELETED":
                        self.registry.set_crd(ev.obj["metadata"]["name"], None)
                    else:
                        await self._serve_crd(crd_res, ev.obj)
            except asyncio.CancelledError:
                raise
            except errors.StatusError:
                # history compacted: re-list and serve what is there now
                page = await self.objects.list(crd_res, None)
                for st in page.items:
                    await self._serve_crd(crd_res, st.obj)
                rv = str(page.revision)
            except Exception:
                log.exception("CRD watch failed; restarting")
                await asyncio.sleep(1)

    # --------------------------------------------------------------- middleware

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        start = time.perf_counter()
        request["vp_verb"] = request.method
        code = 500
        try:
            authorization = request.headers.get("Authorization") or auth.websocket_bearer(request.headers)
            if self._is_public(request.path) or (request.method == "GET" and request.path == CLUSTER_INFO_PATH
                                                 and not authorization):
                request["vp_user"] = auth.ANONYMOUS
            else:
                user = self.authenticator.authenticate(authorization)
                if user is None:
                    user = await self._bootstrap_user(authorization) or \
                        await rbac_reviews.token_user(self, authorization)
                if user is None:
                    raise errors.StatusError(401, "Unauthorized")
                if "Impersonate-User" in request.headers or "Impersonate-Group" in request.headers:
                    user = rbac.impersonate(self.authorizer, user, request.headers)
                request["vp_user"] = user
                if auth.SUPERUSER_GROUPS.isdisjoint(user.groups):  # RBAC: everyone but masters/components
                    rbac.authorize_request(self.authorizer, user, request)
            resp = await handler(request)
            code = resp.status
            if request.method in rbac.WRITE_METHODS and code < 300 and request.get("vp_group") == rbac.GROUP:
                await self.rbac.refresh()  # the RBAC change is in force when the client hears back
            return resp
        except errors.StatusError as exc:
            code = exc.code
            return handlers.status_response(exc)
        except web.HTTPException as exc:
            code = exc.status
            return handlers.status_response(errors.StatusError(exc.status, exc.reason))
        except (ConnectionResetError, asyncio.CancelledError):
            code = 499
            raise
        except Exception as exc:
            log.exception("internal error serving %s %s", request.method, request.path)
            return handlers.status_response(errors.StatusError(500, f"Internal error occurred: {exc}"))
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.observe(request.get("vp_verb", request.method), request.get("vp_resource", ""),
                                 code, elapsed, request.get("vp_group", ""))
            if access_log.isEnabledFor(logging.DEBUG):
                access_log.debug("request", extra={"verb": request.method, "path": request.path_qs,
                                                   "code": code, "ms": round(elapsed * 1000, 2)})

    async def _bootstrap_user(self, authorization: str | None) -> auth.User | None:
        """A bootstrap token (`<id>.<secret>`) checked against its kube-system Secret, read at each request so
        that deleting the Secret revokes it at once."""
        token = (authorization or "").removeprefix("Bearer ").strip()
        m = auth.BOOTSTRAP_TOKEN_RE.match(token)
        secrets_res = self.registry.lookup("", "v1", "secrets")
        if m is None or secrets_res is None:
            return None
        secret = await self.objects.try_get(secrets_res, "kube-system", auth.bootstrap_secret_name(m.group(1)))
        return auth.bootstrap_user(token, secret, datetime.datetime.now(datetime.UTC))

    # --------------------------------------------------------------- endpoints

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        if not self._ready.is_set():
            return web.Response(text="not ready", status=503)
        try:
            await self.store.current_revision()
        except store_api.StoreError as exc:
            return web.Response(text=f"[-]store failed: {exc}", status=503)
        return web.Response(text="ok")

    async def _version(self, request: web.Request) -> web.Response:
        return handlers.json_response({
            **KUBE_VERSION,
            "gitVersion": f"v{KUBE_VERSION['major']}.{KUBE_VERSION['minor']}.0+virtplane-{virtplane.__version__}",
            "gitCommit": "", "gitTreeState": "clean", "buildDate": "", "goVersion": "",
            "compiler": "cpython", "platform": "linux/amd64",
        })

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics.gauges["virtplane_store_revision"] = await self.store.current_revision()
        return web.Response(text=self.metrics.render() + await self._vmi_metrics(), content_type="text/plain")

    async def _vmi_metrics(self) -> str:
        """kubevirt_vmi_phase_count, the cluster-level VMI gauge virt-controller exports, from the store."""
        res = self.registry.lookup("kubevirt.io", "v1", "virtualmachineinstances")
        if res is None:
            return ""
        counts: dict[tuple[str, ...], int] = {}
        for st in (await self.objects.list(res, None)).items:
            obj = st.obj
            ann = obj["metadata"].get("annotations") or {}
            spec = obj.get("spec") or {}
            key = (
                (obj.get("status") or {}).get("nodeName") or "",
                str((obj.get("status") or {}).get("phase") or "pending").lower(),
                ann.get("vm.kubevirt.io/os", "<none>"),
                ann.get("vm.kubevirt.io/workload", "<none>"),
                ann.get("vm.kubevirt.io/flavor", "<none>"),
                ann.get("kubevirt.io/instancetype-name", "<none>") if spec else "<none>",
                ann.get("kubevirt.io/preference-name", "<none>"),
            )
            counts[key] = counts.get(key, 0) + 1
        lines = ["# HELP kubevirt_vmi_phase_count Sum of VMIs per phase and node.",
                 "# TYPE kubevirt_vmi_phase_count gauge"]
        names = ("node", "phase", "os", "workload", "flavor", "instance_type", "preference")
        for key, n in sorted(counts.items()):
            labels = ",".join(f'{k}="{v}"' for k, v in zip(names, key, strict=True))
            lines.append(f"kubevirt_vmi_phase_count{{{labels}}} {n}")
        return "\n".join(lines) + "\n"

    def _advertise(self, request: web.Request) -> str:
        return self.config.advertise_address or request.host

    async def _api(self, request: web.Request) -> web.Response:
        if "as=APIGroupDiscoveryList" in request.headers.get("Accept", ""):
            return self._aggregated(request, legacy=True)
        return handlers.json_response(discovery.api_versions(self._advertise(request)))

    async def _apis(self, request: web.Request) -> web.Response:
        if "as=APIGroupDiscoveryList" in request.headers.get("Accept", ""):
            return self._aggregated(request, legacy=False)
        return handlers.json_response(discovery.api_group_list(self.registry))

    def _aggregated(self, request: web.Request, legacy: bool) -> web.Response:
        body = discovery.aggregated_discovery(self.registry, legacy)
        return web.Response(
            body=orjson.dumps(body),
            headers={"Content-Type": "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
                     "ETag": f'"{self.registry.etag()}"'},
        )

    def _cached(self, key: Any, build: Any) -> bytes:
        full_key = (key, self.registry.generation)
        data = self._openapi_cache.get(full_key)
        if data is None:
            data = orjson.dumps(build())
            self._openapi_cache = {k: v for k, v in self._openapi_cache.items() if k[1] == full_key[1]}
            self._openapi_cache[full_key] = data
        return data

    async def _openapi_v2(self, request: web.Request) -> web.Response:
        data = self._cached("v2", lambda: openapi.openapi_v2(self.registry.all()))
        return web.Response(body=data, content_type="application/json",
                            headers={"ETag": f'"{hashlib.sha256(data).hexdigest()[:32]}"'})

    async def _openapi_v3_index(self, request: web.Request) -> web.Response:
        data = self._cached("v3", lambda: openapi.openapi_v3_index(self.registry.all()))
        return web.Response(body=data, content_type="application/json")

    async def _openapi_v3(self, request: web.Request) -> web.Response:
        path = request.match_info["path"].strip("/")
        gv = path[len("api/"):] if path.startswith("api/") else path[len("apis/"):] if path.startswith("apis/") else ""
        if not gv or not any(r.group_version == gv for r in self.registry.all()):
            raise errors.StatusError(404, f"openapi document for {path!r} not found")
        data = self._cached(("v3", gv), lambda: openapi.openapi_v3(self.registry.all(), gv))
        return web.Response(body=data, content_type="application/json",
                            headers={"Cache-Control": "public, immutable",
                                     "ETag": f'"{hashlib.sha256(data).hexdigest()[:32]}"'})

    async def _dispatch_core(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if path == "/api/v1":
            return handlers.json_response(discovery.api_resource_list(self.registry, "", "v1"))
        target = handlers.parse_target("/api", path)
        if target is None:
            raise errors.StatusError(404, "the server could not find the requested resource")
        return await self.resource_handler.handle(request, target)

    async def _dispatch_apis(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        segs = path.split("/")[2:]
        if len(segs) == 1:
            doc = discovery.api_group(self.registry, segs[0])
            if doc is None:
                raise errors.StatusError(404, "the server could not find the requested resource")
            return handlers.json_response(doc)
        if len(segs) == 2:
            doc = discovery.api_resource_list(self.registry, segs[0], segs[1])
            if doc is None:
                raise errors.StatusError(404, "the server could not find the requested resource")
            return handlers.json_response(doc)
        if segs[0] == discovery.KUBEVIRT_SUBRESOURCES_GROUP:
            return await self._kubevirt_subresource(request, segs)
        target = handlers.parse_target("/apis", path)
        if target is None:
            raise errors.StatusError(404, "the server could not find the requested resource")
        return await self.resource_handler.handle(request, target)

    async def _kubevirt_subresource(self, request: web.Request, segs: list[str]) -> web.StreamResponse:
        """/apis/subresources.kubevirt.io/{v}/namespaces/{ns}/{plural}/{name}/{sub...}"""
        version, rest = segs[1], segs[2:]
        if version not in discovery.KUBEVIRT_SUBRESOURCE_VERSIONS:
            raise errors.StatusError(404, "the server could not find the requested resource")
        if rest in (["version"], ["healthz"]):
            if rest == ["healthz"]:
                return web.Response(text="ok")
            return await self._version(request)
        if len(rest) < 5 or rest[0] != "namespaces":
            raise errors.StatusError(404, "the server could not find the requested resource")
        ns, plural, name, sub = rest[1], rest[2], rest[3], "/".join(rest[4:])
        res = self.registry.lookup("kubevirt.io", "v1", plural)
        if res is None:
            raise errors.StatusError(404, f"the server could not find the requested resource ({plural})")
        request["vp_resource"] = f"{plural}/{sub.split('/')[0]}"
        request["vp_group"] = discovery.KUBEVIRT_SUBRESOURCES_GROUP
        request["vp_verb"] = request.method
        handler = self.subresource_handler(res, sub)
        if handler is None:
            raise errors.StatusError(404, f"the server could not find the requested resource ({plural}/{sub})")
        return await handler(handlers.SubresourceRequest(request, self, res, ns, name, sub))

    async def _not_found(self, request: web.Request) -> web.Response:
        raise errors.StatusError(404, "the server could not find the requested resource")
