"""CDI's cross-namespace clone authorization (virtplane.apiserver.clone_auth) against an Authorizer that
grants `create datavolumes/source` only in listed namespaces (what RBAC will decide; today's Authorizer
allows every authenticated user)."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

from virtplane.apiserver import auth, clone_auth, errors

ALICE = auth.User("alice", groups=("system:authenticated",))
CONTROLLER = auth.User("virtplane:controller", groups=(auth.COMPONENTS_GROUP,))


class OnlyIn(auth.Authorizer):
    def __init__(self, *namespaces: str) -> None:
        self.namespaces = namespaces
        self.asked: list[tuple[str, str, str, str | None]] = []

    def allowed(self, user: auth.User, verb: str, group: str, resource: str, namespace: str | None) -> bool:
        self.asked.append((verb, group, resource, namespace))
        return namespace in self.namespaces


class Objects:
    def __init__(self, objs: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.objs = objs

    async def try_get(self, _res: Any, ns: str, name: str) -> dict[str, Any] | None:
        return self.objs.get((ns, name))


def server(authorizer: auth.Authorizer, objs: dict[tuple[str, str], dict[str, Any]] | None = None) -> Any:
    return types.SimpleNamespace(authorizer=authorizer, objects=Objects(objs or {}),
                                 registry=types.SimpleNamespace(lookup=lambda *a: object()))


def dv(source: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"source": source, "storage": {}}}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_same_namespace_needs_nothing_more() -> None:
    az = OnlyIn()
    run(clone_auth.check_datavolume(server(az), ALICE, "team-a", dv({"pvc": {"name": "golden"}})))
    run(clone_auth.check_datavolume(server(az), ALICE, "team-a", dv({"http": {"url": "http://x"}})))
    assert az.asked == []


def test_cross_namespace_pvc_clone() -> None:
    az = OnlyIn("golden-images")
    run(clone_auth.check_datavolume(server(az), ALICE, "team-a",
                                    dv({"pvc": {"namespace": "golden-images", "name": "debian"}})))
    assert az.asked == [("create", "cdi.kubevirt.io", "datavolumes/source", "golden-images")]
    with pytest.raises(errors.StatusError) as exc:
        run(clone_auth.check_datavolume(server(az), ALICE, "team-a",
                                        dv({"pvc": {"namespace": "secret-ns", "name": "x"}})))
    assert exc.value.code == 403
    assert "alice has insufficient permissions in clone source namespace secret-ns" in str(exc.value)


def test_data_source_and_vm_templates() -> None:
    az = OnlyIn()
    ds = {"spec": {"source": {"pvc": {"namespace": "golden-images", "name": "debian"}}}}
    srv = server(az, {("os-images", "debian"): ds})
    body = {"spec": {"sourceRef": {"kind": "DataSource", "namespace": "os-images", "name": "debian"}}}
    with pytest.raises(errors.StatusError):
        run(clone_auth.check_datavolume(srv, ALICE, "team-a", body))
    assert az.asked[-1][3] == "golden-images"  # the namespace of the PVC the DataSource points at
    vm = {"spec": {"dataVolumeTemplates": [{"metadata": {"name": "root"}, "spec": body["spec"]}]}}
    with pytest.raises(errors.StatusError):
        run(clone_auth.check_virtual_machine(srv, ALICE, "team-a", vm))
    # the VM controller creating the VM's DataVolumes is not asked again
    run(clone_auth.check_datavolume(srv, CONTROLLER, "team-a", body))
