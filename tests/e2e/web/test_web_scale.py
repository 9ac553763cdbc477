"""The VirtualMachines page with 1,000 VMs (community UIs are slow past 10, kubevirt-manager#91): an API server
alone (no controllers, no QEMU) holds 1,000 VMs, a third of them with a Running status; the browser lists,
sorts, searches, follows a watch event and bulk-deletes a page of 50. Timings go to test-artifacts/web/scale.json
and are bounded generously (a loaded 2-core machine), so a regression to per-VM requests or re-renders fails."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.web.conftest import ARTIFACTS, launch_browser, login, shot
from virtplane.testing.cluster import Cluster

pytestmark = pytest.mark.e2e
COUNT = 1000
VMS = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines"


def vm(i: int) -> dict[str, Any]:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": f"scale-{i:04d}", "labels": {"tier": "odd" if i % 2 else "even"}},
            "spec": {"runStrategy": "Halted", "template": {"spec": {
                "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                           "resources": {"requests": {"memory": "128Mi"}}},
                "volumes": [{"name": "root", "containerDisk": {"image": "example/disk:latest"}}]}}}}


class Api:
    def __init__(self, cluster: Cluster) -> None:
        self.server, self.token, _ = cluster.config()
        self.ctx: ssl.SSLContext = cluster.ssl_context()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        async def one() -> Any:
            async with aiohttp.ClientSession(headers=self._headers()) as s:
                return await self._call(s, method, path, body)
        # in a thread: Playwright's sync API keeps an event loop running in this one
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, one()).result()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    async def _call(self, s: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> Any:
        async with s.request(method, self.server + path, json=body, ssl=self.ctx) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def populate(self) -> None:
        """COUNT VMs over a few kept-alive connections; every third gets a Running status, as the controller
        would write it."""
        sem = asyncio.Semaphore(8)
        async with aiohttp.ClientSession(headers=self._headers()) as s:
            async def make(i: int) -> None:
                async with sem:
                    obj = await self._call(s, "POST", VMS, vm(i))
                    if i % 3 == 0:
                        obj["status"] = {"printableStatus": "Running", "ready": True, "created": True}
                        await self._call(s, "PUT", f"{VMS}/scale-{i:04d}/status", obj)
            await asyncio.gather(*(make(i) for i in range(COUNT)))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    c = Cluster(tmp_path_factory.mktemp("web-scale"), command="apiserver").start()
    try:
        a = Api(c)
        started = time.perf_counter()
        asyncio.run(a.populate())
        print(f"created {COUNT} VMs in {time.perf_counter() - started:.1f}s")
        yield a
    finally:
        c.stop()


@pytest.fixture(scope="module")
def page(api: Api) -> Iterator[Any]:
    with launch_browser() as b:
        ctx = b.new_context(ignore_https_errors=True, viewport={"width": 1600, "height": 1000})
        pg = ctx.new_page()
        pg.set_default_timeout(60_000)
        try:
            yield pg
        finally:
            ctx.close()


def count(page: Any, n: int) -> None:
    page.locator(f'[data-testid="vm-count"][data-count="{n}"]').wait_for()


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return round(time.perf_counter() - t, 3)


def test_vm_list_with_1000_vms(page: Any, api: Api) -> None:
    rows = page.locator("tr[data-vm]")
    t: dict[str, float] = {}
    t["login_and_list_s"] = timed(lambda: (login(page, api.server, api.token),
                                           count(page, COUNT)))
    assert rows.count() == 50  # one page rendered, not 1,000 rows
    assert rows.first.get_attribute("data-vm") == "scale-0000"
    shot(page, "20-scale-list")

    def sort_desc() -> None:
        page.get_by_role("button", name="Name", exact=True).click()
        page.locator('tr[data-vm="scale-0999"]').wait_for()
    t["sort_s"] = timed(sort_desc)
    assert rows.first.get_attribute("data-vm") == "scale-0999"

    def search() -> None:
        page.get_by_label("Search by name or IP").fill("scale-077")
        page.wait_for_function("() => document.querySelectorAll('tr[data-vm]').length === 10")
    t["search_s"] = timed(search)

    def status_filter() -> None:
        page.get_by_label("Search by name or IP").fill("")
        page.get_by_label("Status").select_option("Running")
        count(page, COUNT // 3 + 1)
    t["status_filter_s"] = timed(status_filter)
    page.get_by_label("Status").select_option("")

    def watch_event() -> None:
        page.get_by_label("Search by name or IP").fill("scale-new")
        api.call("POST", VMS, {**vm(0), "metadata": {"name": "scale-new"}})
        page.locator('tr[data-vm="scale-new"]').wait_for()
    t["watch_add_visible_s"] = timed(watch_event)
    page.get_by_label("Search by name or IP").fill("")

    # bulk delete the first page (50 VMs) with confirmation; the watch removes them
    page.locator('thead input[type="checkbox"]').check()
    page.locator('[data-action="bulk-delete"]').filter(has_text="(50)").click()
    def bulk_delete() -> None:
        page.get_by_role("dialog").get_by_role("button", name="Delete", exact=True).click()
        result = page.get_by_test_id("bulk-result")
        result.wait_for()
        assert "50 succeeded" in result.inner_text(), result.inner_text()
        count(page, COUNT + 1 - 50)
    try:
        t["bulk_delete_50_s"] = timed(bulk_delete)
    finally:
        shot(page, "21-scale-bulk-delete")
    assert page.locator('td input[type="checkbox"]:checked').count() == 0
    heap = page.evaluate("() => performance.memory ? performance.memory.usedJSHeapSize : 0")
    t["js_heap_mb"] = round(heap / 2**20, 1)
    (Path(ARTIFACTS) / "scale.json").write_text(json.dumps(t, indent=2))
    print("web scale timings:", t)
    assert t["login_and_list_s"] < 20 and t["sort_s"] < 5 and t["search_s"] < 5 and t["status_filter_s"] < 5
    assert t["watch_add_visible_s"] < 10 and t["bulk_delete_50_s"] < 30
