"""Wiring of the pod runtime into the node agent (kept here so node/agent.py only calls `build`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from virtplane.client import informer, rest
from virtplane.client.events import EventRecorder

from .. import network
from .controller import PODS, PodController
from .images import ImageStore
from .runtime import PodRuntime, ptp_conflist


def default_pod_cidr(data_dir: Path) -> str:
    """A /24 in 10.88.0.0/16 chosen by the node's data dir: agents of different clusters on one machine get
    different subnets (and routes), so their pods never share an address."""
    h = hashlib.sha256(str(data_dir).encode()).digest()
    return f"10.88.{h[0]}.0/24"


def cgroup_scope(data_dir: Path) -> str:
    """The node's pods cgroup parent under `virtplane/` (named by the data dir, as the runc prefix is)."""
    return f"pods-{hashlib.sha256(str(data_dir).encode()).hexdigest()[:8]}"


def build(client: rest.Client, *, node_name: str, node_ip: str, data_dir: Path,
          insecure_registries: tuple[str, ...]) -> tuple[PodController, informer.Informer]:  # fmt: skip
    root = data_dir / "pods"
    root.mkdir(parents=True, exist_ok=True)
    # A node with the CNI pod network (`--pod-network cni`) puts pods on the same chain as VMs; otherwise pods
    # get their own ptp chain (a netns and a host-routed IP each) so they are reachable from the node anyway.
    conflist = network.pod_conflist() or ptp_conflist(default_pod_cidr(data_dir), root / "cni")
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:8]
    # The node's containers sit under one CPU-weighted parent beside the VMs' (`virtplane/pods-<hash>`, weighing
    # the host's cores, as kubepods does): inside it each weighs its request, so a BestEffort container's 2
    # shares make it yield to other pods, not to every process of the host.
    runtime = PodRuntime(root, node_name=node_name, conflist=conflist, cgroup_prefix=f"vp{digest}",
                         cgroup_scope=cgroup_scope(data_dir))  # fmt: skip
    images = ImageStore(root, insecure_registries=insecure_registries)
    pods = informer.Informer(client, PODS, field_selector=f"spec.nodeName={node_name}")
    controller = PodController(client=client, node_name=node_name, node_ip=node_ip, runtime=runtime, images=images,
                               recorder=EventRecorder(client, "kubelet", host=node_name), pods=pods)  # fmt: skip
    pods.add_handler(controller.on_pod_event)
    return controller, pods
