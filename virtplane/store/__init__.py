"""virtplane.store: the storage contract (`virtplane.store.interface`) and its backends.

Backends are chosen by URL scheme through `open_store`::

    store = virtplane.store.open_store("sqlite:///var/lib/virtplane/state.db")
    await store.start()
    ...
    await store.close()

A backend is a module in this package with a function ``from_url(url: str) -> interface.Store``
that parses its own URL (path, host, options) and returns an unstarted store. Adding one (the
etcd backend, speaking etcd's v3 JSON gRPC gateway over aiohttp) is a module plus one line in
BACKENDS. Modules are imported on first use, so a backend's dependencies load only when it is
chosen and ``import virtplane.store`` stays cheap.
"""

from __future__ import annotations

import importlib
import types
import urllib.parse
from collections.abc import Mapping

from virtplane.store import interface

# URL scheme -> the module that implements it. Read-only: this is configuration, not state.
BACKENDS: Mapping[str, str] = types.MappingProxyType(
    {
        "sqlite": "virtplane.store.sqlite",
        "etcd": "virtplane.store.etcd",
    }
)


def open_store(url: str) -> interface.Store:
    """The store a URL names, not yet started (the caller awaits `start()` and `close()`).

    ``sqlite:///abs/path/state.db``: SQLite file at an absolute path.
    ``sqlite:rel/path/state.db``: relative to the working directory.
    ``sqlite::memory:``: in memory (tests).
    Options go in the query string, e.g. ``sqlite:///state.db?retain_seconds=600``; see
    `virtplane.store.sqlite.from_url`.

    Raises ValueError for an unknown scheme (naming the supported ones) or a malformed URL.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    module_name = BACKENDS.get(scheme)
    if module_name is None:
        supported = ", ".join(f"{name}://" for name in BACKENDS)
        raise ValueError(f"unsupported store URL {url!r}: supported schemes are {supported}")
    backend = importlib.import_module(module_name)
    store: interface.Store = backend.from_url(url)
    return store
