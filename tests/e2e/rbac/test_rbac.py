"""Kubernetes RBAC with real kubectl (and virtplane's virtctl) against a real API server: users made with
`virtplane user add` and ServiceAccount tokens from `kubectl create token`, the default roles (view/edit and
KubeVirt's and CDI's aggregated into them), 403s worded as Kubernetes words them, `kubectl auth can-i`
(also `--list` and `--as`), `kubectl auth whoami`, CDI's cross-namespace clone rule, and the VM
subresources and consoles refused to a viewer.

The API server runs alone (no controllers, no node agents): every answer here is the API server's own."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from virtplane.apiserver import auth
from virtplane.testing.cluster import REPO, Cluster

pytestmark = pytest.mark.e2e

VM = """apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: %s}
spec:
  runStrategy: Halted
  template:
    spec:
      domain:
        devices: {}
        resources: {requests: {memory: 64Mi}}
"""


class User:
    def __init__(self, api: Cluster, kubeconfig: Path) -> None:
        self.api = api
        self.kubeconfig = kubeconfig

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
               "KUBECACHEDIR": str(self.kubeconfig.parent / f"kcache-{self.kubeconfig.stem}")}
        return subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, env=env, timeout=60,
                              check=False)

    def virtctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "virtplane.cli.virtctl", "--kubeconfig", str(self.kubeconfig),
                               *args], capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def add_user(api: Cluster, name: str, *groups: str) -> User:
    out = api.data_dir / f"{name}.kubeconfig"
    proc = subprocess.run([sys.executable, "-m", "virtplane.cli.main", "user", "add", name, "--kubeconfig",
                           str(api.kubeconfig), "-o", str(out), *(a for g in groups for a in ("--group", g))],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    return User(api, out)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("rbac-api"), command="apiserver").start()
    try:
        for ns in ("ns1", "ns2", "golden"):
            c.kubectl("create", "namespace", ns)
        c.kubectl("apply", "-n", "ns1", "-f", "-", input=VM % "vm1")
        yield c
    finally:
        c.stop()


def forbidden(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Forbidden" in proc.stderr or "forbidden" in proc.stderr, proc.stderr
    return proc.stderr


def test_viewer_reads_its_namespace_only(api: Cluster) -> None:
    alice = add_user(api, "alice")
    # authenticated, but nothing granted yet
    err = forbidden(alice.kubectl("get", "vm", "-n", "ns1"))
    assert ('virtualmachines.kubevirt.io is forbidden: User "alice" cannot list resource "virtualmachines" in API '
            'group "kubevirt.io" in the namespace "ns1"') in err
    api.kubectl("create", "rolebinding", "alice-view", "--clusterrole=view", "--user=alice", "-n", "ns1")
    got = alice.kubectl("get", "vm", "-n", "ns1")
    assert got.returncode == 0 and "vm1" in got.stdout, got.stderr
    got = alice.kubectl("get", "vm", "vm1", "-n", "ns1", "-o", "jsonpath={.spec.runStrategy}")
    assert got.stdout == "Halted", got.stderr
    err = forbidden(alice.kubectl("get", "vm", "vm1", "-n", "ns2"))
    assert ('virtualmachines.kubevirt.io "vm1" is forbidden: User "alice" cannot get resource "virtualmachines" in '
            'API group "kubevirt.io" in the namespace "ns2"') in err
    err = forbidden(alice.kubectl("create", "-n", "ns1", "-f", "-", input=VM % "vm2"))
    assert ('virtualmachines.kubevirt.io is forbidden: User "alice" cannot create resource "virtualmachines" in API '
            'group "kubevirt.io" in the namespace "ns1"') in err
    err = forbidden(alice.kubectl("delete", "vm", "vm1", "-n", "ns1"))
    assert 'User "alice" cannot delete resource "virtualmachines"' in err
    forbidden(alice.kubectl("label", "vm", "vm1", "-n", "ns1", "tier=gold"))
    forbidden(alice.kubectl("get", "secrets", "-n", "ns1"))  # view does not read secrets
    forbidden(alice.kubectl("get", "nodes"))
    forbidden(alice.kubectl("get", "--raw", "/metrics"))
    assert alice.kubectl("get", "--raw", "/version").returncode == 0
    assert alice.kubectl("api-resources").returncode == 0  # discovery for every authenticated user
    # a watch is a watch: allowed where list is
    watch = alice.kubectl("get", "vm", "-n", "ns1", "--watch", "--request-timeout=2s")
    assert "vm1" in watch.stdout, watch.stderr

    # granting edit makes create and delete work, at once
    api.kubectl("create", "rolebinding", "alice-edit", "--clusterrole=edit", "--user=alice", "-n", "ns1")
    got = alice.kubectl("create", "-n", "ns1", "-f", "-", input=VM % "vm2")
    assert got.returncode == 0, got.stderr
    got = alice.kubectl("delete", "vm", "vm2", "-n", "ns1")
    assert got.returncode == 0, got.stderr
    forbidden(alice.kubectl("create", "-n", "ns2", "-f", "-", input=VM % "vm2"))
    # edit does not grant RBAC itself
    forbidden(alice.kubectl("create", "rolebinding", "x", "--clusterrole=admin", "--user=alice", "-n", "ns1"))
    api.kubectl("delete", "rolebinding", "alice-edit", "-n", "ns1")
    forbidden(alice.kubectl("create", "-n", "ns1", "-f", "-", input=VM % "vm3"))


def test_auth_can_i_whoami_and_list(api: Cluster) -> None:
    bob = add_user(api, "bob", "devs")
    api.kubectl("create", "rolebinding", "devs-edit", "--clusterrole=edit", "--group=devs", "-n", "ns2")

    def can_i(*args: str) -> str:
        proc = bob.kubectl("auth", "can-i", *args)
        assert proc.returncode in (0, 1), proc.stderr
        return proc.stdout.strip()

    assert can_i("create", "virtualmachines", "-n", "ns2") == "yes"
    assert can_i("create", "vm", "-n", "ns1") == "no"
    assert can_i("create", "pods", "--subresource=eviction", "-n", "ns2") == "yes"
    assert can_i("get", "pods", "--subresource=log", "-n", "ns2") == "yes"
    assert can_i("create", "datavolumes.cdi.kubevirt.io", "--subresource=source", "-n", "ns2") == "yes"
    assert can_i("create", "rolebindings", "-n", "ns2") == "no"  # edit, not admin
    assert can_i("get", "/healthz") == "yes" and can_i("get", "/metrics") == "no"
    who = bob.kubectl("auth", "whoami", "-o", "json")
    info = json.loads(who.stdout)["status"]["userInfo"]
    assert info["username"] == "bob" and set(info["groups"]) == {"devs", "system:authenticated"}
    listing = bob.kubectl("auth", "can-i", "--list", "-n", "ns2")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:] if line.strip()}
    assert "[get delete create update patch list watch]" in rows["virtualmachines.kubevirt.io"]  # KubeVirt's order
    assert "[create]" in rows["selfsubjectaccessreviews.authorization.k8s.io"]
    assert "virtualmachines.subresources.kubevirt.io/start" in rows
    elsewhere = bob.kubectl("auth", "can-i", "--list", "-n", "ns1").stdout
    assert "virtualmachines.kubevirt.io " not in elsewhere
    # the admin asks on bob's behalf (impersonation: cluster-admin may impersonate)
    proc = api.kubectl("auth", "can-i", "delete", "vm", "-n", "ns2", "--as", "bob", "--as-group", "devs",
                       check=False)
    assert proc.stdout.strip() == "yes", proc.stderr
    proc = api.kubectl("auth", "can-i", "delete", "vm", "-n", "ns2", "--as", "bob", check=False)
    assert proc.stdout.strip() == "no", proc.stderr  # without the group bob has nothing there
    err = forbidden(bob.kubectl("get", "vm", "-n", "ns2", "--as", "alice"))
    assert 'User "bob" cannot impersonate resource "users" in API group "" at the cluster scope' in err


def test_service_account_token(api: Cluster) -> None:
    api.kubectl("create", "serviceaccount", "bot", "-n", "ns1")
    token = api.kubectl("create", "token", "bot", "-n", "ns1", "--duration=10m").stdout.strip()
    kubeconfig = api.data_dir / "bot.kubeconfig"
    admin = api.kubeconfig.read_text()
    kubeconfig.write_text(admin.replace(api.config()[1], token))
    bot = User(api, kubeconfig)
    who = json.loads(bot.kubectl("auth", "whoami", "-o", "json").stdout)["status"]["userInfo"]
    assert who["username"] == "system:serviceaccount:ns1:bot"
    assert {"system:serviceaccounts", "system:serviceaccounts:ns1", "system:authenticated"} <= set(who["groups"])
    err = forbidden(bot.kubectl("get", "configmaps", "-n", "ns1"))
    assert 'User "system:serviceaccount:ns1:bot" cannot list resource "configmaps"' in err
    api.kubectl("create", "role", "cm-reader", "--verb=get,list", "--resource=configmaps", "-n", "ns1")
    api.kubectl("create", "rolebinding", "bot-cm", "--role=cm-reader", "--serviceaccount=ns1:bot", "-n", "ns1")
    got = bot.kubectl("get", "configmaps", "-n", "ns1")
    assert got.returncode == 0, got.stderr
    # deleting the ServiceAccount revokes its tokens
    api.kubectl("delete", "serviceaccount", "bot", "-n", "ns1")
    gone = bot.kubectl("get", "configmaps", "-n", "ns1")
    assert gone.returncode != 0 and _unauthorized(gone.stderr), gone.stderr


def test_cross_namespace_clone_needs_datavolumes_source(api: Cluster) -> None:
    carol = add_user(api, "carol")
    api.kubectl("create", "rolebinding", "carol-edit", "--clusterrole=edit", "--user=carol", "-n", "ns2")
    dv = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": "copy"},
          "spec": {"source": {"pvc": {"namespace": "golden", "name": "debian"}},
                   "storage": {"resources": {"requests": {"storage": "64Mi"}}}}}
    err = forbidden(carol.kubectl("create", "-n", "ns2", "-f", "-", input=json.dumps(dv)))
    assert "User carol has insufficient permissions in clone source namespace golden" in err
    err = forbidden(carol.kubectl("apply", "--server-side", "-n", "ns2", "-f", "-", input=json.dumps(dv)))
    assert "insufficient permissions in clone source namespace golden" in err
    # the same in a VM's dataVolumeTemplates
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "cloned"},
          "spec": {"runStrategy": "Halted",
                   "dataVolumeTemplates": [{"metadata": {"name": "cloned-root"}, "spec": dv["spec"]}],
                   "template": {"spec": {"domain": {"devices": {}, "resources": {"requests": {"memory": "64Mi"}}},
                                         "volumes": [{"name": "root", "dataVolume": {"name": "cloned-root"}}]}}}}
    err = forbidden(carol.kubectl("create", "-n", "ns2", "-f", "-", input=json.dumps(vm)))
    assert "insufficient permissions in clone source namespace golden" in err
    # CDI's rule: create on datavolumes/source in the source namespace
    api.kubectl("create", "role", "clone-source", "--verb=create", "--resource=datavolumes.cdi.kubevirt.io/source",
                "-n", "golden")
    api.kubectl("create", "rolebinding", "carol-clone", "--role=clone-source", "--user=carol", "-n", "golden")
    got = carol.kubectl("create", "-n", "ns2", "-f", "-", input=json.dumps(dv))
    assert got.returncode == 0, got.stderr
    got = carol.kubectl("create", "-n", "ns2", "-f", "-", input=json.dumps(vm))
    assert got.returncode == 0, got.stderr
    # same-namespace clones need nothing more
    local = {**dv, "metadata": {"name": "local"},
             "spec": {**dv["spec"], "source": {"pvc": {"namespace": "ns2", "name": "x"}}}}
    assert carol.kubectl("create", "-n", "ns2", "-f", "-", input=json.dumps(local)).returncode == 0


def test_vm_actions_and_consoles_need_their_subresources(api: Cluster) -> None:
    dave = add_user(api, "dave")
    api.kubectl("create", "rolebinding", "dave-view", "--clusterrole=view", "--user=dave", "-n", "ns1")
    start = dave.virtctl("start", "vm1", "-n", "ns1")
    assert start.returncode != 0
    assert ('User "dave" cannot update resource "virtualmachines/start" in API group "subresources.kubevirt.io" in '
            'the namespace "ns1"') in start.stderr + start.stdout
    # a VMI that looks running (no node runs it here: the refusal comes first)
    vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": {"name": "vm1"},
           "spec": {"domain": {"devices": {}, "resources": {"requests": {"memory": "64Mi"}}}}}
    api.kubectl("create", "-n", "ns1", "-f", "-", input=json.dumps(vmi))
    api.kubectl("patch", "vmi", "vm1", "-n", "ns1", "--type=merge", "-p",  # KubeVirt: no status subresource
                '{"status":{"phase":"Running","nodeName":"nowhere"}}')
    console = dave.virtctl("console", "vm1", "-n", "ns1")
    assert console.returncode != 0
    assert 'cannot get resource "virtualmachineinstances/console"' in console.stderr + console.stdout
    vnc = dave.virtctl("vnc", "screenshot", "vm1", "-n", "ns1", "-f", str(api.data_dir / "x.png"))
    assert vnc.returncode != 0 and "forbidden" in (vnc.stderr + vnc.stdout).lower()
    # the web console's way in: a websocket with the token in a subprotocol
    assert asyncio.run(_console_upgrade(api, dave)) == 403
    # with edit the action goes through (the API server records the desired state; nothing runs here)
    api.kubectl("delete", "vmi", "vm1", "-n", "ns1")
    api.kubectl("create", "rolebinding", "dave-edit", "--clusterrole=edit", "--user=dave", "-n", "ns1")
    start = dave.virtctl("start", "vm1", "-n", "ns1")
    assert start.returncode == 0, start.stderr
    strategy = api.kubectl("get", "vm", "vm1", "-n", "ns1", "-o", "jsonpath={.spec.runStrategy}").stdout
    assert strategy == "Always"


def test_namespace_admin_cannot_grant_more_than_it_holds(api: Cluster) -> None:
    erin = add_user(api, "erin")
    api.kubectl("create", "rolebinding", "erin-admin", "--clusterrole=admin", "--user=erin", "-n", "ns2")
    got = erin.kubectl("create", "rolebinding", "frank-edit", "--clusterrole=edit", "--user=frank", "-n", "ns2")
    assert got.returncode == 0, got.stderr
    err = forbidden(erin.kubectl("create", "rolebinding", "frank-root", "--clusterrole=cluster-admin",
                                 "--user=frank", "-n", "ns2"))
    assert ('rolebindings.rbac.authorization.k8s.io "frank-root" is forbidden: user "erin" (groups=["system:'
            'authenticated"]) is attempting to grant RBAC permissions not currently held') in err
    err = forbidden(erin.kubectl("create", "role", "everything", "--verb=*", "--resource=*.*", "-n", "ns2"))
    assert "attempting to grant RBAC permissions not currently held" in err
    got = erin.kubectl("create", "role", "vm-reader", "--verb=get,list", "--resource=virtualmachines", "-n", "ns2")
    assert got.returncode == 0, got.stderr
    forbidden(erin.kubectl("create", "rolebinding", "frank-ns1", "--clusterrole=view", "--user=frank", "-n", "ns1"))
    # widening a role by a patch is checked too
    err = forbidden(erin.kubectl("patch", "role", "vm-reader", "-n", "ns2", "--type=json", "-p",
                                 '[{"op":"add","path":"/rules/-","value":{"apiGroups":[""],"resources":["nodes"],'
                                 '"verbs":["get"]}}]'))
    assert "not currently held" in err


def test_signed_tokens_never_carry_privileged_groups(api: Cluster) -> None:
    proc = subprocess.run([sys.executable, "-m", "virtplane.cli.main", "user", "add", "mallory", "--group",
                           "system:masters", "--kubeconfig", str(api.kubeconfig), "-o", str(api.data_dir / "m.cfg")],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert proc.returncode != 0 and "kubectl create clusterrolebinding mallory-admin" in proc.stderr
    # one forged with the real key (someone who read the Secret) is refused all the same
    key = base64.b64decode(_get(api, "secret", "-n", "kube-system", "virtplane-token-signing-key")["data"]["key"])
    token = auth.sign_token(key, auth.user_claims("mallory", ("system:masters",), 600, time.time()))
    kubeconfig = api.data_dir / "mallory.kubeconfig"
    kubeconfig.write_text(api.kubeconfig.read_text().replace(api.config()[1], token))
    got = User(api, kubeconfig).kubectl("get", "namespaces")
    assert got.returncode != 0 and _unauthorized(got.stderr), got.stderr


def test_rbac_objects_are_validated(api: Cluster) -> None:
    bad = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "bad"},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
           "subjects": [{"kind": "Robot", "name": "r2d2"}, {"kind": "User", "name": "u"}]}
    proc = api.kubectl("create", "-n", "ns1", "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0
    assert 'subjects[0].kind: Unsupported value: "Robot"' in proc.stderr
    assert 'subjects[1].apiGroup: Unsupported value: ""' in proc.stderr
    api.kubectl("create", "rolebinding", "frozen", "--clusterrole=view", "--user=u", "-n", "ns1")
    patch = api.kubectl("patch", "rolebinding", "frozen", "-n", "ns1", "--type=merge", "-p",
                        '{"roleRef":{"name":"edit"}}', check=False)
    assert patch.returncode != 0 and "cannot change roleRef" in patch.stderr
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "r"},
            "rules": [{"apiGroups": [""], "resources": ["pods"]}]}
    proc = api.kubectl("apply", "-n", "ns1", "-f", "-", input=json.dumps(role), check=False)
    assert "rules[0].verbs: Required value" in proc.stderr
    out = _get(api, "clusterrole", "kubevirt.io:view")
    assert out["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    # the aggregated view holds KubeVirt's rules, and a new aggregated role joins it
    extra = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": "widgets-view", "labels": {"rbac.authorization.k8s.io/aggregate-to-view": "true"}},
             "rules": [{"apiGroups": ["example.com"], "resources": ["widgets"], "verbs": ["get"]}]}
    api.kubectl("apply", "-f", "-", input=json.dumps(extra))
    rules = _get(api, "clusterrole", "view")["rules"]
    assert {"apiGroups": ["example.com"], "resources": ["widgets"], "verbs": ["get"]} in rules
    assert any("virtualmachines" in r.get("resources", []) for r in rules)


async def _console_upgrade(api: Cluster, user: User) -> int:
    token = yaml.safe_load(user.kubeconfig.read_text())["users"][0]["user"]["token"]
    proto = "base64url.bearer.authorization.k8s.io." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    url = api.server + "/apis/subresources.kubevirt.io/v1/namespaces/ns1/virtualmachineinstances/vm1/console"
    async with aiohttp.ClientSession() as s:
        try:
            async with s.ws_connect(url, protocols=["plain.kubevirt.io", proto], ssl=api.ssl_context()):
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


def _unauthorized(stderr: str) -> bool:
    """kubectl's words for a 401 (which depend on whether its discovery cache answered first)."""
    return "Unauthorized" in stderr or "the server has asked for the client to provide credentials" in stderr


def _get(api: Cluster, *args: str) -> Any:
    return json.loads(api.kubectl("get", *args, "-o", "json").stdout)
