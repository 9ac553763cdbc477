"""Crash safety: every write SqliteStore acknowledged survives kill -9 of the writing process.

A child process writes in a loop and prints each acknowledged write (after `await` returned)
to stdout. The test kills it with SIGKILL at a random point, by pid, then reopens the file and
checks that every acknowledged write is there, that the live table agrees with the log, and
that revisions continue above everything acknowledged. Three rounds on the same file, so
recovery also happens on a file that was itself recovered. The values are large enough for
the WAL to pass its auto-checkpoint threshold, so kills also land in or after checkpoints.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import signal
import sys

import virtplane
from virtplane.store import interface, sqlite

CHILD = r"""
import asyncio, sys
from virtplane.store import sqlite

def value(tag: str) -> bytes:
    return (tag + ":").encode() * 200  # ~2 KB, like a serialized VM

async def main(path: str, round_: str) -> None:
    store = sqlite.SqliteStore(path, retain_revisions=None, retain_seconds=None)
    await store.start()
    i = 0
    while True:
        key = f"/crash/{i % 40}"
        tag = f"{round_}-{i}"
        current = await store.get(key)
        if current is None:
            kv = await store.create(key, value(tag))
            op = "PUT"
        elif i % 7 == 0:
            kv = await store.delete(key, expected_revision=current.mod_revision)
            op = "DELETE"
            tag = current.value.decode().split(":")[0]  # a delete carries the last value
        else:
            kv = await store.update(key, value(tag), expected_revision=current.mod_revision)
            op = "PUT"
        print(kv.mod_revision, op, key, tag, flush=True)  # acknowledged
        i += 1

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def value(tag: str) -> bytes:
    return (tag + ":").encode() * 200


async def run_and_kill(path: str, round_: int, writes: int) -> list[tuple[int, str, str, str]]:
    """Start the writer, SIGKILL it after about `writes` acknowledgements; return them all."""
    root = pathlib.Path(virtplane.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        path,
        str(round_),
        stdout=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group: a signal to ours never reaches it, nor back
    )
    assert proc.stdout is not None
    acknowledged: list[tuple[int, str, str, str]] = []
    try:
        async with asyncio.timeout(60):
            while len(acknowledged) < writes:
                line = await proc.stdout.readline()
                assert line, f"writer exited early with {await proc.wait()}"
                revision, op, key, tag = line.decode().split()
                acknowledged.append((int(revision), op, key, tag))
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # by pid, mid-loop
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Whatever it printed before dying was acknowledged too; a torn last line was not.
    for line in (await proc.stdout.read()).decode().splitlines(keepends=True):
        if line.endswith("\n"):
            revision, op, key, tag = line.split()
            acknowledged.append((int(revision), op, key, tag))
    return acknowledged


async def test_acknowledged_writes_survive_sigkill(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "state.db")
    rng = random.Random()
    highest_acknowledged = 0
    for round_ in range(3):
        acknowledged = await run_and_kill(path, round_, writes=rng.randrange(300, 2500))
        assert acknowledged[0][0] > highest_acknowledged  # revisions never go back after recovery
        highest_acknowledged = acknowledged[-1][0]

        store = sqlite.SqliteStore(path, retain_revisions=None, retain_seconds=None)
        await store.start()
        try:
            head = await store.current_revision()
            assert head >= highest_acknowledged  # possibly one more: committed, killed before print
            # The whole history, as a watch from the start replays it.
            watch = store.watch("/crash/", after_revision=0)
            history: dict[int, interface.WatchEvent] = {}
            async for event in watch:
                history[event.revision] = event
                if event.revision == head:
                    break
            await watch.close()
            assert sorted(history) == list(range(1, head + 1))  # no holes
            for revision, op, key, tag in acknowledged:
                event = history[revision]
                assert (event.type.value, event.kv.key, event.kv.value) == (op, key, value(tag))
            # The live table is exactly the log's final state.
            final: dict[str, interface.KeyValue] = {}
            for revision in sorted(history):
                event = history[revision]
                if event.type is interface.EventType.DELETE:
                    del final[event.kv.key]
                else:
                    final[event.kv.key] = event.kv
            assert {kv.key: kv for kv in (await store.list("/crash/")).kvs} == final
            # New writes continue above everything acknowledged.
            kv = await store.create(f"/crash/after/{round_}", b"v")
            assert kv.mod_revision == head + 1 > highest_acknowledged
            highest_acknowledged = kv.mod_revision
        finally:
            await store.close()
