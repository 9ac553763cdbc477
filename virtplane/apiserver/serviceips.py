"""ClusterIP and NodePort allocation for Services, done by the API server as Kubernetes' registry does.

Each allocated address or port is a store key of its own (`/virtplane/allocations/...`), created with the
store's atomic create: two API servers (or two concurrent creates) can never hand out the same ClusterIP,
which a "list the Services and pick a free one" scheme could. This is the design of Kubernetes' current
allocator (one IPAddress object per ClusterIP), without exposing the objects through the API.

An allocation records the Service (namespace, name, uid) that holds it. A Service deleted without its
allocations being released (API server killed in between, deletion through finalizers) leaks nothing for
long: an allocation whose holder is gone is taken over on the next collision, as Kubernetes' repair loop
would eventually release it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import random
from typing import Any

from virtplane.api import resources
from virtplane.store import interface as store_api

from . import errors

JSON = dict[str, Any]
PREFIX = "/virtplane/allocations/"
DEFAULT_SERVICE_CIDR = "10.96.0.0/12"
DEFAULT_NODE_PORTS = (30000, 32767)
SERVICES_PREFIX = "/registry/core/services/"


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceNetwork:
    cidr: str = DEFAULT_SERVICE_CIDR
    node_ports: tuple[int, int] = DEFAULT_NODE_PORTS

    @property
    def network(self) -> ipaddress.IPv4Network:
        net = ipaddress.ip_network(self.cidr, strict=True)
        if not isinstance(net, ipaddress.IPv4Network) or net.num_addresses < 4:
            raise ValueError(f"service CIDR {self.cidr} must be IPv4 with room for addresses")
        return net


def kubernetes_service_ip(cidr: str) -> str:
    """The first address of the Service range: the `kubernetes` Service's ClusterIP, as in Kubernetes."""
    return str(ServiceNetwork(cidr).network.network_address + 1)


def _ip_key(ip: str) -> str:
    return f"{PREFIX}clusterips/{ip}"


def _port_key(proto: str, port: int) -> str:
    return f"{PREFIX}nodeports/{proto.lower()}/{port}"


