"""`kubectl logs` and `kubectl exec` (websocket v5.channel.k8s.io) through the API server to the node agent,
with the real kubectl."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time

from .conftest import PodEnv


def test_kubectl_logs(env: PodEnv) -> None:
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: logger}}
spec:
  restartPolicy: OnFailure
  volumes: [{{name: data, emptyDir: {{}}}}]
  containers:
  - name: main
    image: {env.image}
    command: ["sh", "-c", "for i in 1 2 3; do echo line$i; done; sleep 1; echo err >&2; exec sleep 3600"]
  - name: twice
    image: {env.image}
    command: ["sh", "-c"]
    args: ["if [ -f /data/once ]; then echo second; exec sleep 3600; fi; touch /data/once; echo first; exit 1"]
    volumeMounts: [{{name: data, mountPath: /data}}]
  - name: short
    image: {env.image}
    command: ["sh", "-c", "echo a; sleep 4; echo b"]
""")
    def restarted(p: dict) -> bool:
        return any(cs["name"] == "twice" and cs["restartCount"] >= 1 and cs["state"].get("running")
                   for cs in (p.get("status") or {}).get("containerStatuses") or [])

    env.wait_pod("logger", restarted, what="twice restarted")  # (main wrote stderr 1 s after stdout: ordered)
    # -f on a running container ends when that run ends; `short` prints a, then b four seconds later
    follow = subprocess.Popen(["kubectl", "logs", "-f", "logger", "-c", "short"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "KUBECONFIG": str(env.cluster.kubeconfig)})  # fmt: skip
    out = env.kubectl("logs", "logger", "-c", "main").stdout
    assert out == "line1\nline2\nline3\nerr\n"
    assert env.kubectl("logs", "logger", "-c", "main", "--tail=2").stdout == "line3\nerr\n"
    stamped = env.kubectl("logs", "logger", "-c", "main", "--timestamps").stdout.splitlines()
    assert len(stamped) == 4 and all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z line|\S+ err", s) for s in stamped)
    assert env.kubectl("logs", "logger", "-c", "twice").stdout == "second\n"
    assert env.kubectl("logs", "logger", "-c", "twice", "--previous").stdout == "first\n"
    # kubectl picks the first container itself when none is named (and says so)
    default = env.kubectl("logs", "logger")
    assert default.stdout == out and 'Defaulted container "main"' in default.stderr
    bad = env.kubectl("logs", "logger", "-c", "nope", check=False)
    assert bad.returncode != 0 and "container nope is not valid for pod logger" in bad.stderr
    followed, _ = follow.communicate(timeout=60)
    assert followed == "a\nb\n", followed
    assert follow.returncode == 0


def test_kubectl_exec_pipes_and_exit_code(env: PodEnv) -> None:
    env.wait_pod("logger", lambda p: any(cs["name"] == "main" and cs["state"].get("running")
                                         for cs in p["status"].get("containerStatuses") or []), what="main running")
    res = env.kubectl("exec", "logger", "-c", "main", "--", "sh", "-c", "echo out; echo err >&2; exit 7",
                      check=False)  # fmt: skip
    assert res.returncode == 7, res
    assert res.stdout == "out\n" and "err" in res.stderr
    res = env.kubectl("exec", "-i", "logger", "-c", "main", "--", "sh", "-c", "tr a-z A-Z", input="hello pods\n")
    assert res.stdout == "HELLO PODS\n"
    # it really runs inside the container: its hostname and its own pid namespace
    assert env.kubectl("exec", "logger", "-c", "main", "--", "hostname").stdout == "logger\n"
    assert env.kubectl("exec", "logger", "-c", "main", "--", "cat", "/proc/1/cmdline").stdout.startswith("sleep")


def test_kubectl_exec_tty(env: PodEnv) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: kubectl with a real terminal, as a user runs it
        os.environ["KUBECONFIG"] = str(env.cluster.kubeconfig)
        os.execvp("kubectl", ["kubectl", "exec", "-it", "logger", "-c", "main", "--", "sh"])
    out = b""

    def read_until(pattern: bytes, timeout: float = 30.0) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while pattern not in out:
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in {out!r}"
            r, _, _ = select.select([fd], [], [], left)
            if r:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break

    read_until(b"# ")  # the container's shell prompt
    os.write(fd, b"tty; echo $((6*7)); exit 3\r")
    read_until(b"42")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert b"/dev/pts/" in out, out
    assert os.WEXITSTATUS(status) == 3, out
    env.kubectl("delete", "pod", "logger", "--wait=true")
