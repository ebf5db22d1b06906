"""The embedded default dataset: the synthetic benchmark, generated once into the cache.

Used when no ``--data-root`` or ``$TIMEMATCH_DATA`` is given. A marker file written last
tells a complete dataset from an interrupted one, which is regenerated.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from timematch.data.synthetic import EMBEDDED_BYTES, GENERATOR_VERSION, generate_dataset
from timematch.data.tiles import default_cache_dir
from timematch.diskspace import is_disk_full, no_space, require_space
from timematch.locks import cache_lock

MARKER = ".complete.json"


def embedded_root(cache_dir: Path | None = None, seed: int = 0) -> Path:
    return Path(cache_dir or default_cache_dir()) / "synthetic" / f"v{GENERATOR_VERSION}-seed{seed}"


def ensure_embedded_dataset(
    cache_dir: Path | None = None, seed: int = 0, progress: Callable[[str], None] | None = None
) -> Path:
    """The root of the embedded synthetic dataset, generating it on first use."""
    root = embedded_root(cache_dir, seed)
    if (root / MARKER).is_file():
        return root
    with cache_lock(root):
        if (root / MARKER).is_file():
            return root
        if root.exists():
            shutil.rmtree(root)  # an interrupted generation
        what = "the embedded synthetic dataset"
        require_space(root.parent, EMBEDDED_BYTES, what)
        if progress:
            progress(f"generating the embedded synthetic dataset into {root} (first use only) ...")
        try:
            summary = generate_dataset(root, seed=seed, progress=progress)
            (root / MARKER).write_text(json.dumps(summary, default=str, indent=1))
        except BaseException as err:  # a half-written dataset is never used, nor left to fill the disk
            shutil.rmtree(root, ignore_errors=True)
            if is_disk_full(err):
                raise no_space(root.parent, EMBEDDED_BYTES, what) from None
            raise
    return root
