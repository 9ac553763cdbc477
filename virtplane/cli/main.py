"""`virtplane`: run the all-in-one cluster (`up`) or one component (`apiserver`, `controller`)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import virtplane
from virtplane.apiserver import auth, pki, server, serviceips
from virtplane.cli import demo, instancetypes, join, nodes, users
from virtplane.client import rest
from virtplane.controllers import manager
from virtplane.hypervisor import cgroups
from virtplane.network.nodenet import ClusterNetwork
from virtplane.storage import registry
from virtplane.store import open_store
from virtplane.store.interface import StoreError

log = logging.getLogger("virtplane")
CONTROLLER_USER = "system:virtplane:controller"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: machine-readable logs, like Kubernetes components' structured logs."""

    _STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in self._STD:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def default_data_dir() -> Path:
    return Path(os.environ.get("VIRTPLANE_DATA_DIR", Path.home() / ".virtplane"))


def add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=default_data_dir(), help="state directory (default ~/.virtplane)")
    p.add_argument("--port", type=int, default=6443, help="API server HTTPS port (0 picks a free one)")
    p.add_argument("--bind-address", default="127.0.0.1", help="address the API server listens on")
    p.add_argument("--store", default="", help="store URL (default sqlite:///DATA_DIR/state.db; etcd://host:port)")
    p.add_argument("--tls-san", action="append", default=[], help="extra name or IP for the serving certificate")
    p.add_argument("--log-level", default="info")
    p.add_argument("--service-cluster-ip-range", default=serviceips.DEFAULT_SERVICE_CIDR,
                   help="the CIDR Service ClusterIPs are allocated from (as kube-apiserver's flag)")


