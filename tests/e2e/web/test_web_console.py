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

from tests.e2e.web.conftest import BULK, CLONE, HOT, LOGS_POD, NAD, NICS, VM, load, login, new_page, shot
from virtplane.testing.cluster import Cluster
from virtplane.testing.waiting import wait_for

pytestmark = pytest.mark.e2e
BOOT_MS = 240_000  # a TCG guest on a loaded 2-core machine
USER_DATA = "#cloud-config\nhostname: web-e2e\n"


def row(page: Any, name: str) -> Any:
    return page.locator(f'tr[data-vm="{name}"]')


def wait_status(page: Any, name: str, status: str, timeout: float = 120_000) -> None:
    page.locator(f'tr[data-vm="{name}"][data-status="{status}"]').wait_for(timeout=timeout)


def test_login(page: Any, cluster: Cluster) -> None:
    server, token, _ = cluster.config()
    load(page, f"{server}/console/")
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


def vnc_lit_pixels(page: Any) -> int:
    """Waits (up to 30 s) for the VNC canvas to show more than 100 lit pixels; returns the count."""
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
    return lit


def test_vnc_canvas_has_pixels(page: Any) -> None:
    page.get_by_test_id("vnc-state").filter(has_text="connected").wait_for()
    lit = vnc_lit_pixels(page)
    assert lit > 100, f"VNC canvas has only {lit} lit pixels"
    shot(page, "04-vm-console")


def serial_shows(page: Any, text: str) -> None:
    page.wait_for_function("(t) => document.querySelector('[data-testid=serial-console] .xterm-rows')"
                           ".innerText.includes(t)", arg=text, timeout=60_000)


def test_two_viewers_share_the_serial_and_vnc_consoles(page: Any, context: Any, cluster: Cluster) -> None:
    """A second browser tab on the same VM's consoles: both see the serial output whoever types, and both VNC
    viewers stay connected (the server fans the serial console out and keeps VNC shared)."""
    server, token, _ = cluster.config()
    other = new_page(context)
    try:
        login(other, server, token)  # the token lives in sessionStorage: per tab
        other.goto(f"{server}/console/#/vms/default/{VM}/console")
        other.get_by_test_id("serial-state").filter(has_text="connected").wait_for()
        other.get_by_test_id("vnc-state").filter(has_text="connected").wait_for()
        page.locator('[data-testid="serial-console"] .xterm').click()
        page.keyboard.type("echo two-$((3*5))\n")
        serial_shows(page, "two-15")
        serial_shows(other, "two-15")
        other.locator('[data-testid="serial-console"] .xterm').click()
        other.keyboard.type("echo back-$((2*8))\n")
        serial_shows(other, "back-16")
        serial_shows(page, "back-16")
        assert vnc_lit_pixels(other) > 100
        shot(other, "04b-vm-console-second-viewer")
        # the first tab's viewers were not kicked out by the second's
        assert page.get_by_test_id("serial-state").inner_text() == "connected"
        assert page.get_by_test_id("vnc-state").inner_text() == "connected"
        assert not other.console_errors, other.console_errors
    finally:
        other.close()


def test_migrate_on_a_single_node_cluster(page: Any, cluster: Cluster) -> None:
    """One node: the Migrate action is disabled with the server's LiveMigratable message, or, when the VM is
    migratable, its dialog warns that there is no other node, and a migration submitted anyway fails with the
    controller's reason, shown in the dialog and on the Migrations page."""
    def live_migratable() -> dict[str, Any] | None:
        vmi = json.loads(cluster.kubectl("get", "vmi", VM, "-o", "json").stdout)
        return next((c for c in vmi["status"].get("conditions") or [] if c["type"] == "LiveMigratable"), None)

    cond = wait_for(live_migratable, 60, what="the VMI's LiveMigratable condition")
    button = page.get_by_role("button", name="Migrate", exact=True)
    if cond["status"] != "True":
        page.get_by_test_id("migrate-disabled-reason").filter(has_text=cond["message"]).wait_for()
        assert button.is_disabled()
        shot(page, "04c-vm-migrate-single-node")
    else:
        button.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("No other Ready, schedulable node is listed").wait_for()
        dialog.get_by_role("button", name="Migrate", exact=True).click()
        reason = "live migration is not possible on a single-node cluster: there is no other node to migrate to"
        progress = dialog.locator('[data-testid="migration-progress"][data-phase="Failed"]')
        progress.filter(has_text=reason).wait_for(timeout=60_000)
        shot(page, "04c-vm-migrate-single-node")
        name = re.search(r"Migration (\S+):", progress.inner_text()).group(1)  # type: ignore[union-attr]
        dialog.get_by_role("contentinfo").get_by_role("button", name="Close").click()
        page.goto(page.url.split("#")[0] + "#/migrations")
        page.locator(f'tr[data-migration="{name}"][data-phase="Failed"]').filter(has_text=reason).wait_for()
        page.goto(page.url.split("#")[0] + f"#/vms/default/{VM}")


def test_copy_virtctl_ssh_command(page: Any) -> None:
    page.get_by_role("button", name="Copy virtctl ssh command").click()
    dialog = page.get_by_role("dialog")
    command = dialog.get_by_label("Copyable input")
    assert command.input_value() == f"virtctl ssh -n default root@vm/{VM}"
    dialog.get_by_label("SSH user").fill("alice")
    expected = f"virtctl ssh -n default alice@vm/{VM}"
    page.wait_for_function("(want) => document.querySelector('[role=dialog] input[aria-label=\"Copyable input\"]')"
                           ".value === want", arg=expected)
    dialog.get_by_role("button", name="Copy to clipboard").click()
    page.wait_for_function("async (want) => (await navigator.clipboard.readText()) === want", arg=expected)
    shot(page, "04d-vm-ssh-command")
    dialog.get_by_role("contentinfo").get_by_role("button", name="Close").click()


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


