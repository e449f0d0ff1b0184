#!/usr/bin/env python3
"""Training throughput: grids/s and patches/s of train.py's loop (data loading,
augmentation, forward, CRF, backward, step) on the example's training sets.

  python bench/train_throughput.py [--steps 20] [--set key=value ...]

Run `make demo` first (it writes example/out/dataset). Prints one line per setting.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from crfcore import training
from crfcore.config import load_config
from crfcore.device import retain_freed_memory

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    retain_freed_memory()  # as train.py runs
    if not (ROOT / "example" / "out" / "dataset").exists():
        print("error: run `make demo` first (this bench reads example/out/dataset)", file=sys.stderr)
        return 2
    for grid in (1, 3):
        cfg = load_config(ROOT / "example" / "config.json",
                          [f"grid={grid}", "epochs=1", "data_path_tumor_valid=null", "data_path_normal_valid=null",
                           *args.set])
        with tempfile.TemporaryDirectory() as tmp:
            run = training.Run(cfg, tmp, quiet=True)
            run.train_epoch(max_steps=2)  # warm-up (workers, allocator)
            t = time.perf_counter()
            run.train_epoch(max_steps=args.steps)
            dt = time.perf_counter() - t
        n = args.steps * cfg.batch_size
        cells = (cfg.image_size // cfg.patch_size) ** 2
        print(f"grid {grid}: {n / dt:6.1f} grids/s, {n * cells / dt:7.1f} patches/s "
              f"({cfg.crop_size} px crops, width {cfg.width_mult}, batch {cfg.batch_size}, "
              f"{cfg.workers} workers, device {run.device}, {run.precision})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
