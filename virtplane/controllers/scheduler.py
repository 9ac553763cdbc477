"""The default scheduler: binds pending pods to nodes, as kube-scheduler's default profile does.

Filtering (one reason per node, first failing plugin wins, as the framework does): NodeUnschedulable
(cordon), TaintToleration (NoSchedule/NoExecute; a node whose Ready condition is not True carries the
`node.kubernetes.io/not-ready` or `unreachable` taint the node lifecycle controller would add), NodeAffinity
(nodeSelector, required node affinity, and `kubevirt.io/schedulable=true` for virt-launcher pods), and
NodeResourcesFit (requests of every bound, non-terminated pod plus this one within allocatable; pod
count). Scoring: least allocated (cpu and memory). Binding goes through `pods/{name}/binding`.

When nothing fits the pod gets `PodScheduled=False` (reason `Unschedulable`) with kube-scheduler's message
(`0/3 nodes are available: 1 Insufficient memory, 2 node(s) were unschedulable.`) and a `FailedScheduling`
Warning Event; it is retried whenever nodes or pods change, and every `retry_interval` seconds.

One worker: decisions are taken one pod at a time against an accounting that includes the pods this
scheduler has just bound but not yet seen back through the watch ("assumed" pods, as kube-scheduler's
cache has), so two pods never squeeze into the same free memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import decimal
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from virtplane.api import quantity
from virtplane.client import events, informer, rest

log = logging.getLogger(__name__)
JSON = dict[str, Any]

PODS = rest.GVR("", "v1", "pods")
NODES = rest.GVR("", "v1", "nodes", namespaced=False)
SCHEDULER_NAME = "default-scheduler"
TERMINAL_PHASES = ("Succeeded", "Failed")

# kube-scheduler's reason strings (framework plugins), so messages read exactly as users know them.
REASON_UNSCHEDULABLE = "node(s) were unschedulable"
REASON_AFFINITY = "node(s) didn't match Pod's node affinity/selector"
REASON_TOO_MANY_PODS = "Too many pods"
NO_NODES_MESSAGE = "no nodes available to schedule pods"

TAINT_UNSCHEDULABLE = "node.kubernetes.io/unschedulable"
TAINT_NOT_READY = "node.kubernetes.io/not-ready"
TAINT_UNREACHABLE = "node.kubernetes.io/unreachable"
SCHEDULABLE_LABEL = "kubevirt.io/schedulable"

# NodeResourcesFit scores pods without requests as if they asked for this much (non-zero defaults).
DEFAULT_SCORE_MILLI_CPU = 100
DEFAULT_SCORE_MEMORY = 200 * 2**20
# Repeat the same FailedScheduling Event at most this often per pod (retries happen every few seconds).
FAILED_EVENT_INTERVAL = 60.0


# --------------------------------------------------------------------------------------------------
# resources


def _amount(name: str, value: Any) -> int:
    """cpu in millicores, everything else in whole units (bytes for memory), rounded up as Kubernetes."""
    try:
        q = quantity.parse_quantity(value)
    except (ValueError, decimal.InvalidOperation):
        return 0
    if name == "cpu":
        return math.ceil(q * 1000)
    return math.ceil(q)


def _resource_list(values: Any) -> dict[str, int]:
    if not isinstance(values, dict):
        return {}
    return {k: _amount(k, v) for k, v in values.items()}


def pod_requests(pod: JSON) -> dict[str, int]:
    """What the pod asks for: sum over containers, at least the largest init container, plus overhead."""
    spec = pod.get("spec") or {}
    total: Counter[str] = Counter()
    for c in spec.get("containers") or []:
        total.update(_resource_list((c.get("resources") or {}).get("requests")))
    for c in spec.get("initContainers") or []:
        for k, v in _resource_list((c.get("resources") or {}).get("requests")).items():
            total[k] = max(total[k], v)
    total.update(_resource_list(spec.get("overhead")))
    return {k: v for k, v in total.items() if v}


def node_allocatable(node: JSON) -> dict[str, int]:
    status = node.get("status") or {}
    return _resource_list(status.get("allocatable") or status.get("capacity") or {})


@dataclasses.dataclass(slots=True)
class NodeUsage:
    requested: Counter[str] = dataclasses.field(default_factory=Counter)
    pods: int = 0

    def add(self, requests: dict[str, int]) -> None:
        self.requested.update(requests)
        self.pods += 1


def usage_by_node(pods: Iterable[JSON]) -> dict[str, NodeUsage]:
    """Requests of every pod bound to a node and not terminated, per node."""
    usage: dict[str, NodeUsage] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or (pod.get("status") or {}).get("phase") in TERMINAL_PHASES:
            continue
        usage.setdefault(node, NodeUsage()).add(pod_requests(pod))
    return usage


# --------------------------------------------------------------------------------------------------
# taints and tolerations


def node_taints(node: JSON) -> list[JSON]:
    """The node's taints plus the ones Kubernetes' node lifecycle controller would add for its state."""
    spec = node.get("spec") or {}
    taints = [t for t in spec.get("taints") or [] if isinstance(t, dict)]
    keys = {t.get("key") for t in taints}
    ready = next((c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    status = (ready or {}).get("status", "Unknown")
    if status == "False" and TAINT_NOT_READY not in keys:
        taints.append({"key": TAINT_NOT_READY, "effect": "NoSchedule"})
    elif status != "True" and TAINT_UNREACHABLE not in keys and TAINT_NOT_READY not in keys:
        taints.append({"key": TAINT_UNREACHABLE, "effect": "NoSchedule"})
    return taints


def tolerates(toleration: JSON, taint: JSON) -> bool:
    """v1.Toleration.ToleratesTaint."""
    effect = toleration.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key") or ""
    if key and key != taint.get("key"):
        return False
    op = toleration.get("operator") or "Equal"
    if op == "Exists":
        return True
    if op == "Equal":
        return (toleration.get("value") or "") == (taint.get("value") or "")
    return False


def first_untolerated_taint(tolerations: list[JSON], taints: list[JSON]) -> JSON | None:
    for taint in taints:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue  # PreferNoSchedule only lowers a node's score
        if not any(tolerates(t, taint) for t in tolerations if isinstance(t, dict)):
            return taint
    return None


def taint_reason(taint: JSON) -> str:
    return f"node(s) had untolerated taint {{{taint.get('key', '')}: {taint.get('value', '')}}}"


# --------------------------------------------------------------------------------------------------
# node affinity


def _match_requirement(req: JSON, value: str | None) -> bool:
    op = req.get("operator")
    values = [str(v) for v in req.get("values") or []]
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt"):
        if value is None or len(values) != 1:
            return False
        try:
            have, want = int(value), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def match_node_selector_term(term: JSON, node: JSON) -> bool:
    """matchExpressions against labels AND matchFields against metadata.name; an empty term matches nothing."""
    exprs = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not exprs and not fields:
        return False
    labels = (node.get("metadata") or {}).get("labels") or {}
    for req in exprs:
        if not _match_requirement(req, labels.get(req.get("key", ""))):
            return False
    for req in fields:
        if req.get("key") != "metadata.name":
            return False
        if not _match_requirement(req, (node.get("metadata") or {}).get("name")):
            return False
    return True


def matches_node_affinity(pod: JSON, node: JSON) -> bool:
    spec = pod.get("spec") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    for k, v in (spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return False
    if (pod.get("metadata") or {}).get("labels", {}).get("kubevirt.io") == "virt-launcher" \
            and labels.get(SCHEDULABLE_LABEL) != "true":
        return False  # virt-launcher pods only go to nodes whose node agent declared them able to run VMs
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required is not None:
        terms = required.get("nodeSelectorTerms") or []
        if not any(match_node_selector_term(t, node) for t in terms):
            return False
    return True


# --------------------------------------------------------------------------------------------------
# filter, score, message


def filter_node(pod: JSON, node: JSON, usage: NodeUsage | None, requests: dict[str, int] | None = None) -> list[str]:
    """Why the pod cannot go to this node ([] when it can)."""
    spec = pod.get("spec") or {}
    tolerations = [t for t in spec.get("tolerations") or [] if isinstance(t, dict)]
    if (node.get("spec") or {}).get("unschedulable"):
        cordon = {"key": TAINT_UNSCHEDULABLE, "effect": "NoSchedule"}
        if not any(tolerates(t, cordon) for t in tolerations):
            return [REASON_UNSCHEDULABLE]
    taint = first_untolerated_taint(tolerations, node_taints(node))
    if taint is not None:
        return [taint_reason(taint)]
    if not matches_node_affinity(pod, node):
        return [REASON_AFFINITY]
    requests = pod_requests(pod) if requests is None else requests
    allocatable = node_allocatable(node)
    used = usage or NodeUsage()
    reasons = []
    if "pods" in allocatable and used.pods + 1 > allocatable["pods"]:
        reasons.append(REASON_TOO_MANY_PODS)
    for name in sorted(requests):
        if requests[name] > 0 and used.requested[name] + requests[name] > allocatable.get(name, 0):
            reasons.append(f"Insufficient {name}")
    return reasons


def score_node(requests: dict[str, int], node: JSON, usage: NodeUsage | None) -> float:
    """LeastAllocated: the mean free fraction of cpu and memory after placing the pod, 0..100."""
    allocatable = node_allocatable(node)
    used = usage or NodeUsage()
    scores = []
    for name, default in (("cpu", DEFAULT_SCORE_MILLI_CPU), ("memory", DEFAULT_SCORE_MEMORY)):
        cap = allocatable.get(name, 0)
        if cap <= 0:
            scores.append(0.0)
            continue
        want = used.requested[name] + (requests.get(name) or default)
        scores.append(max(0.0, (cap - want) * 100.0 / cap))
    return sum(scores) / len(scores)


def failure_message(total_nodes: int, reasons: Iterable[list[str]]) -> str:
    """kube-scheduler's FitError message."""
    if total_nodes == 0:
        return NO_NODES_MESSAGE
    counts: Counter[str] = Counter()
    for node_reasons in reasons:
        counts.update(node_reasons)
    parts = sorted(f"{n} {reason}" for reason, n in counts.items())
    return f"0/{total_nodes} nodes are available: {', '.join(parts)}."


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    node: str | None
    message: str = ""


