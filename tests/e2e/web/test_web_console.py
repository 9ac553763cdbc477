"""The web console in a real browser against `virtplane up` (the session `cluster`): log in, create a VM from the
form, watch it reach Running, use its serial console (login + a command) and VNC (non-blank canvas), edit its YAML
into a 409, stop/start it from the list, bulk-delete, and see a 422 next to the offending field. Each main page is
saved as a screenshot under test-artifacts/web/. Tests share one page, in order, like a user's session."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.web.conftest import BULK, HOT, VM, shot
from virtplane.testing.cluster import Cluster

pytestmark = pytest.mark.e2e
BOOT_MS = 240_000  # a TCG guest on a loaded 2-core machine
USER_DATA = "#cloud-config\nhostname: web-e2e\n"


def row(page: Any, name: str) -> Any:
    return page.locator(f'tr[data-vm="{name}"]')


def wait_status(page: Any, name: str, status: str, timeout: float = 120_000) -> None:
    page.locator(f'tr[data-vm="{name}"][data-status="{status}"]').wait_for(timeout=timeout)


def test_login(page: Any, cluster: Cluster) -> None:
    server, token, _ = cluster.config()
    page.goto(f"{server}/console/")
    page.get_by_label("Bearer token").fill("not-a-token")
    page.get_by_role("button", name="Log in").click()
    page.get_by_text("401 Unauthorized").wait_for()
    page.get_by_label("Bearer token").fill(token)
    shot(page, "00-login")
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("heading", name="VirtualMachines").wait_for()


def test_422_is_shown_next_to_the_field(page: Any, image: str) -> None:
    page.goto(page.url.split("#")[0] + "#/vms/~new")
    page.locator("#name").fill("Not_A_Valid_Name")
    page.locator("#image").fill(image)
    page.get_by_role("button", name="Create", exact=True).click()
    err = page.get_by_test_id("error-name")
    err.wait_for()
    text = err.inner_text()
    assert re.search(r"lowercase|RFC 1123|must consist", text, re.I), text
    page.locator("#name").scroll_into_view_if_needed()
    shot(page, "01-create-422")


def test_create_vm_from_a_url_import_and_see_it_running(page: Any, image_url: str) -> None:
    page.locator("#name").fill(VM)
    page.get_by_label("Import from URL (DataVolume)").check()
    page.locator("#url").fill(image_url)
    page.locator("#userData").fill(USER_DATA)
    page.get_by_text("Review as YAML").click()
    assert VM in page.get_by_test_id("review-yaml").inner_text()
    shot(page, "02-create")
    page.get_by_role("button", name="Create", exact=True).click()
    page.wait_for_url(re.compile(rf"#/vms/default/{VM}$"))
    page.locator('[data-status="Running"]').first.wait_for(timeout=180_000)
    page.get_by_text(f"dataVolume: {VM}-rootdisk").wait_for()
    shot(page, "03-vm-overview")


def test_serial_console_shows_login_and_runs_a_command(page: Any) -> None:
    page.get_by_role("tab", name="Console").click()
    page.get_by_test_id("serial-state").filter(has_text="connected").wait_for()
    rows = page.locator('[data-testid="serial-console"] .xterm-rows')
    terminal = page.locator('[data-testid="serial-console"] .xterm')
    # getty may still be starting: each Enter makes it print a fresh prompt once it is up
    for _ in range(BOOT_MS // 5000):
        if "login:" in rows.inner_text():
            break
        terminal.click()
        page.keyboard.press("Enter")
        page.wait_for_timeout(5000)
    assert "login:" in rows.inner_text(), rows.inner_text()
    terminal.click()
    page.keyboard.type("root\n")
    page.wait_for_function("() => /root@[^\\n]*# ?/.test(document.querySelector("
                           "'[data-testid=serial-console] .xterm-rows').innerText)", timeout=60_000)
    page.keyboard.type("echo web-$((6*7))\n")
    page.wait_for_function("() => document.querySelector('[data-testid=serial-console] .xterm-rows')"
                           ".innerText.includes('web-42')", timeout=60_000)


def test_vnc_canvas_has_pixels(page: Any) -> None:
    page.get_by_test_id("vnc-state").filter(has_text="connected").wait_for()
    lit = 0
    for _ in range(30):
        lit = page.evaluate("""() => {
            const c = document.querySelector('[data-testid=vnc-console] canvas');
            if (!c || !c.width || !c.height) return 0;
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 60) n++;
            return n;
        }""")
        if lit > 100:
            break
        page.wait_for_timeout(1000)
    assert lit > 100, f"VNC canvas has only {lit} lit pixels"
    shot(page, "04-vm-console")


def test_yaml_edit_conflict_is_explained(page: Any, cluster: Cluster) -> None:
    page.get_by_role("tab", name="YAML").click()
    editor = page.get_by_role("textbox", name="YAML")
    editor.wait_for()
    text = editor.input_value()
    assert f"name: {VM}" in text
    editor.fill(text.replace("kubevirt.io/vm: web-vm", "kubevirt.io/vm: web-vm\n    edited: by-browser", 1))
    cluster.kubectl("label", "vm", VM, "changed=elsewhere")  # someone else writes first
    page.get_by_role("button", name="Save").click()
    page.get_by_test_id("yaml-conflict").wait_for()
    shot(page, "05-vm-yaml-409")
    page.get_by_role("button", name=re.compile("Reload the latest")).click()
    assert "changed: elsewhere" in editor.input_value()
    page.get_by_role("tab", name="Events").click()
    page.locator('table[aria-label="Events"]').get_by_text("SuccessfulCreate").first.wait_for()
    shot(page, "06-vm-events")
    page.get_by_role("tab", name="Diagnostics").click()
    page.get_by_test_id("console-log").filter(has_text="web-42").wait_for()
    shot(page, "07-vm-diagnostics")


def test_hotplug_a_disk_from_the_configuration_tab(page: Any, cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": HOT},
        "spec": {"source": {"blank": {}},
                 "storage": {"resources": {"requests": {"storage": "64Mi"}}, "storageClassName": "shared"}}}))
    page.get_by_role("tab", name="Configuration").click()
    choice = page.get_by_label("Volume to add")
    page.wait_for_function(f"() => [...document.querySelectorAll('option')].some(o => o.value === 'dv/{HOT}')")
    choice.select_option(f"dv/{HOT}")
    page.get_by_role("button", name="Add disk").click()
    disks = page.locator('table[aria-label="Configured disks"]')
    disks.locator("tr", has_text=HOT).filter(has_text="Ready").wait_for(timeout=120_000)
    shot(page, "05b-vm-configuration-hotplug")
    page.locator(f'[data-remove="{HOT}"]').click()
    disks.locator("tr", has_text=HOT).wait_for(state="detached", timeout=120_000)


@pytest.mark.parametrize(("route", "heading", "name"), [
    ("overview", "Overview", "10-overview"), ("storage", "Storage", "11-storage"), ("nodes", "Nodes", "12-nodes"),
    ("pods", "Pods", "13-pods"), ("migrations", "Migrations", "14-migrations"),
])
def test_other_pages_render(page: Any, route: str, heading: str, name: str) -> None:
    page.goto(page.url.split("#")[0] + f"#/{route}")
    page.locator("h1", has_text=heading).wait_for()
    page.wait_for_timeout(500)
    shot(page, name)
    assert not page.console_errors, page.console_errors


def _row_action(page: Any, name: str, action: str) -> None:
    row(page, name).get_by_role("button", name=re.compile("kebab|actions", re.I)).click()
    page.get_by_role("menuitem", name=action, exact=True).click()
    page.get_by_role("dialog").get_by_role("button", name=action, exact=True).click()


def test_stop_and_start_from_the_list(page: Any) -> None:
    page.goto(page.url.split("#")[0] + "#/vms")
    wait_status(page, VM, "Running")
    # the IP column fills from the VMI's status.interfaces, which the node agent reports on its own schedule
    page.wait_for_function(f"""() => {{
        const r = document.querySelector('tr[data-vm="{VM}"]');
        return r && r.querySelectorAll('td')[7].innerText.trim() !== '';
    }}""", timeout=120_000)
    shot(page, "08-vm-list")
    _row_action(page, VM, "Stop")
    wait_status(page, VM, "Stopped")
    _row_action(page, VM, "Start")
    wait_status(page, VM, "Running")
    row(page, VM).get_by_role("button", name=re.compile("kebab|actions", re.I)).click()
    page.get_by_role("menuitem", name="Open console").click()
    page.wait_for_url(re.compile(rf"#/vms/default/{VM}/console$"))
    page.get_by_test_id("serial-state").filter(has_text="connected").wait_for()
    page.goto(page.url.split("#")[0] + "#/vms")


def test_bulk_delete(page: Any, cluster: Cluster, image: str) -> None:
    # containerDisk VMs made with kubectl: the list shows what others create, live
    for name in BULK:
        vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
              "metadata": {"name": name, "labels": {"bulk": "yes"}},
              "spec": {"runStrategy": "Halted", "template": {"spec": {
                  "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                             "resources": {"requests": {"memory": "128Mi"}}},
                  "volumes": [{"name": "root", "containerDisk": {"image": image}}]}}}}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(vm))
    for name in BULK:
        wait_status(page, name, "Stopped", 60_000)  # the watch brings them in without a reload
    page.get_by_label("Label filter").fill("bulk=yes")
    assert page.locator("tr[data-vm]").count() == 2
    page.get_by_label("Label filter").fill("")
    for name in (*BULK, VM):
        row(page, name).locator('td input[type="checkbox"]').check()
    page.locator('[data-action="bulk-delete"]').click()
    dialog = page.get_by_role("dialog")
    assert "Delete 3 VirtualMachines?" in dialog.inner_text()
    shot(page, "09-bulk-delete-confirm")
    dialog.get_by_role("button", name="Delete", exact=True).click()
    page.get_by_test_id("bulk-result").filter(has_text="3 succeeded").wait_for()
    for name in (*BULK, VM):
        row(page, name).wait_for(state="detached", timeout=120_000)
    assert page.locator('td input[type="checkbox"]:checked').count() == 0  # selection cleared


def test_screenshots_exist() -> None:
    from tests.e2e.web.conftest import ARTIFACTS

    assert len(list(Path(ARTIFACTS).glob("*.png"))) >= 10
