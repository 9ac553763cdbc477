"""`virtplane node`: the node agent (KubeVirt's virt-handler plus the kubelet's part for launcher pods).

Start-up order matters for "a restart never stops or restarts a VM":
1. probe KVM (a guest must really run on it) and read host facts;
2. serve HTTPS (the port goes into the Node object);
3. register the Node and start renewing its Lease;
4. adopt every QEMU a previous agent left running, *before* any reconcile can see a VMI without its machine;
5. start the informers (VMIs with label kubevirt.io/nodeName=<node>, launcher pods) and, once synced, the
   work queue: every cached VMI and every adopted runtime is reconciled once.
On SIGTERM the agent lets go of its QEMUs without touching them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import datetime
import logging
from pathlib import Path
from typing import Any

from virtplane.client import informer, rest
from virtplane.client.events import EventRecorder
from virtplane.hypervisor.accel import AccelProbe, probe_kvm
from virtplane.network.services import ServiceRules
from virtplane.storage import oci

from . import network, nodeinfo
from .controller import PODS, VMIS, VMIController
from .migration import TARGET_NODE_LABEL
from .pods import setup as pod_setup
from .pods.streams import add_pod_routes
from .routes import NodeRoutes
from .server import AgentServer, ProxyToken
from .services import ServiceProxy
from .status import NODE_NAME_LABEL
from .tls import ensure_serving_cert
from .volumes import VolumeResolver

log = logging.getLogger(__name__)

JSON = dict[str, Any]
NODES = rest.GVR("", "v1", "nodes", namespaced=False)
LEASES = rest.GVR("coordination.k8s.io", "v1", "leases")
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_SECONDS = 40
LEASE_RENEW_SECONDS = 10.0
NODE_STATUS_SECONDS = 60.0  # full status refresh; liveness between refreshes is the Lease (as the kubelet does)
KEPT_IP_SECONDS = 15.0  # how often kept pod IPs of migrated-away VMIs are checked for release


@dataclasses.dataclass(frozen=True, slots=True)
class AgentConfig:
    kubeconfig: Path
    name: str
    data_dir: Path
    address: str = "127.0.0.1"
    port: int = 0
    insecure_registries: tuple[str, ...] = ()
    kvm_probe_timeout: float = 3.0


def lease_time() -> str:
    """metav1.MicroTime."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.expanduser().resolve()
        self.client_config = rest.ClientConfig.from_kubeconfig(config.kubeconfig)
        self.client = rest.Client(self.client_config, user_agent=f"virtplane-node/{config.name}")
        self.probe: AccelProbe | None = None
        self.facts: nodeinfo.HostFacts | None = None
        self.fingerprint = ""
        self.controller: VMIController | None = None
        self.pod_controller: pod_setup.PodController | None = None
        self.server: AgentServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.probe, self.facts = await asyncio.gather(
            probe_kvm(timeout=cfg.kvm_probe_timeout), nodeinfo.HostFacts.collect(self.data_dir))
        log.info("accelerator: %s (%s)", self.probe.accel, self.probe.reason)
        cert = ensure_serving_cert(self.data_dir / "pki", cfg.name, [cfg.address, cfg.name, "localhost"])
        self.fingerprint = cert.fingerprint

        vmis = informer.Informer(self.client, VMIS, label_selector=f"{NODE_NAME_LABEL}={cfg.name}")
        pods = informer.Informer(self.client, PODS, label_selector="kubevirt.io=virt-launcher")
        targets = informer.Informer(self.client, VMIS, label_selector=f"{TARGET_NODE_LABEL}={cfg.name}")
        images = oci.ImageCache(self.data_dir / "images", insecure_registries=cfg.insecure_registries)
        controller = VMIController(
            client=self.client, node_name=cfg.name, node_ip=cfg.address, data_dir=self.data_dir, probe=self.probe,
            resolver=VolumeResolver(self.client, images, ca_data=self.client_config.ca_data),
            recorder=EventRecorder(self.client, "virt-handler", host=cfg.name), vmis=vmis, pods=pods,
            targets=targets,
        )  # fmt: skip
        self.controller = controller
        # pods beside VMs (virtplane.node.pods): their own informer (spec.nodeName) and reconciler
        pod_controller, pod_informer = pod_setup.build(
            self.client, node_name=cfg.name, node_ip=cfg.address, data_dir=self.data_dir,
            insecure_registries=cfg.insecure_registries)  # fmt: skip
        self.pod_controller = pod_controller
        self.server = AgentServer(controller, ProxyToken(self.client), cfg.name,
                                  route_hooks=[lambda app, auth: add_pod_routes(app, pod_controller, auth)])
        port = await self.server.start(cfg.address, cfg.port, cert.ssl_context())
        log.info("node agent API listening", extra={"address": cfg.address, "port": port})
        pod_net = network.pod_network()
        proxy = ServiceProxy(self.client, ServiceRules(pod_net.state_dir)) if pod_net is not None else None
        routes = NodeRoutes(self.client, cfg.name, pod_net.pod_cidr, pods) if pod_net is not None else None
        try:
            await self._register_node()
            self._tasks.append(asyncio.create_task(self._lease_loop(), name="lease"))
            self._tasks.append(asyncio.create_task(self._node_status_loop(), name="node-status"))
            await controller.adopt_all()
            pod_controller.adopt_all()
            vmis.add_handler(controller.on_vmi_event)
            targets.add_handler(controller.on_vmi_event)
            pods.add_handler(controller.on_pod_event)
            vmis.start()
            targets.start()
            pods.start()
            pod_informer.start()
            await asyncio.gather(vmis.synced.wait(), pods.synced.wait(), targets.synced.wait(),
                                 pod_informer.synced.wait())
            pod_controller.start()
            for key in {*vmis.cache.keys(), *controller.runtimes.keys()}:
                controller.enqueue(key)
            controller.queue.start()
            if proxy is not None and routes is not None:
                proxy.start()
                routes.start()
                self._tasks.append(asyncio.create_task(self._kept_ip_loop(), name="kept-pod-ips"))
            self.ready.set()
            log.info("node agent ready", extra={"node": cfg.name, "adopted": len(controller.runtimes)})
            await stop.wait()
        finally:
            log.info("node agent stopping (VMs keep running)")
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(BaseException):
                    await t
            if proxy is not None and routes is not None:
                await routes.stop()
                await proxy.stop()
            await vmis.stop()
            await targets.stop()
            await pods.stop()
            await pod_informer.stop()
            await pod_controller.shutdown()  # containers keep running, like VMs
            await controller.shutdown()
            await self.server.stop()
            await self.client.close()

    async def _kept_ip_loop(self) -> None:
        """Pod IPs this node allocated to VMIs that live-migrated away stay reserved while the VMI lives
        (wherever it runs); once it is gone, or has ended, the address goes back to this node's IPAM."""
        pod_net = network.pod_network()
        assert pod_net is not None
        while True:
            for rec in pod_net.kept():
                try:
                    vmi = await self.client.get(VMIS, rec.get("name", ""), rec.get("namespace"))
                except rest.NotFound:
                    vmi = None
                except Exception as err:
                    log.info("kept pod IP %s: cannot look its VMI up: %s", rec.get("ip"), err)
                    continue
                if vmi is None or vmi["metadata"].get("uid") != rec.get("uid") or \
                        (vmi.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    for err in await pod_net.release_kept(str(rec.get("uid"))):
                        log.warning("releasing kept pod IP %s: %s", rec.get("ip"), err)
            await asyncio.sleep(KEPT_IP_SECONDS)

    # -- Node and Lease -----------------------------------------------------------------------------------
    def _desired_meta(self) -> tuple[dict[str, str], dict[str, str]]:
        assert self.probe is not None and self.facts is not None
        return (nodeinfo.node_labels(self.config.name, self.facts, self.probe),
                nodeinfo.node_annotations(self.probe, self.fingerprint))  # fmt: skip

    @staticmethod
    def _pod_cidr_spec() -> JSON:
        """Node.spec.podCIDR(s): this node's pod subnet on a CNI node (the other nodes route it to us)."""
        pod_net = network.pod_network()
        return {"podCIDR": pod_net.pod_cidr, "podCIDRs": [pod_net.pod_cidr]} if pod_net is not None else {}

    async def _register_node(self) -> None:
        name = self.config.name
        labels, annotations = self._desired_meta()
        while True:
            try:
                node = await self.client.get(NODES, name)
            except rest.NotFound:
                body = {"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": name, "labels": labels, "annotations": annotations},
                        "spec": self._pod_cidr_spec()}  # fmt: skip
                try:
                    node = await self.client.create(NODES, body)
                except rest.Conflict:
                    continue
            else:
                meta = node["metadata"]
                want_labels = {**(meta.get("labels") or {}), **labels}
                want_ann = {**(meta.get("annotations") or {}), **annotations}
                want_spec = {**(node.get("spec") or {}), **self._pod_cidr_spec()}
                if want_labels != meta.get("labels") or want_ann != meta.get("annotations") \
                        or want_spec != (node.get("spec") or {}):
                    updated = copy.deepcopy(node)
                    updated["metadata"]["labels"] = want_labels
                    updated["metadata"]["annotations"] = want_ann
                    updated["spec"] = want_spec
                    try:
                        node = await self.client.update(NODES, updated)
                    except rest.Conflict:
                        continue
            await self._update_node_status(node)
            log.info("registered node %s", name)
            return

    async def _update_node_status(self, node: JSON | None = None) -> None:
        assert self.probe is not None and self.facts is not None and self.server is not None
        for _attempt in range(5):
            if node is None:
                node = await self.client.get(NODES, self.config.name)
            body = copy.deepcopy(node)
            body["status"] = nodeinfo.build_node_status(
                self.facts, self.probe, address=self.config.address, hostname=self.config.name,
                port=self.server.port, old=node.get("status"))  # fmt: skip
            try:
                await self.client.update_status(NODES, body)
                return
            except rest.Conflict:
                node = None

    async def _node_status_loop(self) -> None:
        while True:
            await asyncio.sleep(NODE_STATUS_SECONDS)
            try:
                node = await self.client.get(NODES, self.config.name)
                labels, annotations = self._desired_meta()
                meta = node["metadata"]
                if any((meta.get("labels") or {}).get(k) != v for k, v in labels.items()) or \
                        any((meta.get("annotations") or {}).get(k) != v for k, v in annotations.items()):
                    await self._register_node()  # someone removed our labels: put them back
                else:
                    await self._update_node_status(node)
            except rest.NotFound:
                await self._register_node()  # deleted (kubectl delete node): register again, like the kubelet
            except Exception as err:
                log.warning("node status update failed: %s", err)

    async def _lease_loop(self) -> None:
        name = self.config.name
        while True:
            try:
                await self._renew_lease(name)
            except Exception as err:
                log.warning("lease renewal failed: %s", err)
            await asyncio.sleep(LEASE_RENEW_SECONDS)

    async def _renew_lease(self, name: str) -> None:
        try:
            lease = await self.client.get(LEASES, name, LEASE_NAMESPACE)
        except rest.NotFound:
            node = await self.client.get(NODES, name)
            body = {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": LEASE_NAMESPACE, "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"]}]},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                         "renewTime": lease_time()},
            }  # fmt: skip
            await self.client.create(LEASES, body, LEASE_NAMESPACE)
            return
        lease = copy.deepcopy(lease)
        spec = lease.setdefault("spec", {})
        spec.update({"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                     "renewTime": lease_time()})  # fmt: skip
        await self.client.update(LEASES, lease)

