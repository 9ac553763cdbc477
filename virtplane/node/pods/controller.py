"""The node agent's pod reconciler (the kubelet's pod workers): sandbox → init containers → containers.

Pods bound to this node (field selector spec.nodeName) other than virt-launcher pods (those stand for VMs and
belong to the VMI controller) are run here. One key at a time per pod (WorkQueue). The reconcile reads each
container's files (shim/runc state), decides starts, restarts (restartPolicy, CrashLoopBackOff back-off
10 s doubling to 5 min, as the kubelet does) and image pulls (ErrImagePull, then ImagePullBackOff), and writes
`status` when it changed. Running pods are re-read every second: that is how exits are noticed, and it works
the same for containers started by a previous agent (adoption is just loading `sandbox.json`).

Deletion is graceful, as with the kubelet: the API server marks the pod (deletionTimestamp,
deletionGracePeriodSeconds); the agent sends SIGTERM to every container, waits up to that grace period (a later,
shorter one counts), sends SIGKILL, removes everything (rootfs mounts, CNI DEL frees the IP, netns, files) and
then deletes the pod with gracePeriodSeconds=0, which removes it. A pod removed at once (`--force`) is stopped
the same way, with the grace period of the last spec seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virtplane.client import informer, rest
from virtplane.client.events import EventRecorder
from virtplane.storage import dockerconfig, oci

from . import probes
from . import spec as podspec
from .images import ImageNotPresent, ImagePullError, ImageStore, default_pull_policy
from .runtime import ContainerState, PodRuntime, RuntimeError_, Sandbox, read_state, release_cgroup_parent

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Key = tuple[str, str]
PODS = rest.GVR("", "v1", "pods")
CONFIGMAPS = rest.GVR("", "v1", "configmaps")
SECRETS = rest.GVR("", "v1", "secrets")
SERVICEACCOUNTS = rest.GVR("", "v1", "serviceaccounts")
PVCS = rest.GVR("", "v1", "persistentvolumeclaims")
PVS = rest.GVR("", "v1", "persistentvolumes", namespaced=False)
POLL_SECONDS = 1.0
BACKOFF_START, BACKOFF_MAX = 10.0, 300.0
BACKOFF_RESET_AFTER = 600.0  # a container that ran this long starts its back-off over (kubelet: 10 min)
DEFAULT_GRACE = 30
MIN_GRACE_AFTER_HOOK = 2.0  # the kubelet's minimumGracePeriodInSeconds: SIGTERM's time after a long preStop
POSTSTART_TIMEOUT = 120.0  # the kubelet has none; a hung postStart would hold the pod's sync (and deletion)


def is_launcher(pod: JSON) -> bool:
    return ((pod.get("metadata") or {}).get("labels") or {}).get("kubevirt.io") == "virt-launcher"


def rfc3339(ts: str) -> str:
    """The shim's nanosecond-ish timestamps → metav1.Time (seconds)."""
    return ts[:19] + "Z" if ts else ""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodController:
    def __init__(self, *, client: rest.Client, node_name: str, node_ip: str, runtime: PodRuntime,
                 images: ImageStore, recorder: EventRecorder, pods: informer.Informer) -> None:  # fmt: skip
        self.client = client
        self.node_name = node_name
        self.node_ip = node_ip
        self.runtime = runtime
        self.images = images
        self.recorder = recorder
        self.pods = pods
        self.sandboxes: dict[Key, Sandbox] = {}
        self.last_seen: dict[Key, JSON] = {}
        self.queue = informer.WorkQueue(self.reconcile, workers=8, name="node-pods")
        self.probe_states: dict[tuple[str, str, str], probes.ProbeState] = {}  # (pod uid, container, kind)
        self.killing: dict[tuple[str, str], asyncio.Task[None]] = {}  # (pod uid, container) → graceful stop
        self.stopping: dict[str, set[asyncio.Task[None]]] = {}  # pod uid → its running preStop hooks (then SIGTERM)

    def on_pod_event(self, _kind: str, obj: JSON, _old: JSON | None) -> None:
        if not is_launcher(obj):
            self.queue.add(informer.key_of(obj))

    def adopt_all(self) -> None:
        """Containers outlive the agent: their sandboxes are re-read from disk, nothing is restarted."""
        for sb in self.runtime.existing():
            self.sandboxes[sb.key] = sb
            log.info("adopted pod %s/%s", *sb.key, extra={"uid": sb.uid})

    def start(self) -> None:
        for key in {*self.sandboxes, *(k for k, p in self.pods.cache.items() if not is_launcher(p))}:
            self.queue.add(key)
        self.queue.start()

    async def shutdown(self) -> None:
        await self.queue.stop()
        if self.runtime.cpu_control is not None:
            self.runtime.cpu_control.close()  # only when no container runs in it any more
        await asyncio.to_thread(release_cgroup_parent, self.runtime.cgroup_parent)

    def sandbox_for(self, namespace: str, name: str) -> Sandbox | None:
        return self.sandboxes.get((namespace, name))

    # -- reconcile ----------------------------------------------------------------------------------------
    async def reconcile(self, key: Key) -> float | None:
        pod = self.pods.get(*key)
        if pod is not None and is_launcher(pod):
            return None
        sb = self.sandboxes.get(key)
        if pod is not None:
            self.last_seen[key] = pod
        if sb is not None and (pod is None or pod["metadata"].get("uid") != sb.uid
                               or pod["metadata"].get("deletionTimestamp")):  # fmt: skip
            if pod is None or pod["metadata"].get("uid") != sb.uid:
                # Gone from our cache: confirm with the API before killing anything (a relist is no deletion).
                try:
                    fresh = await self.client.get(PODS, key[1], key[0])
                except rest.NotFound:
                    fresh = None
                if fresh is not None and fresh["metadata"].get("uid") == sb.uid and \
                        (fresh.get("spec") or {}).get("nodeName") == self.node_name:  # fmt: skip
                    pod = fresh
                    if fresh["metadata"].get("deletionTimestamp"):
                        return await self._terminate(key, sb, fresh)
                else:
                    return await self._terminate(key, sb, pod)
            else:
                return await self._terminate(key, sb, pod)
        if pod is None:
            self.last_seen.pop(key, None)
            return None
        if (pod.get("spec") or {}).get("nodeName") != self.node_name:
            return None
        if pod["metadata"].get("deletionTimestamp") and sb is None:
            return await self._finish_deletion(pod)  # nothing (left) running here
        phase = (pod.get("status") or {}).get("phase")
        if sb is None:
            if phase in ("Succeeded", "Failed"):
                return None  # finished before (its sandbox already gone): nothing to run
            try:
                sb = await self._create_sandbox(pod)
            except RuntimeError_ as err:
                message = str(err)
                await self.recorder.event(self._obj(pod), "Warning", "FailedCreatePodSandBox", message)
                await self._write_status(pod, lambda old: self._pending_status(old, pod, message))
                return 5.0
            self.sandboxes[key] = sb
        return await self._sync(pod, sb)

    @staticmethod
    def _obj(pod: JSON) -> JSON:
        return {"apiVersion": "v1", "kind": "Pod", **pod}

    async def _create_sandbox(self, pod: JSON) -> Sandbox:
        meta = pod["metadata"]
        hostname = (pod.get("spec") or {}).get("hostname") or meta["name"]
        sb = await self.runtime.create_sandbox(meta["uid"], meta.get("namespace", ""), meta["name"], hostname[:63])
        sb.started_at = _now()
        sb.save()
        log.info("pod sandbox ready", extra={"pod": f"{sb.namespace}/{sb.name}", "ip": sb.pod_ip})
        return sb

    def _lookup_factory(self, namespace: str) -> tuple[Callable[[str, str], JSON | None], dict[tuple[str, str], Any]]:
        cache: dict[tuple[str, str], Any] = {}

        def lookup(kind: str, name: str) -> JSON | None:
            return cache.get((kind, name))

        return lookup, cache

    async def _fetch_refs(self, pod: JSON) -> Callable[[str, str], JSON | None]:
        """Every ConfigMap/Secret the pod refers to, fetched once per sync (missing ones are None)."""
        ns = pod["metadata"].get("namespace", "")
        spec = pod.get("spec") or {}
        wanted: set[tuple[str, str]] = set()
        for vol in spec.get("volumes") or []:
            if "configMap" in vol:
                wanted.add(("configmaps", vol["configMap"].get("name", "")))
            if "secret" in vol:
                wanted.add(("secrets", vol["secret"].get("secretName", "")))
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            for src in c.get("envFrom") or []:
                if src.get("configMapRef"):
                    wanted.add(("configmaps", src["configMapRef"].get("name", "")))
                if src.get("secretRef"):
                    wanted.add(("secrets", src["secretRef"].get("name", "")))
            for e in c.get("env") or []:
                vf = e.get("valueFrom") or {}
                if vf.get("configMapKeyRef"):
                    wanted.add(("configmaps", vf["configMapKeyRef"].get("name", "")))
                if vf.get("secretKeyRef"):
                    wanted.add(("secrets", vf["secretKeyRef"].get("name", "")))
        lookup, cache = self._lookup_factory(ns)
        for vol in spec.get("volumes") or []:
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            if not claim:
                continue
            try:
                pvc = await self.client.get(PVCS, claim, ns)
            except rest.NotFound:
                pvc = None
            cache[("persistentvolumeclaims", claim)] = pvc
            pv_name = ((pvc or {}).get("spec") or {}).get("volumeName")
            if pv_name:
                with contextlib.suppress(rest.NotFound):
                    cache[("persistentvolumes", pv_name)] = await self.client.get(PVS, pv_name)
        for kind, name in wanted:
            gvr = CONFIGMAPS if kind == "configmaps" else SECRETS
            try:
                cache[(kind, name)] = await self.client.get(gvr, name, ns)
            except rest.NotFound:
                cache[(kind, name)] = None
        return lookup

    async def _sync(self, pod: JSON, sb: Sandbox) -> float | None:
        spec = pod.get("spec") or {}
        policy = spec.get("restartPolicy") or "Always"
        sb_grace = spec.get("terminationGracePeriodSeconds")
        grace = DEFAULT_GRACE if sb_grace is None else int(sb_grace)
        if sb.containers.get("__pod__", {}).get("grace") != grace:
            sb.containers.setdefault("__pod__", {})["grace"] = grace
            sb.save()
        lookup = await self._fetch_refs(pod)
        volumes: dict[str, Path] | None = None
        config_error = ""
        try:
            volumes = await asyncio.to_thread(podspec.prepare_volumes, pod, sb.dir / "volumes", lookup,
                                              self.node_ip, sb.pod_ip)  # fmt: skip
        except (podspec.ContainerConfigError, OSError, ValueError) as err:
            config_error = str(err)
        inits = spec.get("initContainers") or []
        conts = spec.get("containers") or []
        pod_failed = False
        # init containers: one at a time, in order, each to a successful exit
        if not sb.init_done:
            for c in inits:
                st = read_state(sb, c["name"])
                rec = sb.containers.setdefault(c["name"], {})
                if st.state == "exited":
                    self._record_exit(sb, c["name"], st)
                    if st.exit_code == 0:
                        continue
                    if policy == "Never":
                        pod_failed = True
                        break
                    if time.time() >= rec.get("backoffUntil", 0):
                        await self._start(pod, sb, c, volumes, config_error, lookup, restart=True)
                    else:
                        await self._backoff_event(pod, c["name"], rec)
                    break
                if st.state in ("running", "starting"):
                    break
                await self._start(pod, sb, c, volumes, config_error, lookup, restart=False)
                break
            else:
                sb.init_done = True
                sb.save()
        if sb.init_done and not pod_failed:
            for c in conts:
                name = c["name"]
                st = read_state(sb, name)
                rec = sb.containers.setdefault(name, {})
                if st.state in ("running", "starting"):
                    continue
                if st.state == "none":
                    await self._start(pod, sb, c, volumes, config_error, lookup, restart=False)
                    continue
                self._record_exit(sb, name, st)
                if policy == "Never" or (policy == "OnFailure" and st.exit_code == 0):
                    continue
                if time.time() >= rec.get("backoffUntil", 0):
                    await self._start(pod, sb, c, volumes, config_error, lookup, restart=True)
                else:
                    await self._backoff_event(pod, name, rec)
        if sb.init_done and not pod_failed:
            # ephemeral containers (kubectl debug): started once, never restarted
            for c in spec.get("ephemeralContainers") or []:
                st = read_state(sb, c["name"])
                if st.state == "none":
                    await self._start(pod, sb, c, volumes, config_error, lookup, restart=False)
                elif st.state == "exited":
                    self._record_exit(sb, c["name"], st)
            await self._probe(pod, sb, conts)
        await self._write_status(pod, lambda old: self._status(old, pod, sb, pod_failed))
        if self._status(None, pod, sb, pod_failed)["phase"] in ("Succeeded", "Failed"):
            # Finished for good: nothing runs or restarts any more. Its IP goes back to the pool (as the kubelet
            # stops the sandbox); logs and status stay until the pod is deleted. No more polling.
            pod_rec = sb.containers.setdefault("__pod__", {})
            every = [*inits, *conts, *(spec.get("ephemeralContainers") or [])]
            if not pod_rec.get("networkReleased"):
                for c in every:
                    if read_state(sb, c["name"]).state in ("running", "starting"):
                        # a still running init (on failure) or debug container: the pod is over
                        await self.runtime.signal(sb, c["name"], signal.SIGKILL)
                await self.runtime.release_network(sb)
                pod_rec["networkReleased"] = True
                sb.save()
            # polled until what was killed has ended, to report it terminated
            return POLL_SECONDS if any(read_state(sb, c["name"]).state in ("running", "starting")
                                       for c in every) else None  # fmt: skip
        return POLL_SECONDS

    async def _probe(self, pod: JSON, sb: Sandbox, conts: list[JSON]) -> None:
        """Startup, liveness and readiness probes of running containers, each on its own period. While a
        container has a startup probe that has not succeeded, its liveness and readiness probes wait (the
        kubelet's rule); its failureThreshold-th failure kills the container, which restarts per policy."""
        for c in conts:
            st = read_state(sb, c["name"])
            if st.state != "running" or (sb.uid, c["name"]) in self.killing:
                continue  # (or being stopped after a failed probe)
            started = _epoch(st.started_at)
            for kind in ("startup", "liveness", "readiness"):
                probe = c.get(f"{kind}Probe")
                if not probe:
                    continue
                if kind != "startup" and not self._started(sb, c, st):
                    break
                key = (sb.uid, c["name"], kind)
                ps = self.probe_states.get(key)
                if ps is None or ps.run != st.started_at:
                    ps = self.probe_states[key] = probes.ProbeState(run=st.started_at, ok=kind == "liveness")
                if kind == "startup" and ps.ok:
                    continue  # succeeded once: not run again in this container run
                if not probes.due(probe, ps, started, time.time()):
                    continue
                ok, message = await probes.run_probe(probe, c, sb.pod_ip, self._exec_fn(sb, c["name"]))
                probes.record(probe, ps, ok, message)
                obj = self._obj(pod)
                if not ok:
                    await self.recorder.event(obj, "Warning", "Unhealthy",
                                              f"{kind.capitalize()} probe failed: {message}")
                if kind in ("startup", "liveness") and ps.failures >= int(probe.get("failureThreshold") or 3):
                    await self.recorder.event(obj, "Normal", "Killing",
                                              f"Container {c['name']} failed {kind} probe, will be restarted")
                    # as the kubelet: preStop, SIGTERM, then SIGKILL after the probe's (or the pod's) grace period
                    grace = probe.get("terminationGracePeriodSeconds")
                    if grace is None:
                        grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
                    grace = DEFAULT_GRACE if grace is None else int(grace)
                    task = asyncio.create_task(self._stop_container(pod, sb, c, st.started_at, grace))
                    self.killing[(sb.uid, c["name"])] = task
                    task.add_done_callback(lambda _t, k=(sb.uid, c["name"]): self.killing.pop(k, None))
                    ps.failures = 0
                    break

    async def _stop_container(self, pod: JSON, sb: Sandbox, c: JSON, run: str, grace: int) -> None:
        """Stop one container run gracefully (a failed liveness/startup probe): its preStop hook and SIGTERM
        within `grace` seconds, then SIGKILL; it then restarts per policy."""
        name = c["name"]
        deadline = time.time() + grace
        hook = (c.get("lifecycle") or {}).get("preStop")
        if hook:
            ok, message = await self._run_hook(pod, sb, c, hook, float(grace))
            if not ok:
                await self.recorder.event(self._obj(pod), "Warning", "FailedPreStopHook", message)
            deadline = max(deadline, time.time() + MIN_GRACE_AFTER_HOOK)
        await self.runtime.signal(sb, name, signal.SIGTERM)
        while time.time() < deadline:
            st = read_state(sb, name)
            if st.state not in ("running", "starting") or st.started_at != run:
                return
            await asyncio.sleep(0.2)
        if read_state(sb, name).started_at == run:
            await self.runtime.signal(sb, name, signal.SIGKILL)

    def _started(self, sb: Sandbox, c: JSON, st: ContainerState) -> bool:
        """containerStatuses[].started: running, and its startup probe (if any) succeeded in this run."""
        if st.state != "running":
            return False
        if not c.get("startupProbe"):
            return True
        ps = self.probe_states.get((sb.uid, c["name"], "startup"))
        return ps is not None and ps.run == st.started_at and ps.ok

    def _exec_fn(self, sb: Sandbox, name: str) -> probes.ExecFn:
        async def run(command: list[str], seconds: float) -> tuple[int, bytes]:
            argv = await self.runtime.exec_argv(sb, name, command, tty=False)
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)  # fmt: skip
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), seconds)
            except TimeoutError:
                proc.kill()  # runc exec, our child (the probe command may outlive it, as under the kubelet)
                await proc.wait()
                raise
            return proc.returncode or 0, out

        return run

    def _record_exit(self, sb: Sandbox, name: str, st: ContainerState) -> None:
        """Count an exit once (by its start time) and arm the back-off for the next start."""
        rec = sb.containers.setdefault(name, {})
        if rec.get("recordedExit") == st.started_at:
            return
        rec["recordedExit"] = st.started_at
        rec["lastTerminated"] = {"exitCode": st.exit_code, "reason": "Completed" if st.exit_code == 0 else "Error",
                                 "startedAt": rfc3339(st.started_at), "finishedAt": rfc3339(st.finished_at),
                                 "containerID": f"runc://{sb.runc_id(name)}"}  # fmt: skip
        ran = _seconds_between(st.started_at, st.finished_at)
        streak = 0 if ran >= BACKOFF_RESET_AFTER else rec.get("streak", 0) + 1
        rec["streak"] = streak
        # The first restart is immediate; then 10 s, 20 s, 40 s ... up to 5 min, as the kubelet's back-off.
        delay = 0.0 if streak <= 1 else min(BACKOFF_MAX, BACKOFF_START * 2 ** (streak - 2))
        rec["backoffUntil"] = time.time() + delay
        rec["backoffDelay"] = delay
        sb.save()

    async def _backoff_event(self, pod: JSON, name: str, rec: JSON) -> None:
        if rec.get("backoffEventFor") != rec.get("recordedExit"):
            rec["backoffEventFor"] = rec.get("recordedExit")
            await self.recorder.event(self._obj(pod), "Warning", "BackOff",
                                      f"Back-off restarting failed container {name} in pod "
                                      f"{pod['metadata']['name']}_{pod['metadata'].get('namespace')}"
                                      f"({pod['metadata']['uid']})")  # fmt: skip

    async def _start(self, pod: JSON, sb: Sandbox, c: JSON, volumes: dict[str, Path] | None, config_error: str,
                     lookup: Callable[[str, str], JSON | None], *, restart: bool) -> None:  # fmt: skip
        name = c["name"]
        rec = sb.containers.setdefault(name, {})
        obj = self._obj(pod)
        # image first (ErrImagePull / ImagePullBackOff), like the kubelet
        if time.time() < rec.get("pullRetryAt", 0):
            rec["waiting"] = {"reason": "ImagePullBackOff",
                              "message": f'Back-off pulling image "{c.get("image")}": {rec.get("pullError", "")}'}
            return
        image_ref = c.get("image") or ""
        policy = c.get("imagePullPolicy") or default_pull_policy(image_ref)
        try:
            credentials: list[oci.Credentials] = []
            if (policy != "Never" and self.images.present(image_ref) is None) or policy == "Always":
                credentials = await self._pull_credentials(pod, image_ref)
                await self.recorder.event(obj, "Normal", "Pulling", f'Pulling image "{image_ref}"')
            t0 = time.monotonic()
            image, pulled = await self.images.ensure(image_ref, policy, credentials)
        except ImageNotPresent as err:
            rec["waiting"] = {"reason": "ErrImageNeverPull", "message": str(err)}
            await self.recorder.event(obj, "Warning", "ErrImageNeverPull", str(err))
            sb.save()
            return
        except ImagePullError as err:
            attempts = rec.get("pullAttempts", 0) + 1
            rec["pullAttempts"] = attempts
            rec["pullError"] = str(err)
            rec["pullRetryAt"] = time.time() + min(BACKOFF_MAX, BACKOFF_START * 2 ** (attempts - 1))
            rec["waiting"] = {"reason": "ErrImagePull", "message": str(err)}
            await self.recorder.event(obj, "Warning", "Failed", f'Failed to pull image "{image_ref}": {err}')
            await self.recorder.event(obj, "Warning", "Failed", "Error: ErrImagePull")
            sb.save()
            return
        rec.pop("pullAttempts", None)
        rec.pop("pullRetryAt", None)
        rec.pop("pullError", None)
        rec["imageID"] = image.image_id
        if pulled:
            await self.recorder.event(obj, "Normal", "Pulled", f'Successfully pulled image "{image_ref}" in '
                                      f"{time.monotonic() - t0:.3f}s")  # fmt: skip
        else:
            if not rec.get("presentEvent"):
                rec["presentEvent"] = True
                await self.recorder.event(obj, "Normal", "Pulled",
                                          f'Container image "{image_ref}" already present on machine')
        try:
            if volumes is None:
                raise podspec.ContainerConfigError(config_error)
            env = podspec.container_env(pod, c, image.config.get("Env") or [], lookup, self.node_ip, sb.pod_ip)
            process = podspec.process(pod, c, image.config, env)
            mounts = podspec.mounts(c, volumes)
            resources = podspec_resources(c)
            pod_resources = pod_cgroup_resources(pod)
        except (podspec.ContainerConfigError, ValueError) as err:
            rec["waiting"] = {"reason": "CreateContainerConfigError", "message": str(err)}
            await self.recorder.event(obj, "Warning", "Failed", f"Error: {err}")
            sb.save()
            return
        count = rec.get("restartCount", 0) + (1 if restart else 0)
        pid_namespace = ""
        if c.get("targetContainerName"):  # an ephemeral container sees the target's processes
            target = read_state(sb, c["targetContainerName"])
            if target.state == "running" and target.pid:
                pid_namespace = f"/proc/{target.pid}/ns/pid"
        try:
            await self.runtime.start_container(sb, name, image, process, mounts, resources, count, pod_resources,
                                               pid_namespace)  # fmt: skip
        except (RuntimeError_, OSError) as err:
            rec["waiting"] = {"reason": "CreateContainerError", "message": str(err)}
            await self.recorder.event(obj, "Warning", "Failed", f"Error: {err}")
            sb.save()
            return
        rec["restartCount"] = count
        rec.pop("waiting", None)
        sb.save()
        await self.recorder.event(obj, "Normal", "Created", f"Created container {name}")
        await self.recorder.event(obj, "Normal", "Started", f"Started container {name}")
        hook = (c.get("lifecycle") or {}).get("postStart")
        if hook:
            # As the kubelet: the pod's sync waits for the hook, so the container is reported Running only once
            # it returned; a failed hook kills the container, which then restarts per policy.
            ok, message = await self._run_hook(pod, sb, c, hook, POSTSTART_TIMEOUT)
            if not ok:
                await self.recorder.event(obj, "Warning", "FailedPostStartHook", message)
                await self.recorder.event(obj, "Normal", "Killing", f"FailedPostStartHook: stopping container {name}")
                await self.runtime.signal(sb, name, signal.SIGKILL)

    async def _pull_credentials(self, pod: JSON, image: str) -> list[oci.Credentials]:
        """Credentials for `image` from the pod's imagePullSecrets, read through the API. A pod listing none
        gets its ServiceAccount's (what Kubernetes' ServiceAccount admission copies into the pod). A missing
        Secret is reported and skipped, as the kubelet does; an unreadable docker config fails the pull."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        ns = meta.get("namespace") or "default"
        names = [r.get("name") for r in spec.get("imagePullSecrets") or [] if isinstance(r, dict) and r.get("name")]
        if not names:
            sa_name = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
            with contextlib.suppress(rest.NotFound):
                sa = await self.client.get(SERVICEACCOUNTS, sa_name, ns)
                names = [r.get("name") for r in sa.get("imagePullSecrets") or []
                         if isinstance(r, dict) and r.get("name")]  # fmt: skip
        secrets, missing = [], []
        for name in names:
            try:
                secrets.append(await self.client.get(SECRETS, name, ns))
            except rest.NotFound:
                missing.append(name)
        if missing:
            await self.recorder.event(self._obj(pod), "Warning", "FailedToRetrieveImagePullSecret",
                                      f"Unable to retrieve some image pull secrets ({', '.join(missing)}); "
                                      "attempting to pull the image may not succeed.")  # fmt: skip
        try:
            return dockerconfig.credentials_for(image, secrets)
        except (dockerconfig.DockerConfigError, oci.OCIError) as err:
            raise ImagePullError(str(err)) from None

    async def _run_hook(self, pod: JSON, sb: Sandbox, c: JSON, handler: JSON, seconds: float) -> tuple[bool, str]:
        """A lifecycle handler (exec, httpGet, sleep) in/against the running container, within `seconds`.
        Returns (ok, the kubelet's failure message)."""
        name = c["name"]
        for _ in range(600):  # up to 30 s for the shim to report runc's pid (nothing to exec into before)
            if read_state(sb, name).state != "starting":
                break
            await asyncio.sleep(0.05)
        if read_state(sb, name).state != "running":
            return False, f"container {name} is not running"
        if handler.get("sleep"):
            await asyncio.sleep(min(float(handler["sleep"].get("seconds") or 0), seconds))
            return True, ""
        ok, message = await probes.run_probe({**handler, "timeoutSeconds": max(seconds, 0.001)}, c, sb.pod_ip,
                                             self._exec_fn(sb, name))  # fmt: skip
        if ok:
            return True, ""
        meta = pod["metadata"]
        where = f'for Container "{name}" in Pod "{meta["name"]}_{meta.get("namespace")}({meta["uid"]})"'
        if handler.get("exec"):
            what = f"Exec lifecycle hook ([{' '.join(map(str, (handler['exec'] or {}).get('command') or []))}])"
        else:
            what = f"HTTP lifecycle hook ({(handler.get('httpGet') or {}).get('path', '/')})"
        return False, f"{what} {where} failed - {message}"

    async def _pre_stop_then_term(self, pod: JSON, sb: Sandbox, c: JSON, hook: JSON) -> None:
        """preStop, then SIGTERM: the hook's time counts against the grace period; if it used (nearly) all of it,
        SIGTERM still gets 2 s before SIGKILL (the kubelet's minimum grace)."""
        ok, message = await self._run_hook(pod, sb, c, hook, max(0.0, sb.grace_deadline - time.time()))
        if not ok:
            await self.recorder.event(self._obj(pod), "Warning", "FailedPreStopHook", message)
        if sb.grace_deadline - time.time() < MIN_GRACE_AFTER_HOOK:
            sb.grace_deadline = time.time() + MIN_GRACE_AFTER_HOOK
            sb.save()
        await self.runtime.signal(sb, c["name"], signal.SIGTERM)

    # -- termination --------------------------------------------------------------------------------------
    async def _terminate(self, key: Key, sb: Sandbox, pod: JSON | None) -> float | None:
        now = time.time()
        names = [n for n in sb.containers if n != "__pod__"]
        running = [n for n in names if read_state(sb, n).state in ("running", "starting")]
        last = pod or self.last_seen.get(key)
        deleting = pod is not None and pod["metadata"].get("uid") == sb.uid
        if running and not sb.grace_deadline:
            grace = sb.containers.get("__pod__", {}).get("grace", DEFAULT_GRACE)
            if deleting and pod["metadata"].get("deletionGracePeriodSeconds") is not None:
                grace = int(pod["metadata"]["deletionGracePeriodSeconds"])
            sb.grace_deadline = now + grace
            sb.containers.setdefault("__pod__", {})["deletionGrace"] = grace
            sb.save()
            specs = {c["name"]: c for key in ("initContainers", "containers")
                     for c in ((last or {}).get("spec") or {}).get(key) or []}  # fmt: skip
            for n in running:
                if last is not None:
                    await self.recorder.event(self._obj(last), "Normal", "Killing", f"Stopping container {n}")
                hook = ((specs.get(n) or {}).get("lifecycle") or {}).get("preStop")
                if hook and last is not None:
                    task = asyncio.create_task(self._pre_stop_then_term(last, sb, specs[n], hook))
                    self.stopping.setdefault(sb.uid, set()).add(task)
                    task.add_done_callback(self.stopping[sb.uid].discard)
                else:
                    await self.runtime.signal(sb, n, signal.SIGTERM)
        elif running and deleting and pod["metadata"].get("deletionGracePeriodSeconds") is not None:
            # a second DELETE may shorten the grace period (never lengthen it): it counts from now
            shorter = int(pod["metadata"]["deletionGracePeriodSeconds"])
            rec = sb.containers.setdefault("__pod__", {})
            if shorter < rec.get("deletionGrace", DEFAULT_GRACE):
                rec["deletionGrace"] = shorter
                sb.grace_deadline = min(sb.grace_deadline, now + shorter)
                sb.save()
        if running and (now < sb.grace_deadline or self.stopping.get(sb.uid)):
            return 0.5  # (a preStop hook ends by the deadline, then may extend it by 2 s for SIGTERM)
        self.stopping.pop(sb.uid, None)
        for n in running:
            await self.runtime.signal(sb, n, signal.SIGKILL)
        await self.runtime.remove_sandbox(sb)
        self.sandboxes.pop(key, None)
        for k in [k for k in self.probe_states if k[0] == sb.uid]:
            del self.probe_states[k]
        log.info("pod %s/%s removed from the node", *key, extra={"uid": sb.uid})
        if deleting:
            return await self._finish_deletion(pod)
        if pod is not None:
            self.queue.add(key)  # a new pod of the same name: start it now that the old one is gone
        return None

    async def _finish_deletion(self, pod: JSON) -> float | None:
        """Its containers are gone: remove the pod object (gracePeriodSeconds=0, for this uid only)."""
        meta = pod["metadata"]
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}}
        try:
            await self.client.request("DELETE", PODS.path(meta.get("namespace"), meta["name"]), body=body)
        except (rest.NotFound, rest.Conflict):
            return None  # gone already, or a new pod of that name
        except rest.APIError as err:
            log.warning("cannot delete terminated pod %s/%s: %s", meta.get("namespace"), meta["name"], err)
            return 5.0
        return None

    # -- status -------------------------------------------------------------------------------------------
    def _container_status(self, sb: Sandbox, c: JSON, *, init: bool) -> JSON:
        name = c["name"]
        rec = sb.containers.get(name, {})
        st = read_state(sb, name)
        out: JSON = {"name": name, "image": c.get("image", ""), "imageID": rec.get("imageID", ""),
                     "restartCount": rec.get("restartCount", 0), "ready": False, "started": False}  # fmt: skip
        if st.state != "none":
            out["containerID"] = f"runc://{sb.runc_id(name)}"
        if rec.get("waiting") and st.state not in ("running", "starting"):
            out["state"] = {"waiting": rec["waiting"]}
            if rec.get("lastTerminated"):
                out["lastState"] = {"terminated": rec["lastTerminated"]}
        elif st.state == "running":
            out["state"] = {"running": {"startedAt": rfc3339(st.started_at)}}
            ps = self.probe_states.get((sb.uid, name, "readiness"))
            gated = bool(c.get("readinessProbe")) and not (ps is not None and ps.run == st.started_at and ps.ok)
            out["started"] = self._started(sb, c, st)
            out["ready"] = not init and not gated and out["started"]
            if rec.get("restartCount", 0) > 0 and rec.get("lastTerminated"):
                out["lastState"] = {"terminated": rec["lastTerminated"]}
        elif st.state == "exited":
            term = rec.get("lastTerminated") or {"exitCode": st.exit_code}
            if init and st.exit_code == 0:
                out["state"] = {"terminated": term}
            elif time.time() < rec.get("backoffUntil", 0):
                delay = int(rec.get("backoffDelay", 0))
                out["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": (
                    f"back-off {delay}s restarting failed container={name} pod={sb.name}_{sb.namespace}({sb.uid})")}}
                out["lastState"] = {"terminated": term}
            else:
                out["state"] = {"terminated": term}
        else:  # none yet, or starting (runc has not reported the pid)
            out["state"] = {"waiting": {"reason": "PodInitializing" if not sb.init_done and not init
                                        else "ContainerCreating"}}  # fmt: skip
            if rec.get("restartCount", 0) > 0 and rec.get("lastTerminated"):
                out["lastState"] = {"terminated": rec["lastTerminated"]}  # a restart on its way
        return out

    def _status(self, old: JSON | None, pod: JSON, sb: Sandbox, pod_failed: bool) -> JSON:
        spec = pod.get("spec") or {}
        policy = spec.get("restartPolicy") or "Always"
        s = copy.deepcopy(old or {})
        now = _now()
        inits = [self._container_status(sb, c, init=True) for c in spec.get("initContainers") or []]
        conts = [self._container_status(sb, c, init=False) for c in spec.get("containers") or []]
        states = [read_state(sb, c["name"]) for c in spec.get("containers") or []]
        if inits:
            s["initContainerStatuses"] = inits
        s["containerStatuses"] = conts
        ephemeral = [self._container_status(sb, c, init=True) for c in spec.get("ephemeralContainers") or []]
        if ephemeral:
            s["ephemeralContainerStatuses"] = ephemeral  # (init=True: never ready, an exit is final)
        will_restart = policy == "Always" or (policy == "OnFailure" and any(x.exit_code != 0 for x in states))
        if pod_failed:
            phase = "Failed"
        elif sb.init_done and states and all(x.state == "exited" for x in states) and not will_restart:
            phase = "Failed" if any(x.exit_code != 0 for x in states) else "Succeeded"
        elif sb.init_done and any(x.state in ("running", "exited") for x in states):
            phase = "Running"
        else:
            phase = "Pending"
        s["phase"] = phase
        s["hostIP"] = self.node_ip
        s["hostIPs"] = [{"ip": self.node_ip}]
        if sb.pod_ip:
            s["podIP"] = sb.pod_ip
            s["podIPs"] = [{"ip": sb.pod_ip}]
        s["startTime"] = s.get("startTime") or rfc3339(sb.started_at) or now
        s["qosClass"] = s.get("qosClass") or qos_class(pod)
        all_ready = bool(conts) and all(c["ready"] for c in conts)
        conds = s.get("conditions") or []
        conds = _set_cond(conds, "PodReadyToStartContainers", "True", now)
        conds = _set_cond(conds, "Initialized", "True" if sb.init_done else "False", now,
                          "" if sb.init_done else "ContainersNotInitialized")  # fmt: skip
        not_ready = [c["name"] for c in conts if not c["ready"]]
        reason = "" if all_ready else ("PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady")
        msg = "" if all_ready or reason == "PodCompleted" else \
            f"containers with unready status: [{' '.join(not_ready)}]"
        conds = _set_cond(conds, "ContainersReady", "True" if all_ready else "False", now, reason, msg)
        conds = _set_cond(conds, "Ready", "True" if all_ready else "False", now, reason, msg)
        conds = _set_cond(conds, "PodScheduled", "True", now)
        s["conditions"] = conds
        s.pop("reason", None)
        s.pop("message", None)
        return s

    def _pending_status(self, old: JSON | None, pod: JSON, message: str) -> JSON:
        s = copy.deepcopy(old or {})
        s["phase"] = "Pending"
        s["hostIP"] = self.node_ip
        s["conditions"] = _set_cond(s.get("conditions") or [], "PodReadyToStartContainers", "False", _now(),
                                    "SandboxCreateFailed", message)  # fmt: skip
        return s

    async def _write_status(self, pod: JSON, build: Callable[[JSON | None], JSON]) -> None:
        current: JSON | None = pod
        for _attempt in range(5):
            if current is None:
                return
            new_status = build(current.get("status"))
            if _strip(current.get("status") or {}) == _strip(new_status):
                return
            body = copy.deepcopy(current)
            body["status"] = new_status
            try:
                await self.client.update_status(PODS, body)
                return
            except rest.Conflict:
                pass
            except rest.NotFound:
                return
            meta = current["metadata"]
            try:
                current = await self.client.get(PODS, meta["name"], meta.get("namespace"))
            except rest.NotFound:
                return


