"""Graceful pod deletion with the real kubectl: the API server marks a running pod (deletionTimestamp, grace
period), the node agent sends SIGTERM, waits up to the grace period, SIGKILLs, then removes the pod object;
`kubectl delete pod` waits for that. `--grace-period=0 --force` removes the object at once; an unscheduled pod
goes at once."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from virtplane.api import quantity
from virtplane.testing.waiting import wait_for

from .conftest import PodEnv, ready


def _pod_manifest(env: PodEnv, name: str, grace: int, script: str, out: Path) -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: {grace}
  volumes: [{{name: out, hostPath: {{path: {out}, type: DirectoryOrCreate}}}}]
  containers:
  - name: main
    image: {env.image}
    command: ["sh", "-c", {json.dumps(script)}]
    volumeMounts: [{{name: out, mountPath: /out}}]
"""


def _gone(env: PodEnv, name: str) -> bool:
    proc = env.kubectl("get", "pod", name, check=False)
    return proc.returncode != 0 and "NotFound" in proc.stderr


def _main_pid(env: PodEnv, pod: dict) -> int:
    state = env.node_dir / "pods" / "sandboxes" / pod["metadata"]["uid"] / "containers" / "main" / "state" / "pid"
    return int(state.read_text())


def _dead(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.split(") ", 1)[1].startswith("Z")


def test_sigterm_handler_runs_and_delete_waits_for_it(env: PodEnv, tmp_path: Path) -> None:
    out = tmp_path / "graceful"
    script = "trap 'echo cleaned-up > /out/term; exit 0' TERM; touch /out/up; while :; do sleep 0.2; done"
    env.apply(_pod_manifest(env, "graceful", 60, script, out))
    pod = env.wait_pod("graceful", ready, what="Ready")
    wait_for(lambda: (out / "up").exists(), 30, what="container started its loop")
    pid = _main_pid(env, pod)
    t0 = time.monotonic()
    proc = env.kubectl("delete", "pod", "graceful", timeout=120)  # kubectl waits until the pod is gone
    took = time.monotonic() - t0
    assert 'pod "graceful" deleted' in proc.stdout
    assert _gone(env, "graceful")
    # the handler ran (SIGTERM, not SIGKILL) and the pod went long before its 60 s grace period ran out
    assert (out / "term").read_text() == "cleaned-up\n"
    assert took < 40, took
    assert _dead(pid)


def test_container_ignoring_sigterm_is_killed_after_the_grace_period(env: PodEnv, tmp_path: Path) -> None:
    out = tmp_path / "stubborn"
    script = "trap 'echo ignored >> /out/term' TERM; touch /out/up; while :; do sleep 0.2; done"
    env.apply(_pod_manifest(env, "stubborn", 4, script, out))
    pod = env.wait_pod("stubborn", ready, what="Ready")
    wait_for(lambda: (out / "up").exists(), 30, what="container started its loop")
    pid = _main_pid(env, pod)
    kenv = {**os.environ, "KUBECONFIG": str(env.cluster.kubeconfig)}
    t0 = time.monotonic()
    deleting = subprocess.Popen(["kubectl", "delete", "pod", "stubborn"], env=kenv, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        # while it terminates: still there, marked, shown as Terminating, and kubectl still waiting
        marked = wait_for(lambda: (p := env.pod("stubborn"))["metadata"].get("deletionTimestamp") and p, 20,
                          what="deletionTimestamp")  # fmt: skip
        assert marked["metadata"]["deletionGracePeriodSeconds"] == 4
        assert "Terminating" in env.kubectl("get", "pod", "stubborn").stdout
        wait_for(lambda: (out / "term").exists(), 20, what="SIGTERM delivered")
        assert not _dead(pid)  # it ignored SIGTERM
        stdout, stderr = deleting.communicate(timeout=90)
    finally:
        if deleting.poll() is None:
            deleting.kill()
    took = time.monotonic() - t0
    assert deleting.returncode == 0, stderr
    assert 'pod "stubborn" deleted' in stdout
    assert took >= 4, took  # not before the grace period ran out ...
    assert took < 60, took  # ... and then SIGKILLed
    assert _gone(env, "stubborn")
    assert _dead(pid)
    assert (out / "term").read_text() == "ignored\n"


def test_force_delete_removes_the_pod_at_once(env: PodEnv, tmp_path: Path) -> None:
    out = tmp_path / "forced"
    script = "trap '' TERM; touch /out/up; while :; do sleep 0.2; done"
    env.apply(_pod_manifest(env, "forced", 3, script, out))
    pod = env.wait_pod("forced", ready, what="Ready")
    pid = _main_pid(env, pod)
    t0 = time.monotonic()
    proc = env.kubectl("delete", "pod", "forced", "--grace-period=0", "--force")
    assert time.monotonic() - t0 < 15
    assert "Immediate deletion does not wait" in proc.stderr  # kubectl's own warning for --force
    assert _gone(env, "forced")
    # as the kubelet does for a pod removed from the API: its containers still get their grace period, then die
    wait_for(lambda: _dead(pid), 60, what="container killed after the API object went")


def test_unscheduled_pod_is_deleted_at_once(env: PodEnv) -> None:
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: nowhere}}
spec:
  nodeSelector: {{no-such-label: "true"}}
  containers: [{{name: main, image: {env.image}}}]
""")
    assert not env.pod("nowhere")["spec"].get("nodeName")
    env.kubectl("delete", "pod", "nowhere", "--wait=false")
    assert _gone(env, "nowhere")


def test_a_terminating_pod_holds_its_requests_until_it_is_gone(env: PodEnv) -> None:
    """The scheduler counts a Terminating pod's requests (its containers still run) until the node removes it."""
    wait_for(lambda: env.kubectl("get", "node", "virtplane-node-1", check=False).returncode == 0, 60,
             what="the node registered")  # fmt: skip
    node = json.loads(env.kubectl("get", "node", "virtplane-node-1", "-o", "json").stdout)
    share = quantity.parse_quantity(node["status"]["allocatable"]["memory"]) * 6 // 10  # 60%: two never fit
    manifest = """
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: {grace}
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"]
    resources: {{requests: {{memory: "{mem}"}}}}
"""
    env.apply(manifest.format(name="bigold", grace=6, image=env.image, mem=int(share)))
    env.wait_pod("bigold", ready, what="Ready")
    env.kubectl("delete", "pod", "bigold", "--wait=false")
    env.apply(manifest.format(name="bignew", grace=1, image=env.image, mem=int(share)))

    def unschedulable(p: dict) -> bool:
        conds = {c["type"]: c for c in (p.get("status") or {}).get("conditions") or []}
        return conds.get("PodScheduled", {}).get("reason") == "Unschedulable"

    pod = env.wait_pod("bignew", unschedulable, timeout=30, what="Unschedulable while the old pod terminates")
    assert any("Insufficient memory" in c.get("message", "") for c in pod["status"]["conditions"]), pod["status"]
    assert env.pod("bigold")["metadata"].get("deletionTimestamp")  # still there, Terminating
    env.wait_pod("bignew", ready, timeout=60, what="scheduled and Ready once the old pod is gone")
    assert _gone(env, "bigold")
    env.kubectl("delete", "pod", "bignew", "--wait=true")
