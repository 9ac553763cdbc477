"""The web console's static route on a real in-process API server: public, index fallback, no path escape,
and the websocket bearer-token subprotocol browsers use (they cannot set an Authorization header)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from virtplane.apiserver import auth, server
from virtplane.store import open_store
from virtplane.web import serve


@pytest_asyncio.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, str]]:
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<html>console</html>")
    (dist / "assets" / "app-1234.js").write_text("console.log(1)")
    (tmp_path / "secret.txt").write_text("outside")
    monkeypatch.setattr(serve, "DIST", dist)
    token = auth.ensure_admin_token(tmp_path / "tokens.csv")
    srv = server.APIServer(open_store(f"sqlite://{tmp_path / 'state.db'}"),
                           server.ServerConfig(host="127.0.0.1", port=0, token_file=tmp_path / "tokens.csv"))
    # register() captured DIST at import time through its default: re-register against the test's files
    srv._routes = [r for r in srv._routes if not r[1].startswith("/console")]
    serve.register(srv, dist)
    await srv.start()
    try:
        yield f"http://127.0.0.1:{srv.bound_port}", token
    finally:
        await srv.stop()


async def test_console_files_are_public_and_unknown_paths_get_the_app(api: tuple[str, str]) -> None:
    url, _ = api
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/console", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/console/"
        async with s.get(f"{url}/console/") as r:
            assert r.status == 200 and "console" in await r.text()
            assert r.content_type == "text/html" and r.headers["Cache-Control"] == "no-cache"
        async with s.get(f"{url}/console/assets/app-1234.js") as r:
            assert r.status == 200 and "immutable" in r.headers["Cache-Control"]
            assert "javascript" in r.content_type
        async with s.get(f"{url}/console/vms/default/x") as r:
            assert r.status == 200 and "console" in await r.text()
        async with s.get(f"{url}/console/assets/missing.js") as r:
            assert r.status == 404
        async with s.get(f"{url}/console/%2e%2e/secret.txt") as r:
            assert "outside" not in await r.text()
        # the API itself stays protected
        async with s.get(f"{url}/api/v1/namespaces") as r:
            assert r.status == 401


async def test_unbuilt_console_says_how_to_build_it(tmp_path: Path) -> None:
    resp = serve.serve_file(tmp_path / "nothing", "")
    assert resp.status == 503
    assert "make setup" in resp.text  # type: ignore[attr-defined]


def test_websocket_bearer_protocol() -> None:
    enc = base64.urlsafe_b64encode(b"tok-en_1").decode().rstrip("=")
    offered = f"plain.kubevirt.io, {auth.WEBSOCKET_TOKEN_PROTOCOL}{enc}"
    headers = {"Upgrade": "websocket", "Sec-WebSocket-Protocol": offered}
    assert auth.websocket_bearer(headers) == "Bearer tok-en_1"
    assert auth.websocket_bearer({"Sec-WebSocket-Protocol": f"{auth.WEBSOCKET_TOKEN_PROTOCOL}{enc}"}) is None
    assert auth.websocket_bearer({"Upgrade": "websocket", "Sec-WebSocket-Protocol": "plain.kubevirt.io"}) is None
    bad = {"Upgrade": "websocket", "Sec-WebSocket-Protocol": f"{auth.WEBSOCKET_TOKEN_PROTOCOL}\xff"}
    assert auth.websocket_bearer(bad) is None


async def test_websocket_token_authenticates_an_upgrade(api: tuple[str, str]) -> None:
    url, token = api
    enc = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    async with aiohttp.ClientSession() as s:
        # no Authorization header: the subprotocol carries the token; the VMI does not exist, so 404, not 401
        path = "/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachineinstances/nope/console"
        hdrs = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
                "Sec-WebSocket-Protocol": f"plain.kubevirt.io, {auth.WEBSOCKET_TOKEN_PROTOCOL}{enc}"}
        async with s.get(url + path, headers=hdrs) as r:
            assert r.status == 404
        hdrs["Sec-WebSocket-Protocol"] = f"plain.kubevirt.io, {auth.WEBSOCKET_TOKEN_PROTOCOL}bm9wZQ"
        async with s.get(url + path, headers=hdrs) as r:
            assert r.status == 401
