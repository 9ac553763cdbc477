"""Small pieces of RFB (VNC) and image handling the VNC routes need.

QEMU runs `-vnc unix:...,share=allow-exclusive`: several viewers may be connected at once, but a viewer whose
ClientInit asks for exclusive access (shared-flag 0) disconnects the others. Several common viewers send 0
by default (virtctl itself starts RealVNC with -Shared=0, and TigerVNC defaults to exclusive), which is how
KubeVirt users get kicked out (kubevirt#7041). `SharedFlagRewriter` follows the client's half of the
handshake and sets the ClientInit shared-flag to 1, so every viewer shares the screen.
"""

from __future__ import annotations

import struct
import zlib


class SharedFlagRewriter:
    """Rewrites the client→server byte stream of one RFB connection so its ClientInit says "shared".

    Client bytes before ClientInit: the 12-byte ProtocolVersion, then (RFB 3.7 and 3.8) one byte choosing
    the security type. With security type None (what QEMU offers on its unix socket) nothing else comes
    before ClientInit, whose single byte is the shared-flag. For any other security type the stream is
    passed through untouched (we cannot follow an authentication exchange).
    """

    def __init__(self) -> None:
        self._buf = b""
        self._state = "version"  # version -> security -> init -> done
        self._minor = 8

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> bytes:
        if self._state == "done":
            return data
        self._buf += data
        out = b""
        while self._state != "done":
            if self._state == "version":
                if len(self._buf) < 12:
                    return out
                version, self._buf = self._buf[:12], self._buf[12:]
                out += version
                try:
                    self._minor = int(version[8:11])
                except ValueError:
                    self._minor = 8
                self._state = "security" if self._minor >= 7 else "init"
            elif self._state == "security":
                if not self._buf:
                    return out
                chosen, self._buf = self._buf[:1], self._buf[1:]
                out += chosen
                self._state = "init" if chosen == b"\x01" else "done"
            else:  # init: the ClientInit shared-flag
                if not self._buf:
                    return out
                self._buf = b"\x01" + self._buf[1:]
                self._state = "done"
        out += self._buf
        self._buf = b""
        return out


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG; ValueError when `data` is not one."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def ppm_to_png(ppm: bytes) -> bytes:
    """Binary PPM (P6, maxval 255: what QEMU's screendump writes by default) to an RGB PNG.

    Only used when QEMU cannot write PNG itself (built without libpng); stdlib only.
    """
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while pos < len(ppm) and ppm[pos:pos + 1].isspace():
            pos += 1
        if ppm[pos:pos + 1] == b"#":
            pos = ppm.index(b"\n", pos) + 1
            continue
        end = pos
        while end < len(ppm) and not ppm[end:end + 1].isspace():
            end += 1
        if end == pos:
            raise ValueError("truncated PPM header")
        fields.append(ppm[pos:end])
        pos = end
    magic, width_s, height_s, maxval_s = fields
    if magic != b"P6" or int(maxval_s) != 255:
        raise ValueError("only binary 8-bit PPM (P6, maxval 255) is supported")
    width, height = int(width_s), int(height_s)
    pixels = ppm[pos + 1:]
    stride = width * 3
    if len(pixels) < stride * height:
        raise ValueError("truncated PPM pixel data")
    raw = b"".join(b"\x00" + pixels[y * stride:(y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw, 6))
            + _png_chunk(b"IEND", b""))
