"""Services through the API with kubectl against a real `virtplane up --nodes 0` (no root, no VM): ClusterIP
and NodePort allocation by the API server (requested, taken, out of range, immutable, released on delete),
and the endpoints controller following a Pod's IP and readiness into Endpoints and an EndpointSlice."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtplane.testing.cluster import Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("svcapi")) / "cluster",
                extra_args=("--nodes", "0", "--service-cluster-ip-range", "10.97.0.0/24"))  # fmt: skip
    c.start()
    try:
        yield c
    finally:
        c.stop()


def get(c: Cluster, *args: str) -> Any:
    return json.loads(c.kubectl("get", *args, "-o", "json").stdout)


def wait_for(fn: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_cluster_ip_and_node_port_allocation(cluster: Cluster) -> None:
    c = cluster
    c.kubectl("create", "service", "clusterip", "a", "--tcp=80:8080")
    a = get(c, "svc", "a")["spec"]
    assert a["clusterIP"].startswith("10.97.0.") and a["clusterIPs"] == [a["clusterIP"]]
    assert a["clusterIP"] not in ("10.97.0.0", "10.97.0.1", "10.97.0.255")

    taken = c.kubectl("create", "service", "clusterip", "b", "--tcp=80", "--clusterip", a["clusterIP"], check=False)
    assert taken.returncode != 0
    assert f'spec.clusterIP: Invalid value: "{a["clusterIP"]}": failed to allocate IP' in taken.stderr
    assert "provided IP is already allocated" in taken.stderr
    out = c.kubectl("create", "service", "clusterip", "b", "--tcp=80", "--clusterip", "10.1.2.3", check=False)
    assert "the provided IP (10.1.2.3) is not in the valid range. The range of valid IPs is 10.97.0.0/24" in out.stderr
    c.kubectl("create", "service", "clusterip", "b", "--tcp=80", "--clusterip", "10.97.0.77")
    assert get(c, "svc", "b")["spec"]["clusterIP"] == "10.97.0.77"

    patched = c.kubectl("patch", "svc", "b", "--type=merge", "-p", '{"spec":{"clusterIP":"10.97.0.78"}}', check=False)
    assert patched.returncode != 0 and "may not change once set" in patched.stderr
    c.kubectl("label", "svc", "b", "x=y")  # other updates keep the address
    assert get(c, "svc", "b")["spec"]["clusterIP"] == "10.97.0.77"

    c.kubectl("delete", "svc", "b")  # released: the address can be asked for again
    c.kubectl("create", "service", "clusterip", "b2", "--tcp=80", "--clusterip", "10.97.0.77")

    c.kubectl("create", "service", "nodeport", "np", "--tcp=22:22", "--node-port", "30022")
    assert get(c, "svc", "np")["spec"]["ports"][0]["nodePort"] == 30022
    dup = c.kubectl("create", "service", "nodeport", "np2", "--tcp=23:23", "--node-port", "30022", check=False)
    assert "spec.ports[0].nodePort: Invalid value: 30022: provided port is already allocated" in dup.stderr
    bad = c.kubectl("create", "service", "nodeport", "np3", "--tcp=23:23", "--node-port", "80", check=False)
    assert "provided port is not in the valid range. The range of valid ports is 30000-32767" in bad.stderr
    c.kubectl("create", "service", "nodeport", "np4", "--tcp=24:24")
    assert 30000 <= get(c, "svc", "np4")["spec"]["ports"][0]["nodePort"] <= 32767
    c.kubectl("delete", "svc", "np")
    c.kubectl("create", "service", "nodeport", "np5", "--tcp=25:25", "--node-port", "30022")


def test_endpoints_follow_selected_pods(cluster: Cluster) -> None:
    c = cluster
    c.kubectl("create", "service", "clusterip", "web", "--tcp=80:8080")  # selector app=web
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "labels": {"app": "web"}},
           "spec": {"containers": [{"name": "c", "image": "nginx"}]}}  # fmt: skip
    c.kubectl("apply", "-f", "-", input=json.dumps(pod))
    ep = wait_for(lambda: get(c, "endpoints", "web"), 10, "Endpoints web")
    assert not ep.get("subsets")  # no IP yet: no endpoint

    def status(ip: str, ready: str) -> None:
        body = {"status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}}
        c.kubectl("patch", "pod", "web-1", "--subresource=status", "--type=merge", "-p", json.dumps(body))

    status("10.244.5.5", "False")
    ep = wait_for(lambda: (e := get(c, "endpoints", "web")).get("subsets") and e, 10, "not-ready address")
    assert ep["subsets"][0]["notReadyAddresses"][0]["ip"] == "10.244.5.5"
    status("10.244.5.5", "True")
    ep = wait_for(lambda: (e := get(c, "endpoints", "web")).get("subsets", [{}])[0].get("addresses") and e, 10,
                  "ready address")  # fmt: skip
    sub = ep["subsets"][0]
    assert sub["addresses"][0]["ip"] == "10.244.5.5" and sub["addresses"][0]["targetRef"]["name"] == "web-1"
    assert sub["ports"] == [{"name": "80-8080", "port": 8080, "protocol": "TCP"}]
    slices = get(c, "endpointslices", "-l", "kubernetes.io/service-name=web")["items"]
    assert len(slices) == 1
    assert slices[0]["endpoints"][0]["addresses"] == ["10.244.5.5"]
    assert slices[0]["endpoints"][0]["conditions"]["ready"] is True
    assert slices[0]["ports"] == [{"name": "80-8080", "port": 8080, "protocol": "TCP"}]

    c.kubectl("label", "pod", "web-1", "app=other", "--overwrite")  # no longer selected
    wait_for(lambda: not get(c, "endpoints", "web").get("subsets"), 10, "endpoint removed")
    c.kubectl("delete", "svc", "web")
    wait_for(lambda: not get(c, "endpointslices", "-l", "kubernetes.io/service-name=web")["items"]
             and c.kubectl("get", "endpoints", "web", check=False).returncode != 0, 20, "Endpoints/slice gone")
