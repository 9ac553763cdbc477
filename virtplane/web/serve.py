"""Serve the built web console under /console/ from the API server.

The route is public: the files are the same for everyone and hold no data. The app asks for a bearer token
and then talks only to the public API (with watches), so authorization stays where it is for every client.
Client-side routes live in the URL fragment, so every path the server sees is a real file or index.html.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

DIST = Path(__file__).resolve().parent / "dist"
PREFIX = "/console/"
NOT_BUILT = "The web console is not built: run `make setup` (npm ci && npm run build in virtplane/web)."


class RouteHost(Protocol):
    def add_route(self, method: str, path: str, handler: Any, *, public: bool = False) -> None: ...


def register(server: RouteHost, dist: Path = DIST) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        # returned, not raised: the API server's middleware turns raised HTTP errors into Status bodies
        return web.Response(status=302, headers={"Location": PREFIX})

    async def files(request: web.Request) -> web.StreamResponse:
        return serve_file(dist, request.match_info["tail"])

    server.add_route("GET", PREFIX.rstrip("/"), redirect, public=True)
    server.add_route("GET", PREFIX + "{tail:.*}", files, public=True)


def serve_file(dist: Path, tail: str) -> web.StreamResponse:
    root = dist.resolve()
    index = root / "index.html"
    if not index.is_file():
        return web.Response(status=503, text=NOT_BUILT, content_type="text/plain")
    target = (root / tail).resolve() if tail else index
    if not target.is_relative_to(root) or not target.is_file():
        if tail.startswith("assets/"):
            return web.Response(status=404, text="not found", content_type="text/plain")
        target = index  # an unknown path is the app's, which shows its own "not found"
    headers = {"X-Content-Type-Options": "nosniff"}
    if target.parent.name == "assets" and target.parent.parent == root:
        headers["Cache-Control"] = "public, max-age=31536000, immutable"  # Vite puts a content hash in the names
    else:
        headers["Cache-Control"] = "no-cache"
    ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return web.FileResponse(target, headers={**headers, "Content-Type": ctype})
