"""The per-container monitor (what conmon is to CRI-O): `python -m virtplane.node.pods.shim ...`.

It runs `runc run` in the foreground in its own session, so the container outlives the node agent (a restart
of the agent must not restart containers), and:
- turns the container's stdout/stderr into a CRI log file (`<RFC3339Nano> stdout|stderr F|P <text>`), the
  format `kubectl logs --timestamps` and the kubelet read;
- records the exit code and time in `exit.json` once runc returns (runc exits with the container's status,
  128+N for a signal), so the agent learns how a container ended even if it was down at the time.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

_CHUNK = 16384


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pump(stream: IO[bytes], name: bytes, out: IO[bytes], lock: threading.Lock) -> None:
    pending = b""
    while True:
        chunk = stream.read1(_CHUNK)  # type: ignore[attr-defined]
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        with lock:
            for line in lines:
                out.write(now().encode() + b" " + name + b" F " + line + b"\n")
            if len(pending) >= _CHUNK:  # a very long line: flush what we have as a partial (CRI "P")
                out.write(now().encode() + b" " + name + b" P " + pending + b"\n")
                pending = b""
            out.flush()
    if pending:
        with lock:
            out.write(now().encode() + b" " + name + b" F " + pending + b"\n")
            out.flush()


def main(argv: list[str]) -> int:
    runc, runc_root, bundle, cid, log_path, state_dir = argv
    state = Path(state_dir)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [runc, "--root", runc_root, "run", "--bundle", bundle, "--pid-file", str(state / "pid"), cid],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        lock = threading.Lock()
        assert proc.stdout is not None and proc.stderr is not None
        threads = [threading.Thread(target=_pump, args=(proc.stdout, b"stdout", out, lock), daemon=True),
                   threading.Thread(target=_pump, args=(proc.stderr, b"stderr", out, lock), daemon=True)]
        for t in threads:
            t.start()
        code = proc.wait()
        for t in threads:
            t.join(5)
    tmp = state / "exit.json.tmp"
    tmp.write_text(json.dumps({"exitCode": code, "finishedAt": now()}))
    os.replace(tmp, state / "exit.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
