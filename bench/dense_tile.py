#!/usr/bin/env python3
"""`prob_map.py --dense-tile`: how the dense method's tile size trades speed for memory.

A dense tile repeats a margin of the backbone's receptive field (256 px) on every side,
so larger tiles do less backbone work, and hold larger activations. On bench/prob_map.py's
synthetic slide and varied model (NCRF's geometry: patch 256, crop 224, stride 64), runs
`dense` at each tile size in turn, `--repeats` times in one process, and prints the
seconds of every run, the backbone pixels per tissue pixel and the largest difference
between the maps. The first run of a larger tile also pays for growing the process's
heap (freed memory is kept for reuse, as prob_map.py keeps it), so later runs show the
steady speed. Peak memory: `bench/prob_map.py --dense-tile PX` (its 40k-slide line).

  python bench/dense_tile.py [--tiles 2048 3072] [--repeats 3] [--keep /tmp/bench.tif]
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

from crfcore import dense, inference, masks, synthetic
from crfcore.device import retain_freed_memory
from crfcore.model import inference_copy
from crfcore.testing import varied_model

PATCH, CROP, STRIDE = 256, 224, 64


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", type=int, nargs="+", default=[2048, 3072], help="tile sizes, model pixels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lattice-side", type=int, default=220, help="as bench/prob_map.py's")
    p.add_argument("--keep", type=Path, help="write (or reuse) the slide here (bench/prob_map.py's, same side)")
    args = p.parse_args()
    retain_freed_memory()  # as prob_map.py does
    side = args.lattice_side * STRIDE + 2 * PATCH
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "bench.tif"
        if not path.exists():
            synthetic.write_slide(path, side, side, tumours=2, seed=0, tissue=[(0.5, 0.5, 0.5, 0.5)])
        mask, meta = masks.make_mask(path, "tissue", downsample=STRIDE)
        model = varied_model(path, CROP, 3, width=1.0, crf_std=0.1, n=128)  # bench/prob_map.py's
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
        net = inference_copy(model)
        for tile in args.tiles:
            job = dense.DenseJob(net, path, mask, geom, replace(opts, dense_tile=tile))
            px = sum(t.size[0] * t.size[1] for t in job.tiles)
            print(f"tile {tile}: {len(job.tiles)} tiles, {px / (mask.sum() * STRIDE ** 2):.2f} backbone pixels per "
                  f"tissue pixel; best {best[tile]:.1f} s")
        first = args.tiles[0]
        diff = max(float(np.abs(maps[t] - maps[first]).max()) for t in args.tiles)
        print("dense_tile: " + " ".join(f"{t}={best[first] / best[t]:.2f}x" for t in args.tiles[1:])
              + f" faster than {first} (best runs); max_abs_diff={diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
