#!/usr/bin/env python3
"""Whole-slide inference: lattice vs naive (NCRF) on one synthetic slide, same model.

Prints the lattice and naive speeds (naive timed on a random subset of tissue points and
scaled: its cost is linear in points), their max abs difference on that subset, the
end-to-end patches/s against the model-only forward throughput (same batch size,
precision and threads), then the peak memory of `prob_map.py` (a separate process, its
DataLoader workers included) on a large synthetic slide (default 40k x 40k; tissue
spread over the whole slide, a full-width strip among it, so the band cache is at its
widest) and ends with one line
`speedup=<lattice/naive> max_abs_diff=<x> io_efficiency=<end-to-end/model-only>`.

The default geometry (patch 64, crop 56, lattice stride 16, k = 4) has NCRF's ratios
(256/224 at stride 64) at 1/16 of the pixels, so a CPU run takes minutes; use
`--patch 256 --crop 224 --stride 64` on a GPU for the published geometry.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crfcore import inference, masks, synthetic
from crfcore import slide as sl
from crfcore.datasets import normalise_batch, to_tensor
from crfcore.model import CRFNet, ModelConfig, save_checkpoint
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


def tree_pss(pid: int) -> int:
    """Bytes of memory of a process and its descendants: summed PSS, so pages shared
    between the DataLoader workers and their parent count once."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += 1024 * sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass  # a worker that just exited
    return total


def peak_memory(cmd: list[str]) -> tuple[float, float, float]:
    """Run `cmd`; return (seconds, peak summed PSS in MiB, peak RSS of the main process in MiB)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(0.2)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(cmd)} failed")
    return time.perf_counter() - t, peak / 2 ** 20, usage.ru_maxrss / 1024


def model_only_rate(model: CRFNet, path: Path, geom: inference.Geometry, rows: np.ndarray, cols: np.ndarray,
                    batch: int, device: torch.device, precision: str, n: int = 4096) -> float:
    """Patches/s of the CNN alone on ready tensors: `n` real crops of the slide (the speed
    of a float pipeline can depend on the data), read and normalised beforehand; the best
    of two passes, so the end-to-end ratio is not flattered."""
    s = sl.open_slide(path)
    pick = np.random.default_rng(1).choice(len(rows), n)
    crops = [sl.read_rgb(s, tuple(int(v) for v in o), 0, (geom.crop, geom.crop))
             for o in geom.crop_origin(geom.centres(rows[pick], cols[pick]))]
    x = normalise_batch(torch.from_numpy(np.stack(crops)))
    rates = []
    for _ in range(2):
        t = time.perf_counter()
        for i in range(0, n, batch):
            inference._embed(model, x[i:i + batch], 1, device, precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t))
    return max(rates)


LARGE_TISSUE = [(0.5, 0.5, 0.49, 0.008)] + [(x, y, 0.02, 0.02) for x in (0.04, 0.96) for y in (0.04, 0.96)]


def large_slide_memory(args, model: CRFNet, tmp: Path) -> None:
    """Peak memory of prob_map.py on a `--large-side` slide (written once, kept with --keep)."""
    side = args.large_side
    path = args.keep.with_name(f"large_{side}.tif") if args.keep else tmp / "large.tif"
    t = time.perf_counter()
    if not path.exists():
        synthetic.write_slide(path, side, side, tumours=0, seed=1, tissue=LARGE_TISSUE)
    print(f"large slide {side}x{side} ready in {time.perf_counter() - t:.0f} s")
    mask, meta = masks.make_mask(path, "tissue", downsample=args.stride)
    masks.save_mask(tmp / "large_tissue.npy", mask, meta)
    rows = np.nonzero(mask)[0]
    cfg = {"mode": "grid", "grid": 3, "crf_iters": model.cfg.crf_iters, "width_mult": model.cfg.width_mult,
           "num_classes": 1, "image_size": 3 * args.patch, "patch_size": args.patch, "crop_size": args.crop}
    save_checkpoint(tmp / "bench.ckpt", model, cfg)
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "prob_map.py"), str(path), str(tmp / "bench.ckpt"),
           str(tmp / "large_tissue.npy"), str(tmp / "large_prob.npy"), "--quiet", "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--device", args.device, "--precision", args.precision]
    seconds, pss, rss = peak_memory(cmd)
    level0 = side * side * 3 / 2 ** 30
    print(f"large: {mask.sum()} tissue points on a {mask.shape[1]}x{mask.shape[0]} lattice, widest tissue row "
          f"{np.bincount(rows).max()} points; prob_map.py {seconds:.0f} s; peak memory {pss:.0f} MiB "
          f"(PSS, workers included; main process RSS {rss:.0f} MiB) vs {level0:.1f} GiB for level 0 as RGB")


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
    p.add_argument("--keep", type=Path, help="write (or reuse) the synthetic slides at this path (and beside it)")
    p.add_argument("--large-side", type=int, default=40000, help="side of the peak-memory slide (0: skip)")
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
        n_lat = len(inference.needed_points(mask, geom.node_offsets()))

        pick = np.random.default_rng(0).choice(len(rows), min(args.naive_points, len(rows)), replace=False)
        sub = (rows[pick], cols[pick])
        t = time.perf_counter()
        ref = inference.naive_map(model, path, mask, geom, opts, points=sub)
        t_naive = (time.perf_counter() - t) * len(rows) / len(pick)
        diff = float(np.abs(lat[sub] - ref[sub]).max())

        model_rate = model_only_rate(model, path, geom, rows, cols, args.batch_size, device, precision)
        e2e = n_lat / t_lat
        print(f"lattice: {t_lat:.1f} s, {n_lat} CNN patches ({n_lat / len(rows):.2f} per tissue point), "
              f"{e2e:.0f} patches/s end to end")
        print(f"naive:   {t_naive:.1f} s (scaled from {len(pick)} points), "
              f"{9 * len(rows)} CNN patches (9 per tissue point)")
        print(f"map: mean {lat[mask].mean():.3f}, std {lat[mask].std():.3f} over the tissue")
        print(f"model-only forward: {model_rate:.0f} patches/s (batch {args.batch_size})")
        if args.large_side:
            large_slide_memory(args, model, Path(tmp))
        print(f"speedup={t_naive / t_lat:.2f} max_abs_diff={diff:.2e} io_efficiency={e2e / model_rate:.2f}")


if __name__ == "__main__":
    main()
