"""Ephemeral containers with the real `kubectl debug` (pods/ephemeralcontainers): a debug container joins a
running pod, shares its network and (with --target) the target container's processes; it runs once."""

from __future__ import annotations

import json
from typing import Any

from .conftest import PodEnv, ready


def test_kubectl_debug_adds_an_ephemeral_container(env: PodEnv) -> None:
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: debugme}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: app, image: {env.image}, command: ["sh", "-c", "mkdir -p /www && exec httpd -f -p 8080 -h /www"]}}
""")
    env.wait_pod("debugme", ready, what="Ready")
    out = env.kubectl("debug", "debugme", "-c", "dbg", f"--image={env.image}", "--target=app", "--",
                      "sh", "-c", "ps; wget -q -S -O- http://127.0.0.1:8080/ 2>&1 | head -1")  # fmt: skip
    assert out.returncode == 0

    def finished(p: dict[str, Any]) -> bool:
        st = {s["name"]: s for s in (p.get("status") or {}).get("ephemeralContainerStatuses") or []}
        return "terminated" in (st.get("dbg", {}).get("state") or {})

    pod = env.wait_pod("debugme", finished, timeout=60, what="the debug container ran")
    (status,) = pod["status"]["ephemeralContainerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == 0, status
    assert pod["spec"]["ephemeralContainers"][0]["targetContainerName"] == "app"
    logs = env.kubectl("logs", "debugme", "-c", "dbg").stdout
    assert "httpd -f -p 8080" in logs, logs  # the target's process, seen from the debug container
    assert "HTTP/1.1 404" in logs or "HTTP/1.0 404" in logs, logs  # and its port, on the pod's localhost
    assert ready(env.pod("debugme"))  # the app was not disturbed
    # an ephemeral container may not be changed or removed afterwards, nor set on create
    patch = json.dumps({"spec": {"ephemeralContainers": []}})
    proc = env.kubectl("patch", "pod", "debugme", "--subresource=ephemeralcontainers", "--type=merge", "-p", patch,
                       check=False)  # fmt: skip
    assert proc.returncode != 0 and 'existing ephemeral containers "dbg" may not be removed' in proc.stderr, proc.stderr
    env.kubectl("delete", "pod", "debugme", "--wait=true")


def test_a_finished_pod_stops_its_debug_container(env: PodEnv) -> None:
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: shortlived}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: job, image: {env.image}, command: ["sh", "-c", "sleep 6"]}}
""")
    env.wait_pod("shortlived", lambda p: (p.get("status") or {}).get("phase") == "Running", what="Running")
    env.kubectl("debug", "shortlived", "-c", "dbg", f"--image={env.image}", "--", "sleep", "3600")

    def dbg_state(p: dict[str, Any]) -> dict[str, Any]:
        st = {s["name"]: s for s in (p.get("status") or {}).get("ephemeralContainerStatuses") or []}
        return st.get("dbg", {}).get("state") or {}

    env.wait_pod("shortlived", lambda p: "running" in dbg_state(p), timeout=30, what="the debug container runs")
    pod = env.wait_pod("shortlived", lambda p: p["status"]["phase"] == "Succeeded" and "terminated" in dbg_state(p),
                       timeout=60, what="Succeeded, its debug container stopped")  # fmt: skip
    assert dbg_state(pod)["terminated"]["exitCode"] == 137, pod["status"]  # killed with the pod's end
    env.kubectl("delete", "pod", "shortlived", "--wait=true")
