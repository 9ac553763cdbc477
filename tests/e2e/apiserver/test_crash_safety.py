"""kill -9 the API server under a writer loop: every acknowledged write survives, revisions stay monotonic,
watches resume from the last revision a client saw."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.apiserver.test_bad_input import call
from virtplane.testing.cluster import Cluster

pytestmark = pytest.mark.e2e
CMS = "/api/v1/namespaces/default/configmaps"


def test_sigkill_under_writes_loses_nothing(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "crash", command="apiserver").start()
    acked: list[tuple[str, int]] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            name = f"cm-{i}"
            try:
                code, body = call(c, "POST", CMS, json.dumps(
                    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                     "data": {"i": str(i)}}).encode())
            except OSError:
                return  # the server died under us: this write was never acknowledged
            if code == 201:
                acked.append((name, int(body["metadata"]["resourceVersion"])))
            i += 1

    try:
        t = threading.Thread(target=writer)
        t.start()
        deadline = time.monotonic() + 30
        while len(acked) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        c.kill()
        stop.set()
        t.join(10)
        assert len(acked) >= 200
        revisions = [rv for _, rv in acked]
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)

        c.start()
        code, listing = call(c, "GET", CMS, None)
        assert code == 200
        stored = {i["metadata"]["name"]: i for i in listing["items"]}
        missing = [n for n, _ in acked if n not in stored]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
        for name, rv in acked:
            assert stored[name]["metadata"]["resourceVersion"] == str(rv)
            assert stored[name]["data"]["i"] == name.split("-")[1]

        # a new write gets a revision above everything acknowledged before the crash
        code, body = call(c, "POST", CMS, json.dumps({"metadata": {"name": "after-crash"}}).encode())
        assert code == 201 and int(body["metadata"]["resourceVersion"]) > revisions[-1]

        # a watch from the last revision a client saw before the crash resumes with the new write
        env_rv = revisions[-1]
        out = c.kubectl("get", "--raw", f"{CMS}?watch=1&resourceVersion={env_rv}&timeoutSeconds=2").stdout
        events = [json.loads(line) for line in out.splitlines() if line.strip()]
        names = [e["object"]["metadata"]["name"] for e in events]
        assert "after-crash" in names
    finally:
        stop.set()
        c.stop()
