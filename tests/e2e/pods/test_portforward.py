"""`kubectl port-forward pod/NAME LOCAL:REMOTE` with the real kubectl (SPDY/3.1 tunnelled in a websocket): pages
of a busybox httpd that listens on the pod's localhost only, several connections, a body larger than SPDY's
64 KiB window, and kubectl's report for a port nothing listens on."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from virtplane.testing.cluster import free_port
from virtplane.testing.waiting import wait_for

from .conftest import PodEnv, ready


@contextmanager
def port_forward(env: PodEnv, target: str, remote: int) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    local = free_port()
    kenv = {**os.environ, "KUBECONFIG": str(env.cluster.kubeconfig)}
    proc = subprocess.Popen(["kubectl", "port-forward", target, f"{local}:{remote}"], env=kenv, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:LOCAL -> REMOTE" once it listens
        assert f"Forwarding from 127.0.0.1:{local} -> {remote}" in line, (line, proc.poll())
        yield local, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fetch(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return r.read()


def test_port_forward_to_a_pod(env: PodEnv) -> None:
    script = ("mkdir -p /www && echo hello-through-the-tunnel > /www/index.html && "
              "yes xxxxxxxxx | head -c 300000 > /www/big.txt && exec httpd -f -p 127.0.0.1:8080 -h /www")
    env.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: pf}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: {env.image}
    command: ["sh", "-c", {json.dumps(script)}]
""")
    pod = env.wait_pod("pf", ready, what="Ready")
    # only the pod's localhost serves: nothing answers on the pod IP
    wait_for(lambda: env.kubectl("exec", "pf", "--", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/",
                                 check=False).returncode == 0, 30, what="httpd up")  # fmt: skip
    assert pod["status"]["podIP"]
    with port_forward(env, "pod/pf", 8080) as (local, _proc):
        assert fetch(local, "/index.html") == b"hello-through-the-tunnel\n"
        assert fetch(local, "/index.html") == b"hello-through-the-tunnel\n"  # a second connection, same session
        big = fetch(local, "/big.txt")
        assert len(big) == 300000 and big == (b"xxxxxxxxx\n" * 30000)

    with port_forward(env, "pod/pf", 9999) as (local, proc):
        try:
            fetch(local, "/")
            raise AssertionError("a port nothing listens on must not answer")
        except OSError:
            pass
        proc.terminate()
        _out, err = proc.communicate(timeout=20)
        assert "error forwarding port 9999" in err, err
    env.kubectl("delete", "pod", "pf")
