"""A stand-in node agent that starts a VM and exits, leaving QEMU running without its parent.

    python -m tests.e2e.hypervisor.agent_once CONFIG.json

CONFIG: {"vmi": ..., "runtime": dir, "kernel": path, "initrd": path, "wait_for": regex}. Prints the QEMU pid
once `wait_for` appeared in console.log. The next "agent" (the test) must adopt the orphaned QEMU.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path

from virtplane.hypervisor import KernelBootFiles, Machine, NetworkAttachment, RuntimeDir


async def main(config: dict) -> None:
    rt = RuntimeDir(Path(config["runtime"]))
    files = KernelBootFiles(Path(config["kernel"]), Path(config["initrd"]))
    m = Machine.create(config["vmi"], rt, {}, {"default": NetworkAttachment.user()}, "tcg", kernel_boot=files)
    await m.start()
    pattern = re.compile(config["wait_for"])
    deadline = time.monotonic() + 60
    while not (rt.console_log.exists() and pattern.search(rt.console_log.read_text(errors="replace"))):
        if time.monotonic() > deadline:
            raise SystemExit("guest did not boot")
        await asyncio.sleep(0.05)
    print(m.pid, flush=True)
    await m.detach()  # exit without touching QEMU, like an agent that is restarted


if __name__ == "__main__":
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
