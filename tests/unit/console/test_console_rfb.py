"""RFB ClientInit rewriting and the PPM → PNG fallback."""

from __future__ import annotations

import struct
import zlib

import pytest

from virtplane.console.rfb import SharedFlagRewriter, png_size, ppm_to_png


def feed_all(data: bytes, chunk: int) -> bytes:
    rw = SharedFlagRewriter()
    return b"".join(rw.feed(data[i:i + chunk]) for i in range(0, len(data), chunk))


@pytest.mark.parametrize("chunk", [1, 2, 5, 100])
def test_exclusive_client_init_becomes_shared(chunk: int) -> None:
    stream = b"RFB 003.008\n" + b"\x01" + b"\x00" + b"\x03\x00\x00\x00\x00\x00\x02\xd0\x01\x90"
    out = feed_all(stream, chunk)
    assert out == b"RFB 003.008\n\x01\x01" + stream[14:]  # only the shared-flag changed


def test_rfb_33_has_no_security_choice() -> None:
    out = feed_all(b"RFB 003.003\n\x00rest", 3)
    assert out == b"RFB 003.003\n\x01rest"


def test_other_security_types_pass_untouched() -> None:
    stream = b"RFB 003.008\n\x02" + bytes(16) + b"\x00"  # VNC auth: a challenge response follows, not ClientInit
    assert feed_all(stream, 4) == stream


def test_ppm_to_png() -> None:
    width, height = 3, 2
    pixels = bytes(range(width * height * 3))
    png = ppm_to_png(b"P6\n# QEMU\n3 2\n255\n" + pixels)
    assert png_size(png) == (width, height)
    idat = png[png.index(b"IDAT") + 4:]
    raw = zlib.decompressobj().decompress(idat)
    assert raw == b"\x00" + pixels[:9] + b"\x00" + pixels[9:]  # filter byte 0 per row, RGB
    assert struct.unpack(">I", png[8:12])[0] == 13  # IHDR length


def test_png_size_rejects_other_data() -> None:
    with pytest.raises(ValueError):
        png_size(b"GIF89a" + bytes(30))
    with pytest.raises(ValueError):
        ppm_to_png(b"P5\n1 1\n255\n\x00")
