"""Container images for pods: the containerDisk puller's registry client, layers unpacked once and shared.

Each layer is unpacked with GNU tar (owners, modes, devices, hard links as the image says) into its own
directory, and its OCI whiteouts become overlayfs whiteouts (`.wh.x` → a 0:0 character device `x`,
`.wh..wh..opq` → the `trusted.overlay.opaque` xattr on the directory). A container's root filesystem is then
an overlay mount: the image's layers as read-only lowerdirs, a per-container upperdir. Nothing is copied per
container, and a layer shared by several images is on disk once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from virtplane.storage import oci

log = logging.getLogger(__name__)

JSON = dict[str, Any]


class ImagePullError(Exception):
    """The image cannot be pulled; the message (the registry's reason) goes into the container status."""


class ImageNotPresent(ImagePullError):
    """imagePullPolicy Never and the image is not on the node."""


@dataclasses.dataclass(frozen=True, slots=True)
class Image:
    reference: str
    digest: str  # manifest digest: what containerStatuses[].imageID reports
    config: JSON  # the OCI image config's `config` (Env, Entrypoint, Cmd, WorkingDir, User)
    layers: tuple[Path, ...]  # unpacked layer dirs, bottom first

    @property
    def image_id(self) -> str:
        ref = oci.Reference.parse(self.reference)
        return f"{ref.registry}/{ref.repository}@{self.digest}"


def default_pull_policy(image: str) -> str:
    """Kubernetes' default: Always for `:latest` or no tag, IfNotPresent otherwise."""
    ref = oci.Reference.parse(image)
    if ref.digest:
        return "IfNotPresent"
    return "Always" if (ref.tag or "latest") == "latest" else "IfNotPresent"


class ImageStore:
    def __init__(self, root: Path, *, insecure_registries: Iterable[str] = (), timeout: float = 600.0) -> None:
        self.root = root
        self.insecure_registries = frozenset(insecure_registries)
        self.timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}

    def _index_file(self, image: str) -> Path:
        return self.root / "images" / (hashlib.sha256(image.encode()).hexdigest()[:32] + ".json")

    def _layer_dir(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.root / "layers" / algo / hexd

    def present(self, image: str) -> Image | None:
        try:
            meta = json.loads(self._index_file(image).read_text())
        except (OSError, ValueError):
            return None
        layers = tuple(self._layer_dir(d) for d in meta["layers"])
        if not all((p / ".complete").exists() for p in layers):
            return None
        return Image(reference=image, digest=meta["digest"], config=meta.get("config") or {},
                     layers=tuple(p / "fs" for p in layers))  # fmt: skip

    async def ensure(self, image: str, policy: str,
                     credentials: Sequence[oci.Credentials] = ()) -> tuple[Image, bool]:  # fmt: skip
        """The image per the pull policy; returns (image, pulled now). `credentials`: the pod's pull Secrets'
        entries for the image's registry, tried in turn (none: anonymous)."""
        have = self.present(image)
        if policy == "Never":
            if have is None:
                raise ImageNotPresent(f"Container image \"{image}\" is not present with pull policy of Never")
            return have, False
        if policy == "IfNotPresent" and have is not None:
            return have, False
        lock = self._locks.setdefault(image, asyncio.Lock())
        try:
            ref = oci.Reference.parse(image)
        except (oci.OCIError, ValueError) as err:
            raise ImagePullError(f"invalid image reference {image!r}: {err}") from None
        async with lock:
            try:
                return await oci.with_each_credential(credentials, ref.registry, {},
                                                      lambda creds: self._pull(image, ref, creds)), True
            except (oci.OCIError, aiohttp.ClientError, OSError, ValueError) as err:
                raise ImagePullError(f"failed to pull and unpack image \"{image}\": {err}") from None

    async def _pull(self, image: str, ref: oci.Reference, credentials: Mapping[str, oci.Credentials]) -> Image:
        timeout = aiohttp.ClientTimeout(total=self.timeout, sock_connect=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            client = oci.RegistryClient(session, insecure_registries=self.insecure_registries,
                                        credentials=credentials)  # fmt: skip
            manifest = await client.resolve(ref)
            config: JSON = {}
            if manifest.config is not None:
                work = Path(tempfile.mkdtemp(prefix=".cfg-", dir=self._mkroot()))
                try:
                    await client.download_blob(ref, manifest.config, work / "config")
                    config = json.loads((work / "config").read_bytes()).get("config") or {}
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            for desc in manifest.layers:
                await self._ensure_layer(client, ref, desc)
        f = self._index_file(image)
        f.parent.mkdir(parents=True, exist_ok=True)
        meta = {"reference": image, "digest": manifest.digest, "config": config,
                "layers": [d.digest for d in manifest.layers]}  # fmt: skip
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(f)
        log.info("pulled container image", extra={"image": image, "digest": manifest.digest})
        have = self.present(image)
        assert have is not None
        return have

    def _mkroot(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    async def _ensure_layer(self, client: oci.RegistryClient, ref: oci.Reference, desc: oci.Descriptor) -> None:
        final = self._layer_dir(desc.digest)
        if (final / ".complete").exists():
            return
        lock = self._locks.setdefault(desc.digest, asyncio.Lock())
        async with lock:
            if (final / ".complete").exists():
                return
            final.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=".layer-", dir=final.parent))
            try:
                blob = work / "blob"
                await client.download_blob(ref, desc, blob)
                (work / "fs").mkdir()
                await _untar(blob, work / "fs")
                blob.unlink()
                await asyncio.to_thread(convert_whiteouts, work / "fs")
                (work / ".complete").write_text(desc.digest)
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(final)  # a leftover of an interrupted unpack
                os.replace(work, final)
            finally:
                shutil.rmtree(work, ignore_errors=True)


async def _untar(blob: Path, dest: Path) -> None:
    # GNU tar detects gzip/zstd itself; as root it restores owners (numeric: the image's, not the host's names).
    proc = await asyncio.create_subprocess_exec(
        "tar", "-x", "--numeric-owner", "-p", "-f", str(blob), "-C", str(dest),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise oci.OCIError(f"cannot unpack layer: {err.decode(errors='replace').strip()[:300]}")


def convert_whiteouts(root: Path) -> None:
    """OCI whiteout files → overlayfs whiteouts, in place. Blocking."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if not name.startswith(".wh."):
                continue
            path = os.path.join(dirpath, name)
            os.unlink(path)
            if name == ".wh..wh..opq":
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
            else:
                os.mknod(os.path.join(dirpath, name[4:]), stat.S_IFCHR | 0o000, os.makedev(0, 0))
