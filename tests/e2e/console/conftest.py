"""A console test stack without the node agent: real QEMU (TCG, the tiny guest) started through the hypervisor
layer, the node-side routes (`add_console_routes`) on a TLS aiohttp app pinned by fingerprint like a node
agent, and an in-process API server that holds a Node and a Running VMI pointing at it. virtctl runs as a
real subprocess against the API server, so every hop (virtctl → API server → "node" → QEMU) is the real one.

Everything shares one event loop per test module; blocking client calls (pexpect, urllib, subprocess) run in
threads so the servers keep serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import hashlib
import ipaddress
import os
import shutil
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from virtplane.apiserver import auth, kubevirt, objects, server
from virtplane.console import LocatedVMI, add_console_routes
from virtplane.hypervisor.cloudinit import build_for_volume
from virtplane.hypervisor.machine import Machine
from virtplane.hypervisor.runtime import NetworkAttachment, ResolvedVolume, RuntimeDir
from virtplane.store import open_store

REPO = Path(__file__).resolve().parents[3]
IMAGES = REPO / "images" / "out"
NAMESPACE = "default"
VMI_NAME = "cons"
NODE_NAME = "node-cons"
HOSTNAME = "cons-e2e"
HTTP_PAGE = "virtplane-pf-ok"


@dataclasses.dataclass
class Stack:
    api: server.APIServer
    api_url: str
    kubeconfig: Path
    token: str
    machine: Machine
    runtime: RuntimeDir
    ssh_key: Path
    workdir: Path

    def virtctl_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "virtplane.cli.virtctl", "--kubeconfig", str(self.kubeconfig), *args]

    async def virtctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:  # noqa: ASYNC109
        argv = self.virtctl_argv(*args)
        return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=timeout,
                                       cwd=REPO, check=False)

    async def put_object(self, group: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create an object as a component would (status included), bypassing controllers we do not run."""
        res = self.api.registry.lookup(group, "v1", plural)
        assert res is not None
        status = body.pop("status", None)
        ns = body["metadata"].get("namespace")
        opts = objects.WriteOptions(field_manager="e2e", privileged=True, field_validation="Ignore")
        created = (await self.api.objects.create(res, ns, body, opts)).obj
        if status is not None:
            def set_status(o: dict[str, Any]) -> dict[str, Any]:
                o["status"] = status
                return o

            created = await self.api.objects.guaranteed_update(
                res, ns, body["metadata"]["name"], set_status,
                subresource="status" if res.status_subresource else "") or created
        return created


