"""Generic object storage: the Kubernetes semantics of every verb, over a `Store`.

This is where create/update/patch/delete/list/watch get their meaning (uid, timestamps,
generation, resourceVersion CAS, status kept apart from spec, finalizers, dryRun, admission).
HTTP concerns stay in `handlers`; this module never sees a request.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from virtplane import hypervisor
from virtplane.api import admission, clock, patch, resources, validation
from virtplane.api import apply as ssa
from virtplane.apiserver import errors, nslifecycle, podgrace, registry, selectors, serviceips
from virtplane.controllers import vmi as vmi_ctrl
from virtplane.store import interface as store_api

log = logging.getLogger(__name__)

JSON = dict[str, Any]
NAMESPACES = ("", "v1", "namespaces")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' generateName alphabet
# Fields the system owns in metadata: never taken from a client's body.
_SYSTEM_META = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation")


def now_rfc3339() -> str:
    return clock.now_rfc3339()


def encode(obj: JSON) -> bytes:
    """Stored form: no resourceVersion, and apiVersion, kind, metadata first (see `Stored.raw`)."""
    meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    ordered: JSON = {"apiVersion": str(obj.get("apiVersion", "")), "kind": str(obj.get("kind", "")), "metadata": meta}
    for k, v in obj.items():
        if k not in ordered:
            ordered[k] = v
    return orjson.dumps(ordered)


def decode(kv: store_api.KeyValue) -> JSON:
    obj: JSON = orjson.loads(kv.value)
    obj["metadata"]["resourceVersion"] = str(kv.mod_revision)
    return obj


_META_OPEN = b'"metadata":{'


def with_resource_version(kv: store_api.KeyValue) -> bytes:
    """The object's JSON with its resourceVersion, without decoding it.

    `encode` writes `{"apiVersion":"…","kind":"…","metadata":{` first; inside JSON strings quotes
    are escaped, so the first `"metadata":{` is the top-level one. Serving lists and watch
    events this way costs a byte splice instead of a parse and a serialization per object.
    """
    value = kv.value
    idx = value.find(_META_OPEN)
    if idx < 0 or not value.startswith(b'{"apiVersion":'):
        return orjson.dumps(decode(kv))
    at = idx + len(_META_OPEN)
    rv = b'"resourceVersion":"%d"' % kv.mod_revision
    return value[:at] + rv + (b"" if value[at:at + 1] == b"}" else b",") + value[at:]


class Stored:
    """One stored object, decoded and/or serialized on demand (each at most once)."""

    __slots__ = ("_obj", "_raw", "kv")

    def __init__(self, kv: store_api.KeyValue) -> None:
        self.kv = kv
        self._obj: JSON | None = None
        self._raw: bytes | None = None

    @property
    def obj(self) -> JSON:
        """The decoded object; shared by every reader of this Stored, so never mutate it."""
        if self._obj is None:
            self._obj = decode(self.kv)
        return self._obj

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = with_resource_version(self.kv)
        return self._raw


@dataclasses.dataclass(slots=True)
class WriteOptions:
    dry_run: bool = False
    field_manager: str = ""
    field_validation: str = "Warn"  # Strict | Warn | Ignore
    user: str = ""
    privileged: bool = False  # a virtplane component, not a user (see auth.COMPONENTS_GROUP)
    # a last check of the object about to be written, with the user in it (RBAC's escalation check)
    check: Callable[[resources.Resource, JSON, JSON | None], None] | None = None


@dataclasses.dataclass(slots=True)
class WriteResult:
    obj: JSON
    warnings: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True)
class ListPage:
    items: list[Stored]
    revision: int
    continue_token: str
    remaining: int | None


@dataclasses.dataclass(slots=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, ERROR, INITIAL_END
    stored: Stored | None = None
    info: JSON | None = None  # the Status of an ERROR, the revision of INITIAL_END

    @property
    def obj(self) -> JSON:
        return self.stored.obj if self.stored is not None else (self.info or {})


def _continue_token(key: str, revision: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"k": key, "rv": revision})).decode()


def _parse_continue(token: str) -> str:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token.encode()))
        return str(data["k"])
    except Exception as exc:
        raise errors.bad_request(f"invalid continue token: {exc}") from exc


def spec_part(obj: JSON) -> JSON:
    """Everything but metadata and status: what a change of bumps `generation`."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


