"""Graceful deletion of pods, as kube-apiserver's pod strategy does it (CheckGracefulDelete + BeforeDelete).

A DELETE of a pod that runs on a node does not remove it: it sets `metadata.deletionTimestamp` (now + grace)
and `deletionGracePeriodSeconds`. The node agent sees that, sends SIGTERM, waits up to the grace period,
SIGKILLs, and then deletes the pod with gracePeriodSeconds=0, which removes it. The grace period is the
request's `gracePeriodSeconds`, else the pod's `spec.terminationGracePeriodSeconds`, else 30; a negative one
counts as 1. A later DELETE may only shorten a pending grace period; gracePeriodSeconds=0 (`kubectl delete
--grace-period=0 --force`) removes the pod at once.

Removed at once, as in Kubernetes: a pod not bound to a node, a pod that finished (Succeeded/Failed), and a pod
bound to a node that does not exist (the pod garbage collector's orphans). Also virt-launcher pods: they stand
for VMs, whose own graceful shutdown (the VMI's terminationGracePeriodSeconds) the VMI teardown does; no pod
agent runs them.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from virtplane.apiserver.objects import ObjectStore

JSON = dict[str, Any]
DEFAULT_GRACE = 30


def _seconds(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _grace(pod: JSON, options: JSON) -> int:
    spec = pod.get("spec") or {}
    period = _seconds(options.get("gracePeriodSeconds"))
    if period is None:
        period = _seconds(spec.get("terminationGracePeriodSeconds"))
    if period is None:
        period = DEFAULT_GRACE
    if not spec.get("nodeName") or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return 0
    return 1 if period < 0 else period


def _timestamp(seconds_from_now: float, base: str = "") -> str:
    start = datetime.datetime.now(datetime.UTC)
    if base:
        try:
            start = datetime.datetime.fromisoformat(base.replace("Z", "+00:00"))
        except ValueError:
            pass
    return (start + datetime.timedelta(seconds=seconds_from_now)).strftime("%Y-%m-%dT%H:%M:%SZ")


async def pending_deletion(objects: ObjectStore, pod: JSON, options: JSON) -> JSON | None:
    """The pod as it is to be stored while its node stops it (a copy; `pod` itself when nothing changes), or
    None when this DELETE removes it now (or leaves it to its finalizers, as for any object)."""
    meta = pod["metadata"]
    if (meta.get("labels") or {}).get("kubevirt.io") == "virt-launcher":
        return None
    pending = _seconds(meta.get("deletionGracePeriodSeconds"))
    if meta.get("deletionTimestamp"):
        if not pending:
            return None  # no grace pending (finalizers only, or an earlier grace-0 delete): the usual rules
        asked = _seconds(options.get("gracePeriodSeconds"))
        if asked is None or max(asked, 0) >= pending:
            return pod  # only a shorter grace period may be asked for
        if asked <= 0:
            return None
        new = {**pod, "metadata": {**meta, "deletionGracePeriodSeconds": asked,
                                   "deletionTimestamp": _timestamp(asked - pending, meta["deletionTimestamp"])}}
        return new
    grace = _grace(pod, options)
    if grace <= 0:
        return None
    nodes = objects.registry.lookup("", "v1", "nodes")
    if nodes is not None and await objects.try_get(nodes, None, pod["spec"]["nodeName"]) is None:
        return None  # no node will ever stop it
    return {**pod, "metadata": {**meta, "deletionTimestamp": _timestamp(grace), "deletionGracePeriodSeconds": grace}}
