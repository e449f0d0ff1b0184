#!/usr/bin/env python3
"""`prob_map.py --dense-tile`: how the dense method's largest tile trades speed for memory.

A dense tile repeats a margin of the backbone's receptive field (256 px) on every side,
so larger tiles do less backbone work; but they also cover more glass around the
tissue, so the plan takes, of the sizes from half of `--dense-tile` to all of it, the
one with the fewest backbone pixels. On bench/prob_map.py's synthetic slide and varied
model (NCRF's geometry: patch 256, crop 224, stride 64), runs `dense` with each cap in
turn, `--repeats` times in one process, and prints the seconds of every run, the tile
size chosen, the backbone pixels per tissue pixel and the largest difference between
the maps. The first run of a larger tile also pays for growing the process's heap
(freed memory is kept for reuse, as prob_map.py keeps it), so later runs show the
steady speed. Peak memory: `bench/prob_map.py --dense-tile PX` (its 40k-slide line).

  python bench/dense_tile.py [--tiles 2048 4096] [--repeats 3] [--keep /tmp/bench.tif]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from crfcore import dense, inference, masks
from crfcore.device import retain_freed_memory
from crfcore.testing import bench_varied_model, write_bench_slide

PATCH, CROP, STRIDE = 256, 224, 64


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", type=int, nargs="+", default=[2048, 4096], help="--dense-tile caps, model pixels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lattice-side", type=int, default=220, help="as bench/prob_map.py's")
    p.add_argument("--keep", type=Path, help="write (or reuse) the slide here (bench/prob_map.py's, same side)")
    args = p.parse_args()
    retain_freed_memory()  # as prob_map.py does
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "bench.tif"
        write_bench_slide(path, args.lattice_side, STRIDE, PATCH)
        mask, meta = masks.make_mask(path, "tissue", downsample=STRIDE)
        model = bench_varied_model(path, CROP)
        opts = inference.Options(workers=0, quiet=True)
        print(f"dense_tile: {mask.sum()} tissue points, {torch.get_num_threads()} threads, load "
              f"{os.getloadavg()[0]:.1f}")
        maps, best = {}, {}
        for rep in range(args.repeats):
            for tile in args.tiles:
                o = replace(opts, dense_tile=tile)
                t = time.perf_counter()
                maps[tile] = inference.probability_map(model, path, mask, meta["downsample"], PATCH, CROP, "dense",
                                                       o)[0]
                dt = time.perf_counter() - t
                best[tile] = min(best.get(tile, dt), dt)
                print(f"run {rep + 1}: tile {tile}: {dt:.1f} s; load {os.getloadavg()[0]:.1f}", flush=True)
        geom = inference.Geometry(3, PATCH, CROP, tuple(meta["downsample"]))
        for tile in args.tiles:
            job = dense.DenseJob(model, path, mask, geom, replace(opts, dense_tile=tile))
            px = job.backbone_pixels()
            print(f"tile {tile}: {len(job.tiles)} tiles (size {job.block * STRIDE} chosen), {px / (mask.sum() * STRIDE ** 2):.2f} "
                  f"backbone pixels per tissue pixel; best {best[tile]:.1f} s")
        first = args.tiles[0]
        diff = max(float(np.abs(maps[t] - maps[first]).max()) for t in args.tiles)
        print("dense_tile: " + " ".join(f"{t}={best[first] / best[t]:.2f}x" for t in args.tiles[1:])
              + f" faster than {first} (best runs); max_abs_diff={diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
