"""Writing large caches on disks that may be full: check first, reserve what a memory map will
write (a full disk under a memory map is a SIGBUS, which no ``except`` catches), and turn a
late ENOSPC into one line naming the folder and the space needed."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from timematch.errors import StorageError

#: Room kept free beyond an estimate (metadata, small arrays, file-system overhead).
MARGIN_BYTES = 16 * 1024**2


def human(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n_bytes) < 1024 or unit == "TB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def no_space(directory: Path, needed: int, what: str) -> StorageError:
    free = shutil.disk_usage(existing_parent(directory)).free
    return StorageError(
        f"{directory}: not enough disk space for {what} (needs about {human(needed)}, {human(free)} free); "
        "free some space or point $TIMEMATCH_CACHE at a larger disk"
    )


def existing_parent(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def require_space(directory: Path, needed: int, what: str) -> None:
    """Raise :class:`StorageError` unless ``directory``'s disk has ``needed`` bytes (+ margin) free."""
    if shutil.disk_usage(existing_parent(directory)).free < needed + MARGIN_BYTES:
        raise no_space(directory, needed, what)


def reserve(path: Path, size: int, what: str) -> None:
    """Allocate ``size`` bytes of file ``path`` on disk now, so that writing it through a memory
    map cannot run out of space later."""
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space(path.parent, size, what) from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate
                raise


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
