"""Lifecycle hooks: preStop (exec and httpGet) runs before SIGTERM when a pod is deleted, postStart holds the
container's Running state until it returns and a failing one restarts the container. What the hooks do is
seen where a user would see it: the access log of another pod's httpd (`kubectl logs`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import PodEnv, ready


def _events(env: PodEnv, name: str) -> str:
    return env.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o",
                       "jsonpath={range .items[*]}{.reason}: {.message}{'\\n'}{end}").stdout  # fmt: skip


@pytest.fixture(scope="module")
def collector(env: PodEnv) -> Iterator[str]:
    """A busybox httpd logging every URL it is asked for (-vv); yields its pod IP."""
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: collector}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: httpd, image: {env.image}, command: ["sh", "-c", "mkdir -p /www && exec httpd -f -vv -p 8080 -h /www"]}}
""")
    pod = env.wait_pod("collector", ready, what="Ready")
    yield pod["status"]["podIP"]
    env.kubectl("delete", "pod", "collector", "--wait=true")


def test_pre_stop_hooks_run_before_sigterm(env: PodEnv, collector: str) -> None:
    url = f"http://{collector}:8080"
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: stopper}}
spec:
  terminationGracePeriodSeconds: 20
  containers:
  - name: app
    image: {env.image}
    command: ["sh", "-c", "trap 'wget -q -O- {url}/app-got-sigterm; exit 0' TERM; while true; do sleep 0.2; done"]
    lifecycle:
      preStop:
        exec:
          command: ["sh", "-c", "wget -q -O- {url}/app-prestop-exec; sleep 1; wget -q -O- {url}/app-prestop-done"]
  - name: side
    image: {env.image}
    command: ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.2; done"]
    lifecycle:
      preStop:
        httpGet: {{host: "{collector}", port: 8080, path: /side-prestop-http}}
""")
    env.wait_pod("stopper", ready, what="Ready")
    env.kubectl("delete", "pod", "stopper", "--wait=true", timeout=60)
    log = env.kubectl("logs", "collector").stdout
    urls = [line.split("url:", 1)[1].strip() for line in log.splitlines() if "url:" in line]
    assert "/side-prestop-http" in urls, log
    app = [u for u in urls if u.startswith("/app-")]
    # the whole exec hook (1 s) ran before the container got SIGTERM
    assert app == ["/app-prestop-exec", "/app-prestop-done", "/app-got-sigterm"], log


def test_pre_stop_hook_counts_against_the_grace_period(env: PodEnv) -> None:
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: slowstop}}
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - name: app
    image: {env.image}
    command: ["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"]
    lifecycle:
      preStop:
        exec: {{command: ["sleep", "600"]}}
""")
    env.wait_pod("slowstop", ready, what="Ready")
    t0 = time.monotonic()
    env.kubectl("delete", "pod", "slowstop", "--wait=true", timeout=60)
    took = time.monotonic() - t0
    # 3 s of grace for the hook, then SIGTERM's minimum 2 s, then SIGKILL (plus polling and API latency)
    assert 4.5 <= took < 30, took


def test_post_start_holds_running_and_a_failing_one_restarts(env: PodEnv) -> None:
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: starter}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {env.image}
    command: ["sleep", "3600"]
    lifecycle:
      postStart:
        exec: {{command: ["sh", "-c", "sleep 2; echo warmed-up > /tmp/poststart"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: badstart}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: {env.image}
    command: ["sleep", "3600"]
    lifecycle:
      postStart:
        exec: {{command: ["sh", "-c", "echo no-config; exit 3"]}}
""")

    def running(p: dict[str, Any]) -> bool:
        cs = ((p.get("status") or {}).get("containerStatuses") or [{}])[0]
        return "running" in (cs.get("state") or {})

    env.wait_pod("starter", running, what="container running")
    # Running is reported only once the hook returned: its file is there the moment we see it
    assert env.kubectl("exec", "starter", "--", "cat", "/tmp/poststart").stdout.strip() == "warmed-up"
    pod = env.wait_pod("badstart", lambda p: p["status"]["containerStatuses"][0]["restartCount"] >= 1, timeout=60,
                       what="restarted after its postStart hook failed")  # fmt: skip
    assert not ready(pod)
    events = _events(env, "badstart")
    assert "FailedPostStartHook: Exec lifecycle hook ([sh -c echo no-config; exit 3])" in events, events
    assert "command failed with exit code 3: no-config" in events, events
    env.kubectl("delete", "pod", "starter", "badstart", "--wait=true")