def podspec_resources(c: JSON) -> JSON:
    from .runtime import cgroup_resources

    return cgroup_resources(podspec.limits(c), podspec.cpu_request(c))


def pod_cgroup_resources(pod: JSON) -> JSON:
    from . import runtime

    spec = pod.get("spec") or {}

    def items(key: str) -> list[JSON]:
        return [{"limits": podspec.limits(c), "cpu_request": podspec.cpu_request(c)} for c in spec.get(key) or []]

    return runtime.pod_cgroup_resources(items("containers"), items("initContainers"))


def qos_class(pod: JSON) -> str:
    conts = (pod.get("spec") or {}).get("containers") or []
    reqs = [((c.get("resources") or {}).get("requests") or {}) for c in conts]
    lims = [((c.get("resources") or {}).get("limits") or {}) for c in conts]
    if not any(reqs) and not any(lims):
        return "BestEffort"
    pairs = zip(reqs, lims, strict=True)
    if all(lim.get("cpu") and lim.get("memory") and str(req.get("cpu", lim["cpu"])) == str(lim["cpu"])
           and str(req.get("memory", lim["memory"])) == str(lim["memory"]) for req, lim in pairs):
        return "Guaranteed"
    return "Burstable"


def _set_cond(conds: list[JSON], ctype: str, status: str, now: str, reason: str = "", message: str = "") -> list[JSON]:
    out = []
    found = False
    for c in conds:
        c = dict(c)
        if c.get("type") == ctype:
            found = True
            if c.get("status") != status:
                c["lastTransitionTime"] = now
            c["status"] = status
            for k, v in (("reason", reason), ("message", message)):
                if v:
                    c[k] = v
                else:
                    c.pop(k, None)
        out.append(c)
    if not found:
        c = {"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": now}
        if reason:
            c["reason"] = reason
        if message:
            c["message"] = message
        out.append(c)
    return out


def _strip(s: JSON) -> JSON:
    s = copy.deepcopy(s)
    for c in s.get("conditions") or []:
        c.pop("lastTransitionTime", None)
        c.pop("lastProbeTime", None)
    return s


def _epoch(ts: str) -> float:
    with contextlib.suppress(ValueError):
        return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    return time.time()


def _seconds_between(a: str, b: str) -> float:
    with contextlib.suppress(ValueError):
        fa = datetime.datetime.fromisoformat(a.replace("Z", "+00:00"))
        fb = datetime.datetime.fromisoformat(b.replace("Z", "+00:00"))
        return (fb - fa).total_seconds()
    return 0.0
