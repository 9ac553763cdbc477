"""Joining a node agent to a cluster over the network, kubeadm's way.

On the control plane, `virtplane token create` makes a bootstrap token (a Secret `kube-system/bootstrap-token-<id>`)
and prints the command to run on the new machine:

    virtplane node --server https://HOST:6443 --token abcdef.0123456789abcdef \\
        --discovery-token-ca-cert-hash sha256:<hash> --name NODE --data-dir DIR

That command reads `kube-public/cluster-info` without credentials (it holds the cluster's CA), trusts that CA
only if its public key has the hash it was given, checks the token against the server over verified TLS, and
writes DIR/kubeconfig; the agent then runs with it. The bootstrap token stays the node's credential (there is
no certificate signing step): delete its Secret to revoke the node.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from virtplane.apiserver import auth, pki, server
from virtplane.client import rest

SECRETS = rest.GVR("", "v1", "secrets")


class JoinError(Exception):
    """Why the node cannot join, in one line for the operator."""


def _get(url: str, ctx: ssl.SSLContext, token: str = "") -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=15) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise JoinError(f"{url}: the server answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise JoinError(f"{url}: cannot reach the server: {getattr(exc, 'reason', exc)}") from None


def discover_ca(server_url: str, ca_hash: str | None) -> bytes:
    """The cluster CA from cluster-info, trusted only when its hash is `ca_hash` (None: trust it unverified)."""
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    cm = _get(server_url.rstrip("/") + server.CLUSTER_INFO_PATH, insecure)
    try:
        kubeconfig = yaml.safe_load(cm["data"]["kubeconfig"])
        ca = base64.b64decode(kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"])
    except (KeyError, IndexError, TypeError, ValueError, yaml.YAMLError) as exc:
        raise JoinError(f"kube-public/cluster-info on {server_url} holds no CA: {exc}") from None
    got = pki.ca_cert_hash(ca)
    if ca_hash is not None and got != ca_hash:
        raise JoinError(f"the cluster CA's public key hash is {got}, not the expected {ca_hash}: refusing to join "
                        "(wrong server, or a man in the middle)")  # fmt: skip
    return ca


def join(server_url: str, token: str, ca_hash: str | None, data_dir: Path) -> Path:
    """Discover and check the CA, check the token, write DATA_DIR/kubeconfig; returns its path."""
    if not auth.BOOTSTRAP_TOKEN_RE.match(token):
        raise JoinError("the token must look like abcdef.0123456789abcdef (virtplane token create prints one)")
    ca = discover_ca(server_url, ca_hash)
    verified = ssl.create_default_context(cadata=ca.decode())
    _get(server_url.rstrip("/") + "/api", verified, token)  # 401 here: the token is unknown, expired or revoked
    data_dir.mkdir(parents=True, exist_ok=True)
    ca_path = data_dir / "ca.crt"
    ca_path.write_bytes(ca)
    kubeconfig = data_dir / "kubeconfig"
    pki.write_kubeconfig(kubeconfig, server_url.rstrip("/"), ca_path, token)
    return kubeconfig


def add_node_flags(node: argparse.ArgumentParser) -> None:
    node.add_argument("--server", default="", help="join the API server at this URL (with --token), instead of "
                                                   "--kubeconfig")  # fmt: skip
    node.add_argument("--token", default="", help="a bootstrap token from `virtplane token create`")
    node.add_argument("--discovery-token-ca-cert-hash", dest="ca_cert_hash", default=None,
                      help="sha256:<hex> of the cluster CA's public key, as `virtplane token create` prints it")
    node.add_argument("--discovery-token-unsafe-skip-ca-verification", dest="skip_ca_verification",
                      action="store_true", help="trust whatever CA the server presents (not for real clusters)")


def kubeconfig_for_node(args: argparse.Namespace) -> Path:
    """--kubeconfig, or the one a --server/--token join writes into the data dir."""
    if args.kubeconfig is not None:
        return Path(args.kubeconfig)
    if not args.server or not args.token:
        raise JoinError("give --kubeconfig, or --server and --token to join a cluster")
    if args.ca_cert_hash is None and not args.skip_ca_verification:
        raise JoinError("give --discovery-token-ca-cert-hash (or --discovery-token-unsafe-skip-ca-verification)")
    return join(args.server, args.token, args.ca_cert_hash, Path(args.data_dir))


def add_token_parser(sub: Any) -> None:
    token = sub.add_parser("token", help="bootstrap tokens for joining nodes (kubeadm token)")
    verbs = token.add_subparsers(dest="token_command", required=True)
    create = verbs.add_parser("create", help="create a token and print the join command")
    create.add_argument("--kubeconfig", default=None, help="an admin kubeconfig (default $KUBECONFIG)")
    create.add_argument("--ttl", default="24h", help="lifetime, e.g. 30m, 24h, 0 for never (default 24h)")
    create.add_argument("--description", default="", help="what the token is for")
    create.add_argument("--log-level", default="warning")
    create.add_argument("--print-join-command", dest="print_join_command", action="store_true",
                        help="print the whole `virtplane node` command instead of the token alone")


def _ttl(text: str) -> datetime.timedelta | None:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text in ("0", "0s"):
        return None
    try:
        return datetime.timedelta(seconds=float(text[:-1]) * units[text[-1]])
    except (KeyError, ValueError, IndexError):
        raise JoinError(f"--ttl {text!r}: use a number and a unit (s, m, h, d), or 0") from None


async def token_create(args: argparse.Namespace) -> int:
    ttl = _ttl(args.ttl)
    cfg = rest.ClientConfig.from_kubeconfig(args.kubeconfig)
    token = auth.new_bootstrap_token()
    token_id, secret = token.split(".")
    string_data = {"token-id": token_id, "token-secret": secret, "usage-bootstrap-authentication": "true",
                   "usage-bootstrap-signing": "true", "auth-extra-groups": "system:bootstrappers:virtplane:nodes"}
    if args.description:
        string_data["description"] = args.description
    if ttl is not None:
        when = datetime.datetime.now(datetime.UTC) + ttl
        string_data["expiration"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"apiVersion": "v1", "kind": "Secret", "type": auth.BOOTSTRAP_SECRET_TYPE,
            "metadata": {"name": auth.bootstrap_secret_name(token_id), "namespace": "kube-system"},
            "stringData": string_data}
    async with rest.Client(cfg) as client:
        await client.create(SECRETS, body, "kube-system")
    if not args.print_join_command:
        print(token)
        return 0
    ca_hash = pki.ca_cert_hash(cfg.ca_data) if cfg.ca_data else None
    flags = f"--discovery-token-ca-cert-hash {ca_hash}" if ca_hash else "--discovery-token-unsafe-skip-ca-verification"
    print(f"virtplane node --server {cfg.server} --token {token} {flags} --name NODE --data-dir DIR")
    return 0
