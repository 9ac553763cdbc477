"""The Create VirtualMachine page's catalog and boot sources in a real browser, against the session `cluster`
(which `virtplane up` seeded with the common instance types and preferences):

- from the catalog: a preference card (Fedora) and an instance type (u1.small); a too-small instance type is
  warned about; the VM boots and its VMI carries the instance type's memory and the preference's disk bus;
- scheduling and an SSH key set from the Configuration tab of a stopped VM land in its template;
- an image uploaded from the browser (CDI upload: DataVolume, UploadTokenRequest, upload proxy) with a progress
  bar, then the VM boots from it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.vm.test_lifecycle import console
from tests.e2e.web.conftest import launch_browser, login, new_page, shot
from virtplane.testing import guest
from virtplane.testing.cluster import Cluster
from virtplane.testing.waiting import wait_for

pytestmark = pytest.mark.e2e
CATALOG_VM = "web-catalog"
UPLOAD_VM = "web-upload"
SCHED_VM = "web-sched"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv0eQz6YV7i6Ub9b0ZtQ2W1yA0e8vJ4mZ1kQ3c5Xw9a web@test"
BOOT = 240  # seconds: a TCG guest on a loaded 2-core machine


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[str]:
    with guest.registry_with_containerdisk(tmp_path_factory.mktemp("web-create-registry")) as (_reg, ref):
        try:
            yield ref
        finally:
            cluster.kubectl("delete", "vm", CATALOG_VM, UPLOAD_VM, SCHED_VM, "--ignore-not-found", "--wait=false",
                            check=False)
            cluster.kubectl("delete", "dv", f"{UPLOAD_VM}-rootdisk", "--ignore-not-found", "--wait=false",
                            check=False)


@pytest.fixture(scope="module")
def page(cluster: Cluster, image: str) -> Iterator[Any]:
    with launch_browser() as browser:
        ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1600, "height": 1200})
        try:
            pg = new_page(ctx)
            server, token, _ = cluster.config()
            login(pg, server, token)
            yield pg
            assert not pg.console_errors, pg.console_errors
        finally:
            ctx.close()


def vmi(cluster: Cluster, name: str) -> dict[str, Any]:
    proc = cluster.kubectl("get", "vmi", name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def booted(cluster: Cluster, name: str) -> bool:
    return (vmi(cluster, name).get("status") or {}).get("phase") == "Running" \
        and "virtplane-guest: booted" in console(cluster, name)


def created(page: Any, name: str, timeout: float) -> None:
    """The page moved on to the new VM (generous: the API server shares 2 cores with other test runs); a
    refusal shown by the form fails at once with its message."""
    def done() -> str | None:
        if re.search(rf"#/vms/default/{name}$", page.url):
            return "created"
        err = page.get_by_test_id("create-error")
        if err.count():
            raise AssertionError(f"create refused: {err.inner_text()}")
        return None

    wait_for(done, timeout, 0.5, what=f"the page of the new VM {name}")


def open_create(page: Any) -> None:
    page.goto(page.url.split("#")[0] + "#/vms/~new")
    page.get_by_role("heading", name="Create VirtualMachine").wait_for()


def test_create_from_the_catalog_with_an_instancetype(page: Any, cluster: Cluster, image: str) -> None:
    open_create(page)
    page.get_by_test_id("pref-fedora").wait_for()
    page.locator("#pref-sel-fedora").check(force=True)  # the card's radio
    page.get_by_text("Preference fedora: fills in").wait_for()
    page.locator("#instancetype").select_option("u1.nano")
    warning = page.get_by_test_id("requirements-warning")
    warning.wait_for()
    assert "Fedora Linux needs at least 2Gi of memory" in warning.inner_text()
    page.locator("#instancetype").select_option("u1.small")
    warning.wait_for(state="detached")
    assert page.locator("#memory").count() == 0  # sized by the instance type
    page.locator("#name").fill(CATALOG_VM)
    page.locator("#image").fill(image)
    page.get_by_text("Review as YAML").click()
    review = page.get_by_test_id("review-yaml").inner_text()
    assert "name: u1.small" in review and "name: fedora" in review
    shot(page, "20-create-catalog")
    page.get_by_role("button", name="Create", exact=True).click()
    created(page, CATALOG_VM, 120)
    page.locator('[data-status="Running"]').first.wait_for(timeout=BOOT * 1000)
    wait_for(lambda: booted(cluster, CATALOG_VM), BOOT, what=f"{CATALOG_VM} booted")
    spec = vmi(cluster, CATALOG_VM)["spec"]
    assert spec["domain"]["memory"]["guest"] == "2Gi"
    assert [d["disk"]["bus"] for d in spec["domain"]["devices"]["disks"]] == ["virtio", "virtio"]
    annotations = vmi(cluster, CATALOG_VM)["metadata"]["annotations"]
    assert annotations["kubevirt.io/cluster-instancetype-name"] == "u1.small"
    assert annotations["kubevirt.io/cluster-preference-name"] == "fedora"
    cluster.kubectl("delete", "vm", CATALOG_VM, "--wait=false")


def test_upload_an_image_from_the_browser_and_boot_from_it(page: Any, cluster: Cluster) -> None:
    open_create(page)
    page.locator("#name").fill(UPLOAD_VM)
    page.get_by_label("Upload an image (DataVolume)").check()
    page.locator("#size").fill("256Mi")
    page.locator("#memory").fill("128Mi")
    page.locator('input[type="file"]').set_input_files(str(guest.image_paths().qcow2))
    # record every state of the progress bar: the page moves on to the VM as soon as it is created
    page.evaluate("""() => { window.__progress = [];
        new MutationObserver(() => { const bar = document.querySelector('[data-testid="upload-progress"]');
            if (bar) window.__progress.push(bar.innerText.replace(/\\s+/g, ' ')); })
          .observe(document.body, { subtree: true, childList: true, characterData: true, attributes: true }); }""")
    page.get_by_role("button", name="Create", exact=True).click()
    page.get_by_test_id("upload-progress").wait_for(timeout=60_000)
    shot(page, "21-create-upload-progress")
    created(page, UPLOAD_VM, 240)
    states: list[str] = page.evaluate("window.__progress")
    mib = f"{guest.image_paths().qcow2.stat().st_size / 1048576:.1f}"
    assert any("Uploading" in s for s in states), states
    assert any(s.startswith("Uploaded") and f"{mib} / {mib} MiB" in s for s in states), states[-5:]
    dv = json.loads(cluster.kubectl("get", "dv", f"{UPLOAD_VM}-rootdisk", "-o", "json").stdout)
    assert dv["spec"]["source"] == {"upload": {}}
    page.locator('[data-status="Running"]').first.wait_for(timeout=BOOT * 1000)
    wait_for(lambda: booted(cluster, UPLOAD_VM), BOOT, what=f"{UPLOAD_VM} booted from the uploaded image")
    shot(page, "22-upload-vm")
    cluster.kubectl("delete", "vm", UPLOAD_VM, "--wait=false")


def test_scheduling_and_ssh_key_from_the_configuration_tab(page: Any, cluster: Cluster, image: str) -> None:
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": SCHED_VM},
          "spec": {"runStrategy": "Halted", "template": {"spec": {
              "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}},
                                               {"name": "ci", "disk": {"bus": "virtio"}}]},
                         "resources": {"requests": {"memory": "128Mi"}}},
              "volumes": [{"name": "root", "containerDisk": {"image": image}},
                          {"name": "ci", "cloudInitNoCloud": {"userData": "#cloud-config\nhostname: sched\n"}}]}}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(vm))
    page.goto(page.url.split("#")[0] + f"#/vms/default/{SCHED_VM}/configuration")
    page.locator("#node-selector").fill("kubernetes.io/os=linux\ndisk=any")
    page.locator("#tolerations").fill("- key: dedicated\n  operator: Exists\n  effect: NoSchedule\n")
    page.locator("#eviction-strategy").select_option("LiveMigrateIfPossible")
    page.locator("#ssh-keys").fill(KEY)
    page.get_by_role("button", name="Save scheduling and SSH key").click()
    # the server's refusal is shown as it words it (no live migration on a one-node cluster), nothing written
    page.get_by_text("this is a single-node cluster").first.wait_for()
    page.locator("#eviction-strategy").select_option("None")
    page.get_by_role("button", name="Save scheduling and SSH key").click()
    page.get_by_test_id("scheduling-saved").wait_for()
    shot(page, "23-configuration-scheduling")
    spec = json.loads(cluster.kubectl("get", "vm", SCHED_VM, "-o", "json").stdout)["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "disk": "any"}
    assert spec["tolerations"] == [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["evictionStrategy"] == "None"
    user_data = spec["volumes"][1]["cloudInitNoCloud"]["userData"]
    assert user_data.startswith("#cloud-config\n") and "hostname: sched" in user_data
    assert KEY in user_data and "ssh_authorized_keys" in user_data
    # a bad selector line is refused in the form, nothing is written
    page.locator("#node-selector").fill("no-equals-sign")
    page.get_by_role("button", name="Save scheduling and SSH key").click()
    page.get_by_text('node selector line "no-equals-sign" is not key=value').wait_for()
    cluster.kubectl("delete", "vm", SCHED_VM, "--wait=false")
