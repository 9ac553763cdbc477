"""An async Kubernetes REST client over aiohttp, configured from a kubeconfig.

Controllers, node agents and virtctl reach the cluster only through this client.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import yaml

JSON = dict[str, Any]


class APIError(Exception):
    """A non-2xx answer; `status` is the server's metav1.Status (or a synthesized one)."""

    def __init__(self, code: int, status: JSON) -> None:
        self.code = code
        self.status = status
        self.reason = status.get("reason", "")
        super().__init__(f"{code} {self.reason}: {status.get('message', '')}")


class NotFound(APIError):
    pass


class Conflict(APIError):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class GVR:
    """group/version/resource with scope: what a URL needs."""

    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace)}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name)}"
        if sub:
            base += f"/{sub}"
        return base


@dataclasses.dataclass(slots=True)
class ClientConfig:
    server: str
    token: str = ""
    ca_data: bytes | None = None
    insecure: bool = False
    namespace: str = "default"

    @classmethod
    def from_kubeconfig(cls, path: str | Path | None = None, context: str | None = None) -> ClientConfig:
        if path is None:
            env = os.environ.get("KUBECONFIG", "")
            path = env.split(":")[0] if env else Path.home() / ".kube" / "config"
        data = yaml.safe_load(Path(path).read_text())
        ctx_name = context or data.get("current-context")
        ctx = next(c["context"] for c in data["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in data["clusters"] if c["name"] == ctx["cluster"])
        user = next((u["user"] for u in data.get("users", []) if u["name"] == ctx.get("user")), {})
        ca = None
        if cluster.get("certificate-authority-data"):
            ca = base64.b64decode(cluster["certificate-authority-data"])
        elif cluster.get("certificate-authority"):
            ca = Path(cluster["certificate-authority"]).read_bytes()
        token = user.get("token", "")
        if not token and user.get("tokenFile"):
            token = Path(user["tokenFile"]).read_text().strip()
        return cls(
            server=cluster["server"].rstrip("/"),
            token=token,
            ca_data=ca,
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
            namespace=ctx.get("namespace", "default"),
        )

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        if self.ca_data:
            return ssl.create_default_context(cadata=self.ca_data.decode())
        return ssl.create_default_context()


class Client:
    def __init__(self, config: ClientConfig, *, user_agent: str = "virtplane") -> None:
        self.config = config
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": self._user_agent, "Accept": "application/json"}
            if self.config.token:
                headers["Authorization"] = f"Bearer {self.config.token}"
            # No pool limit: every informer holds one long-lived watch connection, and a capped pool
            # would let watches starve every other request (HTTP/1.1 has no multiplexing).
            conn = aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=0)
            self._session = aiohttp.ClientSession(self.config.server, headers=headers, connector=conn,
                                                  json_serialize=lambda o: orjson.dumps(o).decode())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(method, path, data=data, params=params, headers=headers) as resp:
            raw = await resp.read()
            return self._result(resp.status, raw)

    @staticmethod
    def _result(code: int, raw: bytes) -> Any:
        try:
            payload = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            payload = raw.decode(errors="replace")
        if code >= 400:
            status = payload if isinstance(payload, dict) else {"message": str(payload), "code": code}
            cls = NotFound if code == 404 else Conflict if code == 409 else APIError
            raise cls(code, status)
        return payload

    # ------------------------------------------------------------- verbs

    async def get(self, gvr: GVR, name: str, namespace: str | None = None) -> JSON:
        return await self.request("GET", gvr.path(namespace, name))

    async def list(self, gvr: GVR, namespace: str | None = None, **params: str) -> JSON:
        return await self.request("GET", gvr.path(namespace), params=params or None)

    async def create(self, gvr: GVR, obj: JSON, namespace: str | None = None) -> JSON:
        ns = namespace or obj.get("metadata", {}).get("namespace")
        return await self.request("POST", gvr.path(ns), body=obj)

    async def update(self, gvr: GVR, obj: JSON, *, subresource: str = "") -> JSON:
        meta = obj["metadata"]
        return await self.request("PUT", gvr.path(meta.get("namespace"), meta["name"], subresource), body=obj)

    async def update_status(self, gvr: GVR, obj: JSON) -> JSON:
        return await self.update(gvr, obj, subresource="status")

    async def patch(
        self,
        gvr: GVR,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        patch_type: str = "merge",
        subresource: str = "",
    ) -> JSON:
        ctype = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "strategic": "application/strategic-merge-patch+json",
        }[patch_type]
        return await self.request("PATCH", gvr.path(namespace, name, subresource), body=patch, content_type=ctype)

    async def delete(
        self,
        gvr: GVR,
        name: str,
        namespace: str | None = None,
        *,
        propagation: str | None = None,
        preconditions: JSON | None = None,
    ) -> JSON:
        body: JSON = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation:
            body["propagationPolicy"] = propagation
        if preconditions:
            body["preconditions"] = preconditions
        return await self.request("DELETE", gvr.path(namespace, name), body=body)

    async def watch(
        self,
        gvr: GVR,
        namespace: str | None = None,
        *,
        resource_version: str = "",
        timeout_seconds: int = 0,
        bookmarks: bool = True,
        **params: str,
    ) -> AsyncIterator[JSON]:
        """Yields watch events ({"type", "object"}); ends when the server closes the stream."""
        q = {"watch": "true", **params}
        if resource_version:
            q["resourceVersion"] = resource_version
        if timeout_seconds:
            q["timeoutSeconds"] = str(timeout_seconds)
        if bookmarks:
            q["allowWatchBookmarks"] = "true"
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.session.get(gvr.path(namespace), params=q, timeout=timeout) as resp:
            if resp.status >= 400:
                self._result(resp.status, await resp.read())
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield orjson.loads(line)


def write_temp_ca(ca_data: bytes) -> str:
    """Some tools want a CA file path; write the bundle to a private temp file."""
    fd, path = tempfile.mkstemp(prefix="virtplane-ca-", suffix=".crt")
    with contextlib.closing(os.fdopen(fd, "wb")) as f:
        f.write(ca_data)
    return path
