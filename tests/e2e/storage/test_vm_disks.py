"""VM disks from DataVolumes, end to end: `virtctl image-upload` then boot, and `dataVolumeTemplates`
imported from a real HTTP server on 127.0.0.1, then boot.

One cluster for the module (its storage root in the test's temp dir). A guest has booted when its serial
console (the `consolelog` subresource) shows `virtplane-guest: booted`, as in tests/e2e/vm/test_lifecycle.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtplane.testing import guest
from virtplane.testing.cluster import Cluster, free_port
from virtplane.testing.waiting import wait_for

pytestmark = pytest.mark.e2e
SUB = "/apis/subresources.kubevirt.io/v1/namespaces/default"

# /slow/ answers after a pause, so the VM is seen waiting for its DataVolume before the import finishes
SERVER = r'''
import asyncio, sys
from aiohttp import web
root, port = sys.argv[1], int(sys.argv[2])

async def slow(request):
    await asyncio.sleep(3)
    return web.FileResponse(f"{root}/{request.match_info['name']}")

app = web.Application()
app.router.add_get("/slow/{name}", slow)
app.router.add_static("/images", root)
web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
'''


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # a short data dir: QEMU's sockets live under it and unix socket paths are limited to 107 bytes
    d = Path(tempfile.mkdtemp(prefix="vpd-"))
    old = os.environ.get("VIRTPLANE_STORAGE_ROOT")
    os.environ["VIRTPLANE_STORAGE_ROOT"] = str(d / "storage")
    c = Cluster(d)
    try:
        c.start()
        # the shared class's StorageProfile is filled in just after start; DataVolumes need it
        wait_for(lambda: ((get(c, "storageprofile", "shared") or {}).get("status") or {}).get("claimPropertySets"),
                 30, what="StorageProfile shared")
        yield c
    finally:
        c.stop()
        if old is None:
            os.environ.pop("VIRTPLANE_STORAGE_ROOT", None)
        else:
            os.environ["VIRTPLANE_STORAGE_ROOT"] = old
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("vm-disks-http")
    root = d / "images"
    root.mkdir()
    src = guest.image_paths().qcow2
    try:
        os.link(src, root / src.name)  # aiohttp's static route does not follow symlinks
    except OSError:
        root.joinpath(src.name).write_bytes(src.read_bytes())
    script = d / "server.py"
    script.write_text(SERVER)
    port = free_port()
    with open(d / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), str(root), str(port)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: _reachable(f"http://127.0.0.1:{port}/images/{src.name}"), 20, what="the HTTP server")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=1).close()
        return True
    except (urllib.error.URLError, OSError):
        return False


def get(c: Cluster, kind: str, name: str) -> dict[str, Any] | None:
    proc = c.kubectl("get", kind, name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def virtctl(c: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(c.kubeconfig)}
    proc = subprocess.run([sys.executable, "-m", "virtplane.cli.virtctl", *args], capture_output=True, text=True,
                          env=env, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"virtctl {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def console(c: Cluster, name: str) -> str:
    try:
        return c.get_raw(f"{SUB}/virtualmachineinstances/{name}/consolelog").decode(errors="replace")
    except OSError:
        return ""


def vm(name: str, volume: dict[str, Any], templates: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"runStrategy": "Always", "template": {
        "metadata": {"labels": {"kubevirt.io/vm": name}},
        # no grace period: the test deletes the VM when done and has nothing to shut down cleanly
        "spec": {"terminationGracePeriodSeconds": 0,
                 "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                            "resources": {"requests": {"memory": "128Mi"}}},
                 "volumes": [{"name": "root", **volume}]}}}
    if templates:
        spec["dataVolumeTemplates"] = templates
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name}, "spec": spec}


def boots(c: Cluster, name: str, timeout: float = 150) -> None:
    def running() -> bool:
        return ((get(c, "vmi", name) or {}).get("status") or {}).get("phase") == "Running"
    try:
        wait_for(running, timeout, what=f"VMI {name} Running")
        wait_for(lambda: "virtplane-guest: booted" in console(c, name), timeout, what=f"{name} booted")
    except AssertionError as exc:
        vm_status = ((get(c, "vm", name) or {}).get("status"))
        vmi_status = ((get(c, "vmi", name) or {}).get("status"))
        events = c.kubectl("get", "events", check=False).stdout
        raise AssertionError(f"{exc}\nVM: {vm_status}\nVMI: {vmi_status}\n{events}\n{console(c, name)[-2000:]}"
                             f"\n{c.log_tail(4000)}") from None


def delete_vm(c: Cluster, name: str) -> None:
    c.kubectl("delete", "vm", name, "--wait=false", check=False)
    wait_for(lambda: get(c, "vmi", name) is None, 90, what=f"VMI {name} gone")


def test_image_upload_then_boot(cluster: Cluster, tmp_path: Path) -> None:
    image = guest.image_paths().qcow2
    garbage = tmp_path / "garbage.qcow2"
    garbage.write_bytes(b"QFI\xfb" + os.urandom(64 * 1024))
    # a bad image: one clear line, and the DataVolume still waits for an upload (resumable)
    bad = virtctl(cluster, "image-upload", "dv", "uploaded", "--size", "1Gi", "--storage-class", "shared",
                  "--image-path", str(garbage), check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: upload failed") and "run the same command again" in last, bad.stderr
    assert "Traceback" not in bad.stderr
    assert ((get(cluster, "dv", "uploaded") or {}).get("status") or {}).get("phase") == "UploadReady"
    # the same command with the right file picks the DataVolume up again
    ok = virtctl(cluster, "image-upload", "dv", "uploaded", "--size", "1Gi", "--storage-class", "shared",
                 "--image-path", str(image))
    assert "Using existing DataVolume default/uploaded" in ok.stderr
    assert "100.0%" in ok.stderr  # the progress bar reached the end
    assert "Processing completed successfully" in ok.stdout
    dv = get(cluster, "dv", "uploaded")
    assert dv is not None and dv["status"]["phase"] == "Succeeded"
    assert dv["spec"]["source"] == {"upload": {}}
    # uploading again into a finished DataVolume is refused, a missing one with --no-create too
    again = virtctl(cluster, "image-upload", "dv", "uploaded", "--size", "1Gi", "--image-path", str(image),
                    check=False)
    assert again.returncode == 1 and "already holds an uploaded image" in again.stderr
    missing = virtctl(cluster, "image-upload", "dv", "nope", "--no-create", "--image-path", str(image), check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
    usage = virtctl(cluster, "image-upload", "dv", "x", "--image-path", str(image), check=False)
    assert usage.returncode == 2 and "--size is required" in usage.stderr

    cluster.kubectl("apply", "-f", "-", input=json.dumps(vm("from-upload", {"dataVolume": {"name": "uploaded"}})))
    try:
        boots(cluster, "from-upload")
    finally:
        delete_vm(cluster, "from-upload")


def test_datavolume_templates_import_then_boot(cluster: Cluster, http: str) -> None:
    template = {"metadata": {"name": "imported-root"},
                "spec": {"source": {"http": {"url": f"{http}/slow/tiny.qcow2"}},
                         "storage": {"resources": {"requests": {"storage": "1Gi"}}, "storageClassName": "shared"}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(
        vm("from-http", {"dataVolume": {"name": "imported-root"}}, [template])))
    seen: set[str] = set()

    def imported() -> bool:
        status = (get(cluster, "vm", "from-http") or {}).get("status") or {}
        if status.get("printableStatus"):
            seen.add(status["printableStatus"])
        dv = get(cluster, "dv", "imported-root") or {}
        return (dv.get("status") or {}).get("phase") == "Succeeded"

    try:
        wait_for(imported, 90, what="the template's DataVolume imported")
        # the server holds the image back for 3 s: the VM waited for its volume before starting
        assert seen & {"Provisioning", "WaitingForVolumeBinding"}, seen
        dv = get(cluster, "dv", "imported-root")
        assert dv is not None
        owner = dv["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("VirtualMachine", "from-http")
        boots(cluster, "from-http")
    finally:
        delete_vm(cluster, "from-http")
