"""The cluster's own OCI registry (Debian's docker-registry) and pushing OCI image layouts to a registry.

`virtplane up` runs one on 127.0.0.1 so containerDisks work out of the box (OpenShift ships an
internal registry too); tests run their own the same way. Pushing speaks the registry HTTP API v2.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

REGISTRY_BINARY = "/usr/bin/docker-registry"


class RegistryError(Exception):
    """The registry would not start, or refused a push; the message says which step."""


@dataclasses.dataclass
class LocalRegistry:
    proc: subprocess.Popen[bytes]
    host: str  # "127.0.0.1:PORT", as image references use it
    root: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(grace)

    def __enter__(self) -> LocalRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_registry(root: Path, port: int, *, host: str = "127.0.0.1", timeout: float = 30.0) -> LocalRegistry:
    """Run `docker-registry serve` with filesystem storage under `root`; return once /v2/ answers."""
    root.mkdir(parents=True, exist_ok=True)
    storage = root / "storage"
    storage.mkdir(exist_ok=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {host}:{port}\n"
    )
    with (root / "registry.log").open("ab") as log:
        proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    reg = LocalRegistry(proc=proc, host=f"{host}:{port}", root=root)
    import time

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RegistryError(f"docker-registry exited {proc.returncode}: "
                                f"{(root / 'registry.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{reg.url}/v2/", timeout=2) as r:
                if r.status == 200:
                    return reg
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            reg.stop()
            raise RegistryError(f"docker-registry did not answer on {reg.host} within {timeout}s")
        time.sleep(0.1)  # the registry has no readiness signal but its port


def _layout_manifest(layout: Path, tag: str | None) -> tuple[dict[str, Any], bytes, str]:
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    if tag is not None:
        desc = next((m for m in index["manifests"]
                     if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag), desc)
    digest = desc["digest"]
    raw = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
    return json.loads(raw), raw, desc["mediaType"]


async def push_oci_layout(registry: str, layout: Path, repository: str, tag: str = "latest") -> str:
    """Push an OCI image layout over plain HTTP (HEAD/POST/PUT blobs, PUT manifest).

    `registry` is "host:port". Returns the manifest digest. Blobs the registry has are skipped.
    """
    manifest, raw, media_type = _layout_manifest(layout, None)
    base = f"http://{registry}/v2/{repository}"
    async with aiohttp.ClientSession() as http:
        for desc in [manifest["config"], *manifest["layers"]]:
            digest = desc["digest"]
            async with http.head(f"{base}/blobs/{digest}") as r:
                if r.status == 200:
                    continue
            async with http.post(f"{base}/blobs/uploads/") as r:
                if r.status != 202:
                    raise RegistryError(f"starting the upload of {digest}: {r.status} {await r.text()}")
                location = r.headers["Location"]
            if location.startswith("/"):
                location = f"http://{registry}{location}"
            sep = "&" if "?" in location else "?"
            data = await asyncio.to_thread((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes)
            async with http.put(f"{location}{sep}digest={digest}", data=data,
                                headers={"Content-Type": "application/octet-stream"}) as r:
                if r.status != 201:
                    raise RegistryError(f"blob {digest}: {r.status} {await r.text()}")
        async with http.put(f"{base}/manifests/{tag}", data=raw, headers={"Content-Type": media_type}) as r:
            if r.status != 201:
                raise RegistryError(f"manifest {repository}:{tag}: {r.status} {await r.text()}")
            return str(r.headers.get("Docker-Content-Digest", ""))
