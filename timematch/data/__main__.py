"""``python -m timematch.data``: inspect a dataset (``info``) or write the synthetic one (``synth``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from timematch.data.classes import CropCodes, normalize_code
from timematch.data.format import TileReader, find_tiles
from timematch.data.synthetic import (
    DEFAULT_PARCELS_PER_TILE, DEFAULT_SHIFTS, PIXEL_SIZES, STRETCH_RANGE, generate_dataset, plot_class_ndvi,
)
from timematch.data.tiles import TILES
from timematch.errors import DatasetError, TimeMatchError


def tile_info(root: Path, tile: str, merge_seasons: bool = False) -> dict:
    """Summary of one tile read in place (metadata only; parcel arrays are not opened)."""
    reader = TileReader(root, tile)
    codes = CropCodes(reader.country, merge_seasons)
    labels = [p["label"] for p in reader.parcels]
    n_pixels = np.array([int(p["n_pixels"]) for p in reader.parcels])
    class_counts = Counter(codes.class_of(code) for code in labels)
    unmapped = Counter(normalize_code(code) for code in labels if not codes.is_known(code))
    missing = sum(1 for i in range(len(reader)) if not reader.parcel_path(i).exists())
    return {
        "path": str(reader.path),
        "parcels": len(reader),
        "dates": len(reader.dates),
        "first_date": reader.dates[0],
        "last_date": reader.dates[-1],
        "pixels_per_parcel": {
            "min": int(n_pixels.min()), "median": float(np.median(n_pixels)), "max": int(n_pixels.max())
        },
        "class_counts": dict(sorted(class_counts.items(), key=lambda kv: -kv[1])),
        "unknown_codes": dict(unmapped.most_common()),
        "missing_parcel_arrays": missing,
    }


def verify_tile(root: Path, tile: str, show_progress: bool = True) -> list[str]:
    """Read every parcel array of a tile (what packing does); one line per bad parcel: its path
    and what is wrong."""
    reader = TileReader(root, tile)
    bad = []
    count = len(reader)
    step = max(1, count // 20)
    for index in range(count):
        try:
            reader.read_parcel(index)
        except DatasetError as err:
            bad.append(str(err))
        if show_progress and (index + 1 == count or (index + 1) % step == 0):
            done = (index + 1) / count
            bar = "#" * int(30 * done)
            print(f"\r  verifying {tile}: [{bar:30s}] {index + 1}/{count} parcels, {len(bad)} bad",
                  end="\n" if index + 1 == count else "", file=sys.stderr, flush=True)
    return bad


def print_info(name: str, info: dict) -> None:
    px = info["pixels_per_parcel"]
    print(f"{name}  ({info['path']})")
    print(f"  parcels {info['parcels']}, dates {info['dates']} ({info['first_date']} .. {info['last_date']}), "
          f"pixels per parcel min {px['min']} / median {px['median']:g} / max {px['max']}")
    if info["missing_parcel_arrays"]:
        print(f"  WARNING: {info['missing_parcel_arrays']} parcel arrays listed in the metadata are missing")
    print("  classes: " + ", ".join(f"{k} {v}" for k, v in info["class_counts"].items()))
    if info["unknown_codes"]:
        shown = list(info["unknown_codes"].items())[:15]
        more = len(info["unknown_codes"]) - len(shown)
        print("  codes in no table (-> unknown): " + ", ".join(f"{k} x{v}" for k, v in shown)
              + (f", ... {more} more" if more > 0 else ""))


def cmd_info(args: argparse.Namespace) -> int:
    root = Path(args.root).expanduser()
    if not root.is_dir():
        raise TimeMatchError(f"{root}: dataset root does not exist")
    tiles = [TILES.get(t, t) for t in args.tile] if args.tile else find_tiles(root)
    if not tiles:
        raise TimeMatchError(f"{root}: no tile found (expected <country>/<tile>/<year>/meta/metadata.pkl)")
    result = {tile: tile_info(root, tile, args.merge_seasons) for tile in tiles}
    bad: dict[str, list[str]] = {}
    if args.verify:
        for tile in tiles:
            bad[tile] = verify_tile(root, tile, show_progress=not args.json)
            result[tile]["bad_parcels"] = bad[tile]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for tile, info in result.items():
            print_info(tile, info)
            if args.verify:
                print(f"  verified: {info['parcels'] - len(bad[tile])} of {info['parcels']} parcel arrays read "
                      f"and match the metadata" + (f"; {len(bad[tile])} BAD:" if bad[tile] else ""))
                for line in bad[tile]:
                    print(f"    {line}")
    return 1 if any(bad.values()) else 0


def cmd_synth(args: argparse.Namespace) -> int:
    shifts = {}
    for item in args.shift or []:
        name, _, days = item.partition("=")
        if name not in TILES or not days.lstrip("-").isdigit():
            raise TimeMatchError(f"--shift {item!r}: expected TILE=DAYS with TILE in {list(TILES)}, e.g. FR1=25")
        shifts[name] = int(days)
    class_shifts: dict[str, dict[str, int]] = {}
    for item in args.class_shift or []:
        where, _, days = item.partition("=")
        tile, _, name = where.partition(":")
        if tile not in TILES or not name or not days.lstrip("+-").isdigit():
            raise TimeMatchError(f"--class-shift {item!r}: expected TILE:CLASS=DAYS with TILE in {list(TILES)}, "
                                 "e.g. FR1:corn=20")
        class_shifts.setdefault(tile, {})[name] = int(days)
    stretch: dict[str, float] = {}
    for item in args.stretch or []:
        tile, _, factor = item.partition("=")
        try:
            stretch[tile] = float(factor)
        except ValueError:
            raise TimeMatchError(f"--stretch {item!r}: expected TILE=FACTOR, e.g. FR1=1.15") from None
        if tile not in TILES:
            raise TimeMatchError(f"--stretch {item!r}: expected TILE=FACTOR with TILE in {list(TILES)}, e.g. FR1=1.15")
    if args.parcels_per_tile is not None and args.tile_gb is not None:
        raise TimeMatchError("--parcels-per-tile and --tile-gb both set the size of a tile: give one of them")
    if args.tile_gb is not None and not args.tile_gb > 0:  # not > 0: NaN too
        raise TimeMatchError(f"--tile-gb {args.tile_gb:g}: expected a size in GB (10^9 bytes) > 0, e.g. 1.5")
    root = Path(args.root).expanduser()
    summary = generate_dataset(
        root,
        parcels_per_tile=args.parcels_per_tile,
        seed=args.seed,
        shifts=shifts or None,
        progress=lambda msg: print(msg, flush=True),
        class_shifts=class_shifts or None,
        stretch=stretch or None,
        pixel_sizes=args.pixel_sizes,
        tile_bytes=None if args.tile_gb is None else args.tile_gb * 1e9,
    )
    if args.plot:
        png = plot_class_ndvi(root, Path(args.plot))
        print(f"NDVI plot: {png}")
    print(json.dumps(summary, indent=1, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m timematch.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="summarise the tiles of a dataset (first check of a download)")
    info.add_argument("root", help="dataset root (holds denmark/, france/, austria/)")
    info.add_argument("--tile", action="append", help="only this tile (short name or country/tile/year); repeatable")
    info.add_argument("--json", action="store_true", help="print one JSON object keyed by tile")
    info.add_argument("--merge-seasons", action="store_true", help="merge spring/winter variants of a crop")
    info.add_argument("--verify", action="store_true",
                      help="read every parcel array and check it against the metadata; list the bad ones "
                           "and exit 1 when there is one")
    info.set_defaults(func=cmd_info)
    synth = sub.add_parser("synth", help="write the synthetic benchmark dataset in the published format")
    synth.add_argument("--root", required=True, help="folder to write the four tiles into")
    synth.add_argument("--parcels-per-tile", type=int, default=None,
                       help=f"parcels in each tile (default {DEFAULT_PARCELS_PER_TILE}; not with --tile-gb)")
    synth.add_argument("--tile-gb", type=float, metavar="GB",
                       help="size each tile's data/ folder to about GB x 10^9 bytes instead (tiles with "
                            "fewer dates get more parcels; not with --parcels-per-tile), e.g. 1.5")
    synth.add_argument("--pixel-sizes", choices=list(PIXEL_SIZES), default="embedded",
                       help="parcel sizes: embedded (10-500 pixels, the default data) or published "
                            "(1-5000, a long tail like the published dataset's)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shift", action="append", metavar="TILE=DAYS",
                       help="planted phenology shift of a tile in days (default: "
                            + ", ".join(f"{k}={v}" for k, v in DEFAULT_SHIFTS.items()) + ")")
    synth.add_argument("--class-shift", action="append", metavar="TILE:CLASS=DAYS",
                       help="extra days for one class of a tile, on top of the tile's shift (per-class "
                            "phenology; repeatable), e.g. FR1:corn=20")
    synth.add_argument("--stretch", action="append", metavar="TILE=FACTOR",
                       help="stretch a tile's season by FACTOR around mid-year (a warp, not a translation; "
                            f"{STRETCH_RANGE[0]}-{STRETCH_RANGE[1]}), e.g. FR1=1.15")
    synth.add_argument("--plot", metavar="PNG", help="also write a plot of mean NDVI per class per tile")
    synth.set_defaults(func=cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TimeMatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
