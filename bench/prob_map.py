#!/usr/bin/env python3
"""Whole-slide inference: lattice vs naive (NCRF) on one synthetic slide, same model.

Prints the lattice and naive speeds (naive timed on a random subset of tissue points and
scaled: its cost is linear in points), their max abs difference on that subset, the
end-to-end patches/s against the model-only forward throughput (same batch size,
precision and threads) and peak memory, and ends with one line
`speedup=<lattice/naive> max_abs_diff=<x> io_efficiency=<end-to-end/model-only>`.

The default geometry (patch 64, crop 56, lattice stride 16, k = 4) has NCRF's ratios
(256/224 at stride 64) at 1/16 of the pixels, so a CPU run takes minutes; use
`--patch 256 --crop 224 --stride 64` on a GPU for the published geometry.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crfcore import inference, masks, synthetic
from crfcore import slide as sl
from crfcore.datasets import to_tensor
from crfcore.model import CRFNet, ModelConfig
from crfcore.training import autocast_for, resolve_device


def calibrated_model(path: Path, crop: int) -> CRFNet:
    """A random MobileNetV2-CRF whose outputs vary with the input (batch-norm statistics
    from real patches of the slide, non-zero CRF W): a fair test of equality."""
    torch.manual_seed(0)
    model = CRFNet(ModelConfig(grid=3))
    s = sl.open_slide(path)
    w, h = s.dimensions
    xy = np.random.default_rng(0).uniform(0.3, 0.7, (128, 2)) * (w, h)
    x = torch.stack([to_tensor(sl.read_rgb(s, tuple(p.astype(int)), 0, (crop, crop))) for p in xy])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # plain average over the calibration batch
    with torch.no_grad():
        model.train()
        model.embed(x)
        model.crf.W.normal_(0, 0.1)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lattice-side", type=int, default=220, help="tissue span in lattice points")
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--crop", type=int, default=56)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--naive-points", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--slide", type=Path, help="reuse a synthetic slide written by an earlier run")
    p.add_argument("--keep", type=Path, help="write (or reuse) the synthetic slide at this path")
    args = p.parse_args()
    device = resolve_device(args.device)
    _, precision = autocast_for(device, args.precision)
    side = args.lattice_side * args.stride + 2 * args.patch
    with tempfile.TemporaryDirectory() as tmp:
        path = args.slide or Path(tmp) / "bench.tif"
        if args.keep:
            path = Path(args.keep)
        t = time.perf_counter()
        if not path.exists():
            synthetic.write_slide(path, side, side, tumours=2, seed=0, tissue=[(0.5, 0.5, 0.5, 0.5)])
        print(f"slide {side}x{side} ready in {time.perf_counter() - t:.0f} s")
        mask, meta = masks.make_mask(path, "tissue", downsample=args.stride)
        rows, cols = np.nonzero(mask)
        print(f"tissue: {mask.sum()} lattice points, spans {np.ptp(rows) + 1} x {np.ptp(cols) + 1}; "
              f"device {device}, precision {precision}, {torch.get_num_threads()} threads")
        model = calibrated_model(path, args.crop).to(device, memory_format=torch.channels_last)
        opts = inference.Options(batch_size=args.batch_size, workers=args.workers, device=device,
                                 precision=precision, quiet=True)

        t = time.perf_counter()
        lat, _ = inference.probability_map(model, path, mask, meta["downsample"], args.patch, args.crop,
                                           "lattice", opts)
        t_lat = time.perf_counter() - t
        geom = inference.Geometry(3, args.patch, args.crop, tuple(meta["downsample"]))
        k = geom.lattice_step()
        offs = [(i * k, j * k) for i in (-1, 0, 1) for j in (-1, 0, 1)]
        n_lat = len({(r + a, c + b) for r, c in zip(rows, cols) for a, b in offs})

        pick = np.random.default_rng(0).choice(len(rows), min(args.naive_points, len(rows)), replace=False)
        sub = (rows[pick], cols[pick])
        t = time.perf_counter()
        ref = inference.naive_map(model, path, mask, geom, opts, points=sub)
        t_naive = (time.perf_counter() - t) * len(rows) / len(pick)
        diff = float(np.abs(lat[sub] - ref[sub]).max())

        x = torch.randn(args.batch_size, 3, args.crop, args.crop)
        for _ in range(2):
            inference._embed(model, x, 1, device, precision)
        reps = max(3, 2000 // args.batch_size)
        t = time.perf_counter()
        for _ in range(reps):
            inference._embed(model, x, 1, device, precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        model_rate = reps * args.batch_size / (time.perf_counter() - t)
        e2e = n_lat / t_lat
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"lattice: {t_lat:.1f} s, {n_lat} CNN patches ({n_lat / len(rows):.2f} per tissue point), "
              f"{e2e:.0f} patches/s end to end")
        print(f"naive:   {t_naive:.1f} s (scaled from {len(pick)} points), "
              f"{9 * len(rows)} CNN patches (9 per tissue point)")
        print(f"map: mean {lat[mask].mean():.3f}, std {lat[mask].std():.3f} over the tissue")
        print(f"model-only forward: {model_rate:.0f} patches/s (batch {args.batch_size})")
        print(f"peak RSS of this process: {peak:.0f} MiB")
        print(f"speedup={t_naive / t_lat:.2f} max_abs_diff={diff:.2e} io_efficiency={e2e / model_rate:.2f}")


if __name__ == "__main__":
    main()
