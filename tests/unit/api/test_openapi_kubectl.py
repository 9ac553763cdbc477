"""Real kubectl against a throwaway server that serves only discovery and our OpenAPI documents.

Proves `kubectl explain` works on the v3 documents and that kubectl chooses server-side field
validation (it sends `fieldValidation=Strict` instead of validating client-side).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from virtplane.api import builtin, openapi, resources

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed"),
]

VM = """
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: vm-cirros
spec:
  runStrategy: Halted
  template:
    spec:
      domain:
        devices: {}
        resources: {requests: {memory: 128Mi}}
"""


class _Server:
    """Discovery (legacy format), /openapi/v2, /openapi/v3; anything else 404s and is recorded."""

    def __init__(self, served: list[resources.Resource]) -> None:
        self.served = served
        self.misses: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None

    def _resource_list(self, gv: str) -> dict[str, object]:
        out: list[dict[str, object]] = []
        for r in self.served:
            if r.group_version != gv:
                continue
            out.append({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
                        "verbs": list(r.verbs), "shortNames": list(r.short_names),
                        "categories": list(r.categories)})
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path.rstrip("/")
        if path == "/api":
            return web.json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
        if path == "/apis":
            groups: dict[str, list[str]] = {}
            for r in self.served:
                if r.group:
                    groups.setdefault(r.group, [])
                    if r.version not in groups[r.group]:
                        groups[r.group].append(r.version)
            return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in sorted(groups.items())]})
        if path == "/api/v1":
            return web.json_response(self._resource_list("v1"))
        if path.startswith("/apis/") and path.count("/") == 3:
            return web.json_response(self._resource_list(path[len("/apis/"):]))
        if path == "/openapi/v3":
            return web.Response(body=orjson.dumps(openapi.openapi_v3_index(self.served)),
                                content_type="application/json")
        if path.startswith("/openapi/v3/"):
            doc = openapi.openapi_v3(self.served, path[len("/openapi/v3/"):])
            return web.Response(body=orjson.dumps(doc), content_type="application/json")
        if path == "/version":
            return web.json_response({"major": "1", "minor": "32", "gitVersion": "v1.32.0"})
        self.misses.append(f"{request.method} {request.path_qs}")
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                  "reason": "NotFound", "message": "not served by this test"}, status=404)

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

    def stop(self) -> None:
        async def cleanup() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    served = builtin.builtin_resources() + [r for c in builtin.bundled_crds() for r in builtin.resources_from_crd(c)]
    srv = _Server(served)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def kubectl(server: _Server, tmp_path: Path) -> object:
    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{server.port}'}}}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u, namespace: default}}]\nusers: [{name: u, user: {}}]\n"
    )
    env = {**os.environ, "KUBECONFIG": str(config), "HOME": str(tmp_path)}

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(["kubectl", *args], env=env, input=stdin, capture_output=True, text=True,
                              timeout=60, check=False)

    return run


def test_explain_field(kubectl: object) -> None:
    out = kubectl("explain", "vm.spec.runStrategy")  # type: ignore[operator]
    assert out.returncode == 0, out.stderr
    assert "GROUP:      kubevirt.io" in out.stdout and "KIND:       VirtualMachine" in out.stdout
    assert "FIELD: runStrategy <string>" in out.stdout
    assert "Running state indicates the requested running state" in out.stdout


def test_explain_recursive(kubectl: object) -> None:
    out = kubectl("explain", "vm.spec", "--recursive")  # type: ignore[operator]
    assert out.returncode == 0, out.stderr
    for line in ("  dataVolumeTemplates\t<[]Object>", "  runStrategy\t<string>", "  template\t<Object> -required-",
                 "      domain\t<Object> -required-", "          disks\t<[]Object>"):
        assert line in out.stdout, line


def test_explain_metadata_and_other_groups(kubectl: object) -> None:
    meta = kubectl("explain", "vmi.metadata.labels")  # type: ignore[operator]
    assert meta.returncode == 0, meta.stderr
    assert "FIELD: labels <map[string]string>" in meta.stdout
    dv = kubectl("explain", "dv.spec.source.http.url")  # type: ignore[operator]
    assert dv.returncode == 0 and "KIND:       DataVolume" in dv.stdout
    cm = kubectl("explain", "configmap.data")  # type: ignore[operator]
    assert cm.returncode == 0 and "FIELD: data <map[string]string>" in cm.stdout
    nad = kubectl("explain", "net-attach-def.spec.config")  # type: ignore[operator]
    assert nad.returncode == 0 and "JSON-formatted CNI configuration" in nad.stdout


def test_kubectl_asks_the_server_to_validate(kubectl: object, server: _Server) -> None:
    server.misses.clear()
    kubectl("create", "-f", "-", stdin=VM)  # type: ignore[operator]
    kubectl("create", "configmap", "cm1", "--from-literal=a=b")  # type: ignore[operator]
    posts = [m for m in server.misses if m.startswith("POST ")]
    assert any("/apis/kubevirt.io/v1/namespaces/default/virtualmachines?" in p and "fieldValidation=Strict" in p
               for p in posts), server.misses
    assert any("/api/v1/namespaces/default/configmaps?" in p and "fieldValidation=Strict" in p for p in posts), posts
