"""Fixtures for the store tests: a started SqliteStore on a fresh file per test."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest

from virtplane.store import sqlite


@pytest.fixture
def db_path(tmp_path: pathlib.Path) -> str:
    return str(tmp_path / "state.db")


@pytest.fixture
async def store(db_path: str) -> AsyncIterator[sqlite.SqliteStore]:
    # No auto-compaction: tests that need it ask for it.
    s = sqlite.SqliteStore(db_path, retain_revisions=None, retain_seconds=None)
    await s.start()
    yield s
    await s.close()
