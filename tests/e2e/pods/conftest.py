"""Fixtures for pods beside VMs: one real `virtplane up --nodes 1` (its agent runs pods with runc), Debian's
docker-registry holding a busybox image the test builds, and cleanup of what containers leave on the host."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from virtplane.testing import containers, guest
from virtplane.testing.cluster import Cluster


def requirements() -> None:
    if os.geteuid() != 0:
        pytest.skip("runc, netns and overlay mounts need root")
    for tool in ("runc", "ip", "nsenter", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    for path in ("/usr/bin/docker-registry", "/usr/bin/busybox", "/usr/lib/cni/ptp", "/usr/lib/cni/host-local"):
        if not Path(path).exists():
            pytest.skip(f"{path} missing")


class PodEnv:
    def __init__(self, cluster: Cluster, registry: guest.Registry, image: str) -> None:
        self.cluster = cluster
        self.registry = registry
        self.image = image

    def kubectl(self, *args: str, **kw: Any) -> Any:
        return self.cluster.kubectl(*args, **kw)

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", input=manifest)

    def pod(self, name: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", "pod", name, "-o", "json").stdout)

    def wait_pod(self, name: str, cond: Callable[[dict[str, Any]], bool], timeout: float = 90.0,
                 what: str = "") -> dict[str, Any]:  # fmt: skip
        deadline = time.monotonic() + timeout
        pod: dict[str, Any] = {}
        while time.monotonic() < deadline:
            proc = self.kubectl("get", "pod", name, "-o", "json", check=False)
            if proc.returncode == 0:
                pod = json.loads(proc.stdout)
                if cond(pod):
                    return pod
            time.sleep(0.3)
        raise AssertionError(f"pod {name}: {what or 'condition'} not met in {timeout}s; status: "
                             f"{json.dumps(pod.get('status'), indent=1)}\nagent log:\n{self.agent_log()[-3000:]}")

    @property
    def node_dir(self) -> Path:
        return self.cluster.data_dir / "nodes" / "virtplane-node-1"

    def agent_log(self) -> str:
        try:
            return (self.node_dir / "agent.log").read_text(errors="replace")
        except OSError:
            return ""


def ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in (pod.get("status") or {}).get("conditions") or []}
    return conds.get("Ready") == "True"


@pytest.fixture(scope="package")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodEnv]:
    requirements()
    work = tmp_path_factory.mktemp("pods")
    registry = guest.start_registry(work / "registry")
    cluster = Cluster(work / "cluster", extra_args=("--nodes", "1"))
    try:
        image = containers.push_busybox_image(registry.host, work)
        cluster.start()
        yield PodEnv(cluster, registry, image)
    finally:
        cluster.stop()
        containers.cleanup_node_pods(cluster.data_dir)
        registry.stop()
