"""RBAC authorization cost per request, in process (what the API server's middleware runs), best of 7 rounds:

    .venv/bin/python bench/rbac.py [--bindings 1000]

- admin: what a request of `system:masters` (or a component) pays: the impersonation-header test, the
  superuser set test, the after-write test (no rule is looked at);
- user, decided before: a non-superuser request whose user and URL were allowed since the last index rebuild;
- user, first decision: URL parsing to request attributes, then the user's rules (default policy, the user
  bound to `edit` in its namespace, `--bindings` other RoleBindings in other namespaces);
- index rebuild: what every RBAC change costs once (default policy plus `--bindings` RoleBindings).
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

from multidict import CIMultiDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from virtplane.apiserver import auth, rbac, rbac_policy


class FakeRequest(dict):  # type: ignore[type-arg]
    method = "POST"
    path = "/apis/kubevirt.io/v1/namespaces/ns1/virtualmachines"
    query: dict[str, str] = {}
    headers = CIMultiDict({"Authorization": "Bearer x", "Content-Type": "application/json", "User-Agent": "kubectl"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bindings", type=int, default=1000)
    args = parser.parse_args()
    admin = auth.authenticated("admin", groups=(auth.MASTERS,))
    alice = auth.authenticated("alice")
    objs = rbac_policy.default_objects()
    crs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ClusterRole"}
    crbs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ClusterRoleBinding"}
    rbs = {(f"team-{i}", "edit"): {"roleRef": {"kind": "ClusterRole", "name": "edit"},
                                  "subjects": [{"kind": "User", "name": f"user-{i}"}]} for i in range(args.bindings)}
    rbs[("ns1", "alice")] = {"roleRef": {"kind": "ClusterRole", "name": "edit"},
                             "subjects": [{"kind": "User", "name": "alice"}]}
    az = rbac.RBACAuthorizer()
    az.set_index(rbac.PolicyIndex({}, crs, rbs, crbs))
    req = FakeRequest()

    def admin_request() -> None:
        _ = "Impersonate-User" in req.headers or "Impersonate-Group" in req.headers
        _ = auth.SUPERUSER_GROUPS.isdisjoint(admin.groups)
        _ = req.method in rbac.WRITE_METHODS and req.get("vp_group") == rbac.GROUP

    def user_decided_before() -> None:
        if auth.SUPERUSER_GROUPS.isdisjoint(alice.groups):
            rbac.authorize_request(az, alice, req)

    def user_first_decision() -> None:
        az.requests = {}
        az._decisions = {}
        rbac.authorize_request(az, alice, req)

    def index_rebuild() -> None:
        rbac.PolicyIndex({}, crs, rbs, crbs)

    with open("/proc/loadavg") as f:
        print(f"load average: {f.read().split()[0]}; {len(crs)} ClusterRoles, {len(rbs)} RoleBindings")
    for name, fn, n in (("admin", admin_request, 200_000), ("user, decided before", user_decided_before, 200_000),
                        ("user, first decision", user_first_decision, 20_000), ("index rebuild", index_rebuild, 20)):
        best = min(timeit.repeat(fn, number=n, repeat=7)) / n
        print(f"{name:22s} {best * 1e6:10.2f} us")


if __name__ == "__main__":
    main()
