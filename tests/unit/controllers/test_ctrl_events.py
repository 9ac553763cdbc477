"""EventRecorder: Kubernetes-shaped Events, repeats aggregated by count, failures swallowed."""

from __future__ import annotations

import asyncio
from typing import Any

from virtplane.client import events, rest

JSON = dict[str, Any]


class FakeClient:
    def __init__(self) -> None:
        self.created: list[JSON] = []
        self.patches: list[tuple[str, str, JSON]] = []
        self.fail_create = False
        self.patch_not_found = False

    async def create(self, gvr: rest.GVR, obj: JSON, namespace: str | None = None) -> JSON:
        if self.fail_create:
            raise rest.APIError(500, {"message": "boom"})
        self.created.append(obj)
        return obj

    async def patch(self, gvr: rest.GVR, name: str, body: JSON, namespace: str | None = None, **kw: Any) -> JSON:
        if self.patch_not_found:
            raise rest.NotFound(404, {"message": "gone"})
        self.patches.append((namespace or "", name, body))
        return body


VM = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
      "metadata": {"name": "vm1", "namespace": "ns", "uid": "u1", "resourceVersion": "7"}}


async def test_event_shape() -> None:
    client = FakeClient()
    rec = events.EventRecorder(client, "virt-controller", "host-a")  # type: ignore[arg-type]
    await rec.event(VM, "Normal", "SuccessfulCreate", "Started")
    await rec.flush()
    (ev,) = client.created
    assert ev["metadata"]["namespace"] == "ns" and ev["metadata"]["name"].startswith("vm1.")
    assert ev["involvedObject"] == {"kind": "VirtualMachine", "namespace": "ns", "name": "vm1", "uid": "u1",
                                    "apiVersion": "kubevirt.io/v1", "resourceVersion": "7"}
    assert ev["source"] == {"component": "virt-controller", "host": "host-a"}
    assert (ev["type"], ev["reason"], ev["message"], ev["count"]) == ("Normal", "SuccessfulCreate", "Started", 1)
    assert ev["firstTimestamp"] == ev["lastTimestamp"]


async def test_repeats_bump_the_count() -> None:
    client = FakeClient()
    rec = events.EventRecorder(client, "default-scheduler")  # type: ignore[arg-type]
    for _ in range(3):
        await rec.event(VM, "Warning", "FailedScheduling", "0/1 nodes are available: 1 Insufficient memory.")
        await rec.flush()
    await rec.event(VM, "Warning", "FailedScheduling", "0/2 nodes are available: 2 Insufficient memory.")
    await rec.flush()
    assert len(client.created) == 2
    assert [p[2]["count"] for p in client.patches] == [2, 3]
    assert client.patches[0][1] == client.created[0]["metadata"]["name"]


async def test_cluster_scoped_objects_report_into_default() -> None:
    client = FakeClient()
    rec = events.EventRecorder(client, "virt-handler")  # type: ignore[arg-type]
    await rec.event({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "uid": "n"}},
                    "Normal", "NodeReady", "ready")
    await rec.flush()
    assert client.created[0]["metadata"]["namespace"] == "default"
    assert "namespace" not in client.created[0]["involvedObject"]


async def test_failures_are_swallowed_and_a_lost_event_starts_over() -> None:
    client = FakeClient()
    rec = events.EventRecorder(client, "x")  # type: ignore[arg-type]
    client.fail_create = True
    await rec.event(VM, "Normal", "R", "m")  # logged, not raised
    await rec.flush()
    client.fail_create = False
    await rec.event(VM, "Normal", "R", "m")
    await rec.flush()
    client.patch_not_found = True
    await rec.event(VM, "Normal", "R", "m")  # the Event was deleted meanwhile: a new one
    await rec.flush()
    assert len(client.created) == 2


async def test_recording_does_not_wait_for_the_write() -> None:
    """A controller goes on while its Events are written, in order, by the recorder's sink."""
    client = FakeClient()
    gate = asyncio.Event()
    real_create = client.create

    async def slow_create(*args: Any, **kw: Any) -> Any:
        await gate.wait()
        return await real_create(*args, **kw)

    client.create = slow_create  # type: ignore[method-assign]
    rec = events.EventRecorder(client, "x")  # type: ignore[arg-type]
    await asyncio.wait_for(rec.event(VM, "Normal", "A", "first"), 1)
    await asyncio.wait_for(rec.event(VM, "Normal", "B", "second"), 1)
    assert client.created == []
    gate.set()
    await rec.flush()
    assert [e["reason"] for e in client.created] == ["A", "B"]
