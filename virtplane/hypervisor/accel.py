"""Decide between KVM and TCG by running a guest, not by looking at /dev/kvm.

/dev/kvm can exist while KVM is unusable: nested virtualisation that emulates every instruction (guests
"hang" for minutes in the kernel decompressor), a host CPU model QEMU cannot program (`failed to set MSR`),
missing permissions. So the probe boots a tiny firmware image we generate here under `-accel kvm` with the
CPU model VMs would get under KVM (`host`), and requires it to get through real mode → protected mode →
long mode with paging and to finish a compute loop within the timeout. A working KVM does this in a few
tens of milliseconds; the loop is long enough (tens of millions of iterations) that an emulating "KVM"
cannot finish it in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import struct
import tempfile
import time
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"

# What the probe firmware writes to COM1, one letter per stage: Real mode, Protected mode, Long mode,
# and K once the compute loop finished. Then it writes _EXIT_VALUE to isa-debug-exit, which makes QEMU exit
# with status (value << 1) | 1.
_STAGES = b"RPLK"
_EXIT_VALUE = 0x2A
_EXIT_STATUS = (_EXIT_VALUE << 1) | 1
_DEBUG_EXIT_PORT = 0xF4
_LOOP_ITERATIONS = 30_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class AccelProbe:
    kvm_usable: bool
    reason: str
    elapsed: float = 0.0

    @property
    def accel(self) -> str:
        return "kvm" if self.kvm_usable else "tcg"


class _Asm:
    """Just enough of an x86 encoder for the probe: raw bytes plus label fix-ups."""

    def __init__(self, base: int) -> None:
        self.base = base  # physical address of byte 0
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str, str]] = []  # (offset, label, kind)

    def emit(self, *data: int | bytes) -> None:
        for d in data:
            if isinstance(d, bytes):
                self.code += d
            else:
                self.code.append(d)

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def abs32(self, name: str) -> None:
        """A 32-bit absolute physical address of a label."""
        self.fixups.append((len(self.code), name, "abs32"))
        self.code += b"\0\0\0\0"

    def off16(self, name: str) -> None:
        """A 16-bit offset of a label relative to the segment base (= self.base in real mode)."""
        self.fixups.append((len(self.code), name, "off16"))
        self.code += b"\0\0"

    def rel8(self, name: str) -> None:
        self.fixups.append((len(self.code), name, "rel8"))
        self.code += b"\0"

    def link(self) -> bytes:
        for off, name, kind in self.fixups:
            target = self.labels[name]
            if kind == "abs32":
                struct.pack_into("<I", self.code, off, self.base + target)
            elif kind == "off16":
                struct.pack_into("<H", self.code, off, target)
            else:
                rel = target - (off + 1)
                if not -128 <= rel <= 127:
                    raise ValueError(f"rel8 out of range to {name}")
                struct.pack_into("<b", self.code, off, rel)
        return bytes(self.code)


def build_probe_firmware(loop_iterations: int = _LOOP_ITERATIONS) -> bytes:
    """A 64 KiB `-bios` image. The CPU starts at F000:FFF0 (the image's last 16 bytes) in real mode."""
    base = 0xF0000  # where the last 64 KiB of the BIOS image are visible below 1 MiB
    a = _Asm(base)
    serial = (0xBA, 0xF8, 0x03)  # mov dx, 0x3f8 (COM1 data register)

    # --- 16-bit real mode ---
    a.emit(0xFA)  # cli
    a.emit(*serial)
    a.emit(0xB0, _STAGES[0], 0xEE)  # mov al, 'R'; out dx, al
    a.emit(0x2E, 0x66, 0x0F, 0x01, 0x16)  # lgdtl cs:[gdt_desc]
    a.off16("gdt_desc")
    a.emit(0x0F, 0x20, 0xC0)  # mov eax, cr0
    a.emit(0x66, 0x83, 0xC8, 0x01)  # or eax, 1 (PE)
    a.emit(0x0F, 0x22, 0xC0)  # mov cr0, eax
    a.emit(0x66, 0xEA)  # ljmpl 0x08:pm32
    a.abs32("pm32")
    a.emit(0x08, 0x00)

    # --- 32-bit protected mode, flat segments ---
    a.label("pm32")
    a.emit(0x66, 0xB8, 0x10, 0x00)  # mov ax, 0x10
    a.emit(0x8E, 0xD8, 0x8E, 0xC0, 0x8E, 0xD0)  # mov ds/es/ss, ax
    a.emit(0xBC, 0x00, 0x70, 0x00, 0x00)  # mov esp, 0x7000
    a.emit(0xB0, _STAGES[1], 0xEE)  # 'P'
    # Identity-map the first 2 MiB with one 2 MiB page: PML4 @0x1000 → PDPT @0x2000 → PD @0x3000.
    a.emit(0xBF, 0x00, 0x10, 0x00, 0x00)  # mov edi, 0x1000
    a.emit(0x31, 0xC0)  # xor eax, eax
    a.emit(0xB9, 0x00, 0x0C, 0x00, 0x00)  # mov ecx, 3072 dwords
    a.emit(0xF3, 0xAB)  # rep stosd
    a.emit(0xC7, 0x05, struct.pack("<II", 0x1000, 0x2003))  # PML4[0] = PDPT | P | RW
    a.emit(0xC7, 0x05, struct.pack("<II", 0x2000, 0x3003))  # PDPT[0] = PD | P | RW
    a.emit(0xC7, 0x05, struct.pack("<II", 0x3000, 0x0083))  # PD[0] = 0 | P | RW | PS
    a.emit(0x0F, 0x20, 0xE0, 0x83, 0xC8, 0x20, 0x0F, 0x22, 0xE0)  # cr4 |= PAE
    a.emit(0xB8, 0x00, 0x10, 0x00, 0x00, 0x0F, 0x22, 0xD8)  # cr3 = 0x1000
    a.emit(0xB9, struct.pack("<I", 0xC0000080))  # mov ecx, IA32_EFER
    a.emit(0x0F, 0x32)  # rdmsr
    a.emit(0x0D, struct.pack("<I", 0x100))  # or eax, LME
    a.emit(0x0F, 0x30)  # wrmsr
    a.emit(0x0F, 0x20, 0xC0, 0x0D, struct.pack("<I", 0x80000000), 0x0F, 0x22, 0xC0)  # cr0 |= PG
    a.emit(0xEA)  # ljmp 0x18:lm64
    a.abs32("lm64")
    a.emit(0x18, 0x00)

    # --- 64-bit long mode ---
    a.label("lm64")
    a.emit(0x66, 0xBA, 0xF8, 0x03)  # mov dx, 0x3f8
    a.emit(0xB0, _STAGES[2], 0xEE)  # 'L'
    a.emit(0xB9, struct.pack("<I", loop_iterations))  # mov ecx, N
    a.label("loop")
    a.emit(0x48, 0x01, 0xCB)  # add rbx, rcx
    a.emit(0xFF, 0xC9)  # dec ecx
    a.emit(0x75)  # jnz loop
    a.rel8("loop")
    a.emit(0xB0, _STAGES[3], 0xEE)  # 'K'
    a.emit(0xB0, _EXIT_VALUE, 0xE6, _DEBUG_EXIT_PORT)  # out 0xf4, al → QEMU exits
    a.label("halt")
    a.emit(0xF4, 0xEB)  # hlt; jmp halt
    a.rel8("halt")

    # GDT: null, 32-bit code, data, 64-bit code (accessed bits preset: the table lives in ROM).
    while len(a.code) % 8:
        a.emit(0x90)
    a.label("gdt")
    a.emit(struct.pack("<QQQQ", 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF, 0x00AF9B000000FFFF))
    a.label("gdt_desc")
    a.emit(struct.pack("<H", 31))
    a.abs32("gdt")
    code = a.link()

    image = bytearray(b"\xf4" * 0x10000)  # hlt everywhere else
    image[: len(code)] = code
    image[0xFFF0:0xFFF5] = bytes((0xEA, 0x00, 0x00, 0x00, 0xF0))  # reset vector: jmp far F000:0000
    return bytes(image)


def probe_command(firmware: Path, accel: str, cpu_model: str) -> list[str]:
    return [
        QEMU_BINARY,
        "-accel", accel,
        "-machine", "q35",
        "-cpu", cpu_model,
        "-m", "16",
        "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
        "-bios", str(firmware),
        "-serial", "stdio",
        "-device", f"isa-debug-exit,iobase={_DEBUG_EXIT_PORT:#x},iosize=0x04",
    ]  # fmt: skip


async def run_probe(
    accel: str,
    timeout: float,  # noqa: ASYNC109 - the timeout is the probe's verdict, not a cancellation knob
    *,
    cpu_model: str = "host",
    qemu: str = QEMU_BINARY,
) -> AccelProbe:
    """Run the probe firmware under `accel`; `kvm_usable` in the result means "the guest completed"."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="virtplane-accel-") as tmp:
        fw = Path(tmp) / "probe.bin"
        fw.write_bytes(build_probe_firmware())
        cmd = probe_command(fw, accel, cpu_model)
        cmd[0] = qemu
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as err:
            return AccelProbe(False, f"cannot run {qemu}: {err}", time.monotonic() - start)
        out = bytearray()
        err_out = bytearray()

        async def drain(stream: asyncio.StreamReader | None, into: bytearray) -> None:
            while stream is not None and (chunk := await stream.read(4096)):
                into += chunk

        readers = asyncio.gather(drain(proc.stdout, out), drain(proc.stderr, err_out))
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            # Kill exactly the probe's QEMU (by pid; it runs in its own session) and reap it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
            await readers
            return AccelProbe(
                False,
                f"{accel} probe guest did not finish within {timeout:g}s (stages reached: "
                f"{_stages_seen(out) or 'none'}; the guest hangs or is emulated too slowly)",
                time.monotonic() - start,
            )
        await readers
        elapsed = time.monotonic() - start
        stages = _stages_seen(out)
        if proc.returncode == _EXIT_STATUS and stages == _STAGES.decode():
            return AccelProbe(True, f"{accel} probe guest completed in {elapsed * 1000:.0f} ms", elapsed)
        last_err = err_out.decode(errors="replace").strip().splitlines()
        detail = last_err[-1] if last_err else "no stderr"
        return AccelProbe(
            False,
            f"{accel} probe guest failed (exit {proc.returncode}, stages reached: {stages or 'none'}): {detail}",
            elapsed,
        )


def _stages_seen(out: bytes | bytearray) -> str:
    return bytes(b for b in out if b in _STAGES).decode()


def _kvm_device_problem(path: str = "/dev/kvm") -> str | None:
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not accessible (permissions)"
    return None


async def probe_kvm(
    timeout: float = 3.0,  # noqa: ASYNC109 - see run_probe
    *,
    cpu_model: str = "host",
    qemu: str = QEMU_BINARY,
) -> AccelProbe:
    """Is KVM usable for VMs on this host? `kvm_usable=False` means use TCG; `reason` says why.

    A missing /dev/kvm decides alone; an existing one decides nothing until a guest has run on it.
    """
    problem = _kvm_device_problem()
    if problem:
        return AccelProbe(False, f"{problem}; using TCG")
    result = await run_probe("kvm", timeout, cpu_model=cpu_model, qemu=qemu)
    if result.kvm_usable:
        return result
    return dataclasses.replace(result, reason=result.reason + "; using TCG")