def schedule(pod: JSON, nodes: list[JSON], usage: dict[str, NodeUsage]) -> Decision:
    """Pure: the best node for the pod, or why there is none."""
    requests = pod_requests(pod)
    feasible: list[tuple[float, str]] = []
    reasons: list[list[str]] = []
    for node in nodes:
        name = node["metadata"]["name"]
        why = filter_node(pod, node, usage.get(name), requests)
        if why:
            reasons.append(why)
        else:
            feasible.append((score_node(requests, node, usage.get(name)), name))
    if not feasible:
        return Decision(None, failure_message(len(nodes), reasons))
    feasible.sort(key=lambda s: (-s[0], s[1]))  # ties: the first name wins, so decisions are reproducible
    return Decision(feasible[0][1])


# --------------------------------------------------------------------------------------------------
# the controller


def _pod_condition(pod: JSON, ctype: str) -> JSON | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == ctype), None)


def wants_scheduling(pod: JSON | None) -> bool:
    if pod is None:
        return False
    spec = pod.get("spec") or {}
    return (not spec.get("nodeName")
            and (spec.get("schedulerName") or SCHEDULER_NAME) == SCHEDULER_NAME
            and not pod["metadata"].get("deletionTimestamp")
            and (pod.get("status") or {}).get("phase") not in TERMINAL_PHASES)