def prepare_apiserver(args: argparse.Namespace, extra_hosts: tuple[str, ...] = ()
                      ) -> tuple[server.APIServer, pki.ServingCert, str]:  # fmt: skip
    data: Path = args.data_dir.expanduser().resolve()
    data.mkdir(parents=True, exist_ok=True)
    # As kube-apiserver's certificate: the `kubernetes` Service's ClusterIP and names, for in-cluster clients.
    sans = [*args.tls_san, *extra_hosts, serviceips.kubernetes_service_ip(args.service_cluster_ip_range),
            "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]
    if args.bind_address not in ("0.0.0.0", "::"):
        sans.append(args.bind_address)
    certs = pki.ensure_pki(data / "pki", sans)
    token_file = data / "tokens.csv"
    token = auth.ensure_admin_token(token_file)
    auth.ensure_token(token_file, CONTROLLER_USER, (auth.COMPONENTS_GROUP,))  # before the server reads the file
    for i in range(1, getattr(args, "nodes", 0) + 1):
        nodes.prepare_node_token(data, i)
    store_url = args.store or f"sqlite://{data / 'state.db'}"
    cfg = server.ServerConfig(host=args.bind_address, port=args.port, tls_cert=certs.cert, tls_key=certs.key,
                              token_file=token_file, extra_hosts=extra_hosts,
                              service_cidr=args.service_cluster_ip_range, ca_cert=certs.ca_cert)
    return server.APIServer(open_store(store_url), cfg), certs, token


async def run_apiserver(args: argparse.Namespace, *, with_controllers: bool) -> int:
    if with_controllers:
        args.node_netns = nodes.use_node_netns(args.nodes, args.node_netns)
    if with_controllers and getattr(args, "pod_network", "user") == "cni" and args.nodes > 1 \
            and not args.node_netns:
        # In one netns every node's pod bridge, gateway address and subnet routes would be host-global and
        # clash; in their own netns each node has its own and routes to the others over the cluster bridge.
        print("virtplane up: --pod-network cni with several nodes needs --node-netns", file=sys.stderr)
        return 2
    nodenet: ClusterNetwork | None = None
    if with_controllers and getattr(args, "node_netns", False) and args.nodes > 0:
        # before the API server: it also listens on the bridge, and its certificate names that address
        data_dir: Path = args.data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - start-up, before anything else runs
        nodenet = await ClusterNetwork.for_data_dir(data_dir).setup_bridge()
        nodenet.save(data_dir)
    api, certs, token = prepare_apiserver(args, (nodenet.gateway,) if nodenet else ())
    # The control plane's CPU reserve beside the VMs (cgroups.py); the node agents `up` starts inherit it.
    cgroups.join_system_group()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await api.start()
    data: Path = args.data_dir.expanduser().resolve()
    host = "127.0.0.1" if args.bind_address in ("0.0.0.0", "::") else args.bind_address
    url = f"https://{host}:{api.bound_port}"
    kubeconfig = data / "kubeconfig"
    pki.write_kubeconfig(kubeconfig, url, certs.ca_cert, token)
    ctrl: manager.ControllerManager | None = None
    ctrl_kubeconfig = data / "controller.kubeconfig"
    ctrl_token = auth.ensure_token(data / "tokens.csv", CONTROLLER_USER, (auth.COMPONENTS_GROUP,))
    pki.write_kubeconfig(ctrl_kubeconfig, url, certs.ca_cert, ctrl_token)
    agents: list[nodes.NodeAgentProcess] = []
    cluster_registry = None
    if with_controllers and args.registry_port:
        try:
            cluster_registry = demo.start_cluster_registry(data, args.registry_port)
        except registry.RegistryError as exc:
            log.warning("the cluster registry did not start; continuing without it: %s", exc)
        if cluster_registry is not None:
            image = await demo.publish_guest_image(cluster_registry)
            if args.demo and image:
                async with rest.Client(rest.ClientConfig.from_kubeconfig(kubeconfig)) as client:
                    await demo.create_demo_vm(client, image)
    if with_controllers:
        async with rest.Client(rest.ClientConfig.from_kubeconfig(kubeconfig)) as client:
            await instancetypes.ensure_common(client)
        ctrl = manager.ControllerManager(rest.ClientConfig.from_kubeconfig(ctrl_kubeconfig),
                                         storage_root=data / "storage")
        await ctrl.start()
        for i in range(1, args.nodes + 1):
            pod_net = nodes.pod_network_args(getattr(args, "pod_network", "user"), i)
            if nodenet is None:
                name, node_dir, node_kubeconfig = nodes.prepare_node(data, i, url, certs.ca_cert)
                agent = nodes.NodeAgentProcess(name, node_dir, node_kubeconfig, extra_args=pod_net)
            else:
                ns, address = await nodenet.add_node(i)
                node_url = f"https://{nodenet.gateway}:{api.bound_port}"
                name, node_dir, node_kubeconfig = nodes.prepare_node(data, i, node_url, certs.ca_cert)
                # registries on the host's bridge address speak plain HTTP, as loopback ones do
                agent = nodes.NodeAgentProcess(name, node_dir, node_kubeconfig, netns=ns, extra_args=(
                    "--address", address, "--insecure-registry", nodenet.gateway, *pod_net))
            agent.start()
            agents.append(agent)
    log.info("virtplane is up", extra={"server": url, "kubeconfig": str(kubeconfig),
                                       "version": virtplane.__version__})
    print(f"virtplane {virtplane.__version__} is up at {url}\n"
          f"  export KUBECONFIG={kubeconfig}\n  kubectl get vm -A", flush=True)
    if getattr(args, "demo", False):
        print("  kubectl wait vm/demo --for=condition=Ready --timeout=120s && virtctl console demo"
              "   # root / virtplane; Ctrl+] leaves", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await asyncio.gather(*(a.stop() for a in agents))
        if cluster_registry is not None:
            cluster_registry.stop()
        if ctrl is not None:
            await ctrl.stop()
        await api.stop()
    return 0


async def run_controller(args: argparse.Namespace) -> int:
    cgroups.join_system_group()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ctrl = manager.ControllerManager(rest.ClientConfig.from_kubeconfig(args.kubeconfig),
                                     storage_root=args.storage_root)
    await ctrl.run_forever(stop)
    return 0


def add_node_parser(sub: Any) -> None:
    node = sub.add_parser("node", help="run a node agent (runs the VMs scheduled to NAME)")
    node.add_argument("--kubeconfig", type=Path, default=None,
                      help="kubeconfig with a components token (or join with --server and --token)")
    node.add_argument("--name", required=True, help="the Node name to register")
    node.add_argument("--data-dir", type=Path, required=True, help="images, VM runtime dirs, agent certificate")
    node.add_argument("--address", default="127.0.0.1", help="InternalIP of the node; the agent API binds here")
    node.add_argument("--port", type=int, default=0, help="agent HTTPS port (0 picks a free one)")
    node.add_argument("--insecure-registry", action="append", default=[],
                      help="registry host[:port] to pull containerDisks from over plain HTTP (repeatable)")
    node.add_argument("--log-level", default="info")
    # Pod network (virtplane.network): opt-in until proven; `user` is the interim QEMU user-mode network.
    node.add_argument("--pod-network", choices=("user", "cni"), default="user",
                      help="cni: a netns per VMI, the CNI chain, KubeVirt's masquerade binding (needs root)")
    node.add_argument("--pod-cidr", default="10.244.0.0/24", help="this node's pod subnet (default CNI chain)")
    node.add_argument("--cni-config", type=Path, default=None,
                      help="CNI config (list) file to use instead of bridge vp0 + host-local; re-read per VMI")
    join.add_node_flags(node)


async def run_node(args: argparse.Namespace) -> int:
    from virtplane.node import network
    from virtplane.node.agent import AgentConfig, NodeAgent

    # before anything else: a join that cannot go through must leave nothing configured
    kubeconfig = await asyncio.to_thread(join.kubeconfig_for_node, args)
    network.configure_pod_network(args.pod_network, args.data_dir, pod_cidr=args.pod_cidr, cni_config=args.cni_config)
    cgroups.join_system_group()  # a no-op under `up` (already there); a node agent run on its own joins here

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    agent = NodeAgent(AgentConfig(kubeconfig=kubeconfig, name=args.name, data_dir=args.data_dir,
                                  address=args.address, port=args.port,
                                  insecure_registries=tuple(args.insecure_registry)))
    await agent.run(stop)
    return 0


def dump_tasks() -> None:
    """SIGUSR1: log every asyncio task's stack (what Go's SIGQUIT gives), to see what a component waits on."""
    for task in asyncio.all_tasks():
        frames = []
        coro: Any = task.get_coro()
        while coro is not None:  # follow the await chain: Task.print_stack shows only the outermost frame
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        log.warning("task %s", task.get_name(), extra={"stack": frames})


async def _with_diagnostics(coro: Any) -> int:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
    return int(await coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="virtplane", description=__doc__)
    parser.add_argument("--version", action="version", version=f"virtplane {virtplane.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the all-in-one cluster in the foreground")
    add_server_flags(up)
    up.add_argument("--nodes", type=int, default=1, help="number of node agents")
    up.add_argument("--node-netns", action=argparse.BooleanOptionalAction, default=None,
                    help="each node agent in its own network namespace on a bridge the cluster creates (root); "
                         "the namespaces stay when `up` exits (its VMs keep running in them). Default: on with "
                         "--nodes > 1 when run as root, off otherwise (the agents then share the host's network)")
    up.add_argument("--pod-network", choices=("user", "cni"), default="user",
                    help="the node agents' pod network (see `virtplane node --pod-network`); cni needs root, and "
                         "with several nodes --node-netns (each node's pod bridge and subnet live in its netns; "
                         "nodes route to each other's pod subnets)")
    up.add_argument("--demo", action="store_true", help="also create a demo VirtualMachine")
    up.add_argument("--registry-port", type=int, default=5000,
                    help="port of the cluster's image registry on 127.0.0.1 (0: none)")
    api = sub.add_parser("apiserver", help="run the API server alone (scale-out)")
    add_server_flags(api)
    ctl = sub.add_parser("controller", help="run the controllers against an API server")
    ctl.add_argument("--kubeconfig", default=None)
    ctl.add_argument("--storage-root", type=Path, default=None,
                     help="where the built-in provisioners keep volumes (default DATA_DIR/storage)")
    ctl.add_argument("--log-level", default="info")
    add_node_parser(sub)
    join.add_token_parser(sub)
    users.add_user_parser(sub)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.command == "up":
            return asyncio.run(_with_diagnostics(run_apiserver(args, with_controllers=True)))
        if args.command == "apiserver":
            return asyncio.run(_with_diagnostics(run_apiserver(args, with_controllers=False)))
        if args.command == "controller":
            return asyncio.run(_with_diagnostics(run_controller(args)))
        if args.command == "node":
            return asyncio.run(_with_diagnostics(run_node(args)))
        if args.command == "token":
            return asyncio.run(join.token_create(args))
        if args.command == "user":
            return asyncio.run(users.user_add(args))
    except KeyboardInterrupt:
        return 130
    except join.JoinError as exc:
        print(f"virtplane: cannot join: {exc}", file=sys.stderr)
        return 1
    except rest.APIError as exc:
        print(f"virtplane: error: {exc}", file=sys.stderr)
        return 1
    except (StoreError, OSError) as exc:
        # one clear line for the operator (a locked state file, a port in use), not a traceback
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        print(f"virtplane: error: {exc}{cause}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
