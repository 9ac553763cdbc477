"""Pods run by the node agent with runc: init containers, shared netns, env/envFrom, volumes, restarts,
image pull errors, adoption across an agent restart, deletion freeing everything."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

from .conftest import PodEnv, ready


def http_get(url: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_pod_with_init_volumes_env_and_shared_network(env: PodEnv) -> None:
    env.apply(f"""
apiVersion: v1
kind: ConfigMap
metadata: {{name: web-config}}
data: {{greeting: hello-cm, mode: fast}}
---
apiVersion: v1
kind: Secret
metadata: {{name: web-secret}}
stringData: {{password: s3cret}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, labels: {{app: web, tier: front}}}}
spec:
  terminationGracePeriodSeconds: 5
  volumes:
  - {{name: www, emptyDir: {{}}}}
  - {{name: cfg, configMap: {{name: web-config}}}}
  - {{name: sec, secret: {{secretName: web-secret}}}}
  - name: info
    downwardAPI:
      items: [{{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}]
  initContainers:
  - name: init
    image: {env.image}
    command: ["sh", "-c", "echo initialized > /www/init.txt"]
    volumeMounts: [{{name: www, mountPath: /www}}]
  containers:
  - name: httpd
    image: {env.image}
    command: ["httpd", "-f", "-p", "8080", "-h", "/www"]
    volumeMounts: [{{name: www, mountPath: /www}}]
  - name: side
    image: {env.image}
    command: ["sh", "-c"]
    args:
    - env > /www/env.txt; cat /cfg/greeting /sec/password /info/labels > /www/files.txt;
      until wget -q -O /www/localhost.tmp http://127.0.0.1:8080/init.txt; do sleep 0.2; done;
      mv /www/localhost.tmp /www/via-localhost.txt; echo side up; exec sleep 3600
    env:
    - name: POD_NAME
      valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
    - {{name: FROM_VALUE, value: "v-$(POD_NAME)"}}
    - name: PASSWORD
      valueFrom: {{secretKeyRef: {{name: web-secret, key: password}}}}
    envFrom:
    - {{configMapRef: {{name: web-config}}, prefix: CM_}}
    volumeMounts:
    - {{name: www, mountPath: /www}}
    - {{name: cfg, mountPath: /cfg}}
    - {{name: sec, mountPath: /sec, readOnly: true}}
    - {{name: info, mountPath: /info}}
""")
    pod = env.wait_pod("web", ready, what="Ready")
    st = pod["status"]
    assert st["phase"] == "Running"
    ip = st["podIP"]
    assert ip and ip != st["hostIP"]
    assert [c["name"] for c in st["initContainerStatuses"]] == ["init"]
    assert st["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    for cs in st["containerStatuses"]:
        assert cs["state"].get("running"), cs
        assert cs["restartCount"] == 0
        assert cs["containerID"].startswith("runc://")
        assert cs["imageID"].endswith(cs["imageID"].split("@")[-1]) and "@sha256:" in cs["imageID"]
    # the node reaches the pod on its own IP; the init container's file is served by httpd
    assert http_get(f"http://{ip}:8080/init.txt") == "initialized\n"
    envtxt = http_get(f"http://{ip}:8080/env.txt")
    assert "FROM_VALUE=v-web\n" in envtxt  # $(VAR) expansion of an earlier variable
    assert "POD_NAME=web\n" in envtxt and "PASSWORD=s3cret\n" in envtxt
    assert "CM_greeting=hello-cm\n" in envtxt and "CM_mode=fast\n" in envtxt
    files = http_get(f"http://{ip}:8080/files.txt")
    assert files.startswith("hello-cms3cret") and 'app="web"' in files and 'tier="front"' in files
    # containers of one pod share its network namespace: side reached httpd on 127.0.0.1
    assert http_get(f"http://{ip}:8080/via-localhost.txt") == "initialized\n"
    reasons = env.kubectl("get", "events", "--field-selector", "involvedObject.name=web", "-o",
                          "jsonpath={.items[*].reason}").stdout.split()  # fmt: skip
    for r in ("Scheduled", "Pulled", "Created", "Started"):
        assert r in reasons, reasons


def test_crashing_container_goes_to_crashloopbackoff(env: PodEnv) -> None:
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: crasher}}
spec:
  containers:
  - name: boom
    image: {env.image}
    command: ["sh", "-c", "echo boom; exit 3"]
""")

    def backing_off(pod: dict) -> bool:
        cs = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]
        return (cs.get("state") or {}).get("waiting", {}).get("reason") == "CrashLoopBackOff" \
            and cs.get("restartCount", 0) >= 1  # fmt: skip

    pod = env.wait_pod("crasher", backing_off, timeout=60, what="CrashLoopBackOff")
    cs = pod["status"]["containerStatuses"][0]
    assert cs["lastState"]["terminated"]["exitCode"] == 3
    assert cs["lastState"]["terminated"]["reason"] == "Error"
    assert "back-off" in cs["state"]["waiting"]["message"]
    assert pod["status"]["phase"] == "Running"
    assert not ready(pod)
    reasons = env.kubectl("get", "events", "--field-selector", "involvedObject.name=crasher", "-o",
                          "jsonpath={.items[*].reason}").stdout.split()  # fmt: skip
    assert "BackOff" in reasons
    env.kubectl("delete", "pod", "crasher", "--wait=true")


