"""`virtplane user add NAME [--group G]... [--ttl 8760h] [-o FILE]`: a kubeconfig for a person.

Kubernetes has no User objects: a user is whoever a credential says (kubeadm's `kubeadm kubeconfig user`
signs a client certificate whose CN is the name and O the groups). virtplane signs a token instead, with the
key every API server reads from the Secret kube-system/virtplane-token-signing-key, which the admin
kubeconfig this command uses may read. The user can do nothing until RBAC grants it:

    virtplane user add alice --group devs -o alice.kubeconfig
    kubectl create rolebinding alice-edit --clusterrole=edit --user=alice -n ns1
    KUBECONFIG=alice.kubeconfig kubectl get vm -n ns1

The token is valid until --ttl runs out (default one year); deleting the key Secret and restarting the API
servers revokes every such token (and every ServiceAccount token) at once.
"""

from __future__ import annotations

import argparse
import base64
import os
import time
from pathlib import Path
from typing import Any

import yaml

from virtplane.apiserver import auth
from virtplane.client import rest

SECRETS = rest.GVR("", "v1", "secrets")
DEFAULT_TTL = "8760h"


def add_user_parser(sub: Any) -> None:
    user = sub.add_parser("user", help="kubeconfigs for people (authorization is RBAC's)")
    verbs = user.add_subparsers(dest="user_command", required=True)
    add = verbs.add_parser("add", help="write a kubeconfig authenticating as NAME")
    add.add_argument("name", help="the user name RBAC subjects refer to (kind: User)")
    add.add_argument("--group", action="append", default=[], help="a group the user is in (repeatable)")
    add.add_argument("--ttl", default=DEFAULT_TTL, help="lifetime, e.g. 12h, 30d (default 8760h)")
    add.add_argument("--kubeconfig", default=None, help="an admin kubeconfig (default $KUBECONFIG)")
    add.add_argument("-o", "--output", type=Path, default=None, help="where to write it (default NAME.kubeconfig)")
    add.add_argument("--namespace", default="default", help="the kubeconfig context's namespace")
    add.add_argument("--log-level", default="warning")


def _seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = int(float(text[:-1]) * units[text[-1]])
    except (KeyError, ValueError, IndexError):
        raise SystemExit(f"virtplane user add: --ttl {text!r}: use a number and a unit (s, m, h, d)") from None
    if value <= 0:
        raise SystemExit("virtplane user add: --ttl must be positive")
    return value


async def user_add(args: argparse.Namespace) -> int:
    privileged = auth.SUPERUSER_GROUPS.intersection(args.group)
    if privileged:
        raise SystemExit(f"virtplane user add: {', '.join(sorted(privileged))} cannot be given to a signed token "
                         "(the API server refuses such tokens); bind the user to cluster-admin instead:\n"
                         f"  kubectl create clusterrolebinding {args.name}-admin --clusterrole=cluster-admin "
                         f"--user={args.name}")
    cfg = rest.ClientConfig.from_kubeconfig(args.kubeconfig)
    ns, name = auth.SIGNING_KEY_SECRET
    async with rest.Client(cfg) as client:
        secret = await client.get(SECRETS, name, ns)
    key = base64.b64decode(secret["data"]["key"])
    groups = tuple(dict.fromkeys(args.group))
    token = auth.sign_token(key, auth.user_claims(args.name, groups, _seconds(args.ttl), time.time()))
    cluster: dict[str, Any] = {"server": cfg.server}
    if cfg.ca_data:
        cluster["certificate-authority-data"] = base64.b64encode(cfg.ca_data).decode()
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "virtplane", "cluster": cluster}],
        "users": [{"name": args.name, "user": {"token": token}}],
        "contexts": [{"name": f"{args.name}@virtplane",
                      "context": {"cluster": "virtplane", "user": args.name, "namespace": args.namespace}}],
        "current-context": f"{args.name}@virtplane", "preferences": {},
    }
    out: Path = args.output or Path(f"{args.name.replace(':', '_')}.kubeconfig")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {out}: user {args.name!r}" + (f" in groups {', '.join(groups)}" if groups else "")
          + f", valid {args.ttl}. It may do nothing until RBAC allows it, e.g.\n"
          f"  kubectl create rolebinding {args.name}-edit --clusterrole=edit --user={args.name} -n NAMESPACE")
    return 0
