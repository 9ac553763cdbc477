"""What the server serves, read from its discovery documents (never from server internals)."""

from __future__ import annotations

import dataclasses

from virtplane.client import rest


@dataclasses.dataclass(frozen=True, slots=True)
class APIResource:
    gvr: rest.GVR
    kind: str
    verbs: frozenset[str]


async def server_resources(client: rest.Client) -> list[APIResource]:
    """Top-level resources (no subresources) of every group's preferred version."""
    out: list[APIResource] = []
    lists = [await client.request("GET", "/api/v1")]
    groups = await client.request("GET", "/apis")
    for g in groups.get("groups", []):
        gv = g["preferredVersion"]["groupVersion"]
        try:
            lists.append(await client.request("GET", f"/apis/{gv}"))
        except rest.APIError:
            continue
    for doc in lists:
        gv = doc["groupVersion"]
        group, _, version = gv.rpartition("/")
        for r in doc.get("resources", []):
            if "/" in r["name"]:
                continue
            out.append(APIResource(rest.GVR(group, version, r["name"], r["namespaced"]), r["kind"],
                                   frozenset(r.get("verbs", []))))
    return out
