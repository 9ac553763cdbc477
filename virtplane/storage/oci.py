"""Pull a KubeVirt containerDisk from an OCI / Docker registry (distribution API v2) into a local cache.

A containerDisk is an ordinary container image whose filesystem holds exactly one disk image under `/disk/`
(KubeVirt's convention; any file name, qcow2 or raw). Pulling one means:

1. resolve the reference to a manifest (`GET /v2/<repo>/manifests/<tag|digest>`), following a manifest list /
   OCI index to its linux/amd64 entry;
2. download each layer blob, verifying its sha256 digest while streaming it to disk;
3. read the layers as tar archives (gzip, zstd or uncompressed; whiteouts honoured) and extract the one file
   under `disk/`.

Authentication follows the registry token protocol: an anonymous request answered `401` with
`WWW-Authenticate: Bearer realm=...,service=...,scope=...` is retried with a token fetched from the realm
(anonymously or with Basic credentials); a `Basic` challenge is answered with the credentials directly.

Plain HTTP is used only for loopback registries and those the caller lists as insecure: everything else is
HTTPS with certificate verification. The cache is keyed by the manifest digest, so a tag that moves is pulled
again while an unchanged image is not; concurrent pulls of one image share a single download.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from yarl import URL

log = logging.getLogger(__name__)

JSON = dict[str, Any]
T = TypeVar("T")

# Media types (docker schema 2 and OCI).
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPT = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
DISK_DIR = "disk"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHUNK = 1 << 20


class OCIError(Exception):
    """A pull failed; the message says which step and why (the root cause is chained)."""


class AuthError(OCIError):
    """The registry refused us (401/403 after authenticating, or a challenge we cannot answer)."""


class NotFoundError(OCIError):
    """The repository, tag or blob does not exist."""


class DigestMismatchError(OCIError):
    """Downloaded bytes do not hash to the digest that named them."""


# --------------------------------------------------------------------------------------------------------------
# references


@dataclasses.dataclass(frozen=True, slots=True)
class Reference:
    """A parsed image reference: `[registry/]repository[:tag][@digest]`."""

    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, image: str) -> Reference:
        ref = image.strip()
        if not ref or any(c.isspace() for c in ref):
            raise OCIError(f"invalid image reference {image!r}")
        digest = None
        if "@" in ref:
            ref, digest = ref.split("@", 1)
            if not _DIGEST_RE.match(digest):
                raise OCIError(f"invalid image reference {image!r}: unsupported digest {digest!r}")
        first, _, rest = ref.partition("/")
        # Docker's rule: the first component is a registry when it looks like a host (has a dot or a port)
        # or is "localhost"; otherwise the whole thing is a Docker Hub repository.
        if rest and ("." in first or ":" in first or first == "localhost"):
            registry, remainder = first, rest
        else:
            registry, remainder = DOCKER_HUB, ref
        tag = None
        last_slash = remainder.rfind("/")
        colon = remainder.rfind(":")
        if colon > last_slash:
            remainder, tag = remainder[:colon], remainder[colon + 1 :]
            if not tag:
                raise OCIError(f"invalid image reference {image!r}: empty tag")
        if not remainder or remainder != remainder.lower() or remainder.startswith("/") or "//" in remainder:
            raise OCIError(f"invalid image reference {image!r}: bad repository name {remainder!r}")
        if registry == DOCKER_HUB and "/" not in remainder:
            remainder = f"library/{remainder}"
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry=registry, repository=remainder, tag=tag, digest=digest)

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def host_of(registry: str) -> str:
    """The host part of `host[:port]` (IPv6 literals in brackets keep their brackets)."""
    if registry.startswith("["):
        return registry[: registry.index("]") + 1]
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def scheme_for(registry: str, insecure: Iterable[str] = ()) -> str:
    """http only for loopback registries and those explicitly listed as insecure."""
    insecure_set = set(insecure)
    if registry in insecure_set or host_of(registry) in insecure_set or host_of(registry) in LOOPBACK_HOSTS:
        return "http"
    return "https"


# --------------------------------------------------------------------------------------------------------------
# WWW-Authenticate


@dataclasses.dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str]


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|{_TOKEN})\s*(?:,|$)')
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?:\s+|$)")


def parse_www_authenticate(header: str) -> list[Challenge]:
    """RFC 7235 challenges: `Bearer realm="https://auth",service="reg",scope="repository:a/b:pull"`.

    Several challenges may share one header (comma separated); quoted values may contain commas and
    backslash escapes.
    """
    challenges: list[Challenge] = []
    pos = 0
    text = header.strip()
    while pos < len(text):
        while pos < len(text) and text[pos] in ", ":
            pos += 1
        m = _SCHEME_RE.match(text, pos)
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while pos < len(text):
            pm = _PARAM_RE.match(text, pos)
            if not pm:
                break
            key, value = pm.group(1).lower(), pm.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[key] = value
            pos = pm.end()
        challenges.append(Challenge(scheme, params))
    return challenges


# --------------------------------------------------------------------------------------------------------------
# manifests


@dataclasses.dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Descriptor:
        digest = str(data.get("digest") or "")
        if not _DIGEST_RE.match(digest):
            raise OCIError(f"unsupported or invalid digest {digest!r} in a descriptor")
        return cls(
            media_type=str(data.get("mediaType") or ""),
            digest=digest,
            size=int(data.get("size") or 0),
            platform={str(k): str(v) for k, v in (data.get("platform") or {}).items() if isinstance(v, str)},
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    digest: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]


def media_type_of(raw: bytes, header_type: str | None) -> str:
    """The manifest's media type: the document's own `mediaType` wins over the Content-Type header."""
    try:
        doc = json.loads(raw)
    except ValueError as err:
        raise OCIError(f"manifest is not JSON: {err}") from err
    if not isinstance(doc, dict):
        raise OCIError("manifest is not a JSON object")
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    ctype = (header_type or "").split(";")[0].strip()
    if ctype in (*INDEX_TYPES, *MANIFEST_TYPES):
        return ctype
    # OCI allows omitting mediaType: an index has "manifests", an image manifest "layers".
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc:
        return OCI_MANIFEST
    raise OCIError(f"unsupported manifest (media type {ctype or 'unknown'})")


def select_platform(index: Mapping[str, Any], os_name: str = "linux", arch: str = "amd64") -> Descriptor:
    """The manifest of an index / manifest list for os/arch (entries without a platform only as a last resort)."""
    entries = [Descriptor.from_json(m) for m in index.get("manifests") or []]
    if not entries:
        raise OCIError("image index lists no manifests")
    for d in entries:
        if d.platform.get("os") == os_name and d.platform.get("architecture") == arch:
            return d
    unlabelled = [d for d in entries if not d.platform and d.media_type in (*MANIFEST_TYPES, "")]
    if len(unlabelled) == 1:
        return unlabelled[0]
    found = sorted({f"{d.platform.get('os', '?')}/{d.platform.get('architecture', '?')}" for d in entries})
    raise OCIError(f"image has no {os_name}/{arch} variant (has: {', '.join(found)})")


def parse_manifest(raw: bytes, media_type: str, digest: str) -> Manifest:
    doc = json.loads(raw)
    if media_type not in MANIFEST_TYPES:
        raise OCIError(f"unsupported manifest media type {media_type!r}")
    if int(doc.get("schemaVersion") or 0) != 2:
        raise OCIError(f"unsupported manifest schemaVersion {doc.get('schemaVersion')!r}")
    layers = tuple(Descriptor.from_json(layer) for layer in doc.get("layers") or [])
    if not layers:
        raise OCIError("image manifest has no layers")
    config = Descriptor.from_json(doc["config"]) if doc.get("config") else None
    return Manifest(media_type=media_type, digest=digest, config=config, layers=layers)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# layers → disk


_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_QCOW2_MAGIC = b"QFI\xfb"


def _compression(path: Path, media_type: str) -> str:
    """gzip / zstd / none, from the magic bytes (media types lie: docker's says gzip for plain tars too)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if media_type.endswith("+zstd") and not head:
        return "zstd"
    return "none"


@contextlib.contextmanager
def _open_layer(path: Path, media_type: str) -> Any:
    kind = _compression(path, media_type)
    if kind == "zstd":
        # No zstd in this Python's standard library: the zstd CLI decompresses into a pipe we stream from.
        zstd = shutil.which("zstd")
        if zstd is None:
            raise OCIError("layer is zstd-compressed but the zstd tool is not installed")
        proc = subprocess.Popen([zstd, "-dc", "--", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                yield tar
        finally:
            proc.stdout.close()
            err = proc.stderr.read() if proc.stderr else b""
            if proc.wait() != 0:
                raise OCIError(f"zstd failed on {path.name}: {err.decode(errors='replace').strip()}")
    else:
        mode = "r|gz" if kind == "gzip" else "r|"
        with tarfile.open(path, mode=mode) as tar:
            yield tar


def _member_path(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def extract_disk(layers: list[tuple[Path, str]], dest: Path) -> str:
    """Apply the layers in order and write the single regular file under disk/ to `dest`; returns its name.

    Whiteouts (`.wh.<name>`, `.wh..wh..opq`) remove files of lower layers, as a container runtime would.
    Runs blocking I/O: call it in a thread.
    """
    tmp_dir = dest.parent
    current: dict[str, Path] = {}  # disk/<name> → extracted temp file holding its content
    try:
        for path, media_type in layers:
            with _open_layer(path, media_type) as tar:
                for member in tar:
                    name = _member_path(member.name)
                    parent, _, base = name.rpartition("/")
                    if base == ".wh..wh..opq":
                        for key in [k for k in current if k.startswith(parent + "/")]:
                            current.pop(key).unlink(missing_ok=True)
                        continue
                    if base.startswith(".wh."):
                        victim = f"{parent}/{base[4:]}" if parent else base[4:]
                        for key in [k for k in current if k == victim or k.startswith(victim + "/")]:
                            current.pop(key).unlink(missing_ok=True)
                        continue
                    if parent != DISK_DIR or not member.isreg():
                        continue
                    src = tar.extractfile(member)
                    if src is None:
                        continue
                    fd, tmp_name = tempfile.mkstemp(prefix=".layer-", dir=tmp_dir)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
                    if name in current:
                        current[name].unlink(missing_ok=True)
                    current[name] = Path(tmp_name)
        if not current:
            raise OCIError(f"the image has no file under /{DISK_DIR}/ (not a containerDisk)")
        if len(current) > 1:
            names = ", ".join(sorted(k.split("/", 1)[1] for k in current))
            raise OCIError(f"the image has several files under /{DISK_DIR}/ ({names}); a containerDisk has one")
        (name, tmp), = current.items()
        os.replace(tmp, dest)
        current.clear()
        return name.split("/", 1)[1]
    finally:
        for leftover in current.values():
            leftover.unlink(missing_ok=True)


def disk_format(path: Path) -> str:
    """qcow2 when the file starts with QEMU's qcow magic, else raw (raw disk images and ISOs)."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == _QCOW2_MAGIC else "raw"


# --------------------------------------------------------------------------------------------------------------
# the registry client


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


@dataclasses.dataclass(frozen=True, slots=True)
class PulledDisk:
    """A containerDisk in the cache: `path` is read-only shared state; VMs get overlays on top of it."""

    reference: str
    manifest_digest: str
    path: Path
    format: str
    file_name: str


class RegistryClient:
    """Distribution API v2 reads (manifests, blobs) with token / basic auth. One per pull session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        insecure_registries: Iterable[str] = (),
        credentials: Mapping[str, Credentials] | None = None,
    ) -> None:
        self._session = session
        self._insecure = frozenset(insecure_registries)
        self._credentials = dict(credentials or {})
        self._auth: dict[tuple[str, str], str] = {}  # (registry, repository) → Authorization header value

    def base_url(self, ref: Reference) -> str:
        return f"{scheme_for(ref.registry, self._insecure)}://{ref.api_host}"

    async def _token(self, ref: Reference, challenge: Challenge) -> str:
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError(f"{ref.registry}: Bearer challenge without a realm")
        params = {}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        params["scope"] = challenge.params.get("scope") or f"repository:{ref.repository}:pull"
        headers = {}
        creds = self._credentials.get(ref.registry)
        if creds is not None:
            headers["Authorization"] = creds.basic()
        try:
            async with self._session.get(realm, params=params, headers=headers) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise AuthError(f"{ref.registry}: token request to {realm} failed: HTTP {resp.status} "
                                    f"{body[:200].decode(errors='replace')}")
        except aiohttp.ClientError as err:
            raise AuthError(f"{ref.registry}: token request to {realm} failed: {err}") from err
        try:
            doc = json.loads(body)
        except ValueError as err:
            raise AuthError(f"{ref.registry}: token response is not JSON") from err
        token = doc.get("token") or doc.get("access_token")
        if not token:
            raise AuthError(f"{ref.registry}: token response has no token")
        return f"Bearer {token}"

    async def _authorize(self, ref: Reference, header: str | None, refusal: str = "") -> str:
        """The Authorization header answering a 401's challenge; `refusal` (what the registry said) goes into
        the error when we have nothing to answer with."""
        challenges = parse_www_authenticate(header or "")
        for ch in challenges:
            if ch.scheme == "bearer":
                return await self._token(ref, ch)
        for ch in challenges:
            if ch.scheme == "basic":
                creds = self._credentials.get(ref.registry)
                if creds is None:
                    raise AuthError(f"{refusal or ref.registry + ': HTTP 401'} (Basic credentials required, "
                                    "none configured for this registry)")
                return creds.basic()
        raise AuthError(f"{ref.registry}: unauthorized, and no usable challenge in {header!r}")

    async def _get(self, ref: Reference, path: str, headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        """GET with one authentication round trip; the caller must release the response.

        Redirects (blob storage) are followed by hand so the registry's Authorization never leaks to
        another host.
        """
        url = self.base_url(ref) + path
        key = (ref.registry, ref.repository)
        for attempt in range(2):
            hdrs = dict(headers)
            if key in self._auth:
                hdrs["Authorization"] = self._auth[key]
            try:
                resp = await self._session.get(url, headers=hdrs, allow_redirects=False)
            except aiohttp.ClientError as err:
                raise OCIError(f"GET {url}: {err}") from err
            if resp.status == 401 and attempt == 0:
                challenge = resp.headers.get("WWW-Authenticate")
                body = await resp.read()
                resp.release()
                refusal = f"GET {url}: HTTP 401 {resp.reason or ''} {body[:200].decode(errors='replace')}".strip()
                self._auth[key] = await self._authorize(ref, challenge, refusal)
                continue
            hops = 0
            while resp.status in (301, 302, 303, 307, 308) and hops < 5:
                location = resp.headers.get("Location", "")
                resp.release()
                target = str(resp.url.join(URL(location)))
                same_origin = URL(target).origin() == URL(url).origin()
                redirect_headers = dict(headers)
                if same_origin and key in self._auth:
                    redirect_headers["Authorization"] = self._auth[key]
                try:
                    resp = await self._session.get(target, headers=redirect_headers, allow_redirects=False)
                except aiohttp.ClientError as err:
                    raise OCIError(f"GET {target} (redirected from {url}): {err}") from err
                hops += 1
            if resp.status in (401, 403):
                body = await resp.read()
                resp.release()
                raise AuthError(f"GET {url}: HTTP {resp.status} {resp.reason or ''} "
                                f"{body[:200].decode(errors='replace')}".replace("  ", " ").strip())
            if resp.status == 404:
                resp.release()
                raise NotFoundError(f"GET {url}: not found")
            if resp.status != 200:
                body = await resp.read()
                resp.release()
                raise OCIError(f"GET {url}: HTTP {resp.status} {body[:200].decode(errors='replace')}")
            return resp
        raise AuthError(f"GET {url}: still unauthorized after authenticating")

    async def fetch_manifest(self, ref: Reference, reference: str | None = None) -> tuple[bytes, str, str]:
        """(raw bytes, media type, digest) of a manifest or index; verified when fetched by digest."""
        target = reference or ref.reference
        resp = await self._get(ref, f"/v2/{ref.repository}/manifests/{target}", {"Accept": ACCEPT})
        try:
            raw = await resp.read()
            header_type = resp.headers.get("Content-Type")
        finally:
            resp.release()
        digest = sha256_digest(raw)
        if target.startswith("sha256:") and digest != target:
            raise DigestMismatchError(f"manifest {target} of {ref} hashes to {digest}")
        return raw, media_type_of(raw, header_type), digest

    async def resolve(self, ref: Reference) -> Manifest:
        """The image manifest for linux/amd64 (through an index / manifest list when there is one)."""
        raw, media_type, digest = await self.fetch_manifest(ref)
        if media_type in INDEX_TYPES:
            chosen = select_platform(json.loads(raw))
            raw, media_type, digest = await self.fetch_manifest(ref, chosen.digest)
            if digest != chosen.digest:
                raise DigestMismatchError(f"manifest {chosen.digest} of {ref} hashes to {digest}")
        return parse_manifest(raw, media_type, digest)

    async def download_blob(self, ref: Reference, desc: Descriptor, dest: Path) -> None:
        """Stream a blob to `dest`, verifying size and sha256 on the way (a mismatch leaves no file)."""
        resp = await self._get(ref, f"/v2/{ref.repository}/blobs/{desc.digest}", {})
        hasher = hashlib.sha256()
        size = 0
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            # Local page-cache writes of 1 MiB chunks: cheap next to the network read, not worth a thread.
            with open(tmp, "wb") as out:  # noqa: ASYNC230
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    hasher.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        except aiohttp.ClientError as err:
            tmp.unlink(missing_ok=True)
            raise OCIError(f"downloading {desc.digest} from {ref.registry}: {err}") from err
        finally:
            resp.release()
        actual = "sha256:" + hasher.hexdigest()
        if actual != desc.digest:
            tmp.unlink(missing_ok=True)
            raise DigestMismatchError(f"blob {desc.digest} of {ref} hashes to {actual}")
        if desc.size and size != desc.size:
            tmp.unlink(missing_ok=True)
            raise DigestMismatchError(f"blob {desc.digest} of {ref}: {size} bytes, manifest says {desc.size}")
        os.replace(tmp, dest)


async def with_each_credential(
    candidates: Sequence[Credentials], registry: str, default: Mapping[str, Credentials],
    attempt: Callable[[Mapping[str, Credentials]], Awaitable[T]],
) -> T:
    """`attempt` with each candidate credential for `registry` in turn until one is not refused (the kubelet's
    loop over a pull Secret keyring's matches); with no candidates, once with `default`. The last refusal is
    raised when all are refused."""
    if not candidates:
        return await attempt(default)
    refused: AuthError | None = None
    for creds in candidates:
        try:
            return await attempt({**default, registry: creds})
        except AuthError as err:
            refused = err
        except OCIError as err:
            if not isinstance(err.__cause__, AuthError):
                raise
            refused = AuthError(str(err))
    assert refused is not None
    raise refused


class ImageCache:
    """containerDisks extracted under `root/sha256/<manifest digest>/`; one download per image at a time."""

    def __init__(
        self,
        root: Path,
        *,
        insecure_registries: Iterable[str] = (),
        credentials: Mapping[str, Credentials] | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.root = Path(root)
        self.insecure_registries = frozenset(insecure_registries)
        self.credentials = dict(credentials or {})
        self.timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}

    def _dir(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.root / algo / hexd

    def cached(self, digest: str) -> PulledDisk | None:
        meta_file = self._dir(digest) / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        path = self._dir(digest) / "disk"
        if not path.exists():
            return None
        return PulledDisk(reference=meta["reference"], manifest_digest=digest, path=path, format=meta["format"],
                          file_name=meta["file_name"])  # fmt: skip

    async def pull(self, image: str, credentials: Sequence[Credentials] = ()) -> PulledDisk:
        """Resolve `image` and return the cached disk, downloading and extracting it when missing.

        `credentials` (a pull Secret's entries for this registry) are tried in turn, as the kubelet does;
        without them the cache's own credentials (or none) are used."""
        ref = Reference.parse(image)
        if ref.digest and (hit := self.cached(ref.digest)) is not None:
            return hit  # pinned by digest: the cache is authoritative, no registry round trip needed
        return await with_each_credential(credentials, ref.registry, self.credentials,
                                          lambda creds: self._pull(image, ref, creds))

    async def _pull(self, image: str, ref: Reference, credentials: Mapping[str, Credentials]) -> PulledDisk:
        timeout = aiohttp.ClientTimeout(total=self.timeout, sock_connect=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            client = RegistryClient(session, insecure_registries=self.insecure_registries,
                                    credentials=credentials)  # fmt: skip
            try:
                manifest = await client.resolve(ref)
            except OCIError as err:
                raise OCIError(f"pulling {image}: {err}") from err
            lock = self._locks.setdefault(manifest.digest, asyncio.Lock())
            async with lock:
                hit = self.cached(manifest.digest)
                if hit is not None:
                    return hit
                try:
                    return await self._download(client, ref, manifest, image)
                except OCIError as err:
                    raise OCIError(f"pulling {image}: {err}") from err

    async def _download(self, client: RegistryClient, ref: Reference, manifest: Manifest, image: str) -> PulledDisk:
        final = self._dir(manifest.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".pull-", dir=final.parent))
        try:
            layers: list[tuple[Path, str]] = []
            for i, desc in enumerate(manifest.layers):
                path = work / f"layer-{i}"
                await client.download_blob(ref, desc, path)
                layers.append((path, desc.media_type))
            disk = work / "disk"
            try:
                file_name = await asyncio.to_thread(extract_disk, layers, disk)
            except (tarfile.TarError, OSError) as err:
                raise OCIError(f"cannot read the image layers: {err}") from err
            for path, _ in layers:
                path.unlink(missing_ok=True)
            fmt = await asyncio.to_thread(disk_format, disk)
            os.chmod(disk, 0o444)  # shared by every VM's overlay: nobody may write it
            meta = {"reference": str(ref), "image": image, "format": fmt, "file_name": file_name,
                    "manifest_digest": manifest.digest, "media_type": manifest.media_type}
            (work / "meta.json").write_text(json.dumps(meta, indent=1))
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(final)  # a half-written leftover of a crashed pull
            os.replace(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # gone already when os.replace moved it into place
        log.info("pulled containerDisk", extra={"image": image, "digest": manifest.digest})
        hit = self.cached(manifest.digest)
        assert hit is not None
        return hit


# --------------------------------------------------------------------------------------------------------------
# files out of an image (kernelBoot containers)


class MissingFileError(OCIError):
    """The image was pulled but has no regular file at a requested path: retrying cannot help."""


def extract_files(layers: list[tuple[Path, str]], wanted: Mapping[str, Path]) -> None:
    """Apply the layers in order and write each wanted image path (`/boot/vmlinuz`) to its destination.

    Only the wanted paths are written, so a kernelBoot image with a full userland costs no disk. Whiteouts
    remove files of lower layers as in `extract_disk`. Raises MissingFileError naming every absent path.
    Runs blocking I/O: call it in a thread.
    """
    by_member = {_member_path(p): p for p in wanted}
    current: dict[str, Path] = {}  # member path → extracted temp file
    try:
        for path, media_type in layers:
            with _open_layer(path, media_type) as tar:
                for member in tar:
                    name = _member_path(member.name)
                    parent, _, base = name.rpartition("/")
                    if base.startswith(".wh."):
                        victim = parent if base == ".wh..wh..opq" else (f"{parent}/{base[4:]}" if parent else base[4:])
                        for key in [k for k in current if k == victim or k.startswith(victim + "/")]:
                            current.pop(key).unlink(missing_ok=True)
                        continue
                    if name not in by_member or not member.isreg():
                        continue
                    src = tar.extractfile(member)
                    if src is None:
                        continue
                    dest = wanted[by_member[name]]
                    fd, tmp_name = tempfile.mkstemp(prefix=".file-", dir=dest.parent)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
                    if name in current:
                        current[name].unlink(missing_ok=True)
                    current[name] = Path(tmp_name)
        missing = sorted(by_member[m] for m in by_member if m not in current)
        if missing:
            raise MissingFileError(f"the image has no file at {', '.join(missing)}")
        for name, tmp in list(current.items()):
            os.chmod(tmp, 0o444)  # shared by every VM booting this image: nobody may write it
            os.replace(tmp, wanted[by_member[name]])
            current.pop(name)
    finally:
        for leftover in current.values():
            leftover.unlink(missing_ok=True)


async def pull_files(cache: ImageCache, image: str, paths: Iterable[str]) -> dict[str, Path]:
    """Host copies of `paths` inside `image`, cached under `<cache root>/files/<manifest digest>/`.

    The same puller (auth, insecure registries, digest checks) as containerDisks; one download per image and
    path set at a time. Raises MissingFileError when the image lacks a path, OCIError when it cannot be pulled.
    """
    wanted = sorted(set(paths))
    ref = Reference.parse(image)
    timeout = aiohttp.ClientTimeout(total=cache.timeout, sock_connect=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = RegistryClient(session, insecure_registries=cache.insecure_registries,
                                credentials=cache.credentials)  # fmt: skip
        try:
            manifest = await client.resolve(ref)
        except OCIError as err:
            raise OCIError(f"pulling {image}: {err}") from err
        algo, hexd = manifest.digest.split(":", 1)
        final = cache.root / "files" / algo / hexd
        # Each path under a name derived from it: image paths are untrusted and must not pick host file names.
        targets = {p: final / hashlib.sha256(p.encode()).hexdigest()[:32] for p in wanted}
        if all(t.exists() for t in targets.values()):
            return targets
        lock = cache._locks.setdefault(f"files:{manifest.digest}", asyncio.Lock())
        async with lock:
            if all(t.exists() for t in targets.values()):
                return targets
            final.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=".pull-", dir=final))
            try:
                layers: list[tuple[Path, str]] = []
                for i, desc in enumerate(manifest.layers):
                    path = work / f"layer-{i}"
                    await client.download_blob(ref, desc, path)
                    layers.append((path, desc.media_type))
                try:
                    await asyncio.to_thread(extract_files, layers, targets)
                except MissingFileError as err:
                    raise MissingFileError(f"image {image}: {err}") from err
                except (tarfile.TarError, OSError) as err:
                    raise OCIError(f"pulling {image}: cannot read the image layers: {err}") from err
                except OCIError as err:
                    raise OCIError(f"pulling {image}: {err}") from err
            finally:
                shutil.rmtree(work, ignore_errors=True)
    log.info("pulled files from image", extra={"image": image, "digest": manifest.digest, "paths": wanted})
    return targets