class ObjectStore:
    def __init__(self, store: store_api.Store, reg: registry.Registry,
                 service_network: serviceips.ServiceNetwork | None = None) -> None:  # fmt: skip
        self.store = store
        self.registry = reg
        self.service_ips = serviceips.Allocator(store, service_network or serviceips.ServiceNetwork())
        self._recent: dict[tuple[str, int], Stored] = {}  # insertion-ordered: oldest first
        self._merge_keys_cache: dict[int, tuple[resources.Resource, patch.MergeKeys]] = {}
        ns_res = reg.lookup(*NAMESPACES)
        assert ns_res is not None
        self._ns_res = ns_res
        # kept current by `namespaces.run()`, a task the API server starts; without it every check reads the store
        self.namespaces = nslifecycle.NamespaceStates(store, ns_res.namespace_prefix(None))

    async def get_stored(self, res: resources.Resource, namespace: str | None, name: str) -> Stored:
        kv = await self.store.get(res.key(namespace, name))
        if kv is None:
            raise errors.not_found(res, name)
        return Stored(kv)

    # ---------------------------------------------------------------- reads

    async def get(self, res: resources.Resource, namespace: str | None, name: str) -> JSON:
        kv = await self.store.get(res.key(namespace, name))
        if kv is None:
            raise errors.not_found(res, name)
        return decode(kv)

    async def try_get(self, res: resources.Resource, namespace: str | None, name: str) -> JSON | None:
        kv = await self.store.get(res.key(namespace, name))
        return decode(kv) if kv is not None else None

    async def list(
        self,
        res: resources.Resource,
        namespace: str | None,
        *,
        match: selectors.Matcher | None = None,
        limit: int = 0,
        continue_token: str = "",
    ) -> ListPage:
        prefix = res.namespace_prefix(namespace)
        start_after = _parse_continue(continue_token) if continue_token else None
        items: list[JSON] = []
        revision = 0
        # With a selector, keep reading pages until `limit` matches are found or keys run out.
        while True:
            want = 0 if not limit else max(limit - len(items), 1)
            page = await self.store.list(prefix, start_after=start_after, limit=want if not match else want * 4)
            revision = revision or page.revision
            for kv in page.kvs:
                st = Stored(kv)
                if match is None or match(st.obj):
                    items.append(st)
                    if limit and len(items) >= limit:
                        last_key = kv.key
                        more = kv is not page.kvs[-1] or page.more
                        if more:
                            return ListPage(items, revision, _continue_token(last_key, revision), None)
                        return ListPage(items, revision, "", None)
            if not page.more or not page.kvs:
                return ListPage(items, revision, "", None)
            start_after = page.kvs[-1].key

    # ---------------------------------------------------------------- writes

    async def create(
        self,
        res: resources.Resource,
        namespace: str | None,
        body: JSON,
        opts: WriteOptions,
        *,
        managed_fields: list[JSON] | None = None,
    ) -> WriteResult:
        obj = body  # the caller hands over a freshly parsed body; no copy needed
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        self._check_type_meta(res, obj)
        if res.namespaced:
            body_ns = meta.get("namespace")
            if body_ns and body_ns != namespace:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                secrets.choice(_GENERATE_ALPHABET) for _ in range(5)
            )
        for f in (*_SYSTEM_META, "resourceVersion", "selfLink", "managedFields"):
            meta.pop(f, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        if res.status_subresource and res.from_crd:
            obj.pop("status", None)
        await self._migration_rules(res, obj, None, namespace)  # first: its message names the culprit
        warnings = self._admit(res, obj, None, "CREATE", opts)
        name = meta["name"]
        if res.namespaced:
            await self._check_namespace_open(namespace or "")
        if managed_fields is not None:
            meta["managedFields"] = managed_fields  # server-side apply already recorded ownership
        else:
            self._record_manager(res, obj, None, opts, "Update")
        if opts.dry_run:
            if await self.store.get(res.key(namespace, name)) is not None:
                raise errors.already_exists(res, name)
            return WriteResult(obj, warnings)
        reserved: list[str] = []
        if _is_service(res):
            if await self.store.get(res.key(namespace, name)) is not None:
                raise errors.already_exists(res, name)  # before allocating: a duplicate must not take an address
            reserved = await self.service_ips.allocate(res, obj, None)
        try:
            kv = await self.store.create(res.key(namespace, name), encode(obj))
            self.namespaces.written(kv)
        except store_api.KeyExistsError as exc:
            await self.service_ips.release_keys(reserved)
            raise errors.already_exists(res, name) from exc
        except BaseException:
            await self.service_ips.release_keys(reserved)
            raise
        meta["resourceVersion"] = str(kv.mod_revision)
        return WriteResult(obj, warnings)

    async def update(
        self,
        res: resources.Resource,
        namespace: str | None,
        name: str,
        body: JSON,
        opts: WriteOptions,
        *,
        subresource: str = "",
    ) -> WriteResult:
        new = body  # owned, as in create
        meta = new.get("metadata")
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        self._check_type_meta(res, new)
        if meta.get("name") and meta["name"] != name:
            raise errors.bad_request(
                f'the name of the object ({meta["name"]}) does not match the name on the URL ({name})'
            )
        if res.namespaced and meta.get("namespace") and meta["namespace"] != namespace:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        key = res.key(namespace, name)
        kv = await self.store.get(key)
        if kv is None:
            raise errors.not_found(res, name)
        old = decode(kv)
        rv = meta.get("resourceVersion")
        if rv:
            if rv != old["metadata"]["resourceVersion"]:
                raise errors.conflict(res, name)
        elif res.from_crd:
            raise errors.invalid(
                res,
                res.kind,
                name,
                [resources.Cause("FieldValueInvalid", "must be specified for an update",
                                 "metadata.resourceVersion")],
            )
        return await self._write_update(res, key, kv, old, new, opts, subresource)

    async def patch(
        self,
        res: resources.Resource,
        namespace: str | None,
        name: str,
        patch_type: str,
        body: Any,
        opts: WriteOptions,
        *,
        subresource: str = "",
        force: bool = False,
    ) -> WriteResult:
        key = res.key(namespace, name)
        for _attempt in range(20):
            kv = await self.store.get(key)
            if kv is None:
                if patch_type == "apply":
                    applied = copy.deepcopy(body)
                    applied.setdefault("metadata", {})["name"] = name
                    created = ssa.server_side_apply(
                        None, applied, manager=opts.field_manager or "unknown", force=force,
                        list_keys=self._merge_keys(res), now=now_rfc3339(),
                    )
                    managed = created.get("metadata", {}).pop("managedFields", None)
                    return await self.create(res, namespace, created, opts, managed_fields=managed)
                raise errors.not_found(res, name)
            old = decode(kv)
            new = self._apply_patch(res, old, patch_type, body, opts, force, subresource)
            meta = new.setdefault("metadata", {})
            if meta.get("resourceVersion") and meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
                raise errors.conflict(res, name)
            meta["resourceVersion"] = old["metadata"]["resourceVersion"]
            try:
                return await self._write_update(
                    res, key, kv, old, new, opts, subresource, record=patch_type != "apply"
                )
            except errors.StatusError as exc:
                if exc.reason == "Conflict" and "has been modified" in exc.message:
                    continue  # someone wrote between our read and CAS: patches retry like Kubernetes
                raise
        raise errors.conflict(res, name)

    def _apply_patch(
        self, res: resources.Resource, old: JSON, patch_type: str, body: Any, opts: WriteOptions, force: bool,
        subresource: str = "",
    ) -> JSON:
        try:
            if patch_type == "json":
                if not isinstance(body, list):
                    raise errors.bad_request("json patch must be a list of operations")
                return patch.json_patch(old, body)
            if not isinstance(body, dict):
                raise errors.bad_request(f"{patch_type} patch must be a JSON object")
            if patch_type == "merge":
                return patch.json_merge_patch(old, body)
            if patch_type == "strategic":
                return patch.strategic_merge_patch(old, body, self._merge_keys(res))
            if patch_type == "apply":
                return ssa.server_side_apply(
                    old, body, manager=opts.field_manager or "unknown", force=force,
                    list_keys=self._merge_keys(res), now=now_rfc3339(), subresource=subresource,
                    reset_fields=("status",) if res.status_subresource and not subresource else (),
                )
        except patch.PatchError as exc:
            raise errors.StatusError(
                exc.status,
                exc.message,
                causes=[resources.Cause("FieldValueInvalid", exc.message, exc.field)] if exc.field else (),
                details=getattr(exc, "details", None),
            ) from exc
        raise errors.StatusError(415, f"unsupported patch type {patch_type!r}")

    def _merge_keys(self, res: resources.Resource) -> patch.MergeKeys:
        """Per resource, built once (from a CRD schema that takes milliseconds)."""
        cached = self._merge_keys_cache.get(id(res))
        if cached is not None and cached[0] is res:
            return cached[1]
        if res.from_crd and res.schema is not None:
            keys = patch.merge_keys_from_schema(res.schema)
        else:
            keys = patch.builtin_merge_keys(res.group, res.kind)
        self._merge_keys_cache[id(res)] = (res, keys)
        return keys

    async def _write_update(
        self,
        res: resources.Resource,
        key: str,
        kv: store_api.KeyValue,
        old: JSON,
        new: JSON,
        opts: WriteOptions,
        subresource: str,
        *,
        record: bool = True,
    ) -> WriteResult:
        meta = new.setdefault("metadata", {})
        old_meta = old["metadata"]
        for f in _SYSTEM_META:
            if f in old_meta:
                meta[f] = old_meta[f]
            else:
                meta.pop(f, None)
        for f in ("name", "namespace"):
            if f in old_meta:
                meta[f] = old_meta[f]
        if subresource == "status":
            # A status write changes status only (labels/annotations too, as Kubernetes allows
            # nothing else); the rest comes from the stored object.
            status = new.get("status")
            new = copy.deepcopy(old)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
            meta = new["metadata"]
        elif subresource == "ephemeralcontainers":
            # pods/ephemeralcontainers (kubectl debug) writes spec.ephemeralContainers and nothing else
            eph = (new.get("spec") or {}).get("ephemeralContainers")
            new = copy.deepcopy(old)
            new.setdefault("spec", {})["ephemeralContainers"] = eph
            if eph is None:
                new["spec"].pop("ephemeralContainers")
            meta = new["metadata"]
        elif res.status_subresource:
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        if old_meta.get("deletionTimestamp"):
            # Finalizers may only be removed once deletion started (Kubernetes forbids adding).
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise errors.forbidden(
                    f"no new finalizers can be added if the object is being deleted, found new finalizers "
                    f"{sorted(added)!r}"
                )
        if subresource != "status":
            await self._migration_rules(res, new, old, old_meta.get("namespace"))
        warnings = self._admit(res, new, old, "UPDATE", opts, subresource=subresource)
        if spec_part(new) != spec_part(old) and subresource != "status":
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        if record:
            self._record_manager(res, new, old, opts, "Update", subresource)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if new == old:
            return WriteResult(old, warnings)  # no-op writes keep their resourceVersion, as in Kubernetes
        if opts.dry_run:
            return WriteResult(new, warnings)
        service = _is_service(res) and subresource != "status"
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not self._namespace_finalizers(
            res, new
        ):
            try:
                self.namespaces.written(await self.store.delete(key, expected_revision=kv.mod_revision))
            except store_api.ConflictError as exc:
                raise errors.conflict(res, meta["name"]) from exc
            if _is_service(res):
                await self.service_ips.release(old)
            return WriteResult(new, warnings)
        reserved = await self.service_ips.allocate(res, new, old) if service else []
        try:
            nkv = await self.store.update(key, encode(new), expected_revision=kv.mod_revision)
            self.namespaces.written(nkv)
        except store_api.ConflictError as exc:
            await self.service_ips.release_keys(reserved)
            raise errors.conflict(res, meta["name"]) from exc
        except store_api.KeyNotFoundError as exc:
            await self.service_ips.release_keys(reserved)
            raise errors.not_found(res, meta["name"]) from exc
        if service:
            await self.service_ips.release(old, keep=new)  # e.g. NodePort → ClusterIP gives its ports back
        meta["resourceVersion"] = str(nkv.mod_revision)
        return WriteResult(new, warnings)

    @staticmethod
    def _namespace_finalizers(res: resources.Resource, obj: JSON) -> list[str]:
        if res.group == "" and res.plural == "namespaces":
            return list((obj.get("spec") or {}).get("finalizers") or [])
        return []

    async def delete(
        self,
        res: resources.Resource,
        namespace: str | None,
        name: str,
        options: JSON,
        opts: WriteOptions,
    ) -> tuple[JSON, bool]:
        """Returns (object, finished). finished=False when finalizers keep the object around."""
        key = res.key(namespace, name)
        for _attempt in range(20):
            kv = await self.store.get(key)
            if kv is None:
                raise errors.not_found(res, name)
            obj = decode(kv)
            meta = obj["metadata"]
            pre = options.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != meta.get("uid"):
                raise errors.conflict(
                    res, name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {meta.get('uid')}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
                raise errors.conflict(
                    res, name,
                    f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                    f"ResourceVersion in object meta: {meta['resourceVersion']}",
                )
            policy = options.get("propagationPolicy")
            if policy is None and options.get("orphanDependents") is not None:
                policy = "Orphan" if options["orphanDependents"] else "Background"
            if policy not in (None, "Background", "Foreground", "Orphan"):
                raise errors.invalid(res, res.kind, name, [resources.Cause(
                    "FieldValueNotSupported",
                    f'Unsupported value: "{policy}": supported values: "Foreground", "Background", "Orphan"',
                    "propagationPolicy")])
            if res.group == "" and res.plural == "pods" and (
                    pending := await podgrace.pending_deletion(self, obj, options)) is not None:  # fmt: skip
                if pending is obj or opts.dry_run:
                    return pending, False
                try:
                    nkv = await self.store.update(key, encode(pending), expected_revision=kv.mod_revision)
                    self.namespaces.written(nkv)
                except store_api.ConflictError:
                    continue
                pending["metadata"]["resourceVersion"] = str(nkv.mod_revision)
                return pending, False  # its node stops it, then deletes it with gracePeriodSeconds=0
            finalizers = list(meta.get("finalizers") or [])
            if policy == "Foreground" and "foregroundDeletion" not in finalizers:
                finalizers.append("foregroundDeletion")
            if policy == "Orphan" and "orphan" not in finalizers:
                finalizers.append("orphan")
            ns_finalizers = self._namespace_finalizers(res, obj)
            if finalizers or ns_finalizers:
                if meta.get("deletionTimestamp") and finalizers == list(meta.get("finalizers") or []):
                    return obj, False
                new = copy.deepcopy(obj)
                nmeta = new["metadata"]
                nmeta.setdefault("deletionTimestamp", now_rfc3339())
                nmeta.setdefault("deletionGracePeriodSeconds", 0)
                nmeta["finalizers"] = finalizers
                if ns_finalizers:
                    new.setdefault("status", {})["phase"] = "Terminating"
                if opts.dry_run:
                    return new, False
                try:
                    nkv = await self.store.update(key, encode(new), expected_revision=kv.mod_revision)
                    self.namespaces.written(nkv)
                except store_api.ConflictError:
                    continue
                nmeta["resourceVersion"] = str(nkv.mod_revision)
                return new, False
            if opts.dry_run:
                return obj, True
            try:
                self.namespaces.written(await self.store.delete(key, expected_revision=kv.mod_revision))
            except store_api.ConflictError:
                continue
            except store_api.KeyNotFoundError as exc:
                raise errors.not_found(res, name) from exc
            if _is_service(res):
                await self.service_ips.release(obj)
            return obj, True
        raise errors.conflict(res, name)

    async def guaranteed_update(
        self,
        res: resources.Resource,
        namespace: str | None,
        name: str,
        mutate: Callable[[JSON], JSON | None],
        *,
        subresource: str = "",
    ) -> JSON | None:
        """Read-modify-CAS loop for the server's own writes; mutate returns None to skip."""
        key = res.key(namespace, name)
        for _attempt in range(50):
            kv = await self.store.get(key)
            if kv is None:
                return None
            old = decode(kv)
            new = mutate(copy.deepcopy(old))
            if new is None:
                return old
            try:
                result = await self._write_update(
                    res, key, kv, old, new, WriteOptions(field_validation="Ignore", privileged=True), subresource,
                    record=False,
                )
            except errors.StatusError as exc:
                if exc.code == 409:
                    continue
                raise
            return result.obj
        raise errors.conflict(res, name)

    # ---------------------------------------------------------------- watch

    async def watch(
        self,
        res: resources.Resource,
        namespace: str | None,
        *,
        resource_version: str,
        match: selectors.Matcher | None,
        initial_end_marker: bool = False,
    ) -> AsyncIterator[WatchEvent]:
        """Kubernetes watch semantics: rv ""/"0" sends the current state as ADDED first.

        With initial_end_marker (sendInitialEvents), an INITIAL_END event carrying the list's
        revision follows the initial ADDED events, for the server's closing bookmark.
        """
        prefix = res.namespace_prefix(namespace)
        if resource_version in ("", "0"):
            page = await self.list(res, namespace, match=match)
            start = page.revision
            initial = page.items
        else:
            try:
                start = int(resource_version)
            except ValueError as exc:
                raise errors.bad_request(f"invalid resourceVersion {resource_version!r}") from exc
            initial = []
        try:
            w = self.store.watch(prefix, after_revision=start)
        except store_api.CompactedError as exc:
            raise errors.gone(f"too old resource version: {start} ({exc.compact_revision + 1})") from exc
        return self._watch_events(w, initial, match, start if initial_end_marker else None)

    def _shared(self, kv: store_api.KeyValue) -> Stored:
        """One Stored per written revision, shared by every watcher of it (decode/serialize once)."""
        k = (kv.key, kv.mod_revision)
        st = self._recent.get(k)
        if st is None:  # a (key, revision) names one value forever
            st = self._recent[k] = Stored(kv)
            if len(self._recent) > 4096:
                self._recent.pop(next(iter(self._recent)))
        return st

    async def _watch_events(
        self, w: store_api.Watch, initial: list[Stored], match: selectors.Matcher | None, initial_end: int | None
    ) -> AsyncIterator[WatchEvent]:
        try:
            for st in initial:
                yield WatchEvent("ADDED", st)
            if initial_end is not None:
                yield WatchEvent("INITIAL_END", info={"resourceVersion": str(initial_end)})
            async for ev in w:
                st = self._shared(ev.kv)
                if ev.type is store_api.EventType.DELETE:
                    if match is None or match(st.obj):
                        yield WatchEvent("DELETED", st)
                    continue
                created = ev.kv.create_revision == ev.kv.mod_revision
                if match is None:
                    yield WatchEvent("ADDED" if created else "MODIFIED", st)
                    continue
                now_m = match(st.obj)
                if created:
                    if now_m:
                        yield WatchEvent("ADDED", st)
                    continue
                prev_m = match(self._shared(ev.prev_kv).obj) if ev.prev_kv is not None else now_m
                if now_m and prev_m:
                    yield WatchEvent("MODIFIED", st)
                elif now_m:
                    yield WatchEvent("ADDED", st)
                elif prev_m and ev.prev_kv is not None:
                    yield WatchEvent("DELETED", st)
        except store_api.CompactedError as exc:
            yield WatchEvent("ERROR", info=errors.gone(f"too old resource version: {exc.requested}").status())
        except store_api.WatchClosedError:
            return
        finally:
            await w.close()

    # ---------------------------------------------------------------- helpers

    def _check_type_meta(self, res: resources.Resource, obj: JSON) -> None:
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if api_version is not None and api_version != res.api_version:
            # Same group, other version: accept when we serve that version for the kind.
            group = api_version.rpartition("/")[0] if "/" in api_version else ""
            if group != res.group:
                raise errors.bad_request(
                    f"the API version in the data ({api_version}) does not match the expected API version "
                    f"({res.api_version})"
                )
        if kind is not None and kind != res.kind:
            raise errors.bad_request(f"the kind in the data ({kind}) does not match the expected kind ({res.kind})")
        obj["apiVersion"] = res.api_version
        obj["kind"] = res.kind

    def _admit(
        self,
        res: resources.Resource,
        obj: JSON,
        old: JSON | None,
        operation: str,
        opts: WriteOptions,
        *,
        subresource: str = "",
    ) -> list[str]:
        warnings: list[str] = []
        validator = self.registry.validator(res)
        if validator is not None:
            # One walk finds the unknown fields and prunes them: Strict refuses the whole write below,
            # so pruning first changes nothing a client can see.
            unknown = validator.prune(obj)
            if unknown:
                if opts.field_validation == "Strict":
                    raise errors.bad_request(
                        f"{res.kind} in version \"{res.version}\" cannot be handled as a {res.kind}: "
                        + "; ".join(f'strict decoding error: unknown field "{p}"' for p in unknown),
                        causes=[resources.Cause("FieldValueInvalid", f'unknown field "{p}"', p) for p in unknown],
                    )
                if opts.field_validation != "Ignore":
                    warnings.extend(f'unknown field "{p}"' for p in unknown)
        if subresource != "status":
            admission.mutate(res, obj, old, operation)
        causes: list[resources.Cause] = []
        causes.extend(
            validation.validate_object_meta(
                obj, res.namespaced, is_namespace_kind=(res.group == "" and res.plural == "namespaces"),
                custom_resource=res.from_crd, name_format="path" if res.group == _RBAC_GROUP else "",
            )
        )
        if validator is not None:
            causes.extend(validator.validate(obj))
        if not causes and subresource != "status":
            causes.extend(admission.validate(res, obj, old, operation, privileged=opts.privileged,
                                             subresource=subresource))
            causes.extend(_unsupported_by_hypervisor(res, obj))
        if causes:
            name = (obj.get("metadata") or {}).get("name") or (obj.get("metadata") or {}).get("generateName", "")
            raise errors.invalid(res, res.kind, name, causes)
        if opts.check is not None:
            opts.check(res, obj, old)
        return warnings

    def _record_manager(
        self, res: resources.Resource, obj: JSON, old: JSON | None, opts: WriteOptions, operation: str,
        subresource: str = "",
    ) -> None:
        if not opts.field_manager:
            return
        ssa.update_managed_fields(
            old, obj, manager=opts.field_manager, operation=operation, subresource=subresource, now=now_rfc3339(),
            list_keys=self._merge_keys(res),
        )

    async def _migration_rules(self, res: resources.Resource, obj: JSON, old: JSON | None,
                               namespace: str | None) -> None:  # fmt: skip
        """The seed's rules on `evictionStrategy` (checked when it is set or changed): a single-node cluster
        has no live migration and no drain, so it refuses any eviction strategy; `LiveMigrate` is refused on
        a VM that cannot live-migrate (RWO volume, host device, bridge binding on the pod network), naming
        what prevents it, by the rules of the LiveMigratable condition."""
        path = _VMI_SPEC_PATHS.get((res.group, res.kind))
        if path is None:
            return
        spec, old_spec = _at(obj, path), _at(old, path) if old is not None else None
        eviction = spec.get("evictionStrategy") if spec is not None else None
        if not eviction or (old_spec is not None and old_spec.get("evictionStrategy") == eviction):
            return
        field = ".".join(path) + ".evictionStrategy"
        name = (obj.get("metadata") or {}).get("name") or ""
        if eviction != "None" and await self._single_node():
            raise errors.invalid(res, res.kind, name, [resources.Cause(
                "FieldValueNotSupported", f"this is a single-node cluster: no live migration and no "
                f"node drain, so evictionStrategy {eviction} cannot be honoured (remove it)", field)])
        if eviction != "LiveMigrate" or spec is None:
            return
        meta_path = (*path[:-1], "metadata") if path[-1] == "spec" and len(path) > 1 else ("metadata",)
        vmi_like = {"metadata": _at(obj, meta_path) or {}, "spec": spec}
        pvcs: dict[str, JSON] = {}
        pvc_res = self.registry.lookup("", "v1", "persistentvolumeclaims")
        for vol in spec.get("volumes") or []:
            claim = vmi_ctrl.claim_name(vol)
            if claim and pvc_res is not None:
                found = await self.try_get(pvc_res, namespace, claim)
                if found is not None:
                    pvcs[claim] = found
                else:  # not created yet (a dataVolumeTemplate): judged when it exists, by the condition
                    pvcs[claim] = {"spec": {"accessModes": ["ReadWriteMany"]}}
        cond = vmi_ctrl.live_migratable(vmi_like, pvcs)
        if cond.get("status") == "False":
            devices = (spec.get("domain") or {}).get("devices") or {}
            named = [f"{kind} {d.get('name')} ({d.get('deviceName')})" for kind in ("gpus", "hostDevices")
                     for d in devices.get(kind) or [] if isinstance(d, dict)]
            extra = f": {', '.join(named)}" if named and cond.get("reason") == "HostDeviceNotLiveMigratable" else ""
            raise errors.invalid(res, res.kind, name, [resources.Cause(
                "FieldValueInvalid", f"evictionStrategy LiveMigrate is not possible: {cond.get('reason')}: "
                f"{cond.get('message')}{extra}", field)])

    async def _single_node(self) -> bool:
        nodes = self.registry.lookup("", "v1", "nodes")
        if nodes is None:
            return False
        # the topology, not the moment: a cordoned node (a drain in progress) still counts
        page = await self.list(nodes, None)
        return len(page.items) == 1

    async def shared_key(self, namespace: str, name: str) -> bytes:
        """A random 32-byte key kept in Secret `namespace/name` (created on first use, the first creator wins), so
        that every API server over this store signs and checks with the same one."""
        res = self.registry.lookup("", "v1", "secrets")
        assert res is not None
        secret = await self.try_get(res, namespace, name)
        if secret is None:
            body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": name, "namespace": namespace},
                    "data": {"key": base64.b64encode(secrets.token_bytes(32)).decode()}}
            try:
                await self.create(res, namespace, body,
                                  WriteOptions(field_manager="virtplane-apiserver", privileged=True))
            except errors.StatusError as exc:
                if exc.code != 409:
                    raise
            secret = await self.get(res, namespace, name)
        return base64.b64decode((secret.get("data") or {})["key"])

    async def _check_namespace_open(self, namespace: str) -> None:
        key = self._ns_res.key(None, namespace)
        state = self.namespaces.lookup(key)
        if state is None:
            kv = await self.store.get(key)
            self.namespaces.remember(kv)
            state = nslifecycle.GONE if kv is None else nslifecycle.namespace_state(kv)
        if state == nslifecycle.GONE:
            raise errors.StatusError(
                404, f'namespaces "{namespace}" not found', details={"name": namespace, "kind": "namespaces"}
            )
        if state == nslifecycle.TERMINATING:
            raise errors.forbidden(
                f"unable to create new content in namespace {namespace} because it is being terminated"
            )


_RBAC_GROUP = "rbac.authorization.k8s.io"  # object names are path segments (`kubevirt.io:admin`)


def _is_service(res: resources.Resource) -> bool:
    return res.group == "" and res.plural == "services"


# Where a kind carries a VMI spec the hypervisor must be able to run (KubeVirt field paths).
_VMI_SPEC_PATHS = {
    ("kubevirt.io", "VirtualMachineInstance"): ("spec",),
    ("kubevirt.io", "VirtualMachine"): ("spec", "template", "spec"),
    ("kubevirt.io", "VirtualMachineInstanceReplicaSet"): ("spec", "template", "spec"),
    ("pool.kubevirt.io", "VirtualMachinePool"): ("spec", "virtualMachineTemplate", "spec", "template", "spec"),
}


def _at(obj: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        obj = obj.get(p) if isinstance(obj, dict) else None
    return obj if isinstance(obj, dict) else None


def _unsupported_by_hypervisor(res: resources.Resource, obj: JSON) -> list[resources.Cause]:
    """Reject up front (422) what the hypervisor cannot run, instead of failing or ignoring it at start."""
    path = _VMI_SPEC_PATHS.get((res.group, res.kind))
    if path is None:
        return []
    spec: Any = obj
    for p in path:
        spec = spec.get(p) if isinstance(spec, dict) else None
    if not isinstance(spec, dict):
        return []
    causes = [resources.Cause("FieldValueNotSupported", message, field)
              for field, message in hypervisor.check_supported(spec, ".".join(path))]
    if res.kind == "VirtualMachine" and isinstance((obj.get("spec") or {}).get("instancetype"), dict):
        # the instance type brings the guest memory; the VMI it expands into is checked when it is created
        causes = [c for c in causes if c.field != "spec.template.spec.domain.memory.guest"]
    return causes


async def cancel_quietly(task: asyncio.Task[Any]) -> None:
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
