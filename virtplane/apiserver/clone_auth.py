"""CDI's clone authorization: cloning a PVC from another namespace needs `create` on `datavolumes/source` in
the source namespace (cdi.kubevirt.io), checked for the user who creates the DataVolume, or the VM whose
`dataVolumeTemplates` clone (virt-api checks those for the VM's creator, since the DataVolumes themselves are
then created by the VM controller, which may do anything).

The decision is the API server's RBAC authorizer (virtplane.apiserver.rbac; CDI's view/edit/admin roles grant
`datavolumes/source`). Same-namespace clones need no extra permission (the user can already read that PVC's
namespace), as in CDI. Creates are checked (POST, and a server-side apply that creates); updates are not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from virtplane.apiserver import auth, errors

if TYPE_CHECKING:
    from virtplane.apiserver.server import APIServer

JSON = dict[str, Any]
CDI_GROUP = "cdi.kubevirt.io"
SOURCE_RESOURCE = "datavolumes/source"


def register(server: APIServer) -> None:
    server.register_create_check(CDI_GROUP, "datavolumes", check_datavolume)
    server.register_create_check("kubevirt.io", "virtualmachines", check_virtual_machine)


async def clone_source_namespace(server: APIServer, ns: str, dv_spec: JSON) -> str | None:
    """The namespace a DataVolume spec clones from (pvc, snapshot, or a DataSource's pvc/snapshot); None when
    it does not clone."""
    source = dv_spec.get("source") or {}
    for kind in ("pvc", "snapshot"):
        if isinstance(source.get(kind), dict):
            return str(source[kind].get("namespace") or ns)
    ref = dv_spec.get("sourceRef") or {}
    if ref.get("kind") == "DataSource" and ref.get("name"):
        ds_ns = str(ref.get("namespace") or ns)
        res = server.registry.lookup(CDI_GROUP, "v1beta1", "datasources")
        ds = await server.objects.try_get(res, ds_ns, str(ref["name"])) if res is not None else None
        ds_source = ((ds or {}).get("spec") or {}).get("source") or {}
        for kind in ("pvc", "snapshot"):
            if isinstance(ds_source.get(kind), dict):
                return str(ds_source[kind].get("namespace") or ds_ns)
        return ds_ns if ds_ns != ns else None
    return None


def _authorize(server: APIServer, user: auth.User, ns: str, source_ns: str | None) -> None:
    if source_ns is None or source_ns == ns:
        return
    if not server.authorizer.allowed(user, "create", CDI_GROUP, SOURCE_RESOURCE, source_ns):
        raise errors.forbidden(f"User {user.name} has insufficient permissions in clone source namespace "
                               f"{source_ns}")


async def check_datavolume(server: APIServer, user: auth.User, ns: str | None, body: JSON) -> None:
    if auth.is_component(user):
        return  # the VM controller creating a VM's DataVolumes: the VM's creator was checked
    namespace = ns or "default"
    _authorize(server, user, namespace, await clone_source_namespace(server, namespace, body.get("spec") or {}))


async def check_virtual_machine(server: APIServer, user: auth.User, ns: str | None, body: JSON) -> None:
    if auth.is_component(user):
        return
    namespace = ns or "default"
    for template in (body.get("spec") or {}).get("dataVolumeTemplates") or []:
        if isinstance(template, dict):
            _authorize(server, user, namespace,
                       await clone_source_namespace(server, namespace, template.get("spec") or {}))
