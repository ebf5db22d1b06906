"""The embedded default dataset: the synthetic benchmark, generated once into the cache.

Used when no ``--data-root`` or ``$TIMEMATCH_DATA`` is given. A marker file written last
tells a complete dataset from an interrupted one, which is regenerated.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from timematch.data.tiles import default_cache_dir

MARKER = ".complete.json"


def embedded_root(cache_dir: Path | None = None, seed: int = 0) -> Path:
    from timematch.data import synthetic

    version = getattr(synthetic, "GENERATOR_VERSION", 1)
    return Path(cache_dir or default_cache_dir()) / "synthetic" / f"v{version}-seed{seed}"


def ensure_embedded_dataset(
    cache_dir: Path | None = None, seed: int = 0, progress: Callable[[str], None] | None = None
) -> Path:
    """The root of the embedded synthetic dataset, generating it on first use."""
    from timematch.data import synthetic

    root = embedded_root(cache_dir, seed)
    if (root / MARKER).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / MARKER).is_file():
            return root
        if root.exists():
            shutil.rmtree(root)  # an interrupted generation
        if progress:
            progress(f"generating the embedded synthetic dataset into {root} (first use only) ...")
        summary = synthetic.generate_dataset(root, seed=seed, progress=progress)
        (root / MARKER).write_text(json.dumps(summary, default=str, indent=1))
    return root
