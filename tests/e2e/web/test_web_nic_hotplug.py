"""NIC hotplug from the web console into a running VM, on a node with the CNI pod network (`virtplane up --nodes 1
--node-netns --pod-network cni`, root): the Configuration tab adds a bridge NIC on a NetworkAttachmentDefinition
(as `virtctl addinterface`), the guest gets it and an address from the NAD's range with no RestartRequired, and
Remove unplugs it (`state: absent`)."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.migration.conftest import vm_manifest
from tests.e2e.web.conftest import logged_in_page, netns_cluster, shot, vmi_of
from virtplane.testing.cluster import Cluster
from virtplane.testing.waiting import wait_for

pytestmark = pytest.mark.e2e
VM = "web-nic"
NAD = "webnet"
SUBNET = "192.168.179"


def manifest(image: str) -> dict[str, Any]:
    vm = vm_manifest(VM, image)
    # the pod network's NIC spelled out: a NIC added later must not replace the implicit default one
    spec = vm["spec"]["template"]["spec"]
    spec["domain"]["devices"]["interfaces"] = [{"name": "default", "masquerade": {}}]
    spec["networks"] = [{"name": "default", "pod": {}}]
    return vm


@pytest.fixture(scope="module")
def cni_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    with netns_cluster(tmp_path_factory, 1, manifest, cni=True) as c:
        yield c


@pytest.fixture(scope="module")
def page(cni_node: tuple[Cluster, str]) -> Iterator[Any]:
    with logged_in_page(cni_node[0]) as pg:
        yield pg


@pytest.fixture
def nad(cni_node: tuple[Cluster, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bridge + host-local NAD; the bridge name is host-global, unique per run and removed after."""
    cluster, _ = cni_node
    bridge = f"vpw{secrets.token_hex(3)}"
    ipam = tmp_path_factory.mktemp("web-nad-ipam")
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition", "metadata": {"name": NAD},
        "spec": {"config": json.dumps({"cniVersion": "1.0.0", "name": NAD, "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": False, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": f"{SUBNET}.0/24"}]], "dataDir": str(ipam)}}]})}}))
    try:
        yield NAD
    finally:
        subprocess.run(["ip", "link", "delete", bridge], check=False, capture_output=True)


def test_hotplug_a_nic_into_the_running_vm(page: Any, cni_node: tuple[Cluster, str], nad: str) -> None:
    cluster, _ = cni_node
    wait_for(lambda: (vmi_of(cluster, VM).get("status") or {}).get("phase") == "Running", 240, what=f"{VM} Running")
    page.goto(page.url.split("#")[0] + f"#/vms/default/{VM}/configuration")
    page.wait_for_function(f"() => [...document.querySelectorAll('option')].some(o => o.value === '{nad}')")
    page.get_by_label("Network attachment definition").select_option(nad)
    page.get_by_label("Interface name").fill("hot")
    page.get_by_role("button", name="Add network interface").click()
    nics = page.locator('table[aria-label="Configured network interfaces"]')
    hot = nics.locator("tr", has_text=f"multus: {nad}")
    hot.filter(has_text="attached").filter(has_text=re.compile(rf"{re.escape(SUBNET)}\.\d+")).wait_for(timeout=240_000)
    shot(page, "30-nic-hotplugged")
    assert page.get_by_test_id("restart-required").count() == 0
    page.locator('[data-remove-nic="hot"]').click()
    hot.filter(has_text="absent").wait_for()
    wait_for(lambda: all(i.get("name") != "hot" for i in (vmi_of(cluster, VM).get("status") or {}).get("interfaces")
                         or []), 120, what="the hot NIC gone from the VMI's status.interfaces")  # fmt: skip
    assert page.get_by_test_id("restart-required").count() == 0
    shot(page, "31-nic-unplugged")
