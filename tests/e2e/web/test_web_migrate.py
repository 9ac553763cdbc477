"""Migration and drain from the web console on a real two-node cluster (`virtplane up --nodes 2 --node-netns`):
a VM is live-migrated from its list row to a chosen node, then back from its details page to "any other node",
the Migrations page shows the phase and nodes, and draining the VM's node from the Nodes page migrates it away
(evictionStrategy LiveMigrate) and leaves the node cordoned."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.migration.conftest import vm_manifest
from tests.e2e.web.conftest import logged_in_page, netns_cluster, running_and_migratable, shot
from virtplane.testing.cluster import Cluster
from virtplane.testing.waiting import wait_for

pytestmark = pytest.mark.e2e
NODES = 2
VM = "web-mig"
MIGRATE_MS = 300_000  # a TCG guest's memory over a loaded 2-core machine


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    with netns_cluster(tmp_path_factory, NODES, lambda image: vm_manifest(VM, image, eviction="LiveMigrate")) as c:
        yield c


@pytest.fixture(scope="module")
def page(two_nodes: tuple[Cluster, str]) -> Iterator[Any]:
    with logged_in_page(two_nodes[0]) as pg:
        yield pg


def vmi_node(cluster: Cluster) -> str:
    vmi = json.loads(cluster.kubectl("get", "vmi", VM, "-o", "json").stdout)
    return str((vmi.get("status") or {}).get("nodeName") or "")


def vm_row(page: Any) -> Any:
    return page.locator(f'tr[data-vm="{VM}"]')


def wait_on_node(page: Any, node: str) -> None:
    """The list's Node column (from the VMI watch) names `node`, and the VM is Running there."""
    page.locator(f'tr[data-vm="{VM}"][data-status="Running"]').locator("td", has_text=re.compile(
        rf"^{re.escape(node)}$")).wait_for(timeout=MIGRATE_MS)


def migratable(cluster: Cluster) -> bool:
    return running_and_migratable(cluster, VM)


def test_migrate_from_the_list_to_a_chosen_node(page: Any, two_nodes: tuple[Cluster, str]) -> None:
    cluster, _ = two_nodes
    wait_for(lambda: migratable(cluster), 240, what=f"{VM} Running and LiveMigratable")
    source = vmi_node(cluster)
    items = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    nodes = sorted(n["metadata"]["name"] for n in items)
    target = next(n for n in nodes if n != source)
    wait_on_node(page, source)
    vm_row(page).get_by_role("button", name=re.compile("kebab|actions", re.I)).click()
    page.get_by_role("menuitem", name="Migrate", exact=True).click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Target node").select_option(target)
    assert [o for o in dialog.get_by_label("Target node").locator("option").all_inner_texts() if o == source] == []
    dialog.get_by_role("button", name="Migrate", exact=True).click()
    progress = dialog.get_by_test_id("migration-progress")
    dialog.locator('[data-testid="migration-progress"][data-phase="Succeeded"]').wait_for(timeout=MIGRATE_MS)
    assert f"{source} → {target}" in progress.inner_text()
    shot(page, "20-migrate-dialog-succeeded")
    name = re.search(r"Migration (\S+):", progress.inner_text()).group(1)  # type: ignore[union-attr]
    vmim = json.loads(cluster.kubectl("get", "virtualmachineinstancemigrations", name, "-o", "json").stdout)
    assert vmim["spec"]["addedNodeSelector"] == {"kubernetes.io/hostname": target}
    dialog.get_by_role("contentinfo").get_by_role("button", name="Close").click()
    wait_on_node(page, target)
    assert vmi_node(cluster) == target

    page.goto(page.url.split("#")[0] + "#/migrations")
    mig = page.locator(f'tr[data-migration="{name}"][data-phase="Succeeded"]')
    mig.wait_for()
    assert source in mig.inner_text() and target in mig.inner_text()
    shot(page, "21-migrations")


def test_migrate_from_the_details_page_to_any_node(page: Any, two_nodes: tuple[Cluster, str]) -> None:
    cluster, _ = two_nodes
    wait_for(lambda: migratable(cluster), 120, what=f"{VM} LiveMigratable after its migration")
    source = vmi_node(cluster)
    page.goto(page.url.split("#")[0] + f"#/vms/default/{VM}")
    page.get_by_role("button", name="Migrate", exact=True).click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("button", name="Migrate", exact=True).click()  # "any other node": no addedNodeSelector
    dialog.locator('[data-testid="migration-progress"][data-phase="Succeeded"]').wait_for(timeout=MIGRATE_MS)
    dialog.get_by_role("contentinfo").get_by_role("button", name="Close").click()
    wait_for(lambda: vmi_node(cluster) not in ("", source), 60, what=f"{VM} off {source}")


def test_drain_the_vms_node_from_the_nodes_page(page: Any, two_nodes: tuple[Cluster, str]) -> None:
    cluster, _ = two_nodes
    wait_for(lambda: migratable(cluster), 120, what=f"{VM} LiveMigratable")
    victim = vmi_node(cluster)
    uid = json.loads(cluster.kubectl("get", "vmi", VM, "-o", "json").stdout)["metadata"]["uid"]
    page.goto(page.url.split("#")[0] + "#/nodes")
    node_row = page.locator(f'tr[data-node="{victim}"]')
    node_row.get_by_role("button", name="Drain").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(re.compile(r"virt-launcher")).first.wait_for()  # the VM's pod is listed before confirming
    dialog.get_by_role("button", name="Drain", exact=True).click()
    dialog.get_by_test_id("drain-phase").filter(has_text="done").wait_for(timeout=MIGRATE_MS)
    # the launcher pod's eviction was answered 429 while its VM moved, then it went
    pods = dialog.get_by_test_id("drain-pods").inner_text()
    assert re.search(rf'virt-launcher-{VM}.*Eviction triggered evacuation of VMI "default/{VM}".*gone from the node',
                     pods), pods
    shot(page, "22-nodes-drained")
    dialog.get_by_role("contentinfo").get_by_role("button", name="Close").click()
    node_row.filter(has_text="Cordoned").wait_for()
    vmi = json.loads(cluster.kubectl("get", "vmi", VM, "-o", "json").stdout)
    assert vmi["metadata"]["uid"] == uid, "live-migrated: the same VMI"
    assert vmi["status"]["nodeName"] != victim
    node_row.get_by_role("button", name="Uncordon").click()
    node_row.filter(has_text="Yes").wait_for()
