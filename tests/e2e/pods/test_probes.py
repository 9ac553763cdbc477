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


def _events(env: PodEnv, name: str) -> str:
    return env.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o",
                       "jsonpath={range .items[*]}{.reason}: {.message}{'\\n'}{end}").stdout  # fmt: skip


def test_startup_probe_holds_liveness_and_readiness_until_it_succeeds(env: PodEnv) -> None:
    # A slow starter: /tmp/started appears after 5 s. Its liveness probe (one failure kills) would restart it
    # at once if it ran before the startup probe succeeded.
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: slowstart}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {env.image}
    command: ["sh", "-c", "sleep 5; touch /tmp/started; exec sleep 3600"]
    startupProbe:
      exec: {{command: ["test", "-f", "/tmp/started"]}}
      periodSeconds: 1
      failureThreshold: 30
    livenessProbe:
      exec: {{command: ["test", "-f", "/tmp/started"]}}
      periodSeconds: 1
      failureThreshold: 1
    readinessProbe:
      exec: {{command: ["true"]}}
      periodSeconds: 1
""")

    def running(p: dict) -> bool:
        cs = ((p.get("status") or {}).get("containerStatuses") or [{}])[0]
        return "running" in (cs.get("state") or {})

    pod = env.wait_pod("slowstart", running, what="container running")
    cs = pod["status"]["containerStatuses"][0]
    assert cs["started"] is False and cs["ready"] is False, cs  # the startup probe has not passed yet
    pod = env.wait_pod("slowstart", ready, timeout=60, what="Ready after the startup probe passed")
    cs = pod["status"]["containerStatuses"][0]
    assert cs["started"] is True and cs["restartCount"] == 0, cs
    assert "Startup probe failed" in _events(env, "slowstart")
    assert "Liveness probe failed" not in _events(env, "slowstart")
    env.kubectl("delete", "pod", "slowstart", "--wait=true")


def test_failing_startup_probe_restarts_the_container(env: PodEnv) -> None:
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: neverstarts}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {env.image}
    command: ["sleep", "3600"]
    startupProbe:
      exec: {{command: ["test", "-f", "/tmp/never"]}}
      periodSeconds: 1
      failureThreshold: 3
""")
    pod = env.wait_pod("neverstarts", lambda p: p["status"]["containerStatuses"][0]["restartCount"] >= 1,
                       timeout=60, what="restarted by the startup probe")  # fmt: skip
    assert not ready(pod)
    events = _events(env, "neverstarts")
    assert "Unhealthy: Startup probe failed: command failed with exit code 1" in events, events
    assert "Container app failed startup probe, will be restarted" in events, events
    env.kubectl("delete", "pod", "neverstarts", "--wait=true")


def test_liveness_failure_stops_the_container_gracefully(env: PodEnv) -> None:
    """As the kubelet: a container failing its liveness probe gets SIGTERM (its handler runs) before the restart."""
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: gentle}}
spec:
  terminationGracePeriodSeconds: 10
  containers:
  - name: app
    image: {env.image}
    command: ["sh", "-c", "trap 'echo got SIGTERM; exit 0' TERM; touch /tmp/alive; while :; do sleep 0.2; done"]
    livenessProbe:
      exec: {{command: ["cat", "/tmp/alive"]}}
      periodSeconds: 1
      failureThreshold: 1
""")
    env.wait_pod("gentle", ready, what="Ready")
    env.kubectl("exec", "gentle", "--", "rm", "/tmp/alive")
    pod = env.wait_pod("gentle", lambda p: p["status"]["containerStatuses"][0]["restartCount"] >= 1, timeout=60,
                       what="restarted by the liveness probe")  # fmt: skip
    last = pod["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] == 0, last  # its SIGTERM handler ended it, not a SIGKILL (137)
    assert "got SIGTERM" in env.kubectl("logs", "gentle", "--previous").stdout
    env.kubectl("delete", "pod", "gentle", "--wait=true")
