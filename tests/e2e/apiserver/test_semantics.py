"""Kubernetes list/watch/status semantics, observed over HTTP as any client sees them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.e2e.apiserver.test_bad_input import call, vm
from virtplane.testing.cluster import Cluster

pytestmark = pytest.mark.e2e
CMS = "/api/v1/namespaces/default/configmaps"
VMS = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines"


def cm(name: str, labels: dict[str, str] | None = None) -> bytes:
    return json.dumps({"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": name, "labels": labels or {}}, "data": {"k": name}}).encode()


def raw_call(cluster: Cluster, path: str) -> tuple[int, bytes]:
    import ssl
    import urllib.error
    import urllib.request

    server, token, ca = cluster.config()
    req = urllib.request.Request(server + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ssl.create_default_context(cadata=ca.decode()), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def watch_lines(cluster: Cluster, path: str) -> list[dict]:
    out = cluster.kubectl("get", "--raw", path, timeout=30).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_limit_and_continue_pages_through_everything(cluster: Cluster) -> None:
    names = {f"page-{i}" for i in range(7)}
    for n in names:
        assert call(cluster, "POST", CMS, cm(n, {"set": "paging"}))[0] == 201
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        q = f"{CMS}?labelSelector=set%3Dpaging&limit=3" + (f"&continue={token}" if token else "")
        code, body = call(cluster, "GET", q, None)
        assert code == 200 and len(body["items"]) <= 3
        seen += [i["metadata"]["name"] for i in body["items"]]
        pages += 1
        token = body["metadata"].get("continue", "")
        if not token:
            break
    assert sorted(seen) == sorted(names) and pages == 3
    code, _ = call(cluster, "DELETE", f"{CMS}?labelSelector=set%3Dpaging", None)  # deletecollection
    assert code == 200
    assert call(cluster, "GET", f"{CMS}?labelSelector=set%3Dpaging", None)[1]["items"] == []


def test_label_and_field_selectors(cluster: Cluster) -> None:
    call(cluster, "POST", CMS, cm("sel-a", {"tier": "gold", "app": "x"}))
    call(cluster, "POST", CMS, cm("sel-b", {"tier": "silver", "app": "x"}))
    call(cluster, "POST", CMS, cm("sel-c", {"app": "y"}))

    def names(q: str) -> list[str]:
        code, body = call(cluster, "GET", f"{CMS}?{q}", None)
        assert code == 200, body
        return sorted(i["metadata"]["name"] for i in body["items"] if i["metadata"]["name"].startswith("sel-"))

    assert names("labelSelector=tier%3Dgold") == ["sel-a"]
    assert names("labelSelector=tier%20in%20(gold%2Csilver)") == ["sel-a", "sel-b"]
    assert names("labelSelector=!tier") == ["sel-c"]
    assert names("labelSelector=app%3Dx%2Ctier!%3Dgold") == ["sel-b"]
    assert names("fieldSelector=metadata.name%3Dsel-c") == ["sel-c"]
    code, body = call(cluster, "GET", f"{CMS}?labelSelector=a%20b%20c", None)
    assert code == 400 and "label selector" in body["message"]
    for n in ("sel-a", "sel-b", "sel-c"):
        call(cluster, "DELETE", f"{CMS}/{n}", None)


def test_status_is_kept_apart_from_spec(bare_api: Cluster) -> None:
    cluster = bare_api  # no VM controller here to write the VM's status under the test
    code, created = call(cluster, "POST", VMS, json.dumps(vm("status-apart")).encode())
    assert code == 201
    created["status"] = {"printableStatus": "Running"}
    code, updated = call(cluster, "PUT", f"{VMS}/status-apart", json.dumps(created).encode())
    assert code == 200 and "status" not in updated  # the main resource ignores status
    updated["status"] = {"printableStatus": "Stopped"}
    updated["spec"]["runStrategy"] = "Always"
    code, st = call(cluster, "PUT", f"{VMS}/status-apart/status", json.dumps(updated).encode())
    assert code == 200
    assert st["status"]["printableStatus"] == "Stopped" and st["spec"]["runStrategy"] == "Halted"
    assert st["metadata"]["generation"] == 1  # status writes never bump generation
    call(cluster, "DELETE", f"{VMS}/status-apart", None)


def test_no_op_update_keeps_resource_version(cluster: Cluster) -> None:
    code, obj = call(cluster, "POST", CMS, cm("noop"))
    code, again = call(cluster, "PUT", f"{CMS}/noop", json.dumps(obj).encode())
    assert code == 200 and again["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
    call(cluster, "DELETE", f"{CMS}/noop", None)


def test_watch_from_revision_selectors_and_bookmarks(cluster: Cluster) -> None:
    _, listing = call(cluster, "GET", CMS, None)
    rv = listing["metadata"]["resourceVersion"]
    call(cluster, "POST", CMS, cm("w-gold", {"tier": "gold"}))
    call(cluster, "POST", CMS, cm("w-plain"))
    # relabel w-gold out of the selection: a selector watch sees it as DELETED
    call(cluster, "PUT", f"{CMS}/w-gold", json.dumps(
        {**call(cluster, "GET", f"{CMS}/w-gold", None)[1], "metadata": {
            **call(cluster, "GET", f"{CMS}/w-gold", None)[1]["metadata"], "labels": {"tier": "tin"}}}).encode())
    events = watch_lines(cluster, f"{CMS}?watch=1&resourceVersion={rv}&labelSelector=tier%3Dgold"
                                  "&allowWatchBookmarks=true&timeoutSeconds=6")
    kinds = [(e["type"], e["object"]["metadata"].get("name")) for e in events]
    assert kinds[:2] == [("ADDED", "w-gold"), ("DELETED", "w-gold")], kinds
    assert "w-plain" not in [n for _, n in kinds]
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert bookmarks and int(bookmarks[-1]["object"]["metadata"]["resourceVersion"]) >= int(rv)
    for n in ("w-gold", "w-plain"):
        call(cluster, "DELETE", f"{CMS}/{n}", None)


def test_watch_from_a_compacted_revision_is_410(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'c' / 'state.db'}?retain_revisions=5&retain_seconds=none&compact_interval=0.2"
    c = Cluster(tmp_path / "c", command="apiserver", extra_args=("--store", store)).start()
    try:
        _, first = call(c, "POST", CMS, cm("old-0"))
        for i in range(1, 30):
            call(c, "POST", CMS, cm(f"old-{i}"))
        first_rv = first["metadata"]["resourceVersion"]
        deadline = time.monotonic() + 20
        while True:
            code, raw = raw_call(c, f"{CMS}?watch=1&resourceVersion={first_rv}&timeoutSeconds=1")
            if code == 410 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert code == 410 and json.loads(raw)["reason"] == "Expired", raw
        # a fresh list and a watch from its revision still work
        _, listing = call(c, "GET", CMS, None)
        assert len(listing["items"]) == 30
        code, _ = raw_call(c, f"{CMS}?watch=1&resourceVersion={listing['metadata']['resourceVersion']}"
                              "&timeoutSeconds=1")
        assert code == 200
    finally:
        c.stop()


def test_delete_held_by_a_finalizer_answers_200_like_kubernetes(cluster: Cluster) -> None:
    """A deletion that is pending (a finalizer here; a pod's grace period or a namespace alike) answers 200 with
    the object and its deletionTimestamp; 202 is only for orphanDependents: false, as kube-apiserver does."""
    body = json.loads(cm("held"))
    body["metadata"]["finalizers"] = ["example.com/hold"]
    assert call(cluster, "POST", CMS, json.dumps(body).encode())[0] == 201
    code, obj = call(cluster, "DELETE", f"{CMS}/held", None)
    assert code == 200 and obj["metadata"]["deletionTimestamp"], (code, obj)
    code, obj = call(cluster, "DELETE", f"{CMS}/held", json.dumps({"orphanDependents": False}).encode())
    assert code == 202, (code, obj)
    code, _ = call(cluster, "PATCH", f"{CMS}/held", b'{"metadata": {"finalizers": null}}',
                   "application/merge-patch+json")
    assert code == 200
    assert call(cluster, "GET", f"{CMS}/held", None)[0] == 404
