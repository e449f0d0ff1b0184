#!/usr/bin/env python3
"""Patch_gen throughput: patches/s cutting a grid of patches from a synthetic slide,
with batched region reads (read once, slice) vs one read per patch, and 0 vs N workers."""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from crfcore import datasets, masks, synthetic, tiling


def run(slide, boxes, size, out, workers, batched) -> float:
    shutil.rmtree(out, ignore_errors=True)
    names = [tiling.tile_name(i, 0, tuple(b)) for i, b in enumerate(boxes)]
    t = time.perf_counter()
    datasets.extract_patches(slide, boxes, 0, size, out, names, workers, quiet=True, batched=batched)
    return len(boxes) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=6144, help="synthetic slide side")
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        s = synthetic.write_slide(tmp / "bench.tif", args.size, args.size, tumours=1, seed=0)
        mask, meta = masks.make_mask(s.path, "tissue", downsample=32)
        centres = tiling.grid_centres(mask, tuple(meta["downsample"]), args.patch, 0.2)
        boxes = np.concatenate([centres - args.patch // 2, centres + args.patch // 2], 1)
        print(f"{len(boxes)} patches of {args.patch} px from a {args.size} px synthetic slide")
        rates = {}
        for batched in (False, True):
            for w in (0, args.workers):
                rates[batched, w] = r = run(s.path, boxes, args.patch, tmp / "out", w, batched)
                print(f"  {'batched regions' if batched else 'read per patch '}  workers={w}: {r:7.1f} patches/s")
        print(f"batched/per-patch (workers=0): {rates[True, 0] / rates[False, 0]:.2f}x; "
              f"workers={args.workers}/0 (batched): {rates[True, args.workers] / rates[True, 0]:.2f}x")


if __name__ == "__main__":
    main()