def test_missing_image_gives_err_image_pull(env: PodEnv) -> None:
    missing = env.image.rsplit("/", 2)[0] + "/virtplane/no-such-image:1"
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: noimage}}
spec:
  containers: [{{name: c, image: "{missing}"}}]
""")

    def pull_error(pod: dict) -> bool:
        cs = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]
        return (cs.get("state") or {}).get("waiting", {}).get("reason") in ("ErrImagePull", "ImagePullBackOff")

    pod = env.wait_pod("noimage", pull_error, timeout=60, what="ErrImagePull")
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    # what the registry answered (404 on the manifest) is in the message
    assert "no-such-image/manifests/1: not found" in waiting["message"], waiting
    assert pod["status"]["phase"] == "Pending"
    env.wait_pod("noimage", lambda p: p["status"]["containerStatuses"][0]["state"].get("waiting", {}).get("reason")
                 == "ImagePullBackOff", timeout=30, what="ImagePullBackOff")  # fmt: skip
    env.kubectl("delete", "pod", "noimage", "--wait=true")


def _container_pid(env: PodEnv, uid: str, name: str) -> int:
    return int((env.node_dir / "pods" / "sandboxes" / uid / "containers" / name / "state" / "pid").read_text())


def test_agent_restart_keeps_containers_and_delete_frees_everything(env: PodEnv) -> None:
    pod = env.wait_pod("web", ready, what="Ready")
    uid, ip = pod["metadata"]["uid"], pod["status"]["podIP"]
    pid = _container_pid(env, uid, "httpd")
    agent_pid_file = env.node_dir / "agent.pid"
    old_agent = int(agent_pid_file.read_text())
    readies = env.agent_log().count("node agent ready")
    os.kill(old_agent, signal.SIGKILL)  # a crash, not a clean stop; `virtplane up` starts a new agent
    deadline = time.monotonic() + 60
    while env.agent_log().count("node agent ready") == readies:  # the new agent adopted what it found
        assert time.monotonic() < deadline, env.agent_log()[-2000:]
        time.sleep(0.3)
    assert int(agent_pid_file.read_text()) != old_agent
    assert "adopted pod default/web" in env.agent_log()
    # same process, still serving, no restart counted
    assert _container_pid(env, uid, "httpd") == pid
    os.kill(pid, 0)
    assert http_get(f"http://{ip}:8080/init.txt") == "initialized\n"
    pod = env.pod("web")
    assert all(cs["restartCount"] == 0 for cs in pod["status"]["containerStatuses"])
    # the new agent still reconciles the adopted pod: kill httpd → it is restarted and counted
    os.kill(pid, signal.SIGKILL)
    pod = env.wait_pod("web", lambda p: ready(p) and any(cs["name"] == "httpd" and cs["restartCount"] == 1
                                                         for cs in p["status"]["containerStatuses"]),
                       timeout=60, what="httpd restarted once")  # fmt: skip
    pid = _container_pid(env, uid, "httpd")
    netns = json.loads((env.node_dir / "pods" / "sandboxes" / uid / "sandbox.json").read_text())["netns"]
    assert Path(f"/var/run/netns/{netns}").exists()
    t0 = time.monotonic()
    env.kubectl("delete", "pod", "web", "--wait=true")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (env.node_dir / "pods" / "sandboxes" / uid).exists():
        time.sleep(0.2)
    assert not (env.node_dir / "pods" / "sandboxes" / uid).exists(), env.agent_log()[-2000:]
    # httpd dies of SIGTERM well within the 5 s grace period
    assert time.monotonic() - t0 < 20
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
    assert not Path(f"/var/run/netns/{netns}").exists()
    ipam = list(env.node_dir.glob("pods/cni/ipam/*/*"))
    assert ip not in [p.name for p in ipam], ipam  # host-local released the address
