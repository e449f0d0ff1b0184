#!/usr/bin/env python3
"""What the CPU settings of prob_map.py and train.py are worth on this machine.

  python bench/cpu_settings.py [--batch 64] [--repeats 3] [--lattice-side 40]

1. MobileNetV2 (width 1, crop 224, channels-last, fp32) patches/s, each setting in a fresh
   process (the allocator setting cannot be undone in one):
   - inference as PyTorch runs it by default;
   - with freed memory kept for reuse (`crfcore.device.retain_freed_memory`);
   - and with batch norm folded into the convolutions (`crfcore.model.fold_batch_norm`);
   - and with each convolution + ReLU6 fused as well (`crfcore.model.inference_copy`, as
     prob_map.py runs);
   - a training step (forward, backward), by default and with freed memory kept.
2. `lattice` and `dense` maps of one synthetic slide (NCRF's geometry, the bench model of
   bench/prob_map.py) with the slide read in 2 DataLoader workers against in the main
   process (prob_map.py's default on the CPU), both with the settings above; taken in
   turn, best of two.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from crfcore import inference, masks
from crfcore.device import retain_freed_memory
from crfcore.model import CRFNet, ModelConfig, fold_batch_norm, inference_copy
from crfcore.testing import bench_varied_model, write_bench_slide

SETTINGS = {"default": "inference, PyTorch's defaults",
            "retain": "inference, freed memory kept",
            "retain+fold": "inference, freed memory kept, batch norm folded",
            "retain+fold+fuse": "inference, freed memory kept, batch norm folded, convolution + ReLU6 fused",
            "train": "training step, PyTorch's defaults",
            "train+retain": "training step, freed memory kept"}


def patches_per_s(setting: str, batch: int, repeats: int) -> float:
    """Best of `repeats` passes of one setting, in this process."""
    if "retain" in setting:
        retain_freed_memory()
    torch.manual_seed(0)
    model = CRFNet(ModelConfig(grid=1)).to(memory_format=torch.channels_last)
    train = setting.startswith("train")
    if train:
        model.train()
    else:
        model = {"fold": fold_batch_norm, "fuse": inference_copy}.get(setting.split("+")[-1], CRFNet.eval)(model)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        t = time.perf_counter()
        if train:
            model.embed(x)[0].square().mean().backward()
        else:
            with torch.no_grad():
                model.embed(x)
        best = min(best, time.perf_counter() - t)
    return batch / best


def in_fresh_process(setting: str, args) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", setting, "--batch", str(args.batch),
                          "--repeats", str(args.repeats)], check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def map_seconds(side: int) -> None:
    """Lattice and dense maps of one slide, slide reading in 2 workers against 0."""
    retain_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.tif"
        write_bench_slide(path, side)
        mask, meta = masks.make_mask(path, "tissue", downsample=64)
        model = bench_varied_model(path)
        print(f"maps: {mask.sum()} tissue points, patch 256, crop 224, stride 64, grid 3")
        for method in ("lattice", "dense"):
            took = {2: float("inf"), 0: float("inf")}
            for workers in (2, 0, 2, 0):  # taken in turn, the best of each counts
                opts = inference.Options(workers=workers, quiet=True)
                t = time.perf_counter()
                inference.probability_map(model, path, mask, meta["downsample"], 256, 224, method, opts)
                took[workers] = min(took[workers], time.perf_counter() - t)
            print(f"{method}: 2 workers {took[2]:.1f} s, main process {took[0]:.1f} s: {took[2] / took[0]:.2f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lattice-side", type=int, default=40, help="tissue span of the mapped slide, lattice points")
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(patches_per_s(args.child, args.batch, args.repeats))
        return 0
    print(f"{torch.get_num_threads()} threads; load {os.getloadavg()[0]:.1f}; MobileNetV2 width 1, crop 224, "
          f"batch {args.batch}, fp32, channels-last")
    rate = {s: in_fresh_process(s, args) for s in SETTINGS}
    for s, what in SETTINGS.items():
        print(f"{what}: {rate[s]:.1f} patches/s")
    print(f"freed memory kept: inference {rate['retain'] / rate['default']:.2f}x, training "
          f"{rate['train+retain'] / rate['train']:.2f}x; batch norm folded: {rate['retain+fold'] / rate['retain']:.2f}x "
          f"more; convolution + ReLU6 fused: {rate['retain+fold+fuse'] / rate['retain+fold']:.2f}x more; together "
          f"{rate['retain+fold+fuse'] / rate['default']:.2f}x")
    if args.lattice_side:
        map_seconds(args.lattice_side)
    return 0


if __name__ == "__main__":
    sys.exit(main())
