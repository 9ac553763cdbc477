"""A throwaway Kubernetes API endpoint that records what real kubectl sends.

Plain HTTP on 127.0.0.1 with a kubeconfig pointing at it; it serves just enough discovery for the
`kubectl create ...` family, `kubectl drain`, `kubectl create token` and `kubectl debug`, records every
request, and answers a POST/PUT with the object it received (decoded with the module under test: a
body it cannot decode gets a 400 carrying the reason, which the test then shows).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from virtplane.api.protobuf import CONTENT_TYPE, ProtobufDecodeError, decode_k8s_protobuf

# The version the fake server reports; Google Cloud SDK's kubectl dispatcher picks the matching kubectl.
SERVER_MINOR = "32"

_CORE = [
    ("namespaces", "Namespace", False), ("configmaps", "ConfigMap", True), ("secrets", "Secret", True),
    ("services", "Service", True), ("pods", "Pod", True), ("serviceaccounts", "ServiceAccount", True),
    ("resourcequotas", "ResourceQuota", True), ("nodes", "Node", False),
]
_GROUPS: dict[str, list[tuple[str, str, bool]]] = {
    "apps/v1": [("deployments", "Deployment", True), ("replicasets", "ReplicaSet", True)],
    "batch/v1": [("jobs", "Job", True), ("cronjobs", "CronJob", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "networking.k8s.io/v1": [("ingresses", "Ingress", True)],
    "rbac.authorization.k8s.io/v1": [
        ("roles", "Role", True), ("rolebindings", "RoleBinding", True),
        ("clusterroles", "ClusterRole", False), ("clusterrolebindings", "ClusterRoleBinding", False),
    ],
    "scheduling.k8s.io/v1": [("priorityclasses", "PriorityClass", False)],
    "authentication.k8s.io/v1": [("tokenreviews", "TokenReview", False)],
    "certificates.k8s.io/v1": [("certificatesigningrequests", "CertificateSigningRequest", False)],
}
_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def _resources(rows: list[tuple[str, str, bool]]) -> list[dict[str, Any]]:
    return [
        {"name": name, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind, "verbs": _VERBS}
        for name, kind, namespaced in rows
    ]


def discovery(path: str) -> Any:
    if path == "/version":
        return {"major": "1", "minor": SERVER_MINOR, "gitVersion": f"v1.{SERVER_MINOR}.0", "platform": "linux/amd64"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
    if path == "/api/v1":
        subresources = [
            # kubectl drain looks for this to know evictions are supported (and in which version).
            {"name": "pods/eviction", "singularName": "", "namespaced": True, "group": "policy", "version": "v1",
             "kind": "Eviction", "verbs": ["create"]},
            {"name": "serviceaccounts/token", "singularName": "", "namespaced": True,
             "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]},
        ]
        return {"kind": "APIResourceList", "groupVersion": "v1", "resources": _resources(_CORE) + subresources}
    if path == "/apis":
        groups = []
        for gv in _GROUPS:
            group, version = gv.split("/")
            ref = {"groupVersion": gv, "version": version}
            groups.append({"name": group, "versions": [ref], "preferredVersion": ref})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    m = re.fullmatch(r"/apis/([^/]+/[^/]+)", path)
    if m and m.group(1) in _GROUPS:
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": m.group(1),
                "resources": _resources(_GROUPS[m.group(1)])}
    return None


@dataclasses.dataclass
class Recorded:
    method: str
    path: str  # with the query string
    content_type: str
    body: bytes


class FakeAPIServer:
    def __init__(self, home: pathlib.Path) -> None:
        self.home = home
        self.requests: list[Recorded] = []
        # (method, path without query) -> JSON reply; None means 404. Tests add what their command reads.
        self.replies: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.kubeconfig = home / "kubeconfig"
        self.kubeconfig.write_text(
            json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}],
            })
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.replies.clear()

    def writes(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.method in ("POST", "PUT")]

    def kubectl(self, binary: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "KUBECONFIG": str(self.kubeconfig),
            # kubectl caches discovery under ~/.kube/cache: keep it away from the real home.
            "HOME": str(self.home),
        }
        proc = subprocess.run([binary, *args], env=env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{binary} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep pytest's output clean
                pass

            def _reply(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._reply(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                   "code": code, "reason": reason, "message": message})

            def _record(self) -> Recorded:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                rec = Recorded(self.command, self.path, self.headers.get("Content-Type", ""), body)
                with fake._lock:
                    fake.requests.append(rec)
                return rec

            def do_GET(self) -> None:
                self._record()
                path = self.path.split("?")[0]
                obj = fake.replies.get(("GET", path)) or discovery(path)
                if obj is None:
                    self._status(404, "NotFound", f"{path} not found")
                else:
                    self._reply(200, obj)

            def do_PATCH(self) -> None:
                self._record()
                obj = fake.replies.get(("PATCH", self.path.split("?")[0]))
                if obj is None:
                    self._status(404, "NotFound", "not found")
                else:
                    self._reply(200, obj)

            def _write(self) -> None:
                rec = self._record()
                reply = fake.replies.get((self.command, self.path.split("?")[0]))
                try:
                    if rec.content_type == CONTENT_TYPE:
                        obj = decode_k8s_protobuf(rec.body)
                    else:
                        obj = json.loads(rec.body)
                except (ProtobufDecodeError, ValueError) as exc:
                    self._status(400, "BadRequest", f"cannot decode the body: {exc}")
                    return
                self._reply(201 if self.command == "POST" else 200, reply if reply is not None else obj)

            do_POST = _write
            do_PUT = _write

        return Handler


@pytest.fixture(scope="module")
def fake_apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeAPIServer]:
    server = FakeAPIServer(tmp_path_factory.mktemp("kubectl-home"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake(fake_apiserver: FakeAPIServer) -> Iterator[FakeAPIServer]:
    fake_apiserver.reset()
    yield fake_apiserver
    fake_apiserver.reset()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every test taking `kubectl` runs once per kubectl binary that sends protobuf.
    if "kubectl" in metafunc.fixturenames:
        binaries = kubectl_binaries()
        metafunc.parametrize("kubectl", binaries, ids=[pathlib.Path(b).name for b in binaries])


def kubectl_binaries() -> list[str]:
    """kubectl on PATH and, for Google Cloud SDK's dispatcher, its versioned kubectl.1.NN siblings.

    Only kubectl >= 1.32 sends protobuf (older ones send JSON), so older siblings are left out.
    """
    found = shutil.which("kubectl")
    if not found:
        return []
    real = pathlib.Path(os.path.realpath(found))
    out = [found]
    for sibling in sorted(real.parent.glob("kubectl.1.*")):
        m = re.fullmatch(r"kubectl\.1\.(\d+)", sibling.name)
        if m and int(m.group(1)) >= 32:
            out.append(str(sibling))
    return out
