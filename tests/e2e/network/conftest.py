"""A node agent with the CNI pod network (`virtplane node --pod-network cni`): real `virtplane up --nodes 0`,
real CNI plugins from /usr/lib/cni, dnsmasq and nftables in per-VMI network namespaces. Needs root."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.node.conftest import (  # noqa: F401 - admin/component are fixtures re-exported for these tests
    NODE,
    NodeAgentProc,
    admin,
    component,
    component_kubeconfig,
    requirements,
)
from virtplane.network import services
from virtplane.testing import guest
from virtplane.testing.cluster import REPO, Cluster

POD_CIDR = "10.244.97.0/24"
POD_GATEWAY = "10.244.97.1"
BRIDGE = "vpe2e0"  # not the default vp0: never touch a bridge a real node agent on this host may use


def network_requirements() -> None:
    if os.geteuid() != 0:
        pytest.skip("the CNI pod network needs root (netns, bridges, nftables)")
    for tool in ("/usr/lib/cni/bridge", "/usr/lib/cni/host-local"):
        if not Path(tool).exists():
            pytest.skip(f"{tool} missing (apt: containernetworking-plugins)")
    for tool in ("nft", "dnsmasq", "nsenter", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def good_config(root: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0", "name": "e2e-pod",
        "plugins": [{
            "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}],
                     "dataDir": str(root / "ipam")},
        }],
    }  # fmt: skip


class CNINodeAgent(NodeAgentProc):
    def __init__(self, kubeconfig: Path, data_dir: Path, log_path: Path, cni_config: Path) -> None:
        super().__init__(kubeconfig, data_dir, log_path)
        self.cni_config = cni_config

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "virtplane.cli.main", "node", "--kubeconfig", str(self.kubeconfig),
                 "--name", NODE, "--data-dir", str(self.data_dir), "--address", "127.0.0.1",
                 "--pod-network", "cni", "--cni-config", str(self.cni_config)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
            )  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    requirements()
    network_requirements()
    root = tmp_path_factory.mktemp("nete2e")
    cni_config = root / "10-pod.conflist"
    cni_config.write_text(json.dumps(good_config(root)))
    cluster = Cluster(root / "cluster", extra_args=("--nodes", "0"))
    cluster.start()
    agent: CNINodeAgent | None = None
    try:
        with guest.registry_with_containerdisk(root / "registry") as (_reg, image):
            kubeconfig = component_kubeconfig(cluster, root / "node.kubeconfig")
            agent = CNINodeAgent(kubeconfig, root / "node", root / "node-agent.log", cni_config)
            agent.start()
            yield {"cluster": cluster, "agent": agent, "image": image, "root": root, "cni_config": cni_config,
                   "component_kubeconfig": kubeconfig}  # fmt: skip
    finally:
        if agent is not None:
            agent.stop()
        for pidfile in (root / "node" / "runtime").glob("*/pid"):
            with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        # Whatever a failed test left: dnsmasq by the pid in its state file, netns by name, the test bridge.
        for state in (root / "node" / "network" / "pods").glob("*.json"):
            with contextlib.suppress(ValueError, OSError):
                data = json.loads(state.read_text())
                if data.get("dnsmasqPid"):
                    os.kill(int(data["dnsmasqPid"]), signal.SIGTERM)
                subprocess.run(["ip", "netns", "delete", data["netns"]], check=False, capture_output=True)
        subprocess.run(["ip", "link", "delete", BRIDGE], check=False, capture_output=True)
        # The agent removes its Service table when it stops; a killed one would leave it behind.
        table = services.table_name((root / "node" / "network").resolve())
        subprocess.run(["nft", "delete", "table", "ip", table], check=False, capture_output=True)
        cluster.stop()
