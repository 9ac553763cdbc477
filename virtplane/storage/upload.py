"""CDI uploads: tokens, and the upload server that receives image bodies next to the volume.

Flow (the same endpoints as CDI's upload proxy; see virtplane.apiserver.upload for the proxy half):

    virtctl --POST UploadTokenRequest--> API server: status.token (HMAC-signed: namespace, PVC, expiry)
    virtctl --POST /v1beta1/upload[-async|-form|-form-async], Bearer token--> API server (proxy)
        --same request--> upload server of the controller that owns the volume (PVC annotation
        `upload.virtplane.io/endpoint`) --> streaming pipeline (storage.importer) --> volume

The token key is shared through the Secret `kube-system/virtplane-upload-token-key`, so any API server can
issue tokens the upload server accepts. Tokens expire after `TOKEN_TTL` seconds (CDI's five minutes).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from virtplane.storage import importer

log = logging.getLogger(__name__)

TOKEN_SECRET = ("kube-system", "virtplane-upload-token-key")
TOKEN_TTL = 300.0
ANN_ENDPOINT = "upload.virtplane.io/endpoint"
UPLOAD_PATHS = ("/v1beta1/upload", "/v1beta1/upload-async", "/v1beta1/upload-form", "/v1beta1/upload-form-async")
FORM_FIELD = "file"


class TokenError(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(key: bytes, namespace: str, pvc: str, *, ttl: float = TOKEN_TTL, now: float | None = None) -> str:
    payload = json.dumps({"ns": namespace, "pvc": pvc, "exp": int((now or time.time()) + ttl)},
                         separators=(",", ":")).encode()
    sig = hmac.new(key, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(sig)}"


def verify_token(key: bytes, token: str, *, now: float | None = None) -> tuple[str, str]:
    """(namespace, pvc) of a valid token; TokenError otherwise."""
    try:
        payload_b64, sig_b64 = token.strip().split(".", 1)
        payload = _unb64(payload_b64)
        sig = _unb64(sig_b64)
    except (ValueError, TypeError) as err:
        raise TokenError("malformed upload token") from err
    if not hmac.compare_digest(hmac.new(key, payload, hashlib.sha256).digest(), sig):
        raise TokenError("invalid upload token")
    try:
        claims = json.loads(payload)
        ns, pvc, exp = str(claims["ns"]), str(claims["pvc"]), float(claims["exp"])
    except (ValueError, KeyError, TypeError) as err:
        raise TokenError("malformed upload token") from err
    if exp < (now or time.time()):
        raise TokenError("the upload token has expired; request a new one")
    return ns, pvc


def bearer(header: str | None) -> str:
    if not header or not header.startswith("Bearer "):
        return ""
    return header[len("Bearer "):].strip()


# --------------------------------------------------------------------------------------------------
# the upload server (runs where the volume is)


@dataclasses.dataclass(slots=True)
class UploadTarget:
    """Registered by the DataVolume controller while a DataVolume is UploadReady."""

    namespace: str
    pvc: str
    target: Path  # temp image path inside the volume
    work_dir: Path
    limit: int
    preallocate: bool
    on_progress: Callable[[float], None]
    on_done: Callable[[importer.ImportResult], Awaitable[None]]
    on_error: Callable[[importer.TransferError], Awaitable[None]]
    busy: bool = False


class UploadServer:
    """An aiohttp server for upload bodies; one per controller process."""

    def __init__(self, key_source: Callable[[], Awaitable[bytes]], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._key_source = key_source
        self.host = host
        self.port = port
        self.targets: dict[tuple[str, str], UploadTarget] = {}
        self._runner: web.AppRunner | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 62)
        for path in UPLOAD_PATHS:
            app.router.add_post(path, self._handle)
            app.router.add_put(path, self._handle)
        app.router.add_get("/healthz", lambda r: _text(200, "ok"))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if server is not None and server.sockets:  # type: ignore[attr-defined]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        for t in list(self._background):
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            ns, pvc = verify_token(await self._key_source(), bearer(request.headers.get("Authorization")))
        except TokenError as err:
            return _text(401, str(err))
        target = self.targets.get((ns, pvc))
        if target is None:
            return _text(503, f"PVC {ns}/{pvc} is not ready for an upload (is its DataVolume UploadReady?)")
        if target.busy:
            return _text(409, f"an upload to PVC {ns}/{pvc} is already in progress")
        target.busy = True
        is_async = request.path.endswith("-async")
        form = "/upload-form" in request.path
        try:
            result = await self._receive(request, target, form)
        except importer.TransferError as err:
            target.busy = False
            await target.on_error(err)
            code = 400 if not err.transient else 503
            return _text(code, f"upload failed: {err.message}")
        except (ConnectionResetError, asyncio.IncompleteReadError, OSError) as err:
            target.busy = False
            e = importer.TransferError(importer.TRANSFER_FAILED, f"the upload was interrupted: {err}; retry it",
                                       transient=True)
            await target.on_error(e)
            return _text(400, e.message)
        if is_async:
            task = asyncio.create_task(self._finish(target, result))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return _text(200, "")
        ok, message = await self._finish(target, result)
        return _text(200 if ok else 400, message)

    async def _receive(self, request: web.Request, target: UploadTarget, form: bool) -> importer.PipelineResult:
        pipeline = importer.Pipeline(target.target, target.work_dir, target.limit)
        total = request.content_length or 0
        done = 0
        last = 0.0
        try:
            if form:
                reader = await request.multipart()
                part: Any = None
                while True:
                    part = await reader.next()
                    if part is None:
                        raise importer.TransferError(importer.INVALID_IMAGE,
                                                     f"the form has no {FORM_FIELD!r} field")
                    if getattr(part, "name", None) == FORM_FIELD:
                        break
                while True:
                    chunk = await part.read_chunk(importer.CHUNK)
                    if not chunk:
                        break
                    done += len(chunk)
                    await asyncio.to_thread(pipeline.feed, memoryview(chunk))
            else:
                buf = bytearray()
                async for chunk in request.content.iter_chunked(1 << 20):
                    buf += chunk
                    if len(buf) < importer.CHUNK:
                        continue
                    done += len(buf)
                    await asyncio.to_thread(pipeline.feed, memoryview(bytes(buf)))
                    buf.clear()
                    now = time.monotonic()
                    if total and now - last > 0.5:
                        last = now
                        target.on_progress(0.95 * done / total)
                if buf:
                    done += len(buf)
                    await asyncio.to_thread(pipeline.feed, memoryview(bytes(buf)))
            if total and done < total and not form:  # a form's length counts its envelope too
                raise importer.TransferError(importer.TRANSFER_FAILED, f"the upload ended after {done} of {total} "
                                             "bytes; retry it", transient=True)
            if done == 0:
                raise importer.TransferError(importer.INVALID_IMAGE, "the upload is empty")
            return await asyncio.to_thread(pipeline.finish)
        except BaseException:
            pipeline.abort()
            raise

    async def _finish(self, target: UploadTarget, result: importer.PipelineResult) -> tuple[bool, str]:
        try:
            done = await importer.finish_image(result, target.target, target.limit, preallocate=target.preallocate)
            await target.on_done(done)
            self.targets.pop((target.namespace, target.pvc), None)
            return True, ""
        except importer.TransferError as err:
            await target.on_error(err)
            return False, f"upload failed: {err.message}"
        finally:
            target.busy = False


def _text(code: int, text: str) -> web.Response:
    return web.Response(status=code, text=text)


async def wait_closed(tasks: set[asyncio.Task[None]]) -> None:
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t
