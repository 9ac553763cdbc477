"""apps/v1 Deployment and ReplicaSet: busybox httpd replicas reachable by pod IP, `kubectl scale`, a rolling
update watched by `kubectl rollout status`."""

from __future__ import annotations

import json
import urllib.request

from .conftest import PodEnv


def pods_of(env: PodEnv, selector: str) -> list[dict]:
    return json.loads(env.kubectl("get", "pods", "-l", selector, "-o", "json").stdout)["items"]


def fetch(ip: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{ip}:8080/{path}", timeout=10) as r:
        return r.read().decode()


def test_deployment_scale_and_rolling_update(env: PodEnv) -> None:
    def manifest(version: str) -> str:
        return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: webd}}}}
  strategy: {{rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}}}
  template:
    metadata: {{labels: {{app: webd}}}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: httpd
        image: {env.image}
        command: ["sh", "-c", "mkdir -p /www && echo {version} > /www/version && exec httpd -f -p 8080 -h /www"]
"""

    env.apply(manifest("v1"))
    env.kubectl("rollout", "status", "deployment/web", "--timeout=120s", timeout=150)
    pods = pods_of(env, "app=webd")
    assert len(pods) == 2
    for p in pods:
        assert p["status"]["phase"] == "Running"
        assert (p["metadata"]["ownerReferences"][0]["kind"]) == "ReplicaSet"
        assert fetch(p["status"]["podIP"], "version") == "v1\n"
    dep = json.loads(env.kubectl("get", "deployment", "web", "-o", "json").stdout)
    assert dep["status"]["readyReplicas"] == 2 and dep["status"]["availableReplicas"] == 2
    assert {c["type"]: c["status"] for c in dep["status"]["conditions"]} == {"Available": "True", "Progressing": "True"}

    env.kubectl("scale", "deployment/web", "--replicas=3")
    env.kubectl("rollout", "status", "deployment/web", "--timeout=120s", timeout=150)
    assert len([p for p in pods_of(env, "app=webd") if not p["metadata"].get("deletionTimestamp")]) == 3

    env.apply(manifest("v2").replace("replicas: 2", "replicas: 3"))
    out = env.kubectl("rollout", "status", "deployment/web", "--timeout=180s", timeout=200).stdout
    assert "successfully rolled out" in out
    pods = [p for p in pods_of(env, "app=webd") if not p["metadata"].get("deletionTimestamp")
            and p["status"].get("phase") == "Running"]  # fmt: skip
    assert len(pods) == 3
    assert {fetch(p["status"]["podIP"], "version") for p in pods} == {"v2\n"}
    rss = json.loads(env.kubectl("get", "rs", "-l", "app=webd", "-o", "json").stdout)["items"]
    by_rev = {r["metadata"]["annotations"]["deployment.kubernetes.io/revision"]: r for r in rss}
    assert by_rev["1"]["spec"]["replicas"] == 0 and by_rev["2"]["spec"]["replicas"] == 3
    dep = json.loads(env.kubectl("get", "deployment", "web", "-o", "json").stdout)
    assert dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    assert dep["status"]["updatedReplicas"] == 3

    env.kubectl("delete", "deployment", "web", "--wait=true")
    # garbage collection takes the ReplicaSets and their pods with it
    env.kubectl("wait", "--for=delete", "pod", "-l", "app=webd", "--timeout=60s", timeout=90)
