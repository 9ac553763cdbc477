"""Readiness (httpGet) gates the pod's Ready condition; a failing liveness probe (exec) restarts the container."""

from __future__ import annotations

from .conftest import PodEnv, ready


def test_readiness_and_liveness_probes(env: PodEnv) -> None:
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: probed}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: {env.image}
    command: ["sh", "-c", "mkdir -p /www && touch /tmp/alive && exec httpd -f -p 8080 -h /www"]
    ports: [{{name: http, containerPort: 8080}}]
    readinessProbe:
      httpGet: {{path: /ready, port: http}}
      periodSeconds: 1
    livenessProbe:
      exec: {{command: ["cat", "/tmp/alive"]}}
      periodSeconds: 1
      failureThreshold: 2
""")
    pod = env.wait_pod("probed", lambda p: (p.get("status") or {}).get("phase") == "Running", what="Running")
    assert not ready(pod)  # /ready answers 404 so far
    env.kubectl("exec", "probed", "--", "touch", "/www/ready")
    env.wait_pod("probed", ready, timeout=30, what="Ready after /ready exists")
    env.kubectl("exec", "probed", "--", "rm", "/tmp/alive")
    pod = env.wait_pod("probed", lambda p: p["status"]["containerStatuses"][0]["restartCount"] >= 1, timeout=60,
                       what="restarted by the liveness probe")  # fmt: skip
    events = env.kubectl("get", "events", "--field-selector", "involvedObject.name=probed", "-o",
                         "jsonpath={range .items[*]}{.reason}: {.message}{'\\n'}{end}").stdout  # fmt: skip
    assert "Unhealthy: Readiness probe failed: HTTP probe failed with statuscode: 404" in events, events
    assert "Unhealthy: Liveness probe failed: command failed with exit code 1" in events, events
    assert "failed liveness probe, will be restarted" in events
    # the new run starts not ready again (its /www is fresh: the rootfs is per run)
    env.kubectl("delete", "pod", "probed", "--wait=true")
