"""Actions follow the logged-in user's permissions (SelfSubjectRulesReview), in a real browser against the session
`cluster`: a ServiceAccount bound to `view` in `default` (token from `kubectl create token`) sees the VM but
every action, the console and "Create VirtualMachine" are disabled; the admin token on the same VM gets them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.web.conftest import launch_browser, load, new_page, shot
from virtplane.testing.cluster import Cluster

pytestmark = pytest.mark.e2e
VM = "web-perm"
SA = "web-viewer"


@pytest.fixture(scope="module")
def viewer_token(cluster: Cluster) -> Iterator[str]:
    cluster.kubectl("create", "serviceaccount", SA)
    cluster.kubectl("create", "rolebinding", f"{SA}-view", "--clusterrole=view", f"--serviceaccount=default:{SA}")
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": VM},
          "spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {
              "devices": {}, "resources": {"requests": {"memory": "64Mi"}}},
              "volumes": [{"name": "root", "containerDisk": {"image": "127.0.0.1:5000/virtplane/tiny:latest"}}]}}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(vm))
    try:
        yield cluster.kubectl("create", "token", SA, "--duration=1h").stdout.strip()
    finally:
        cluster.kubectl("delete", "vm", VM, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "rolebinding", f"{SA}-view", "--ignore-not-found", check=False)
        cluster.kubectl("delete", "serviceaccount", SA, "--ignore-not-found", check=False)


@pytest.fixture(scope="module")
def browser(viewer_token: str) -> Iterator[Any]:
    with launch_browser() as b:
        yield b


def logged_in(browser: Any, cluster: Cluster, token: str) -> Any:
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1600, "height": 1000})
    page = new_page(ctx)
    server, _, _ = cluster.config()
    load(page, f"{server}/console/")
    page.get_by_label("Bearer token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("heading", name="VirtualMachines").wait_for()
    page.locator(f'tr[data-vm="{VM}"]').wait_for()
    return page


def menu_item(page: Any, name: str) -> Any:
    return page.get_by_role("menuitem", name=name, exact=True)


def open_row_menu(page: Any) -> None:
    page.locator(f'tr[data-vm="{VM}"]').get_by_role("button", name=re.compile("kebab|actions", re.I)).click()


def test_a_viewer_sees_the_vm_with_every_action_disabled(browser: Any, cluster: Cluster, viewer_token: str) -> None:
    page = logged_in(browser, cluster, viewer_token)
    create = page.get_by_test_id("create-vm")
    page.wait_for_function("() => document.querySelector('[data-testid=\"create-vm\"]')"
                           ".getAttribute('aria-disabled') === 'true'", timeout=30_000)
    open_row_menu(page)
    for name in ("Start", "Delete", "Clone", "Migrate"):
        assert menu_item(page, name).is_disabled(), name
    shot(page, "30-viewer-list")
    page.keyboard.press("Escape")
    page.goto(page.url.split("#")[0] + f"#/vms/default/{VM}")
    start = page.get_by_role("button", name="Start", exact=True)
    start.wait_for()
    page.wait_for_function("() => [...document.querySelectorAll('button')].filter(b => b.innerText.trim() === 'Start')"
                           ".every(b => b.disabled)", timeout=30_000)
    assert page.get_by_role("button", name="Delete", exact=True).is_disabled()
    assert create.count() == 0  # left the list
    page.context.close()


def test_the_admin_gets_the_same_actions(browser: Any, cluster: Cluster, viewer_token: str) -> None:
    _, admin, _ = cluster.config()
    page = logged_in(browser, cluster, admin)
    assert page.get_by_test_id("create-vm").get_attribute("aria-disabled") != "true"
    open_row_menu(page)
    menu_item(page, "Start").wait_for()
    assert not menu_item(page, "Start").is_disabled()
    assert not menu_item(page, "Delete").is_disabled()
    page.context.close()