def test_restart_required_is_shown(page: Any, cluster: Cluster) -> None:
    """A template change the running VM cannot take (here its termination grace period) shows the VM's
    RestartRequired condition above the tabs; the stop/start from the list later settles it."""
    cluster.kubectl("patch", "vm", VM, "--type", "merge",
                    "-p", json.dumps({"spec": {"template": {"spec": {"terminationGracePeriodSeconds": 5}}}}))
    alert = page.get_by_test_id("restart-required")
    alert.filter(has_text="a non-live-updatable field was changed in the template spec").wait_for(timeout=60_000)
    shot(page, "05e-vm-restart-required")


def vm_spec(cluster: Cluster, name: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", "vm", name, "-o", "json").stdout)["spec"]["template"]["spec"]


def test_nics_add_and_remove_from_the_configuration_tab(page: Any, cluster: Cluster, image: str) -> None:
    """As `virtctl addinterface`/`removeinterface`: a bridge NIC on a NAD is added to the VM's template, then
    marked absent. The VM is stopped: the session cluster has no secondary network to plug it into."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition", "metadata": {"name": NAD},
        "spec": {"config": json.dumps({"cniVersion": "1.0.0", "name": NAD, "plugins": [
            {"type": "bridge", "bridge": "vpwebnad0", "ipam": {}}]})}}))
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": NICS},
        "spec": {"runStrategy": "Halted", "template": {"spec": {
            "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}],
                                   "interfaces": [{"name": "default", "masquerade": {}}]},
                       "resources": {"requests": {"memory": "128Mi"}}},
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [{"name": "root", "containerDisk": {"image": image}}]}}}}))
    page.goto(page.url.split("#")[0] + f"#/vms/default/{NICS}/configuration")
    nics = page.locator('table[aria-label="Configured network interfaces"]')
    nics.locator("tr", has_text="pod network").wait_for()
    page.wait_for_function(f"() => [...document.querySelectorAll('option')].some(o => o.value === '{NAD}')")
    page.get_by_label("Network attachment definition").select_option(NAD)
    page.get_by_label("Interface name").fill("default")
    page.get_by_role("button", name="Add network interface").click()
    page.get_by_text("Unable to add interface [default] because an interface or network with that name already "
                     "exists").wait_for()
    page.get_by_label("Interface name").fill("sec")
    page.get_by_role("button", name="Add network interface").click()
    nics.locator("tr", has_text=f"multus: {NAD}").filter(has_text="bridge").wait_for()
    spec = vm_spec(cluster, NICS)
    assert {"name": "sec", "bridge": {}} in spec["domain"]["devices"]["interfaces"]
    assert {"name": "sec", "multus": {"networkName": NAD}} in spec["networks"]
    shot(page, "05c-vm-configuration-nics")
    assert page.locator('[data-remove-nic="default"]').count() == 0  # the pod network's NIC cannot be unplugged
    page.locator('[data-remove-nic="sec"]').click()
    nics.locator("tr", has_text="sec").filter(has_text="absent").wait_for()
    iface = next(i for i in vm_spec(cluster, NICS)["domain"]["devices"]["interfaces"] if i["name"] == "sec")
    assert iface.get("state") == "absent"


def test_clone_from_the_list(page: Any, cluster: Cluster) -> None:
    """A VirtualMachineClone of the stopped VM: its progress shows in the dialog and the new VM in the list."""
    page.goto(page.url.split("#")[0] + "#/vms")
    wait_status(page, NICS, "Stopped")
    row(page, NICS).get_by_role("button", name=re.compile("kebab|actions", re.I)).click()
    page.get_by_role("menuitem", name="Clone", exact=True).click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name of the new VirtualMachine").fill(CLONE)
    dialog.get_by_role("button", name="Clone", exact=True).click()
    dialog.locator('[data-testid="clone-progress"][data-phase="Succeeded"]').wait_for(timeout=120_000)
    shot(page, "05d-vm-clone")
    dialog.get_by_role("contentinfo").get_by_role("button", name="Close").click()
    wait_status(page, CLONE, "Stopped", 60_000)
    nets = vm_spec(cluster, CLONE)["networks"]
    assert {"name": "sec", "multus": {"networkName": NAD}} in nets  # the source's spec, NICs included


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


def test_pod_logs(page: Any, cluster: Cluster, busybox: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": LOGS_POD},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "talker", "image": busybox,
            "command": ["sh", "-c", "echo hello-from-web-$((40+2)); exec sleep 3600"]}]}}))
    page.goto(page.url.split("#")[0] + "#/pods")
    pod = page.locator(f'tr[data-pod="{LOGS_POD}"]')
    pod.filter(has_text="Running").wait_for(timeout=120_000)
    pod.get_by_role("button", name="Logs").click()
    dialog = page.get_by_role("dialog")
    log = dialog.get_by_test_id("pod-log")
    for _ in range(30):  # the container's first line may land just after Running
        if "hello-from-web-42" in log.inner_text():
            break
        dialog.get_by_role("button", name="Refresh").click()
        page.wait_for_timeout(1000)
    assert "hello-from-web-42" in log.inner_text(), log.inner_text()
    shot(page, "13b-pod-logs")
    dialog.get_by_role("contentinfo").get_by_role("button", name="Close").click()
    cluster.kubectl("delete", "pod", LOGS_POD, "--wait=false")


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
    assert "RestartRequired" not in row(page, VM).inner_text()  # the restart applied the template change
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
