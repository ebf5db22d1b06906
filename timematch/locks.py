"""Cross-process locks on cache entries: one process builds an entry, the others wait for it.

``fcntl.flock`` on a ``<entry>.lock`` file beside the entry: it holds between processes of one
machine and, on NFS v4 and the other shared file systems the k8s/ volumes use, between
machines; the kernel releases it when its holder dies, so a killed builder never blocks the
next one.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def cache_lock(entry: Path) -> Iterator[None]:
    """Hold the exclusive lock of cache entry ``entry`` (a file or folder, existing or not)."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
