"""Live migration: virtplane (VMIM created → Succeeded) against a raw QEMU-to-QEMU migration started by hand
between the same two network namespaces, same guest, same run.

    .venv/bin/python bench/migration.py [--runs 3]

One `virtplane up --nodes 2 --node-netns` and a docker-registry on the host's bridge address holding the tiny
containerDisk; one 128Mi VM (idle guest: its tick loop only).
- platform: POST a VirtualMachineInstanceMigration, poll its phase every 20 ms until Succeeded (the VM goes back
  and forth between the two nodes); QEMU's own total time and downtime come from the source agent's
  `MigrationCompleted` event. TLS (TLS-PSK) as by default.
- raw: the platform VM's exact argv (cmdline.json; runtime dir rewritten, fresh overlays), a source QEMU in node
  1's netns booted to `virtplane-guest: booted`, a target with `-incoming defer` in node 2's netns; by QMP:
  `migrate-incoming tcp:<node 2>:0`, then `migrate` on the source, clock from `migrate` to `completed`; with the
  same TLS-PSK credentials and, for reference, plain TCP; the same migration parameters as the platform sets
  (downtime-limit 50 ms, max-bandwidth unlimited).
Targets: platform end to end ≤ raw + 1 s; downtime ≤ 50 ms for an idle guest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.vm_start import BareTemplate, bare_start, wait_line_in_file
from virtplane.client import rest
from virtplane.hypervisor.qmp import QMP
from virtplane.node.migration import START_DOWNTIME_MS, UNLIMITED_BANDWIDTH
from virtplane.testing import guest
from virtplane.testing.cluster import Cluster

VMIS = rest.GVR("kubevirt.io", "v1", "virtualmachineinstances")
VMIMS = rest.GVR("kubevirt.io", "v1", "virtualmachineinstancemigrations")
EVENTS = rest.GVR("", "v1", "events")
NS = "default"
FIGURES = re.compile(r"total-time (\d+) ms, downtime (\d+) ms")


def vmi(name: str, image: str) -> dict[str, Any]:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": {"name": name},
            "spec": {"domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                                "resources": {"requests": {"memory": "128Mi"}}},
                     "volumes": [{"name": "root", "containerDisk": {"image": image}}]}}  # fmt: skip


async def wait(client: rest.Client, gvr: rest.GVR, name: str, pred: Any, timeout: float = 300,  # noqa: ASYNC109
               interval: float = 0.02) -> dict[str, Any]:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            obj = await client.get(gvr, name, NS)
            if pred(obj):
                return obj
        except rest.NotFound:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: condition not met in {timeout}s")
        await asyncio.sleep(interval)


async def platform_run(client: rest.Client, i: int) -> tuple[float, int, int]:
    name = f"bench-mig-{i}"
    body = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": name}, "spec": {"vmiName": "bench"}}  # fmt: skip
    t0 = time.monotonic()
    seen: dict[str, float] = {}  # phase -> when this poll first saw it (s after the create)

    def finished(o: dict[str, Any]) -> bool:
        ph = (o.get("status") or {}).get("phase") or "(none)"
        seen.setdefault(ph, time.monotonic() - t0)
        return ph in ("Succeeded", "Failed")

    await client.create(VMIMS, body, NS)
    done = await wait(client, VMIMS, name, finished)
    elapsed = time.monotonic() - t0
    print("  phases first seen (s): " + ", ".join(f"{k} {v:.2f}" for k, v in seen.items()), flush=True)
    if done["status"]["phase"] != "Succeeded":
        raise RuntimeError(f"migration failed: {done['status']}")
    # QEMU's figures: the source agent's MigrationCompleted event for this VMI (the newest one)
    for _ in range(100):
        evs = [e for e in (await client.list(EVENTS, NS))["items"] if e.get("reason") == "MigrationCompleted"
               and e["involvedObject"].get("name") == "bench"]
        if len(evs) > i:
            m = FIGURES.search(sorted(evs, key=lambda e: e["metadata"]["creationTimestamp"])[-1]["message"])
            if m:
                return elapsed, int(m.group(1)), int(m.group(2))
        await asyncio.sleep(0.1)
    return elapsed, -1, -1


async def raw_run(template: BareTemplate, work: Path, ns_src: str, ns_dst: str, dst_ip: str,
                  psk: str | None) -> tuple[float, int, int]:  # fmt: skip
    """psk: TLS-PSK with this key (as the platform does by default); None: plain TCP."""
    src_dir, dst_dir = work / "src", work / "dst"
    argv_src = await template.prepare(src_dir)
    argv_dst = [*(await template.prepare(dst_dir)), "-incoming", "defer"]
    src = await bare_start(["nsenter", f"--net=/var/run/netns/{ns_src}", *argv_src], src_dir)
    dst_proc = await asyncio.create_subprocess_exec("nsenter", f"--net=/var/run/netns/{ns_dst}", *argv_dst,
                                                    stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
    qs, qd = QMP(src_dir / "qmp.sock"), None
    try:
        await wait_line_in_file(src_dir / "console.log", b"virtplane-guest: booted", 300)
        qd = QMP(dst_dir / "qmp.sock")
        await qs.connect(30)
        await qd.connect(30)
        for q, endpoint in ((qs, "client"), (qd, "server")):
            await q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            if psk is not None:
                d = work / f"psk-{endpoint}"
                d.mkdir()
                (d / "keys.psk").write_text(f"virtplane:{psk}\n")
                obj = {"qom-type": "tls-creds-psk", "id": "tls0", "endpoint": endpoint, "dir": str(d)}
                if endpoint == "client":
                    obj["username"] = "virtplane"
                await q.execute("object-add", obj)
                await q.execute("migrate-set-parameters", {"tls-creds": "tls0"})
        # the parameters the platform's source agent sets: its downtime limit, no bandwidth cap (libvirt's
        # "unlimited"; QEMU's own default caps at 128 MiB/s)
        await qs.execute("migrate-set-parameters", {"downtime-limit": START_DOWNTIME_MS,
                                                    "max-bandwidth": UNLIMITED_BANDWIDTH})  # fmt: skip
        await qd.execute("migrate-incoming", {"uri": f"tcp:{dst_ip}:0"})
        port = (await qd.execute("query-migrate"))["socket-address"][0]["port"]
        t0 = time.monotonic()
        await qs.execute("migrate", {"uri": f"tcp:{dst_ip}:{port}"})
        while True:
            info = await qs.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - t0
        while info["status"] == "completed" and not info.get("total-time"):
            await asyncio.sleep(0.01)  # QEMU sets "completed" a moment before it fills in its figures
            info = await qs.execute("query-migrate")
        if info["status"] != "completed":
            raise RuntimeError(f"raw migration {info['status']}: {info.get('error-desc')}")
        return elapsed, int(info.get("total-time", -1)), int(info.get("downtime", -1))
    finally:
        for q in (qs, qd):
            if q is not None:
                await q.close()
        await src.stop()
        dst_proc.kill()
        await dst_proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def mmm(xs: list[float]) -> str:
    return f"min {min(xs):.3f} median {statistics.median(xs):.3f} max {max(xs):.3f}"


async def measure(cluster: Cluster, image: str, runs: int, short: Path) -> tuple[list[Any], list[Any], list[Any]]:
    net = cluster.node_network()
    plat: list[Any] = []
    raw_tls: list[Any] = []
    raw_plain: list[Any] = []
    async with rest.Client(rest.ClientConfig.from_kubeconfig(cluster.kubeconfig)) as client:
        await client.create(VMIS, vmi("bench", image), NS)
        v = await wait(client, VMIS, "bench", lambda o: (o.get("status") or {}).get("phase") == "Running",
                       interval=0.2)  # fmt: skip
        rdir = cluster.data_dir / "nodes" / v["status"]["nodeName"] / "runtime" / f"{NS}_bench"
        await wait_line_in_file(rdir / "guest.log", b"virtplane-guest: tick 3 ", 300)
        template = BareTemplate.capture(rdir, short / "template")
        psk = secrets.token_hex(32)
        items = (await client.list(rest.GVR("", "v1", "nodes", namespaced=False)))["items"]
        nodes = sorted(n["metadata"]["name"] for n in items)
        addr = {n["metadata"]["name"]: n["status"]["addresses"][0]["address"] for n in items}
        ns_of = {n: f"virtplane-{net['tag']}-node-{n.rsplit('-', 1)[1]}" for n in nodes}
        for i in range(runs):
            plat.append(await platform_run(client, i))
            print(f"platform run {i}: {plat[-1][0]:.3f} s (QEMU total {plat[-1][1]} ms, downtime {plat[-1][2]} ms)",
                  flush=True)
            for tls, out in ((True, raw_tls), (False, raw_plain)):
                out.append(await raw_run(template, short / f"raw{i}{tls}", ns_of[nodes[0]], ns_of[nodes[1]],
                                         addr[nodes[1]], psk if tls else None))  # fmt: skip
                print(f"raw ({'TLS-PSK' if tls else 'plain'}) run {i}: {out[-1][0]:.3f} s (QEMU total "
                      f"{out[-1][1]} ms, downtime {out[-1][2]} ms)", flush=True)
    return plat, raw_tls, raw_plain


def report(plat: list[Any], raw_tls: list[Any], raw_plain: list[Any]) -> None:
    print(f"\nplatform VMIM created → Succeeded (s): {mmm([p[0] for p in plat])}")
    print(f"platform QEMU total-time (ms):         {mmm([p[1] for p in plat])}")
    print(f"platform QEMU downtime (ms):           {mmm([p[2] for p in plat])}")
    for label, xs in (("raw TLS-PSK", raw_tls), ("raw plain TCP", raw_plain)):
        print(f"{label} migrate → completed (s):  {mmm([x[0] for x in xs])}")
        print(f"{label} QEMU total-time (ms):     {mmm([x[1] for x in xs])}")
        print(f"{label} QEMU downtime (ms):       {mmm([x[2] for x in xs])}")
    gap = statistics.median([p[0] for p in plat]) - statistics.median([x[0] for x in raw_tls])
    print(f"\nend to end minus raw (TLS, medians): {gap:+.3f} s (target ≤ +1 s)")
    print(json.dumps({"platform": plat, "raw_tls": raw_tls, "raw_plain": raw_plain}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--trace", action="store_true", help="agents at log level info; print their migration lines")
    args = p.parse_args()
    short = Path(tempfile.mkdtemp(prefix="vpb-", dir="/tmp"))  # short: unix socket paths in runtime dirs
    cluster = Cluster(short / "c", nodes=2, extra_args=("--log-level", "info" if args.trace else "warning"))
    try:
        cluster.start()
        with guest.registry_with_containerdisk(short / "registry", host=cluster.node_network()["gateway"]) as (
                _reg, image):
            results = asyncio.run(measure(cluster, image, args.runs, short))
    finally:
        cluster.stop()
        if args.trace:
            logs = [cluster.log_path, *sorted((cluster.data_dir / "nodes").glob("*/agent.log"))]
            lines = [ln for log in logs for ln in log.read_text(errors="replace").splitlines()
                     if "migrat" in ln.lower()]
            print("\n".join(sorted(lines)))
        shutil.rmtree(short, ignore_errors=True)
    report(*results)


if __name__ == "__main__":
    main()
