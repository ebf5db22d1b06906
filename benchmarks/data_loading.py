"""Training-view samples per second: packed memory-mapped cache vs per-parcel zarr reads.

Both paths build the same training view (64 pixels, 30 dates, normalised) from the same
tile in one run, on one core: the packed path with the loop's tensor operations
(:class:`timematch.data.views.DomainViews` on the CPU), the per-parcel path by opening one
zarr array per sample, as the original implementation did. With ``--device cuda`` the packed
path also runs with the tile on the GPU (as a trial builds its batches there). Also prints
resident memory after each epoch of the packed path, which must not grow with the number of
epochs.

    python benchmarks/data_loading.py [--data-root DIR] [--tile DK] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from timematch.data.dataset import DataConfig, open_domains  # noqa: E402
from timematch.data.embedded import ensure_embedded_dataset  # noqa: E402
from timematch.data.format import TileReader  # noqa: E402
from timematch.data.views import DomainViews  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def per_parcel_batch(reader: TileReader, parcels, normalizer, rng, n_pixels=64, n_dates=30):
    """The original data path: open each parcel's zarr array, sample, normalise."""
    out = []
    for i in parcels:
        x = reader.read_parcel(int(i))  # (T, C, S)
        t, _, s = x.shape
        pix = rng.choice(s, n_pixels, replace=False) if s > n_pixels else np.arange(s)
        dates = np.sort(rng.choice(t, min(n_dates, t), replace=False))
        sample = x[dates][:, :, pix].transpose(0, 2, 1)
        if s < n_pixels:
            sample = np.concatenate([sample, np.repeat(sample[:, :1], n_pixels - s, axis=1)], axis=1)
        out.append(normalizer(sample))
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--tile", default="DK")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="epochs over the train split for the packed path")
    parser.add_argument("--zarr-batches", type=int, default=8, help="batches timed on the per-parcel path")
    parser.add_argument("--device", default="cpu", help="also time the packed path with the tile on this device")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.data_root or Path(os.environ.get("TIMEMATCH_DATA") or ensure_embedded_dataset(progress=print))
    source, _ = open_domains(root, args.tile, args.tile, fold=0, config=DataConfig(min_parcels=1))
    reader = TileReader(root, args.tile)
    train = source.split.train
    rng = np.random.default_rng(0)
    bs = args.batch_size

    views = DomainViews.on(source, "cpu", torch.Generator().manual_seed(0))
    views.strong(torch.as_tensor(train[:bs]))  # warm the page cache like the zarr path's OS cache
    print(f"tile {source.tile}: {len(source.packed)} parcels, {source.packed.n_dates} dates, "
          f"{source.packed.pixels.shape[0]} pixels; batch {bs}, 64 pixels, 30 dates; 1 core")
    rss = []
    samples, started = 0, time.perf_counter()
    for _ in range(args.epochs):
        order = torch.as_tensor(rng.permutation(train))
        for start in range(0, len(order) - bs + 1, bs):
            views.strong(order[start : start + bs])
            samples += bs
        rss.append(rss_mb())
    packed_rate = samples / (time.perf_counter() - started)
    device_rate = None
    if args.device != "cpu":
        on_device = DomainViews.on(source, args.device)
        on_device.strong(on_device.draw_train(bs))
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(200):
            on_device.strong(on_device.draw_train(bs))
        torch.cuda.synchronize()
        device_rate = 200 * bs / (time.perf_counter() - started)

    samples, started = 0, time.perf_counter()
    for b in range(args.zarr_batches):
        per_parcel_batch(reader, rng.choice(train, bs), source.normalizer, rng)
        samples += bs
    zarr_rate = samples / (time.perf_counter() - started)

    print(f"packed cache      : {packed_rate:10.0f} samples/s")
    if device_rate:
        print(f"  on {args.device:12s}: {device_rate:10.0f} samples/s (tile on the device, nothing from the host)")
    print(f"per-parcel zarr   : {zarr_rate:10.0f} samples/s")
    print(f"speed-up          : {packed_rate / zarr_rate:10.1f}x")
    print("RSS after each packed epoch (MB): " + ", ".join(f"{r:.0f}" for r in rss))


if __name__ == "__main__":
    main()
