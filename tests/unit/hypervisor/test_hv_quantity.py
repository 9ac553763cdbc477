from __future__ import annotations

from fractions import Fraction

import pytest

from virtplane.hypervisor.quantity import QuantityError, mib_ceil, parse_bytes, parse_cpu, parse_quantity


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64Mi", 64 * 2**20),
        ("1Gi", 2**30),
        ("128M", 128_000_000),
        ("1G", 10**9),
        ("512Ki", 512 * 1024),
        ("1k", 1000),
        ("1e9", 10**9),
        ("1E3", 1000),
        ("0.5Gi", 2**29),
        ("1.5G", 1_500_000_000),
        ("2Ti", 2 * 2**40),
        (".5Mi", 2**19),
        ("100", 100),
        (1024, 1024),
        ("  64Mi ", 64 * 2**20),
    ],
)
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_fractional_bytes_round_up() -> None:
    assert parse_bytes("1.5") == 2
    assert parse_bytes("100m") == 1  # 0.1 byte: Kubernetes' Value() rounds up


@pytest.mark.parametrize(("text", "expected"), [("500m", Fraction(1, 2)), ("2", 2), ("1.5", Fraction(3, 2)),
                                                ("250m", Fraction(1, 4))])
def test_parse_cpu(text: str, expected: Fraction) -> None:
    assert parse_cpu(text) == expected


@pytest.mark.parametrize("bad", ["", "Mi", "1MB", "1 Gi", "1Gib", "abc", "--1", "1e", True, None, [1]])
def test_invalid(bad: object) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(bad)  # type: ignore[arg-type]


def test_negative_size_rejected() -> None:
    assert parse_quantity("-1Mi") == -(2**20)
    with pytest.raises(QuantityError):
        parse_bytes("-1Mi")


def test_mib_ceil() -> None:
    assert mib_ceil(128_000_000) == 123  # 122.07 MiB: never give the guest less than asked
    assert mib_ceil(64 * 2**20) == 64
    assert mib_ceil(1) == 1
