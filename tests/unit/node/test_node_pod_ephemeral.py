"""pods/ephemeralcontainers admission: additions only, unique names, no ports/probes/resources, a real target."""

from __future__ import annotations

import copy
from typing import Any

from virtplane.api import admission


def _pod(eph: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "i"}]}
    if eph is not None:
        spec["ephemeralContainers"] = eph
    return {"metadata": {"name": "p"}, "spec": spec}


def _check(new: dict[str, Any], old: dict[str, Any] | None, op: str, sub: str = "") -> list[str]:
    req = admission.Request(None, new, old, op, subresource=sub)  # type: ignore[arg-type]
    return [f"{c.field}: {c.message}" for c in admission._validate_pod(req)]


def test_ephemeral_containers_only_through_the_subresource_and_only_added() -> None:
    old = _pod()
    dbg = {"name": "dbg", "image": "busybox", "targetContainerName": "app"}
    assert _check(_pod([dbg]), old, "UPDATE", "ephemeralcontainers") == []
    assert _check(_pod([dbg]), old, "UPDATE")  # not through the pod itself
    assert _check(_pod([dbg]), None, "CREATE") == ["spec.ephemeralContainers: Forbidden: cannot be set on create"]
    with_dbg = _pod([dbg])
    changed = copy.deepcopy(with_dbg)
    changed["spec"]["ephemeralContainers"][0]["image"] = "other"
    assert _check(changed, with_dbg, "UPDATE", "ephemeralcontainers") == [
        'spec.ephemeralContainers: Forbidden: existing ephemeral containers "dbg" may not be changed']
    assert _check(_pod([]), with_dbg, "UPDATE", "ephemeralcontainers") == [
        'spec.ephemeralContainers: Forbidden: existing ephemeral containers "dbg" may not be removed']
    bad = {"name": "app", "image": "b", "ports": [{"containerPort": 80}], "targetContainerName": "nope"}
    assert _check(_pod([bad]), old, "UPDATE", "ephemeralcontainers") == [
        'spec.ephemeralContainers[0].name: Duplicate value: "app"',
        "spec.ephemeralContainers[0].ports: Forbidden: cannot be set for an Ephemeral Container",
        "spec.ephemeralContainers[0].targetContainerName: Not found: \"nope\""]