class Allocator:
    def __init__(self, store: store_api.Store, net: ServiceNetwork) -> None:
        self.store = store
        self.net = net
        self._rand = random.Random()

    async def allocate(self, res: resources.Resource, svc: JSON, old: JSON | None) -> list[str]:
        """Fill `spec.clusterIP(s)` and the NodePorts the Service needs, reserving each; a requested address
        or port that is taken or out of range is a 422 naming the field. Returns the keys it reserved (for
        release when the write then fails)."""
        spec = svc.get("spec")
        if not isinstance(spec, dict):
            return []
        meta = svc["metadata"]
        holder = {"namespace": meta.get("namespace"), "name": meta.get("name"), "uid": meta.get("uid")}
        reserved: list[str] = []
        try:
            await self._cluster_ip(res, svc, spec, old, holder, reserved)
            await self._node_ports(res, svc, spec, old, holder, reserved)
        except BaseException:
            await self.release_keys(reserved)
            raise
        return reserved

    async def _cluster_ip(self, res: resources.Resource, svc: JSON, spec: JSON, old: JSON | None, holder: JSON,
                          reserved: list[str]) -> None:  # fmt: skip
        if spec.get("type") == "ExternalName":
            return
        old_ip = ((old or {}).get("spec") or {}).get("clusterIP")
        want = spec.get("clusterIP")
        if old is not None and old_ip and want in (None, "", old_ip):
            spec["clusterIP"] = old_ip  # kept across updates (immutable; an omitted one is defaulted back)
            spec["clusterIPs"] = [old_ip]
            return
        if old is not None and old_ip and spec.get("type") != "ExternalName":
            raise _invalid(res, svc, "spec.clusterIPs[0]", want, "may not change once set")
        if want == "None":  # headless: no address, DNS lists the endpoints
            spec["clusterIPs"] = ["None"]
            return
        net = self.net.network
        if want:
            try:
                addr = ipaddress.ip_address(str(want))
            except ValueError:
                raise _invalid(res, svc, "spec.clusterIP", want, "must be a valid IP address") from None
            if addr not in net or addr in (net.network_address, net.broadcast_address):
                raise _invalid(res, svc, "spec.clusterIP", want,
                               f"failed to allocate IP {want}: the provided IP ({want}) is not in the valid "
                               f"range. The range of valid IPs is {net}")  # fmt: skip
            got = await self._reserve(_ip_key(str(addr)), holder)
            if got is False:
                raise _invalid(res, svc, "spec.clusterIP", want,
                               f"failed to allocate IP {want}: provided IP is already allocated")  # fmt: skip
            if got:
                reserved.append(_ip_key(str(addr)))
            ip = str(addr)
        else:
            ip = await self._pick(net, holder, reserved)
            if ip is None:
                raise errors.StatusError(500, f"Internal error occurred: failed to allocate a serviceIP: range "
                                              f"is full ({net})")  # fmt: skip
        spec["clusterIP"] = ip
        spec["clusterIPs"] = [ip]
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")

    async def _pick(self, net: ipaddress.IPv4Network, holder: JSON, reserved: list[str]) -> str | None:
        # Random, not sequential: concurrent creates rarely collide, and a collision just tries another.
        # The first address of the range is left out, as Kubernetes keeps it for the `kubernetes` Service.
        size = net.num_addresses - 3
        start = self._rand.randrange(size)
        for i in range(min(size, 4096)):
            addr = net.network_address + 2 + (start + i * 7919) % size  # a prime stride covers the range
            got = await self._reserve(_ip_key(str(addr)), holder)
            if got is not False:
                if got:
                    reserved.append(_ip_key(str(addr)))
                return str(addr)
        return None

    async def _node_ports(self, res: resources.Resource, svc: JSON, spec: JSON, old: JSON | None, holder: JSON,
                          reserved: list[str]) -> None:  # fmt: skip
        if spec.get("type") not in ("NodePort", "LoadBalancer"):
            for p in spec.get("ports") or []:
                if isinstance(p, dict) and p.get("nodePort") and spec.get("type") == "ClusterIP":
                    raise _invalid(res, svc, "spec.ports.nodePort", p["nodePort"],
                                   "may not be used when `type` is 'ClusterIP'")  # fmt: skip
            return
        lo, hi = self.net.node_ports
        old_ports = {(str(p.get("protocol") or "TCP"), p.get("port")): p.get("nodePort")
                     for p in ((old or {}).get("spec") or {}).get("ports") or [] if isinstance(p, dict)}  # fmt: skip
        for i, p in enumerate(spec.get("ports") or []):
            if not isinstance(p, dict):
                continue
            proto = str(p.get("protocol") or "TCP")
            kept = old_ports.get((proto, p.get("port")))
            want = p.get("nodePort")
            if kept and want in (None, 0, kept):
                p["nodePort"] = kept
                continue
            field = f"spec.ports[{i}].nodePort"
            if want:
                if not isinstance(want, int) or not lo <= want <= hi:
                    raise _invalid(res, svc, field, want, f"provided port is not in the valid range. The range of "
                                                          f"valid ports is {lo}-{hi}")  # fmt: skip
                got = await self._reserve(_port_key(proto, want), holder)
                if got is False:
                    raise _invalid(res, svc, field, want, "provided port is already allocated")
                if got:
                    reserved.append(_port_key(proto, want))
                continue
            start = self._rand.randrange(hi - lo + 1)
            for j in range(hi - lo + 1):
                port = lo + (start + j) % (hi - lo + 1)
                got = await self._reserve(_port_key(proto, port), holder)
                if got is not False:
                    if got:
                        reserved.append(_port_key(proto, port))
                    p["nodePort"] = port
                    break
            else:
                raise errors.StatusError(500, "Internal error occurred: failed to allocate a nodePort: range is full")

    async def _reserve(self, key: str, holder: JSON) -> bool | None:
        """True: newly reserved for `holder`; None: `holder` held it already; False: someone else holds it."""
        value = json.dumps(holder).encode()
        try:
            await self.store.create(key, value)
            return True
        except store_api.KeyExistsError:
            pass
        kv = await self.store.get(key)
        if kv is None:
            return await self._reserve(key, holder)
        try:
            current = json.loads(kv.value)
        except ValueError:
            current = {}
        if current == holder:
            return None  # ours already (an update re-reserving what it holds)
        if await self._holder_alive(current, key):
            return False
        try:
            await self.store.update(key, value, expected_revision=kv.mod_revision)
        except (store_api.ConflictError, store_api.KeyNotFoundError):
            return False
        return True

    async def _holder_alive(self, holder: JSON, key: str) -> bool:
        """Does the Service that reserved `key` still exist and still use it?"""
        kv = await self.store.get(f"{SERVICES_PREFIX}{holder.get('namespace')}/{holder.get('name')}")
        if kv is None:
            return False
        try:
            svc = json.loads(kv.value)
        except ValueError:
            return True
        if (svc.get("metadata") or {}).get("uid") != holder.get("uid"):
            return False
        spec = svc.get("spec") or {}
        if key.startswith(f"{PREFIX}clusterips/"):
            return spec.get("clusterIP") == key.rsplit("/", 1)[1]
        proto, port = key.rsplit("/", 2)[1:]
        return any(isinstance(p, dict) and str(p.get("protocol") or "TCP").lower() == proto
                   and str(p.get("nodePort")) == port for p in spec.get("ports") or [])  # fmt: skip

    def keys_of(self, svc: JSON) -> list[str]:
        spec = svc.get("spec") or {}
        keys = []
        ip = spec.get("clusterIP")
        if ip and ip != "None":
            keys.append(_ip_key(ip))
        for p in spec.get("ports") or []:
            if isinstance(p, dict) and p.get("nodePort"):
                keys.append(_port_key(str(p.get("protocol") or "TCP"), int(p["nodePort"])))
        return keys

    async def release(self, svc: JSON, *, keep: JSON | None = None) -> None:
        """Release what `svc` held (and `keep` no longer does, for an update)."""
        kept = set(self.keys_of(keep)) if keep is not None else set()
        await self.release_keys([k for k in self.keys_of(svc) if k not in kept])

    async def release_keys(self, keys: list[str]) -> None:
        for key in keys:
            try:
                await self.store.delete(key)
            except store_api.StoreError:
                pass  # already gone: release is idempotent


def _invalid(res: resources.Resource, svc: JSON, field: str, value: Any, message: str) -> errors.StatusError:
    name = (svc.get("metadata") or {}).get("name", "")
    return errors.invalid(res, res.kind, name, [resources.Cause("FieldValueInvalid",
                                                                f"Invalid value: {json.dumps(value)}: {message}",
                                                                field)])  # fmt: skip