def self_signed(workdir: Path) -> tuple[ssl.SSLContext, str]:
    """A serving certificate for 127.0.0.1 and the hex SHA-256 of its DER form (what the API server pins)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "virtplane-e2e-node")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / "node.crt", workdir / "node.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def prepare_files(work: Path) -> tuple[Path, str, Path]:
    """An SSH key pair and a qcow2 overlay on a private copy of the tiny image (a concurrent `make images`
    must not change the backing file under the running guest)."""
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "virtplane-e2e", "-f", str(key)], check=True)
    base = work / "tiny.qcow2"
    shutil.copyfile(IMAGES / "tiny.qcow2", base)
    root = work / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(root)],
                   check=True)
    return key, (work / "id_ed25519.pub").read_text().strip(), root


def vmi_spec(pub_key: str) -> dict[str, Any]:
    user_data = (
        "#cloud-config\n"
        f"hostname: {HOSTNAME}\n"
        "ssh_authorized_keys:\n"
        f"  - {pub_key}\n"
        "bootcmd:\n"
        "  - mkdir -p /srv/www\n"
        f"  - echo {HTTP_PAGE} > /srv/www/index.html\n"
        "  - httpd -p 8080 -h /srv/www\n"
    )
    return {
        "domain": {"resources": {"requests": {"memory": "256Mi"}},
                   "devices": {"disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}},
                                         {"name": "cloudinitdisk", "disk": {"bus": "virtio"}}],
                               "interfaces": [{"name": "default", "masquerade": {}}]}},
        "networks": [{"name": "default", "pod": {}}],
        "volumes": [{"name": "containerdisk", "containerDisk": {"image": "tiny"}},
                    {"name": "cloudinitdisk", "cloudInitNoCloud": {"userData": user_data}}],
    }


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    if not (IMAGES / "tiny.qcow2").exists():
        pytest.skip(f"guest images missing in {IMAGES} (run `make images`)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    work = tmp_path_factory.mktemp("console")
    key, pub, root = prepare_files(work)

    # QEMU through the hypervisor layer, as the node agent would start it.
    uid = str(uuid.uuid4())
    spec = vmi_spec(pub)
    vmi = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
           "metadata": {"name": VMI_NAME, "namespace": NAMESPACE, "uid": uid}, "spec": spec}
    rt = RuntimeDir(work / "rt")
    rt.create()
    cidata = await build_for_volume(vmi, "cloudinitdisk", work / "cidata.iso")
    machine = Machine.create(vmi, rt, {"containerdisk": ResolvedVolume(root, "qcow2"), "cloudinitdisk": cidata},
                             {"default": NetworkAttachment.user()}, "tcg")
    await machine.start()

    # The API server, in process (no controllers: nothing fights the objects we write).
    data = work / "api"
    data.mkdir()
    token = auth.ensure_admin_token(data / "tokens.csv")
    api = server.APIServer(open_store(f"sqlite://{data / 'state.db'}"),
                           server.ServerConfig(host="127.0.0.1", port=0, token_file=data / "tokens.csv"))
    await api.start()
    api_url = f"http://127.0.0.1:{api.bound_port}"
    kubeconfig = work / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
        "clusters": [{"name": "e2e", "cluster": {"server": api_url}}],
        "users": [{"name": "e2e", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e", "namespace": NAMESPACE}}],
    }))
    secret_res = api.registry.lookup("", "v1", "secrets")
    assert secret_res is not None
    secret = await api.objects.get(secret_res, *kubevirt.PROXY_SECRET)
    proxy_token = base64.b64decode(secret["data"]["token"]).decode()

    # The "node agent": only the console routes, with the real authorize/locate contract.
    async def authorize(request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {proxy_token}":
            raise web.HTTPUnauthorized(text="invalid proxy token")

    async def qmp(command: str, arguments: Any) -> Any:
        return await machine.monitor_command(command, arguments)  # the Machine's monitor connection

    async def locate(namespace: str, name: str) -> LocatedVMI | None:
        if (namespace, name) != (NAMESPACE, VMI_NAME) or not machine.state.alive:
            return None
        return LocatedVMI.from_runtime_dir(namespace, name, rt.path, uid=uid, qmp=qmp, user_netdev="netdev-default")

    app = web.Application()
    add_console_routes(app, locate, authorize)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tls, fingerprint = self_signed(work)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    node_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    st = Stack(api=api, api_url=api_url, kubeconfig=kubeconfig, token=token, machine=machine, runtime=rt,
               ssh_key=key, workdir=work)
    await st.put_object("", "nodes", {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE_NAME, "annotations": {kubevirt.AGENT_FINGERPRINT_ANNOTATION: fingerprint}},
        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                   "daemonEndpoints": {"kubeletEndpoint": {"Port": node_port}}},
    })
    await st.put_object("kubevirt.io", "virtualmachines", {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": VMI_NAME, "namespace": NAMESPACE},
        "spec": {"runStrategy": "Always", "template": {"metadata": {"labels": {"app": "cons"}}, "spec": spec}},
    })
    await st.put_object("kubevirt.io", "virtualmachineinstances", {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": VMI_NAME, "namespace": NAMESPACE, "labels": {"app": "cons"}}, "spec": spec,
        "status": {"phase": "Running", "nodeName": NODE_NAME},
    })
    # Wait for the guest to be reachable the way users will use it.
    log = rt.console_log
    for _ in range(240):
        text = log.read_bytes() if log.exists() else b""
        if b"login:" in text and b"virtplane-guest: ready" in text:
            break
        await asyncio.sleep(0.5)
    else:
        pytest.fail(f"guest did not come up; console tail:\n{log.read_text(errors='replace')[-2000:]}")
    try:
        yield st
    finally:
        await runner.cleanup()
        await api.stop()
        if machine.state.alive:
            try:
                await machine.kill()  # SIGKILL to this QEMU's pid, reaped by the Machine
            except Exception:
                if machine.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(machine.pid, signal.SIGKILL)  # by pid, never by name
        await machine.detach()
