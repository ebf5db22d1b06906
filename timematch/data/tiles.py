"""The four tiles of the published TimeMatch dataset and their short names."""

from __future__ import annotations

import os
from pathlib import Path

from timematch.errors import ConfigError

#: Short names used in the paper -> ``<country>/<tile>/<year>`` directory of the dataset.
TILES: dict[str, str] = {
    "DK": "denmark/32VNH/2017",
    "FR1": "france/30TXT/2017",
    "FR2": "france/31TCJ/2017",
    "AT1": "austria/33UVP/2017",
}

COUNTRIES: tuple[str, ...] = ("denmark", "france", "austria")


def resolve_tile(name: str) -> str:
    """Return the ``country/tile/year`` path of a tile given its short name or its path."""
    if name in TILES:
        return TILES[name]
    cleaned = name.strip("/")
    parts = cleaned.split("/")
    if len(parts) == 3 and parts[0] in COUNTRIES:
        return cleaned
    valid = ", ".join(f"{short} ({path})" for short, path in TILES.items())
    raise ConfigError(
        f"unknown tile {name!r}: use a short name or a 'country/tile/year' path "
        f"with country in {COUNTRIES}; known tiles: {valid}"
    )


def short_name(tile: str) -> str:
    """The paper's short name of a tile path, or the path itself when it has none."""
    for short, path in TILES.items():
        if path == tile:
            return short
    return tile


def default_cache_dir() -> Path:
    """Where the project keeps caches: ``$TIMEMATCH_CACHE``, else ``~/.cache/timematch``.

    Nothing is ever written into a user's dataset folder.
    """
    env = os.environ.get("TIMEMATCH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "timematch"
