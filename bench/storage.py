"""Storage benchmarks: HTTP import vs local qemu-img convert, copy-on-write clone time, host-assisted clone vs cp.

    .venv/bin/python bench/storage.py [--size-mib 200] [--repeat 5]

1. A ~200 MiB qcow2 (tiny.qcow2 plus random data written with qemu-io, re-packed by qemu-img convert) is
   served by an aiohttp server on 127.0.0.1 (sendfile, Range support). Timed, same run, best of N, each to a
   fresh target file: `qemu-img convert -O raw` from the local file (the reference); our streaming importer
   (`storage.importer.import_http`); qemu-img convert reading the URL itself (curl driver, 64 MiB
   readahead); download to a scratch file + local qemu-img convert. Target: importer <= 1.2x local.
2. Copy-on-write clone (`storage.provisioner.cow_clone`) of a raw volume with 1 GiB and 10 GiB virtual
   size (sparse, ~200 MiB of data). Target <= 0.2 s.
3. Host-assisted clone (`qemu-img convert`, what a fallback clone runs) vs `cp --sparse=always` of the same
   volume.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from virtplane.storage import importer, provisioner  # noqa: E402

TINY = REPO / "images" / "out" / "tiny.qcow2"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def best(fn: Callable[[], None], repeat: int, before: Callable[[], None] | None = None) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        if before:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def make_image(work: Path, data_mib: int) -> Path:
    overlay = work / "overlay.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-b", str(TINY), "-F", "qcow2", str(overlay), "1G")
    rnd = work / "random.bin"
    with open(rnd, "wb") as f:
        f.write(os.urandom((data_mib - 20) << 20))
    sh("qemu-io", "-f", "qcow2", "-c", f"write -s {rnd} 256M {(data_mib - 20)}M", str(overlay))
    image = work / "bench.qcow2"
    sh("qemu-img", "convert", "-O", "qcow2", str(overlay), str(image))
    overlay.unlink()
    rnd.unlink()
    return image


def serve(root: Path) -> tuple[str, Callable[[], None]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_static("/", root)
    runner = web.AppRunner(app, access_log=None)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.5)

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
    return f"http://127.0.0.1:{port}", stop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vp-bench-storage-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    results: dict[str, object] = {}
    try:
        image = make_image(work, args.size_mib)
        results["image_bytes"] = image.stat().st_size
        base, stop = serve(work)
        url = f"{base}/{image.name}"
        out = work / "out.raw"

        def fresh() -> None:
            out.unlink(missing_ok=True)
            (work / ".scratch").unlink(missing_ok=True)

        local = best(lambda: sh("qemu-img", "convert", "-O", "raw", str(image), str(out)), args.repeat, fresh)
        ours = best(lambda: asyncio.run(importer.import_http(importer.HTTPOptions(url), out, work, 1 << 30)),
                    args.repeat, fresh)
        sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(out), str(image))
        curl_json = json.dumps({"file.driver": "http", "file.url": url, "file.readahead": 64 << 20})
        qemu_http = best(lambda: sh("qemu-img", "convert", "-O", "raw", f"json:{curl_json}", str(out)),
                         max(1, args.repeat // 2), fresh)
        scratch = work / "scratch.qcow2"

        def download_then_convert() -> None:
            sh("curl", "-s", "-o", str(scratch), url)
            sh("qemu-img", "convert", "-O", "raw", str(scratch), str(out))
            scratch.unlink()
        two_step = best(download_then_convert, args.repeat, fresh)
        stop()
        results["import"] = {
            "local_qemu_img_convert_s": local, "streaming_importer_s": ours, "qemu_img_from_url_s": qemu_http,
            "download_then_convert_s": two_step, "ratio_best": round(ours[0] / local[0], 2),
            "ratio_median": round(ours[1] / local[1], 2),
        }
        # clones
        root = provisioner.StorageRoot(work / "storage")
        clones: dict[str, object] = {}
        for gib in (1, 10):
            src = root.volume("shared", None, f"src-{gib}", "Filesystem")
            provisioner.prepare(src)
            sh("qemu-img", "convert", "-O", "raw", str(image), str(src.raw_disk))
            os.truncate(src.raw_disk, gib << 30)
            if gib == 1:
                dst = work / "copy.raw"

                def convert_copy(src: provisioner.Volume = src, dst: Path = dst) -> None:
                    dst.unlink(missing_ok=True)
                    path, fmt = src.disk()
                    asyncio.run(importer.convert(path, fmt, dst))

                def cp_copy(src: provisioner.Volume = src, dst: Path = dst) -> None:
                    dst.unlink(missing_ok=True)
                    sh("cp", "--sparse=always", str(src.disk()[0]), str(dst))
                clones["host_assisted_1GiB_s"] = best(convert_copy, args.repeat)
                clones["cp_1GiB_s"] = best(cp_copy, args.repeat)
            times = []
            for i in range(args.repeat):
                dst = root.volume("shared", None, f"clone-{gib}-{i}", "Filesystem")
                t = time.perf_counter()
                asyncio.run(provisioner.cow_clone(src, dst, gib << 30))
                times.append(time.perf_counter() - t)
            clones[f"cow_{gib}GiB_s"] = (min(times), statistics.median(times))
        results["clone"] = clones
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
