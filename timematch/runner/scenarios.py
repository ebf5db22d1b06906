"""Scenarios: which tile is the source and which the target.

The paper's five scenarios are listed in ``experiments/scenarios.yaml``; on the command
line a scenario is one of its names (``DK-FR1``), ``SRC:TGT`` with tile names (short, as
``DK``, or ``country/tile/year``), ``all`` (every scenario of the file) or ``pairs`` (every
ordered pair of the known tiles). Comma-separated lists mix these.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import yaml

from timematch.data.tiles import TILES, resolve_tile, short_name
from timematch.errors import ConfigError


@dataclass(frozen=True)
class Scenario:
    """A source tile adapted to a target tile; ``source`` and ``target`` are ``country/tile/year``."""

    name: str
    source: str
    target: str

    @property
    def source_short(self) -> str:
        return short_name(self.source)

    @property
    def target_short(self) -> str:
        return short_name(self.target)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "source": self.source, "target": self.target}


def make_scenario(source: str, target: str, name: str | None = None) -> Scenario:
    """A scenario from two tile names (short or ``country/tile/year``); raises on unknown or equal tiles."""
    src, tgt = resolve_tile(source.strip()), resolve_tile(target.strip())
    if src == tgt:
        raise ConfigError(f"scenario {source}:{target} adapts a tile to itself; pick two different tiles")
    return Scenario(name or f"{short_name(src)}-{short_name(tgt)}", src, tgt)


def load_scenarios(path: Path) -> dict[str, Scenario]:
    """The named scenarios of ``experiments/scenarios.yaml``, in file order."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: scenario file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    entries = (document or {}).get("scenarios") if isinstance(document, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{path}: expected a 'scenarios:' mapping of NAME: {{source: TILE, target: TILE}}")
    scenarios = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) != {"source", "target"}:
            raise ConfigError(f"{path}: scenario {name!r} must have exactly the keys 'source' and 'target'")
        try:
            scenarios[str(name)] = make_scenario(str(entry["source"]), str(entry["target"]), str(name))
        except ConfigError as err:
            raise ConfigError(f"{path}: scenario {name!r}: {err}") from None
    return scenarios


def all_pairs() -> list[Scenario]:
    """Every ordered pair of the known tiles (12 for the four published tiles)."""
    return [make_scenario(a, b) for a, b in itertools.permutations(TILES, 2)]


def parse_scenarios(text: str, named: dict[str, Scenario]) -> list[Scenario]:
    """The scenarios a ``--scenario`` value names, in order, without duplicates.

    Raises :class:`ConfigError` listing the valid choices on anything unknown.
    """
    chosen: list[Scenario] = []
    tokens = [token.strip() for token in text.split(",") if token.strip()]
    if not tokens:
        raise ConfigError(f"--scenario is empty; {scenario_choices(named)}")
    by_lower = {name.lower(): scenario for name, scenario in named.items()}
    for token in tokens:
        if token.lower() == "all":
            chosen.extend(named.values())
        elif token.lower() == "pairs":
            chosen.extend(all_pairs())
        elif token.lower() in by_lower:
            chosen.append(by_lower[token.lower()])
        else:
            chosen.append(_parse_pair(token, named))
    unique: dict[tuple[str, str], Scenario] = {}
    for scenario in chosen:
        unique.setdefault((scenario.source, scenario.target), scenario)
    return list(unique.values())


def _parse_pair(token: str, named: dict[str, Scenario]) -> Scenario:
    for separator in (":", "->"):
        if separator in token:
            source, _, target = token.partition(separator)
            try:
                return make_scenario(source, target)
            except ConfigError as err:
                raise ConfigError(f"--scenario {token!r}: {err}; {scenario_choices(named)}") from None
    # SRC-TGT with short tile names, e.g. AT1-DK (not every pair has a name in the file).
    parts = token.split("-")
    if len(parts) == 2 and all(part.upper() in TILES for part in parts):
        return make_scenario(parts[0].upper(), parts[1].upper())
    raise ConfigError(f"unknown scenario {token!r}; {scenario_choices(named)}")


def scenario_choices(named: dict[str, Scenario]) -> str:
    tiles = ", ".join(f"{short} ({path})" for short, path in TILES.items())
    return (
        f"valid: all ({', '.join(named)}), pairs (all {len(TILES) * (len(TILES) - 1)} ordered pairs), "
        f"a name like DK-FR1, or SRC:TGT with tiles {tiles}; separate several with commas"
    )
