"""storage.oci: references, WWW-Authenticate, manifests/indexes, layer extraction, and a pull against a small
registry served by aiohttp in-process (token auth, index → manifest → blobs, digest checks)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from virtplane.storage import oci

QCOW2_HEAD = b"QFI\xfb\x00\x00\x00\x03" + b"\x00" * 56


# ------------------------------------------------------------------------------------------------ references


@pytest.mark.parametrize(("image", "registry", "repo", "tag", "digest"), [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("kubevirt/fedora-cloud-container-disk-demo", "docker.io", "kubevirt/fedora-cloud-container-disk-demo",
     "latest", None),
    ("quay.io/containerdisks/fedora:40", "quay.io", "containerdisks/fedora", "40", None),
    ("127.0.0.1:5000/virtplane/tiny:v1", "127.0.0.1:5000", "virtplane/tiny", "v1", None),
    ("localhost/tiny", "localhost", "tiny", "latest", None),
    ("reg.example:443/a/b/c@sha256:" + "ab" * 32, "reg.example:443", "a/b/c", None, "sha256:" + "ab" * 32),
    ("reg.example/a:t@sha256:" + "cd" * 32, "reg.example", "a", "t", "sha256:" + "cd" * 32),
])  # fmt: skip
def test_reference_parse(image: str, registry: str, repo: str, tag: str | None, digest: str | None) -> None:
    ref = oci.Reference.parse(image)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)
    assert ref.reference == (digest or tag)


@pytest.mark.parametrize("image", ["", "UPPER/case", "a b", "reg.io/a@sha256:short", "reg.io/a:"])
def test_reference_rejects(image: str) -> None:
    with pytest.raises(oci.OCIError):
        oci.Reference.parse(image)


def test_docker_hub_api_host_and_schemes() -> None:
    assert oci.Reference.parse("busybox").api_host == "registry-1.docker.io"
    assert oci.scheme_for("127.0.0.1:5000") == "http"
    assert oci.scheme_for("localhost:5000") == "http"
    assert oci.scheme_for("[::1]:5000") == "http"
    assert oci.scheme_for("quay.io") == "https"
    assert oci.scheme_for("reg.lan:5000", insecure=["reg.lan:5000"]) == "http"
    assert oci.scheme_for("reg.lan:5000", insecure=["reg.lan"]) == "http"
    assert oci.scheme_for("reg.lan:5000", insecure=["other"]) == "https"


# ----------------------------------------------------------------------------------------- WWW-Authenticate


def test_parse_bearer_challenge() -> None:
    header = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
              'scope="repository:library/busybox:pull"')  # fmt: skip
    (ch,) = oci.parse_www_authenticate(header)
    assert ch.scheme == "bearer"
    assert ch.params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                         "scope": "repository:library/busybox:pull"}  # fmt: skip


def test_parse_several_challenges_with_commas_and_escapes() -> None:
    header = ('Basic realm="reg, with comma", Bearer realm="https://a/t",scope="repository:x:pull,push" , '
              'error=invalid_token')
    chs = oci.parse_www_authenticate(header)
    assert [c.scheme for c in chs] == ["basic", "bearer"]
    assert chs[0].params == {"realm": "reg, with comma"}
    assert chs[1].params == {"realm": "https://a/t", "scope": "repository:x:pull,push", "error": "invalid_token"}
    (esc,) = oci.parse_www_authenticate(r'Bearer realm="a\"b"')
    assert esc.params["realm"] == 'a"b'
    assert oci.parse_www_authenticate("") == []


# ------------------------------------------------------------------------------------------------ manifests


def _desc(data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data),
            **extra}  # fmt: skip


def test_media_type_detection() -> None:
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert oci.media_type_of(index, None) == oci.OCI_INDEX
    assert oci.media_type_of(index, oci.DOCKER_MANIFEST_LIST) == oci.DOCKER_MANIFEST_LIST
    declared = json.dumps({"schemaVersion": 2, "mediaType": oci.DOCKER_MANIFEST, "layers": []}).encode()
    assert oci.media_type_of(declared, "application/json") == oci.DOCKER_MANIFEST
    with pytest.raises(oci.OCIError):
        oci.media_type_of(b"not json", None)


def test_select_platform_prefers_linux_amd64() -> None:
    arm = _desc(b"arm", oci.OCI_MANIFEST, platform={"os": "linux", "architecture": "arm64"})
    amd = _desc(b"amd", oci.OCI_MANIFEST, platform={"os": "linux", "architecture": "amd64"})
    att = _desc(b"att", oci.OCI_MANIFEST, platform={"os": "unknown", "architecture": "unknown"})
    assert oci.select_platform({"manifests": [arm, att, amd]}).digest == amd["digest"]
    with pytest.raises(oci.OCIError, match="linux/arm64"):
        oci.select_platform({"manifests": [arm, att]})
    only = _desc(b"x", oci.OCI_MANIFEST)
    assert oci.select_platform({"manifests": [only]}).digest == only["digest"]


def test_parse_manifest_errors() -> None:
    good = {"schemaVersion": 2, "config": _desc(b"{}", "application/vnd.oci.image.config.v1+json"),
            "layers": [_desc(b"l", "application/vnd.oci.image.layer.v1.tar")]}  # fmt: skip
    m = oci.parse_manifest(json.dumps(good).encode(), oci.OCI_MANIFEST, "sha256:" + "0" * 64)
    assert len(m.layers) == 1
    with pytest.raises(oci.OCIError, match="media type"):
        oci.parse_manifest(json.dumps(good).encode(), oci.OCI_INDEX, "d")
    with pytest.raises(oci.OCIError, match="no layers"):
        oci.parse_manifest(json.dumps({**good, "layers": []}).encode(), oci.OCI_MANIFEST, "d")
    with pytest.raises(oci.OCIError, match="digest"):
        oci.parse_manifest(json.dumps({**good, "layers": [{"digest": "md5:x"}]}).encode(), oci.OCI_MANIFEST, "d")


# ------------------------------------------------------------------------------------------------- layers


def tar_bytes(files: dict[str, bytes], dirs: tuple[str, ...] = ("disk",)) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def test_extract_gzip_layer_qcow2(tmp_path: Path) -> None:
    disk = QCOW2_HEAD + b"x" * 1000
    layer = write(tmp_path, "l0", gzip.compress(tar_bytes({"disk/fedora.qcow2": disk, "etc/x": b"y"}, ("disk", "etc"))))
    dest = tmp_path / "disk"
    assert oci.extract_disk([(layer, "application/vnd.docker.image.rootfs.diff.tar.gzip")], dest) == "fedora.qcow2"
    assert dest.read_bytes() == disk
    assert oci.disk_format(dest) == "qcow2"


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd not installed")
def test_extract_zstd_layer(tmp_path: Path) -> None:
    raw_disk = b"\x00" * 4096
    plain = write(tmp_path, "plain.tar", tar_bytes({"./disk/disk.img": raw_disk}))
    subprocess.run(["zstd", "-q", "-o", str(tmp_path / "l0"), str(plain)], check=True)
    dest = tmp_path / "disk"
    assert oci.extract_disk([(tmp_path / "l0", "application/vnd.oci.image.layer.v1.tar+zstd")], dest) == "disk.img"
    assert dest.read_bytes() == raw_disk and oci.disk_format(dest) == "raw"


def test_extract_whiteouts_and_errors(tmp_path: Path) -> None:
    first = write(tmp_path, "l0", tar_bytes({"disk/old.img": b"old"}))
    second = write(tmp_path, "l1", tar_bytes({"disk/.wh.old.img": b"", "disk/new.img": b"new"}))
    dest = tmp_path / "disk"
    assert oci.extract_disk([(first, ""), (second, "")], dest) == "new.img"
    assert dest.read_bytes() == b"new"
    opaque = write(tmp_path, "l2", tar_bytes({"disk/.wh..wh..opq": b""}))
    with pytest.raises(oci.OCIError, match="no file under /disk/"):
        oci.extract_disk([(first, ""), (opaque, "")], tmp_path / "d2")
    two = write(tmp_path, "l3", tar_bytes({"disk/a.img": b"a", "disk/b.img": b"b"}))
    with pytest.raises(oci.OCIError, match="several files"):
        oci.extract_disk([(two, "")], tmp_path / "d3")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".layer-")) == []  # no temp leftovers


# ----------------------------------------------------------------------------------- a registry, in-process


class FakeRegistry:
    """Distribution API v2 reads behind bearer-token auth, serving an index → amd64 manifest → one layer."""

    def __init__(self, disk: bytes, *, corrupt_blob: bool = False) -> None:
        self.token = "t0ken"
        self.token_requests: list[dict[str, str]] = []
        layer = gzip.compress(tar_bytes({"disk/tiny.qcow2": disk}))
        config = b'{"architecture":"amd64","os":"linux"}'
        self.blobs = {_desc(layer, "")["digest"]: layer, _desc(config, "")["digest"]: config}
        manifest = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                               "config": _desc(config, "application/vnd.oci.image.config.v1+json"),
                               "layers": [_desc(layer, "application/vnd.oci.image.layer.v1.tar+gzip")]}).encode()
        arm = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "layers": []}).encode()
        index = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
            _desc(arm, oci.OCI_MANIFEST, platform={"os": "linux", "architecture": "arm64"}),
            _desc(manifest, oci.OCI_MANIFEST, platform={"os": "linux", "architecture": "amd64"}),
        ]}).encode()  # fmt: skip
        self.manifests = {"latest": (index, oci.OCI_INDEX), _desc(index, "")["digest"]: (index, oci.OCI_INDEX),
                          _desc(manifest, "")["digest"]: (manifest, oci.OCI_MANIFEST),
                          _desc(arm, "")["digest"]: (arm, oci.OCI_MANIFEST)}  # fmt: skip
        self.manifest_digest = _desc(manifest, "")["digest"]
        self.corrupt_blob = corrupt_blob
        self.base = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_get("/v2/{repo:.+}/manifests/{ref}", self._manifest)
        app.router.add_get("/v2/{repo:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/storage/{digest}", self._storage)
        return app

    def _challenge(self, repo: str) -> web.Response:
        return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401, headers={
            "WWW-Authenticate": f'Bearer realm="{self.base}/token",service="fake",scope="repository:{repo}:pull"'})

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests.append(dict(request.query))
        return web.json_response({"token": self.token})

    async def _manifest(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._challenge(request.match_info["repo"])
        found = self.manifests.get(request.match_info["ref"])
        if found is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        return web.Response(body=found[0], content_type=found[1])

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._challenge(request.match_info["repo"])
        # Like S3-backed registries: redirect to storage, which must not receive our registry token.
        raise web.HTTPTemporaryRedirect(f"/storage/{request.match_info['digest']}")

    async def _storage(self, request: web.Request) -> web.Response:
        assert "Authorization" not in request.headers or self._authorized(request)
        data = self.blobs[request.match_info["digest"]]
        if self.corrupt_blob and len(data) > 100:
            data = data[:-1] + bytes([data[-1] ^ 1])
        return web.Response(body=data)


async def serve(reg: FakeRegistry) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(reg.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    reg.base = f"http://127.0.0.1:{port}"
    return runner, f"127.0.0.1:{port}"


async def test_pull_through_token_auth_and_index(tmp_path: Path) -> None:
    disk = QCOW2_HEAD + b"d" * 5000
    reg = FakeRegistry(disk)
    runner, host = await serve(reg)
    try:
        cache = oci.ImageCache(tmp_path / "images")
        pulled = await cache.pull(f"{host}/virtplane/tiny:latest")
        assert pulled.manifest_digest == reg.manifest_digest
        assert pulled.format == "qcow2" and pulled.file_name == "tiny.qcow2"
        assert pulled.path.read_bytes() == disk
        assert reg.token_requests[0] == {"service": "fake", "scope": "repository:virtplane/tiny:pull"}
        again = await cache.pull(f"{host}/virtplane/tiny:latest")
        assert again.path == pulled.path
        # pinned by digest and cached: no registry round trip at all
        await runner.cleanup()
        pinned = await cache.pull(f"{host}/virtplane/tiny@{reg.manifest_digest}")
        assert pinned.path == pulled.path
    finally:
        await runner.cleanup()


async def test_pull_detects_corrupt_blob(tmp_path: Path) -> None:
    reg = FakeRegistry(QCOW2_HEAD + b"d" * 5000, corrupt_blob=True)
    runner, host = await serve(reg)
    try:
        with pytest.raises(oci.OCIError, match="hashes to"):
            await oci.ImageCache(tmp_path / "images").pull(f"{host}/virtplane/tiny:latest")
        with pytest.raises(oci.OCIError, match="not found"):
            await oci.ImageCache(tmp_path / "images").pull(f"{host}/virtplane/tiny:nope")
        assert not list((tmp_path / "images").rglob("disk"))
    finally:
        await runner.cleanup()
