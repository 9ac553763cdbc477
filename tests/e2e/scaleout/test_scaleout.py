"""Scale-out: one etcd, several `virtplane apiserver --store etcd://...` processes serving the same
objects. Writes through one server are read, watched and validated through another; CRDs created
through one are served by the others; a server killed with SIGKILL loses nothing it acknowledged.

The servers share one identity (CA, serving certificate, tokens): every server of a control plane
must, so one kubeconfig works against any of them. Each has its own data dir (each writes its
own kubeconfig there, with its own port); the identity files are copied from the first server's,
as an operator distributes them to the hosts of a real control plane.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import shutil
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.apiserver import manifests
from tests.e2e.apiserver.test_bad_input import call
from virtplane.testing.cluster import Cluster
from virtplane.testing.etcd import EtcdCluster, etcd_binary

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (Debian package: etcd-server)"),
]

VMS = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines"
CMS = "/api/v1/namespaces/default/configmaps"

WIDGET_CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {kind: Widget, plural: widgets, singular: widget, listKind: WidgetList, shortNames: [wg]}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer}
"""


class ScaleOut:
    """One etcd and API servers on it that share the first server's identity."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.etcd = EtcdCluster(base / "etcd").start()
        self.url = self.etcd.url + "?prefix=/scaleout"
        self.servers: list[Cluster] = []

    def server(self, name: str) -> Cluster:
        data = self.base / name
        if self.servers:
            # The first server has written the CA, the serving certificate and the tokens, and is
            # ready: no two processes race to create them.
            first = self.servers[0].data_dir
            data.mkdir(parents=True)
            shutil.copytree(first / "pki", data / "pki")
            shutil.copy2(first / "tokens.csv", data / "tokens.csv")
        server = Cluster(data, command="apiserver", extra_args=("--store", self.url))
        self.servers.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.etcd.stop()


@pytest.fixture(scope="module")
def scaleout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleOut]:
    s = ScaleOut(tmp_path_factory.mktemp("scaleout"))
    try:
        s.server("a")
        s.server("b")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def a(scaleout: ScaleOut) -> Cluster:
    return scaleout.servers[0]


@pytest.fixture(scope="module")
def b(scaleout: ScaleOut) -> Cluster:
    return scaleout.servers[1]


class WatchStream:
    """An HTTP watch on a server, read line by line in a thread."""

    def __init__(self, server: Cluster, path: str) -> None:
        url, token, ca = server.config()
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=120,
                                           context=ssl.create_default_context(cadata=ca.decode()))
        conn.connect()
        # Kept to end the stream from another thread: closing the response would wait for the
        # reader thread's blocked read, i.e. for the server to end the watch.
        self._sock = conn.sock
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        # Returns once the server sent its headers, i.e. after it opened its store watch.
        self._resp = conn.getresponse()
        assert self._resp.status == 200, self._resp.read()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._resp:
                if line.strip():
                    self.events.put(json.loads(line))
        except Exception:
            pass  # ended by close()

    def next(self, timeout: float = 10) -> dict[str, Any]:
        return self.events.get(timeout=timeout)

    def until(self, predicate: Any, timeout: float = 20) -> list[dict[str, Any]]:
        """Events up to and including the first that satisfies predicate."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            event = self.next(max(0.01, deadline - time.monotonic()))
            seen.append(event)
            if predicate(event):
                return seen

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self._resp.close()


