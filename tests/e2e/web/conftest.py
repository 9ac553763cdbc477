"""A real browser (Debian's chromium, driven by Playwright's Python client) on the web console of the session
`cluster`. The browser is never downloaded: Playwright launches /usr/bin/chromium by path."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from virtplane.testing import containers, guest
from virtplane.testing.cluster import REPO, Cluster
from virtplane.testing.waiting import wait_for
from virtplane.web import serve

VM = "web-vm"
BULK = ("web-bulk-a", "web-bulk-b")
HOT = "web-hot"
NICS = "web-nics"  # a stopped VM whose NICs and clone the tests edit
CLONE = "web-nics-copy"
NAD = "web-nad"
LOGS_POD = "web-logs"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "web"
# Headless Chromium as root on a machine with no outside network: without the background-networking flags it
# keeps trying (and failing) to reach Google's services.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[tuple[guest.Registry, str]]:
    """A registry with the tiny containerDisk. Set up before the browser: Playwright's sync API runs its own
    event loop in this thread, and pushing the image uses asyncio.run."""
    with guest.registry_with_containerdisk(tmp_path_factory.mktemp("web-registry")) as (reg, ref):
        try:
            yield reg, ref
        finally:
            # a leftover running VM would burn the shared CPUs for every later test
            cluster.kubectl("delete", "vm", VM, *BULK, NICS, CLONE, "--ignore-not-found", "--wait=false",
                            check=False)  # fmt: skip
            cluster.kubectl("delete", "dv", HOT, "--ignore-not-found", "--wait=false", check=False)
            cluster.kubectl("delete", "pod", LOGS_POD, "--ignore-not-found", "--wait=false", check=False)
            cluster.kubectl("delete", "network-attachment-definitions", NAD, "--ignore-not-found", check=False)


@pytest.fixture(scope="module")
def image(registry: tuple[guest.Registry, str]) -> str:
    return registry[1]


@pytest.fixture(scope="module")
def busybox(registry: tuple[guest.Registry, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A busybox container image in the same registry, for a pod whose log the Pods page shows."""
    return containers.push_busybox_image(registry[0].host, tmp_path_factory.mktemp("web-busybox"))


@pytest.fixture(scope="module")
def image_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 serving the tiny qcow2, as a user's image server would (URL import)."""
    d = tmp_path_factory.mktemp("web-http")
    src = guest.image_paths().qcow2
    try:
        os.link(src, d / src.name)
    except OSError:
        shutil.copy(src, d / src.name)
    port = guest.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(d),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/{src.name}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


@contextlib.contextmanager
def launch_browser() -> Iterator[Any]:
    """Debian's chromium through Playwright; the app must be built (`make setup`)."""
    if not CHROMIUM.exists() or shutil.which("node") is None:
        pytest.fail("chromium and nodejs are required (deps/apt.txt; `make setup` installs them)")
    if not (serve.DIST / "index.html").exists():
        pytest.fail("the web console is not built: `make setup` (npm ci && npm run build in virtplane/web)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def browser(image: str, image_url: str, busybox: str) -> Iterator[Any]:
    with launch_browser() as b:
        yield b


def load(page: Any, url: str) -> None:
    """page.goto, retried when Chromium aborts the load with ERR_NETWORK_CHANGED: other tests on this machine
    keep creating and deleting bridges, veths and network namespaces, and Chromium drops loads in flight when
    the host's interfaces change."""
    for attempt in range(5):
        try:
            page.goto(url)
            return
        except Exception as exc:  # playwright's Error
            if "ERR_NETWORK_CHANGED" not in str(exc) or attempt == 4:
                raise
            page.wait_for_timeout(500)


def login(page: Any, server: str, token: str) -> None:
    load(page, f"{server}/console/")
    page.get_by_label("Bearer token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.locator("h1", has_text="VirtualMachines").wait_for()


def new_page(ctx: Any) -> Any:
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.console_errors = errors  # type: ignore[attr-defined]
    return pg


@pytest.fixture(scope="module")
def context(browser: Any) -> Iterator[Any]:
    # clipboard permissions: the "Copy" buttons write to the clipboard and the tests read it back
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1600, "height": 1000},
                              permissions=["clipboard-read", "clipboard-write"])  # fmt: skip
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def page(context: Any, cluster: Cluster) -> Any:
    return new_page(context)


def shot(page: Any, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@contextlib.contextmanager
def netns_cluster(tmp_path_factory: pytest.TempPathFactory, nodes: int, vm: Callable[[str], dict[str, Any]], *,
                  cni: bool = False) -> Iterator[tuple[Cluster, str]]:  # fmt: skip
    """`virtplane up --nodes N --node-netns [--pod-network cni]` (root), a registry on the cluster bridge's
    address that every node reaches, holding the tiny containerDisk, and the VM `vm(image)` applied. Yields
    (cluster, image); the VM is deleted and its VMI waited for before the cluster stops (a CNI pod network
    leaves dnsmasq and netns behind otherwise)."""
    from tests.e2e.migration.conftest import requirements
    from tests.e2e.network.conftest import network_requirements
    from tests.e2e.network.test_multinode import cleanup_pod_networks

    requirements()
    if cni:
        network_requirements()
    root = tmp_path_factory.mktemp("web-netns")
    short = Path(tempfile.mkdtemp(prefix="vpw-", dir="/tmp"))  # VM runtime dirs hold unix sockets (107 bytes)
    cluster = Cluster(short / "c", nodes=nodes, extra_args=("--pod-network", "cni") if cni else ())
    try:
        cluster.start()
        with guest.registry_with_containerdisk(root / "registry", host=cluster.node_network()["gateway"]) as (
                _reg, image):
            def ready() -> bool:
                items = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
                return sum(1 for n in items if any(c["type"] == "Ready" and c["status"] == "True"
                                                   for c in n["status"].get("conditions") or [])) == nodes
            wait_for(ready, 120, what=f"{nodes} Ready nodes")
            manifest = vm(image)
            cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
            name = manifest["metadata"]["name"]
            try:
                yield cluster, image
            finally:
                cluster.kubectl("delete", "vm", name, "--wait=false", check=False)
                cluster.kubectl("wait", "--for=delete", f"vmi/{name}", "--timeout=90s", check=False, timeout=120)
    finally:
        cluster.stop()
        if cni:
            cleanup_pod_networks(cluster.data_dir)
        shutil.rmtree(short, ignore_errors=True)


@contextlib.contextmanager
def logged_in_page(cluster: Cluster) -> Iterator[Any]:
    """A browser tab logged in to `cluster`'s console, on the VM list."""
    with launch_browser() as browser:
        ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1600, "height": 1000})
        try:
            pg = new_page(ctx)
            server, token, _ = cluster.config()
            login(pg, server, token)
            yield pg
        finally:
            ctx.close()


def vmi_of(cluster: Cluster, name: str) -> dict[str, Any]:
    proc = cluster.kubectl("get", "vmi", name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def running_and_migratable(cluster: Cluster, name: str) -> bool:
    st = vmi_of(cluster, name).get("status") or {}
    return st.get("phase") == "Running" and any(c["type"] == "LiveMigratable" and c["status"] == "True"
                                                for c in st.get("conditions") or [])
