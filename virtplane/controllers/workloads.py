"""apps/v1 ReplicaSet and Deployment controllers, with kube-controller-manager's semantics.

ReplicaSet: keeps `spec.replicas` active pods (not terminating, not Succeeded/Failed) that it controls
(ownerReference controller=true), created from `spec.template` as `<rs>-<5 random>`; surplus pods are deleted
not-ready first, then the youngest. Status: replicas, fullyLabeledReplicas, readyReplicas, availableReplicas
(ready for minReadySeconds), observedGeneration.

Deployment: one ReplicaSet per pod template, named `<deployment>-<pod-template-hash>` and labelled with the
hash; RollingUpdate scales the new one up within maxSurge and the old ones down keeping at least
replicas - maxUnavailable available (defaults 25%/25%), Recreate scales old ones to zero first. Revisions
(`deployment.kubernetes.io/revision`), status (updated/ready/available/unavailable replicas, conditions
Available and Progressing) as `kubectl rollout status` reads them. `kubectl scale` goes through the scale
subresource the API server already serves for both kinds.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import logging
import math
import secrets
import string
from typing import Any

from virtplane.client import informer, rest
from virtplane.client.events import EventRecorder

log = logging.getLogger(__name__)
JSON = dict[str, Any]
PODS = rest.GVR("", "v1", "pods")
REPLICASETS = rest.GVR("apps", "v1", "replicasets")
DEPLOYMENTS = rest.GVR("apps", "v1", "deployments")
HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
DESIRED_REPLICAS = "deployment.kubernetes.io/desired-replicas"
MAX_REPLICAS = "deployment.kubernetes.io/max-replicas"
TERMINAL = ("Succeeded", "Failed")
_ALNUM = string.ascii_lowercase + string.digits
_SAFE = "bcdfghjklmnpqrstvwxz2456789"  # k8s rand.SafeEncodeString alphabet: no vowels, no confusable digits


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def selector_matches(selector: JSON | None, labels: JSON | None) -> bool:
    """metav1.LabelSelector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist); empty matches all."""
    labels = labels or {}
    sel = selector or {}
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def controller_of(obj: JSON) -> JSON | None:
    return next((r for r in (obj.get("metadata") or {}).get("ownerReferences") or [] if r.get("controller")), None)


def owner_ref(owner: JSON, kind: str) -> JSON:
    return {"apiVersion": "apps/v1", "kind": kind, "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
            "controller": True, "blockOwnerDeletion": True}  # fmt: skip


def pod_ready(pod: JSON) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])  # fmt: skip


def _ready_since(pod: JSON) -> float | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready" and c.get("status") == "True":
            with contextlib.suppress(ValueError, AttributeError):
                t = datetime.datetime.fromisoformat(str(c.get("lastTransitionTime")).replace("Z", "+00:00"))
                return t.timestamp()
            return 0.0
    return None


def pod_available(pod: JSON, min_ready: int, at: float) -> bool:
    since = _ready_since(pod)
    return since is not None and (min_ready <= 0 or since + min_ready <= at)


def active(pod: JSON) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and (pod.get("status") or {}).get("phase") not in TERMINAL


class ReplicaSetController:
    def __init__(self, client: rest.Client) -> None:
        self.client = client
        self.rs = informer.Informer(client, REPLICASETS)
        self.pods = informer.Informer(client, PODS)
        self.queue = informer.WorkQueue(self._reconcile, workers=4, name="replicaset")
        self.recorder = EventRecorder(client, "replicaset-controller")
        self.rs.add_handler(lambda _k, obj, _o: self.queue.add(informer.key_of(obj)))
        self.pods.add_handler(self._on_pod)
        # Creations/deletions sent but not yet seen in the cache ("expectations"): no double creates.
        self._expect: dict[informer.Key, tuple[set[str], set[str]]] = {}

    async def start(self) -> None:
        self.rs.start()
        self.pods.start()
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        await self.rs.stop()
        await self.pods.stop()

    def _on_pod(self, kind: str, pod: JSON, _old: JSON | None) -> None:
        ref = controller_of(pod)
        if ref is None or ref.get("kind") != "ReplicaSet":
            return
        key = (pod["metadata"].get("namespace", ""), ref.get("name", ""))
        exp = self._expect.get(key)
        if exp is not None:
            if kind == "ADDED":
                exp[0].discard(pod["metadata"]["name"])
            if kind == "DELETED":
                exp[1].discard(pod["metadata"]["name"])
        self.queue.add(key)

    def owned(self, rs: JSON) -> list[JSON]:
        uid = rs["metadata"]["uid"]
        return [p for p in self.pods.list(rs["metadata"].get("namespace"))
                if (controller_of(p) or {}).get("uid") == uid]  # fmt: skip

    async def _reconcile(self, key: informer.Key) -> float | None:
        rs = self.rs.get(*key)
        if rs is None:
            self._expect.pop(key, None)
            return None
        if rs["metadata"].get("deletionTimestamp"):
            return None
        exp = self._expect.get(key)
        if exp is not None and (exp[0] or exp[1]):
            return 1.0  # still waiting to see our own writes; the watch will wake us (or this timeout)
        spec = rs.get("spec") or {}
        want = int(spec.get("replicas", 1))
        pods = [p for p in self.owned(rs) if active(p)]
        diff = want - len(pods)
        ns = key[0]
        if diff > 0:
            created: set[str] = set()
            self._expect[key] = (created, set())
            for _ in range(diff):
                body = self._pod_from_template(rs)
                created.add(body["metadata"]["name"])
                try:
                    await self.client.create(PODS, body, ns)
                except rest.APIError as err:
                    created.discard(body["metadata"]["name"])
                    await self.recorder.event(self._obj(rs), "Warning", "FailedCreate", f"Error creating: {err}")
                    break
                await self.recorder.event(self._obj(rs), "Normal", "SuccessfulCreate",
                                          f"Created pod: {body['metadata']['name']}")  # fmt: skip
        elif diff < 0:
            # not scheduled, then pending, then not ready, then the youngest: what k8s deletes first
            def rank(p: JSON) -> tuple[int, int, int, str]:
                return (0 if (p.get("spec") or {}).get("nodeName") else -1,
                        0 if (p.get("status") or {}).get("phase") == "Running" else -1,
                        0 if pod_ready(p) else -1, p["metadata"].get("creationTimestamp", ""))  # fmt: skip

            victims = sorted(pods, key=lambda p: (rank(p)[:3], _neg(rank(p)[3])))[: -diff]
            deleted: set[str] = {p["metadata"]["name"] for p in victims}
            self._expect[key] = (set(), deleted)
            for p in victims:
                try:
                    await self.client.delete(PODS, p["metadata"]["name"], ns)
                except rest.NotFound:
                    deleted.discard(p["metadata"]["name"])
                await self.recorder.event(self._obj(rs), "Normal", "SuccessfulDelete",
                                          f"Deleted pod: {p['metadata']['name']}")  # fmt: skip
        await self._status(rs, pods)
        min_ready = int(spec.get("minReadySeconds") or 0)
        if min_ready and any(pod_ready(p) and not pod_available(p, min_ready, _ts()) for p in pods):
            return float(min_ready)  # re-count availability once minReadySeconds passed
        return None

    @staticmethod
    def _obj(rs: JSON) -> JSON:
        return {"apiVersion": "apps/v1", "kind": "ReplicaSet", **rs}

    def _pod_from_template(self, rs: JSON) -> JSON:
        tmpl = copy.deepcopy((rs.get("spec") or {}).get("template") or {})
        meta = tmpl.get("metadata") or {}
        name = f"{rs['metadata']['name']}-{''.join(secrets.choice(_SAFE) for _ in range(5))}"
        pod_meta = {"name": name, "namespace": rs["metadata"].get("namespace"), "labels": meta.get("labels") or {},
                    "ownerReferences": [owner_ref(rs, "ReplicaSet")]}  # fmt: skip
        if meta.get("annotations"):
            pod_meta["annotations"] = meta["annotations"]
        return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": tmpl.get("spec") or {}}

    async def _status(self, rs: JSON, pods: list[JSON]) -> None:
        spec = rs.get("spec") or {}
        min_ready = int(spec.get("minReadySeconds") or 0)
        t = _ts()
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        status = {
            "replicas": len(pods),
            "fullyLabeledReplicas": sum(1 for p in pods if all(
                (p["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())),
            "readyReplicas": sum(1 for p in pods if pod_ready(p)),
            "availableReplicas": sum(1 for p in pods if pod_available(p, min_ready, t)),
            "observedGeneration": rs["metadata"].get("generation", 1),
        }  # fmt: skip
        old = rs.get("status") or {}
        if all(old.get(k, 0) == v for k, v in status.items()):
            return
        body = copy.deepcopy(rs)
        body["status"] = {**old, **status}
        with contextlib.suppress(rest.Conflict, rest.NotFound):
            await self.client.update_status(REPLICASETS, body)


def _neg(ts: str) -> str:
    """Sort key making later timestamps come first."""
    return "".join(chr(0x10FFFF - ord(c)) for c in ts)


def _ts() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


def template_hash(template: JSON) -> str:
    """A stable short hash of the pod template (k8s uses fnv of the template; any stable hash serves)."""
    raw = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    h = int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")
    out = ""
    while len(out) < 10:
        out += _SAFE[h % len(_SAFE)]
        h //= len(_SAFE)
    return out


def int_or_percent(value: Any, total: int, *, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        frac = int(value[:-1]) * total / 100
        return math.ceil(frac) if round_up else math.floor(frac)
    return int(value)


class DeploymentController:
    def __init__(self, client: rest.Client) -> None:
        self.client = client
        self.deployments = informer.Informer(client, DEPLOYMENTS)
        self.rs = informer.Informer(client, REPLICASETS)
        self.queue = informer.WorkQueue(self._reconcile, workers=4, name="deployment")
        self.recorder = EventRecorder(client, "deployment-controller")
        self.deployments.add_handler(lambda _k, obj, _o: self.queue.add(informer.key_of(obj)))
        self.rs.add_handler(self._on_rs)

    async def start(self) -> None:
        self.deployments.start()
        self.rs.start()
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        await self.deployments.stop()
        await self.rs.stop()

    def _on_rs(self, _kind: str, rs: JSON, _old: JSON | None) -> None:
        ref = controller_of(rs)
        if ref is not None and ref.get("kind") == "Deployment":
            self.queue.add((rs["metadata"].get("namespace", ""), ref.get("name", "")))

    @staticmethod
    def _obj(d: JSON) -> JSON:
        return {"apiVersion": "apps/v1", "kind": "Deployment", **d}

    async def _reconcile(self, key: informer.Key) -> float | None:
        d = self.deployments.get(*key)
        if d is None or d["metadata"].get("deletionTimestamp"):
            return None
        ns = key[0]
        spec = d.get("spec") or {}
        replicas = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        h = template_hash(template)
        uid = d["metadata"]["uid"]
        owned = [r for r in self.rs.list(ns) if (controller_of(r) or {}).get("uid") == uid]
        new = next((r for r in owned if ((r["metadata"].get("labels") or {}).get(HASH_LABEL)) == h), None)
        olds = [r for r in owned if r is not new]
        revisions = [int((r["metadata"].get("annotations") or {}).get(REVISION, "0") or 0) for r in owned]
        strategy = spec.get("strategy") or {}
        recreate = strategy.get("type") == "Recreate"
        rolling = strategy.get("rollingUpdate") or {}
        surge = int_or_percent(rolling.get("maxSurge", "25%"), replicas, round_up=True)
        unavailable = int_or_percent(rolling.get("maxUnavailable", "25%"), replicas, round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        if recreate:
            surge, unavailable = 0, replicas
        if spec.get("paused"):
            await self._status(d, new, olds, unavailable)
            return None
        if new is None:
            old_total = sum(int((r.get("spec") or {}).get("replicas", 0)) for r in olds)
            if recreate:
                start = 0 if old_total else replicas
            else:
                start = max(0, min(replicas, replicas + surge - old_total)) if olds else replicas
            revision = max(revisions, default=0) + 1
            new = await self._create_rs(d, template, h, start, revision)
            if new is None:
                return 2.0
            return 0.2
        # the new RS carries the newest revision (a rollback to an old template makes it new again)
        rev = int((new["metadata"].get("annotations") or {}).get(REVISION, "0") or 0)
        if rev < max(revisions, default=0):
            await self._set_rs(new, None, {REVISION: str(max(revisions) + 1)})
            return 0.2
        new_spec = int((new.get("spec") or {}).get("replicas", 0))
        if recreate:
            for r in olds:
                if int((r.get("spec") or {}).get("replicas", 0)):
                    await self._scale(d, r, 0)
            if any(int((r.get("status") or {}).get("replicas", 0)) for r in olds):
                await self._status(d, new, olds, unavailable)
                return 1.0
            if new_spec != replicas:
                await self._scale(d, new, replicas)
        else:
            old_specs = sum(int((r.get("spec") or {}).get("replicas", 0)) for r in olds)
            total = new_spec + old_specs
            if new_spec != replicas:
                if new_spec > replicas:
                    await self._scale(d, new, replicas)  # scaled down (or kubectl scale)
                elif not olds or old_specs == 0:
                    await self._scale(d, new, replicas)
                else:
                    up = min(replicas + surge - total, replicas - new_spec)
                    if up > 0:
                        await self._scale(d, new, new_spec + up)
            # scale old ReplicaSets down while keeping replicas - maxUnavailable available
            min_available = replicas - unavailable
            available = sum(int((r.get("status") or {}).get("availableReplicas", 0)) for r in [new, *olds])
            room = available - min_available
            for r in sorted(olds, key=lambda r: r["metadata"].get("creationTimestamp", "")):
                cur = int((r.get("spec") or {}).get("replicas", 0))
                if cur == 0:
                    continue
                # pods of old sets that are not available anyway can always go
                unhealthy = max(0, cur - int((r.get("status") or {}).get("availableReplicas", 0)))
                down = min(cur, unhealthy + max(0, room))
                if down > 0:
                    room -= max(0, down - unhealthy)
                    await self._scale(d, r, cur - down)
        await self._cleanup(d, olds)
        await self._status(d, new, olds, unavailable)
        return None

    async def _create_rs(self, d: JSON, template: JSON, h: str, replicas: int, revision: int) -> JSON | None:
        ns = d["metadata"].get("namespace")
        tmpl = copy.deepcopy(template)
        tmpl.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = h
        selector = copy.deepcopy((d.get("spec") or {}).get("selector") or {})
        selector.setdefault("matchLabels", {})[HASH_LABEL] = h
        d_replicas = int((d.get("spec") or {}).get("replicas", 1))
        body = {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"{d['metadata']['name']}-{h}", "namespace": ns,
                         "labels": {**(tmpl["metadata"].get("labels") or {})},
                         "annotations": {REVISION: str(revision), DESIRED_REPLICAS: str(d_replicas)},
                         "ownerReferences": [owner_ref(d, "Deployment")]},
            "spec": {"replicas": replicas, "selector": selector, "template": tmpl,
                     "minReadySeconds": int((d.get("spec") or {}).get("minReadySeconds") or 0)},
        }  # fmt: skip
        try:
            rs = await self.client.create(REPLICASETS, body, ns)
        except rest.Conflict:
            return None  # the cache is behind: we see it next round
        await self.recorder.event(self._obj(d), "Normal", "ScalingReplicaSet",
                                  f"Scaled up replica set {body['metadata']['name']} from 0 to {replicas}")  # fmt: skip
        return rs

    async def _set_rs(self, rs: JSON, replicas: int | None, annotations: dict[str, str] | None = None) -> None:
        patch: JSON = {}
        if replicas is not None:
            patch["spec"] = {"replicas": replicas}
        if annotations:
            patch["metadata"] = {"annotations": annotations}
        with contextlib.suppress(rest.NotFound):
            await self.client.patch(REPLICASETS, rs["metadata"]["name"], patch, rs["metadata"].get("namespace"))

    async def _scale(self, d: JSON, rs: JSON, replicas: int) -> None:
        cur = int((rs.get("spec") or {}).get("replicas", 0))
        if cur == replicas:
            return
        d_replicas = str(int((d.get("spec") or {}).get("replicas", 1)))
        await self._set_rs(rs, replicas, {DESIRED_REPLICAS: d_replicas})
        word = "up" if replicas > cur else "down"
        await self.recorder.event(self._obj(d), "Normal", "ScalingReplicaSet",
                                  f"Scaled {word} replica set {rs['metadata']['name']} from {cur} to {replicas}")

    async def _cleanup(self, d: JSON, olds: list[JSON]) -> None:
        limit = int((d.get("spec") or {}).get("revisionHistoryLimit", 10))
        idle = [r for r in olds if not int((r.get("spec") or {}).get("replicas", 0))
                and not int((r.get("status") or {}).get("replicas", 0))]  # fmt: skip
        idle.sort(key=lambda r: int((r["metadata"].get("annotations") or {}).get(REVISION, "0") or 0))
        for r in idle[: max(0, len(idle) - limit)]:
            with contextlib.suppress(rest.NotFound):
                await self.client.delete(REPLICASETS, r["metadata"]["name"], r["metadata"].get("namespace"))

    async def _status(self, d: JSON, new: JSON | None, olds: list[JSON], max_unavailable: int) -> None:
        spec = d.get("spec") or {}
        replicas = int(spec.get("replicas", 1))
        sets = [r for r in [new, *olds] if r is not None]

        def total(field: str, rs: list[JSON]) -> int:
            return sum(int((r.get("status") or {}).get(field, 0)) for r in rs)

        status: JSON = {
            "observedGeneration": d["metadata"].get("generation", 1),
            "replicas": total("replicas", sets),
            "updatedReplicas": total("replicas", [new]) if new is not None else 0,
            "readyReplicas": total("readyReplicas", sets),
            "availableReplicas": total("availableReplicas", sets),
        }
        status["unavailableReplicas"] = max(0, replicas - status["availableReplicas"])
        old = d.get("status") or {}
        conds = list(old.get("conditions") or [])
        t = now()
        available = status["availableReplicas"] >= replicas - max_unavailable
        conds = _cond(conds, "Available", "True" if available else "False",
                      "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                      "Deployment has minimum availability." if available else
                      "Deployment does not have minimum availability.", t)  # fmt: skip
        complete = new is not None and status["updatedReplicas"] == replicas and status["replicas"] == replicas \
            and status["availableReplicas"] == replicas  # fmt: skip
        name = new["metadata"]["name"] if new is not None else ""
        conds = _cond(conds, "Progressing", "True", "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated",
                      f'ReplicaSet "{name}" has successfully progressed.' if complete else
                      f'ReplicaSet "{name}" is progressing.', t)  # fmt: skip
        status["conditions"] = conds
        if {k: v for k, v in old.items() if k != "conditions"} == {k: v for k, v in status.items()
                                                                   if k != "conditions"} and \
                _strip(old.get("conditions")) == _strip(conds):  # fmt: skip
            return
        body = copy.deepcopy(d)
        body["status"] = status
        if new is not None:
            rev = (new["metadata"].get("annotations") or {}).get(REVISION)
            if rev and (d["metadata"].get("annotations") or {}).get(REVISION) != rev:
                with contextlib.suppress(rest.APIError):
                    await self.client.patch(DEPLOYMENTS, d["metadata"]["name"],
                                            {"metadata": {"annotations": {REVISION: rev}}},
                                            d["metadata"].get("namespace"))  # fmt: skip
                return  # the annotation write wakes us again; the status goes with the fresh object
        with contextlib.suppress(rest.Conflict, rest.NotFound):
            await self.client.update_status(DEPLOYMENTS, body)


def _cond(conds: list[JSON], ctype: str, status: str, reason: str, message: str, t: str) -> list[JSON]:
    out = [c for c in conds if c.get("type") != ctype]
    prev = next((c for c in conds if c.get("type") == ctype), None)
    same = prev is not None and prev.get("status") == status and prev.get("reason") == reason
    out.append({"type": ctype, "status": status, "reason": reason, "message": message,
                "lastUpdateTime": prev.get("lastUpdateTime", t) if same and prev else t,
                "lastTransitionTime": prev.get("lastTransitionTime", t) if prev and prev.get("status") == status
                else t})  # fmt: skip
    return out


def _strip(conds: Any) -> Any:
    return [{k: v for k, v in c.items() if k not in ("lastUpdateTime", "lastTransitionTime")} for c in conds or []]
