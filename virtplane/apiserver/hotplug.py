"""KubeVirt's `addvolume` / `removevolume` subresources on VMs and VMIs (subresources.kubevirt.io/v1).

Like the other virt-api subresources these only change desired state:
- on a VMI they add/remove the volume and its disk in the VMI spec (not persisted: the volume is gone when
  the VM restarts, since the VMI is then recreated from the VM template); the node agent running the VMI
  attaches/detaches the disk and reports `status.volumeStatus`;
- on a VM (`virtctl addvolume --persist`) they edit `spec.template.spec`; the VM controller carries
  hotpluggable volumes of the template over to the running VMI (KubeVirt's declarative hotplug), so editing
  the VM's volumes directly has the same effect. KubeVirt queues these in `status.volumeRequests` for its
  controller to apply; virtplane applies them in the request, which answers with the same errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from virtplane.api import hotplug
from virtplane.api.resources import Cause
from virtplane.apiserver import errors, handlers
from virtplane.apiserver.kubevirt import read_options

if TYPE_CHECKING:
    from virtplane.apiserver.server import APIServer

JSON = dict[str, Any]
FINAL_PHASES = ("Succeeded", "Failed")


def register(server: APIServer) -> None:
    for plural in ("virtualmachines", "virtualmachineinstances"):
        server.register_subresource("kubevirt.io", plural, "addvolume", _handle)
        server.register_subresource("kubevirt.io", plural, "removevolume", _handle)


def _request_error(err: hotplug.HotplugRequestError, kind: str) -> errors.StatusError:
    if err.conflict:
        return errors.StatusError(409, err.message, reason="Conflict")
    return errors.StatusError(422, f"invalid {kind}: {err.field}: {err.message}", reason="Invalid",
                              causes=[Cause("FieldValueInvalid", err.message, err.field)])


async def _handle(req: handlers.SubresourceRequest) -> web.StreamResponse:
    if req.request.method != "PUT":
        raise errors.StatusError(405, f"{req.subresource} takes PUT")
    adding = req.subresource == "addvolume"
    kind = "AddVolumeOptions" if adding else "RemoveVolumeOptions"
    body = await read_options(req)
    dry_run = bool(body.get("dryRun")) or "dryRun" in req.request.query
    try:
        if adding:
            volume, disk = hotplug.parse_add(body)
        else:
            name = str(body.get("name") or "")
            if not name:
                raise hotplug.HotplugRequestError("name", "RemoveVolumeOptions requires name to be set")
    except hotplug.HotplugRequestError as err:
        raise _request_error(err, kind) from err

    def change(spec: JSON) -> None:
        try:
            if adding:
                hotplug.add_volume(spec, volume, disk)
            else:
                hotplug.remove_volume(spec, name)
        except hotplug.HotplugRequestError as err:
            raise _request_error(err, kind) from err

    srv, res, ns = req.server, req.resource, req.namespace
    obj = await srv.objects.get(res, ns, req.name)  # 404 for a missing VM/VMI
    if res.plural == "virtualmachineinstances":
        status = obj.get("status") or {}
        if status.get("phase") != "Running" or obj["metadata"].get("deletionTimestamp"):
            raise errors.StatusError(409, "Unable to add/remove a volume: VMI is not running", reason="Conflict")
        mutate = _mutator(lambda o: o.setdefault("spec", {}), change)
    else:
        mutate = _mutator(lambda o: o.setdefault("spec", {}).setdefault("template", {}).setdefault("spec", {}),
                          change)
    if dry_run:
        mutate(obj)  # the same checks, nothing written
        return web.Response(status=202)
    written = await srv.objects.guaranteed_update(res, ns, req.name, mutate)
    if written is None:
        raise errors.not_found(res, req.name)
    return web.Response(status=202)


def _mutator(spec_of: Callable[[JSON], JSON], change: Callable[[JSON], None]) -> Callable[[JSON], JSON]:
    def mutate(obj: JSON) -> JSON:
        change(spec_of(obj))
        return obj

    return mutate


__all__ = ["register"]