def _node_signature(node: JSON) -> Any:
    """What scheduling depends on; heartbeats alone do not make pending pods worth another try."""
    status = node.get("status") or {}
    ready = next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    return (node["metadata"].get("labels"), node.get("spec"), status.get("allocatable"),
            status.get("capacity"), ready)


class Scheduler:
    def __init__(self, client: rest.Client, *, retry_interval: float = 5.0) -> None:
        # Our own connection pool: every informer holds a watch connection open, and a pool shared with
        # watch-heavy neighbours (the garbage collector watches every resource) can run dry and stall writes.
        self.client = rest.Client(client.config, user_agent="default-scheduler")
        self.pods = informer.Informer(self.client, PODS)
        self.nodes = informer.Informer(self.client, NODES)
        self.queue = informer.WorkQueue(self._reconcile, workers=1, name="scheduler")
        self.recorder = events.EventRecorder(self.client, SCHEDULER_NAME)
        self.retry_interval = retry_interval
        self._assumed: dict[informer.Key, tuple[str, JSON]] = {}  # bound by us, not yet seen bound
        self._last_event: dict[informer.Key, tuple[str, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._binding: set[asyncio.Task[None]] = set()  # binds in flight
        self.pods.add_handler(self._on_pod)
        self.nodes.add_handler(self._on_node)

    async def start(self) -> None:
        self.pods.start()
        self.nodes.start()
        self.queue.start()
        self._task = asyncio.create_task(self._periodic(), name="scheduler-retry")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self.queue.stop()
        for task in list(self._binding):
            task.cancel()
        await asyncio.gather(*self._binding, return_exceptions=True)
        await self.pods.stop()
        await self.nodes.stop()
        await self.client.close()

    # ------------------------------------------------------------- events

    def _enqueue_pending(self) -> None:
        for key, pod in list(self.pods.cache.items()):
            if wants_scheduling(pod):
                self.queue.add(key)

    def _on_pod(self, kind: str, pod: JSON, old: JSON | None) -> None:
        key = informer.key_of(pod)
        if kind == "DELETED" or (pod.get("spec") or {}).get("nodeName"):
            self._assumed.pop(key, None)  # the cache now accounts for it (or it is gone)
        if kind == "DELETED":
            self._last_event.pop(key, None)
        if kind != "DELETED" and wants_scheduling(pod):
            self.queue.add(key)
        freed = kind == "DELETED" or (
            old is not None and (pod.get("status") or {}).get("phase") in TERMINAL_PHASES
            and (old.get("status") or {}).get("phase") not in TERMINAL_PHASES)
        if freed and (pod.get("spec") or {}).get("nodeName"):
            self._enqueue_pending()  # resources were released: pending pods may fit now

    def _on_node(self, kind: str, node: JSON, old: JSON | None) -> None:
        if kind == "MODIFIED" and old is not None and _node_signature(old) == _node_signature(node):
            return
        self._enqueue_pending()

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.retry_interval)
            self._enqueue_pending()

    # ------------------------------------------------------------- scheduling

    def _usage(self) -> dict[str, NodeUsage]:
        pods = list(self.pods.cache.values())
        usage = usage_by_node(pods)
        for key, (node, pod) in list(self._assumed.items()):
            cached = self.pods.cache.get(key)
            if cached is not None and (cached.get("spec") or {}).get("nodeName"):
                continue
            usage.setdefault(node, NodeUsage()).add(pod_requests(pod))
        return usage

    async def _reconcile(self, key: informer.Key) -> float | None:
        pod = self.pods.get(*key)
        if not wants_scheduling(pod) or key in self._assumed:
            return None
        assert pod is not None
        if not (self.pods.synced.is_set() and self.nodes.synced.is_set()):
            return 0.2  # never decide on a partial view of the cluster
        decision = schedule(pod, list(self.nodes.cache.values()), self._usage())
        if decision.node is None:
            await self._unschedulable(key, pod, decision.message)
            return None
        # Assume, then bind in the background (kube-scheduler's scheme): the decision is serial, so the next
        # pod is decided against this one's resources, but the writes of one pod no longer hold up the next.
        self._assumed[key] = (decision.node, pod)
        task = asyncio.create_task(self._bind(key, pod, decision.node), name=f"bind {key[0]}/{key[1]}")
        self._binding.add(task)
        task.add_done_callback(self._binding.discard)
        return None

    async def _bind(self, key: informer.Key, pod: JSON, node: str) -> None:
        ns, name = key
        body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": ns},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        try:
            # The binding sets spec.nodeName and PodScheduled=True in one write, as Kubernetes' does.
            await self.client.request("POST", PODS.path(ns, name, "binding"), body=body)
        except (rest.NotFound, rest.Conflict) as exc:
            log.info("not binding %s/%s: %s", ns, name, exc)  # gone, or bound by someone else meanwhile
            self._assumed.pop(key, None)
            return
        except Exception as exc:  # a server or connection error: decide again shortly
            log.warning("binding %s/%s to %s failed, retrying: %s", ns, name, node, exc)
            self._assumed.pop(key, None)
            self.queue.add_after(key, 1.0)
            return
        self._last_event.pop(key, None)
        log.info("bound pod %s/%s to %s", ns, name, node)
        await self.recorder.event(pod, "Normal", "Scheduled", f"Successfully assigned {ns}/{name} to {node}")

    async def _unschedulable(self, key: informer.Key, pod: JSON, message: str) -> None:
        ns, name = key
        current = _pod_condition(pod, "PodScheduled") or {}
        if (current.get("status"), current.get("reason"), current.get("message")) != ("False", "Unschedulable",
                                                                                      message):
            transition = current.get("lastTransitionTime") if current.get("status") == "False" else None
            cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                    "lastProbeTime": None, "lastTransitionTime": transition or events.now_rfc3339()}
            with contextlib.suppress(rest.NotFound):
                await self.client.patch(PODS, name, {"status": {"conditions": [cond]}}, ns,
                                        patch_type="strategic", subresource="status")
        last = self._last_event.get(key)
        now = time.monotonic()
        if last is None or last[0] != message or now - last[1] >= FAILED_EVENT_INTERVAL:
            self._last_event[key] = (message, now)
            log.info("pod %s/%s unschedulable: %s", ns, name, message)
            await self.recorder.event(pod, "Warning", "FailedScheduling", message)