def wait_for(predicate: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def test_both_servers_are_ready_on_one_store(a: Cluster, b: Cluster) -> None:
    assert a.get_raw("/readyz") == b.get_raw("/readyz") == b"ok"
    # Bootstrap ran twice (default namespaces, bundled CRDs) and created each object once.
    ns_a = json.loads(a.kubectl("get", "namespaces", "-o", "json").stdout)["items"]
    ns_b = json.loads(b.kubectl("get", "namespaces", "-o", "json").stdout)["items"]
    assert [n["metadata"]["uid"] for n in ns_a] == [n["metadata"]["uid"] for n in ns_b]


def test_vm_created_through_a_is_served_by_b(a: Cluster, b: Cluster) -> None:
    out = a.kubectl("apply", "-f", "-", input=manifests.VM_CIRROS.format(name="vm-scale")).stdout
    assert "virtualmachine.kubevirt.io/vm-scale created" in out
    through_a = yaml.safe_load(a.kubectl("get", "vm", "vm-scale", "-o", "yaml").stdout)
    through_b = yaml.safe_load(b.kubectl("get", "vm", "vm-scale", "-o", "yaml").stdout)
    assert through_b == through_a
    assert any(line.split()[0] == "vm-scale" for line in b.kubectl("get", "vm").stdout.splitlines()[1:])
    # And back: B updates, A reads the update, with B's resourceVersion.
    b.kubectl("label", "vm", "vm-scale", "tier=gold")
    again = yaml.safe_load(a.kubectl("get", "vm", "vm-scale", "-o", "yaml").stdout)
    assert again["metadata"]["labels"]["tier"] == "gold"
    assert int(again["metadata"]["resourceVersion"]) > int(through_a["metadata"]["resourceVersion"])


def test_watch_through_b_sees_updates_through_a(a: Cluster, b: Cluster) -> None:
    a.kubectl("apply", "-f", "-", input=manifests.VM_CIRROS.format(name="vm-watched"))
    rv = yaml.safe_load(b.kubectl("get", "vm", "vm-watched", "-o", "yaml").stdout)["metadata"]["resourceVersion"]
    stream = WatchStream(b, f"{VMS}?watch=1&resourceVersion={rv}&timeoutSeconds=60")
    try:
        time.sleep(0.5)  # the watch is live, not replaying, when the update comes
        a.kubectl("label", "vm", "vm-watched", "stage=live")
        events = stream.until(lambda e: e["object"]["metadata"].get("labels", {}).get("stage") == "live")
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("MODIFIED", "vm-watched")]
        a.kubectl("delete", "vm", "vm-watched")
        deleted = stream.next()
        assert deleted["type"] == "DELETED" and deleted["object"]["metadata"]["name"] == "vm-watched"
    finally:
        stream.close()


def test_crd_created_through_a_is_served_by_b(a: Cluster, b: Cluster) -> None:
    a.kubectl("apply", "-f", "-", input=WIDGET_CRD)
    # B follows CRDs through its store watch: it starts serving the kind without a restart.
    wait_for(lambda: b.kubectl("get", "widgets", check=False).returncode == 0)
    crd = json.loads(b.kubectl("get", "crd", "widgets.example.com", "-o", "json").stdout)
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}.get("Established") == "True"
    widget = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3}\n"
    assert "widget.example.com/w1 created" in b.kubectl("apply", "-f", "-", input=widget).stdout
    assert json.loads(a.kubectl("get", "wg", "w1", "-o", "json").stdout)["spec"] == {"size": 3}
    # B validates with the CRD's schema, not just a route.
    bad = b.kubectl("apply", "-f", "-", input=widget.replace("w1", "w2").replace("3", '"big"'), check=False)
    assert bad.returncode != 0 and "spec.size" in bad.stderr
    # Deleted through B, A stops serving it.
    b.kubectl("delete", "crd", "widgets.example.com")
    wait_for(lambda: a.kubectl("get", "widgets", check=False).returncode != 0)


def test_sigkill_of_one_server_loses_nothing_acknowledged(scaleout: ScaleOut, b: Cluster) -> None:
    victim = scaleout.server("c")
    code, listing = call(b, "GET", CMS, None)
    assert code == 200
    stream = WatchStream(b, f"{CMS}?watch=1&resourceVersion={listing['metadata']['resourceVersion']}"
                            "&timeoutSeconds=120")
    acked: list[tuple[str, int]] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            name = f"kill-{i}"
            try:
                code, body = call(victim, "POST", CMS, json.dumps(
                    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"i": str(i)}}
                ).encode())
            except OSError:
                return  # the server died under us: this write was never acknowledged
            if code == 201:
                acked.append((name, int(body["metadata"]["resourceVersion"])))
            i += 1

    try:
        thread = threading.Thread(target=writer)
        thread.start()
        wait_for(lambda: len(acked) >= 200, timeout=60)
        victim.kill()
        stop.set()
        thread.join(10)

        # B serves every acknowledged write, at the revision that was acknowledged.
        code, listing = call(b, "GET", CMS, None)
        assert code == 200
        stored = {i["metadata"]["name"]: i for i in listing["items"]}
        missing = [n for n, _ in acked if n not in stored]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
        for name, rv in acked:
            assert stored[name]["metadata"]["resourceVersion"] == str(rv)
        # ...keeps taking writes, above everything acknowledged...
        code, body = call(b, "POST", CMS, json.dumps({"metadata": {"name": "after-kill"}}).encode())
        assert code == 201 and int(body["metadata"]["resourceVersion"]) > acked[-1][1]
        # ...and its watch, open across the kill, delivered each of C's writes once, in order.
        events = stream.until(lambda e: e["object"]["metadata"]["name"] == "after-kill", timeout=30)
        added = [(e["object"]["metadata"]["name"], int(e["object"]["metadata"]["resourceVersion"]))
                 for e in events if e["type"] == "ADDED"]
        assert [rv for _, rv in added] == sorted({rv for _, rv in added})
        assert set(acked) <= set(added)
    finally:
        stop.set()
        stream.close()
