#!/usr/bin/env python3
"""`prob_map.py --dense-tile`: what the dense method's tile shape costs and buys.

A dense tile repeats a margin of the backbone's receptive field (256 px) on every side,
so larger tiles do less backbone work; but a tile's height (`--dense-tile`) is also the
height of the band of logits and features held at once, and larger tiles cover more
glass around small tissue fragments. So each band's tiles take, of the widths from half
their height to 4 times it, the one with the fewest backbone pixels.

On bench/prob_map.py's synthetic slide and varied model (NCRF's geometry: patch 256,
crop 224, stride 64), runs `dense` with square tiles of the first `--tiles` height (the
plan before widths were chosen) and then with each height in `--tiles`, in turn,
`--repeats` times in one process; prints the seconds of every run, the backbone pixels
per tissue pixel and the largest difference between the maps. The first run of a
larger tile also pays for growing the process's heap (freed memory is kept for reuse,
as prob_map.py keeps it), so later runs show the steady speed. Then plans (without
running) the same settings on a slide with three small tissue fragments. Peak memory:
`bench/prob_map.py --dense-tile PX` (its 40k-slide line).

  python bench/dense_tile.py [--tiles 2048 4096] [--repeats 3] [--keep /tmp/bench.tif]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from crfcore import dense, inference, masks, synthetic
from crfcore.device import retain_freed_memory
from crfcore.testing import bench_varied_model, write_bench_slide

PATCH, CROP, STRIDE = 256, 224, 64
# three tissue ellipses (cx, cy, rx, ry, as fractions) on a 16,000 x 12,000 slide
FRAGMENTS = [(0.2, 0.3, 0.12, 0.2), (0.75, 0.35, 0.15, 0.15), (0.5, 0.8, 0.3, 0.1)]


class Setting(NamedTuple):
    height: int  # --dense-tile
    widths_chosen: bool  # False: square tiles, the plan before widths were chosen

    def label(self) -> str:
        return f"{self.height}{'' if self.widths_chosen else ' square'}"


def square(rows: int) -> list[int]:
    """The one tile width of the old plan: the height."""
    return [rows]


@contextlib.contextmanager
def widths_of(setting: Setting):
    """Plans made inside use the setting's widths: for square tiles, the module's
    `dense.tile_widths` is swapped for `square` (a bench-only switch, undone on exit)."""
    widths = dense.tile_widths
    dense.tile_widths = widths if setting.widths_chosen else square
    try:
        yield
    finally:
        dense.tile_widths = widths


def plan(model, path: Path, mask: np.ndarray, meta: dict, setting: Setting) -> dense.DenseJob:
    """The dense job of one setting, planned only."""
    geom = inference.Geometry(3, PATCH, CROP, tuple(meta["downsample"]))
    with widths_of(setting):
        return dense.DenseJob(model, path, mask, geom, inference.Options(workers=0, quiet=True,
                                                                          dense_tile=setting.height))


def per_tissue_pixel(job: dense.DenseJob, mask: np.ndarray) -> float:
    """Backbone pixels per tissue pixel."""
    return job.backbone_pixels() / (mask.sum() * STRIDE ** 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", type=int, nargs="+", default=[2048, 4096],
                   help="tile heights (--dense-tile), model pixels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lattice-side", type=int, default=220, help="as bench/prob_map.py's")
    p.add_argument("--keep", type=Path, help="write (or reuse) the slide here (bench/prob_map.py's, same side)")
    args = p.parse_args()
    retain_freed_memory()  # as prob_map.py does
    settings = [Setting(args.tiles[0], False)] + [Setting(t, True) for t in args.tiles]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "bench.tif"
        write_bench_slide(path, args.lattice_side, STRIDE, PATCH)
        mask, meta = masks.make_mask(path, "tissue", downsample=STRIDE)
        model = bench_varied_model(path, CROP)
        print(f"dense_tile: {mask.sum()} tissue points, {torch.get_num_threads()} threads, load "
              f"{os.getloadavg()[0]:.1f}")
        maps, best = {}, {}
        for rep in range(args.repeats):
            for setting in settings:
                opts = inference.Options(workers=0, quiet=True, dense_tile=setting.height)
                t = time.perf_counter()
                with widths_of(setting):
                    maps[setting] = inference.probability_map(model, path, mask, meta["downsample"], PATCH, CROP,
                                                              "dense", opts)[0]
                dt = time.perf_counter() - t
                best[setting] = min(best.get(setting, dt), dt)
                print(f"run {rep + 1}: tile {setting.label()}: {dt:.1f} s; load {os.getloadavg()[0]:.1f}", flush=True)
        for setting in settings:
            job = plan(model, path, mask, meta, setting)
            print(f"tile {setting.label()}: {len(job.tiles)} tiles, {per_tissue_pixel(job, mask):.2f} backbone pixels "
                  f"per tissue pixel; best {best[setting]:.1f} s")
        first = settings[0]
        diff = max(float(np.abs(maps[s] - maps[first]).max()) for s in settings)
        print("dense_tile: " + " ".join(f"{s.label()}={best[first] / best[s]:.2f}x" for s in settings[1:])
              + f" faster than {first.label()} (best runs); max_abs_diff={diff:.1e}")
        frag = Path(tmp) / "fragments.tif"
        synthetic.write_slide(frag, 16000, 12000, tumours=0, seed=1, tissue=FRAGMENTS)
        mask, meta = masks.make_mask(frag, "tissue", downsample=STRIDE)
        print(f"three fragments ({mask.sum()} tissue points), backbone pixels per tissue pixel: " + ", ".join(
            f"{s.label()} {per_tissue_pixel(plan(model, frag, mask, meta, s), mask):.2f}" for s in settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
