"""Storage benchmarks: HTTP import vs local qemu-img convert, copy-on-write clone time, host-assisted clone vs cp.

    .venv/bin/python bench/storage.py [--size-mib 200] [--repeat 5]

1. A ~200 MiB qcow2 (tiny.qcow2 plus random data written with qemu-io, re-packed by qemu-img convert) is
   served by an aiohttp server on 127.0.0.1 in its own process (sendfile, Range support). Timed, same run,
   best and median of N, the reference and the importer alternating (a shared machine's load drifts), each
   to a fresh target file: `qemu-img convert -O raw` from the local file (the reference); our importer
   (`storage.importer.import_http`: parallel ranged GETs) and the same streaming over one connection (what a
   server without Range support gets); qemu-img convert reading the URL itself (curl driver, 64 MiB
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
import time
from collections.abc import Callable
from pathlib import Path

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


def alternating(fns: list[Callable[[], None]], repeat: int, before: Callable[[], None]) -> list[tuple[float, float]]:
    """best/median of each of `fns`, run in turn `repeat` times."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            before()
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [(min(ts), statistics.median(ts)) for ts in times]


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


SERVER = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/", sys.argv[1])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
"""


def serve(root: Path) -> tuple[str, Callable[[], None]]:
    """An aiohttp static server (sendfile, Range) in its own process, as any real server is: in a thread of
    the benchmark it would compete with the importer's threads for the GIL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(port)])
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the benchmark's HTTP server did not start") from None
            time.sleep(0.05)

    def stop() -> None:
        proc.terminate()
        proc.wait(10)
    return f"http://127.0.0.1:{port}", stop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vp-bench-storage-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    results: dict[str, object] = {"loadavg_start": os.getloadavg()}
    try:
        image = make_image(work, args.size_mib)
        results["image_bytes"] = image.stat().st_size
        base, stop = serve(work)
        url = f"{base}/{image.name}"
        out = work / "out.raw"

        def fresh() -> None:
            out.unlink(missing_ok=True)
            (work / ".scratch").unlink(missing_ok=True)

        def import_http(parallel: bool) -> None:
            saved = importer.PARALLEL_MIN_SIZE
            importer.PARALLEL_MIN_SIZE = saved if parallel else 1 << 62
            try:
                asyncio.run(importer.import_http(importer.HTTPOptions(url), out, work, 1 << 30))
            finally:
                importer.PARALLEL_MIN_SIZE = saved

        local, ours, one_connection = alternating([
            lambda: sh("qemu-img", "convert", "-O", "raw", str(image), str(out)),
            lambda: import_http(True), lambda: import_http(False)],
            args.repeat, fresh)
        sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(out), str(image))
        curl_json = json.dumps({"file.driver": "http", "file.url": url, "file.readahead": 64 << 20})
        qemu_http: object
        try:
            qemu_http = best(lambda: sh("qemu-img", "convert", "-O", "raw", f"json:{curl_json}", str(out)),
                             max(1, args.repeat // 2), fresh)
        except subprocess.CalledProcessError:
            qemu_http = "unavailable: qemu-img has no http driver here (Debian's qemu-block-extra)"
        scratch = work / "scratch.qcow2"

        def download_then_convert() -> None:
            sh("curl", "-s", "-o", str(scratch), url)
            sh("qemu-img", "convert", "-O", "raw", str(scratch), str(out))
            scratch.unlink()
        two_step = best(download_then_convert, args.repeat, fresh)
        stop()
        results["import"] = {
            "local_qemu_img_convert_s": local, "importer_s": ours, "importer_one_connection_s": one_connection,
            "parallel_connections": importer.PARALLEL_CONNECTIONS, "qemu_img_from_url_s": qemu_http,
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
    results["loadavg_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
