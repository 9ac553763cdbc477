"""A PersistentVolumeClaim from the storage provisioner (local, WaitForFirstConsumer) outlives its pods."""

from __future__ import annotations

import time
from pathlib import Path

from .conftest import PodEnv


def test_pvc_data_outlives_pods(env: PodEnv) -> None:
    def pod(name: str, command: str) -> str:
        return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  restartPolicy: Never
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: pod-data}}}}]
  containers:
  - name: c
    image: {env.image}
    command: ["sh", "-c", "{command}"]
    volumeMounts: [{{name: data, mountPath: /data}}]
"""

    env.apply("""
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: pod-data}
spec:
  storageClassName: local
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 16Mi}}
""")
    env.apply(pod("writer", "echo kept > /data/file"))
    done = env.wait_pod("writer", lambda p: (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"),
                        timeout=90, what="writer finished")  # fmt: skip
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    # a finished pod gives its network back at once (its logs stay until it is deleted)
    netns = Path("/var/run/netns") / f"vpp-{done['metadata']['uid'].replace('-', '')[:12]}"
    deadline = time.monotonic() + 30
    while netns.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not netns.exists()
    assert env.kubectl("logs", "writer").stdout == ""
    env.kubectl("delete", "pod", "writer", "--wait=true")
    env.apply(pod("reader", "cat /data/file"))
    env.wait_pod("reader", lambda p: (p.get("status") or {}).get("phase") == "Succeeded", timeout=90,
                 what="reader finished")  # fmt: skip
    assert env.kubectl("logs", "reader").stdout == "kept\n"
    env.kubectl("delete", "pod", "reader", "--wait=true")
