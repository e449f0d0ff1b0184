#!/usr/bin/env python3
"""Whole-slide inference at NCRF's geometry: one synthetic slide, one model, every method.

Times `naive` (NCRF's loop; on a random subset of tissue points, scaled: its cost is
linear in points), `lattice`, `dense`, `dense` with bf16 autocast and the model alone on
ready tensors of real crops (same batch size, precision and threads). Each map is timed
`--runs` times (default 2), each time in a fresh process of its own, as prob_map.py
runs it, the methods taking turns; the best time of each is kept (`best_alone`). Prints their
agreement on the subset / over the tissue, then the peak memory of `prob_map.py` (a
separate process, its DataLoader workers included) with `lattice` and with `dense` on a
large synthetic slide (default 40k x 40k; tissue spread over the whole slide, a
full-width strip among it, so the band cache is at its widest), and ends with two lines:

  speedup=<lattice/naive> max_abs_diff=<x> io_efficiency=<end-to-end/model-only>
  dense: speedup_vs_naive=<x> speedup_vs_lattice=<y> pearson=<r> max_abs_diff=<d>

(`max_abs_diff` of the first line: lattice against naive; of the second: dense against
lattice, over the whole map; `pearson` over the tissue. `lattice` runs as prob_map.py
runs it, its stem shared between crops (crfcore.shared_stem); it is also timed with
`share_stem` off, each crop through the whole CNN, and `io_efficiency` is that run's
patches/s over the model's alone on ready tensors: how little reading costs.)

Geometry: patch 256, crop 224, lattice stride 64, grid 3 (NCRF's). The default model is
`crfcore.testing.varied_model` (random weights, batch-norm statistics from crops of the
slide): fine for speed and for lattice == naive, but a random network is not a fair
judge of dense's agreement (its deep features swing with the context a trained one
learns to ignore); give `--ckpt` a trained grid checkpoint (its patch and crop sizes
are used) for agreement figures, and see bench/agreement.py for them on the demo.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from crfcore import dense, inference, masks, synthetic
from crfcore import slide as sl
from crfcore.datasets import normalise_batch
from crfcore.device import reader_workers, resolve_device, resolve_precision, retain_freed_memory
from crfcore.model import CRFNet, inference_copy, model_from_checkpoint, save_checkpoint
from crfcore.testing import bench_varied_model, write_bench_slide

ROOT = Path(__file__).resolve().parents[1]


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


def peak_memory(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; return (seconds, peak summed PSS in MiB). (Not the child's ru_maxrss:
    Linux starts it at the RSS of this process when it forks, so it says more about the
    bench than about prob_map.py.)"""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0
    while True:
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(0.2)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(cmd)} failed")
    return time.perf_counter() - t, peak / 2 ** 20


def model_only_rate(model: CRFNet, path: Path, geom: inference.Geometry, rows: np.ndarray, cols: np.ndarray,
                    batch: int, device: torch.device, precision: str, n: int) -> float:
    """Patches/s of the CNN alone on ready tensors: `n` real crops of the slide (the speed
    of a float pipeline can depend on the data), read and normalised beforehand; the best
    of two passes, so the end-to-end ratio is not flattered."""
    with sl.open_slide(path) as s:
        pick = np.random.default_rng(1).choice(len(rows), n)
        crops = [sl.read_rgb(s, tuple(int(v) for v in o), 0, (geom.crop, geom.crop))
                 for o in geom.crop_origin(geom.centres(rows[pick], cols[pick]))]
    x = normalise_batch(torch.from_numpy(np.stack(crops)))
    rates = []
    for _ in range(2):
        t = time.perf_counter()
        for i in range(0, n, batch):
            inference.embed_patches(model, x[i:i + batch], 1, device, precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t))
    return max(rates)


LARGE_TISSUE = [(0.5, 0.5, 0.49, 0.008)] + [(x, y, 0.02, 0.02) for x in (0.04, 0.96) for y in (0.04, 0.96)]


def large_slide_memory(args, ckpt: Path, tmp: Path, precision: str) -> None:
    """Peak memory of prob_map.py, lattice and dense, on a `--large-side` slide (written
    once, kept with --keep)."""
    side = args.large_side
    path = args.keep.with_name(f"large_{side}.tif") if args.keep else tmp / "large.tif"
    t = time.perf_counter()
    if not path.exists():
        synthetic.write_slide(path, side, side, tumours=0, seed=1, tissue=LARGE_TISSUE)
    print(f"large slide {side}x{side} ready in {time.perf_counter() - t:.0f} s")
    mask, meta = masks.make_mask(path, "tissue", downsample=args.stride)
    masks.save_mask(tmp / "large_tissue.npy", mask, meta)
    rows = np.nonzero(mask)[0]
    print(f"large: {mask.sum()} tissue points on a {mask.shape[1]}x{mask.shape[0]} lattice, widest tissue row "
          f"{np.bincount(rows).max()} points; level 0 would be {side * side * 3 / 2 ** 30:.1f} GiB as RGB")
    for method in ("lattice", "dense"):
        cmd = [sys.executable, str(ROOT / "prob_map.py"), str(path), str(ckpt), str(tmp / "large_tissue.npy"),
               str(tmp / f"large_{method}_prob.npy"), "--quiet", "--method", method, "--batch-size",
               str(args.batch_size), "--workers", str(args.workers), "--device", args.device, "--precision", precision,
               "--dense-tile", str(args.dense_tile)]
        seconds, pss = peak_memory(cmd)
        print(f"large {method}: prob_map.py {seconds:.0f} s; peak memory {pss:.0f} MiB (PSS, workers included)")


def bench_model(args, path: Path, tmp: Path) -> tuple[CRFNet, Path]:
    """The model (trained from --ckpt, else varied) and a checkpoint of it for prob_map.py."""
    if args.ckpt:
        model, ck = model_from_checkpoint(args.ckpt, expect={"mode": "grid"})
        args.patch, args.crop = ck["config"]["patch_size"], ck["config"]["crop_size"]
        return model, args.ckpt
    model = bench_varied_model(path, args.crop)
    cfg = {"mode": "grid", "grid": 3, "crf_iters": model.cfg.crf_iters, "width_mult": model.cfg.width_mult,
           "num_classes": 1, "image_size": 3 * args.patch, "patch_size": args.patch, "crop_size": args.crop}
    save_checkpoint(tmp / "bench.ckpt", model, cfg)
    return model, tmp / "bench.ckpt"


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


def timed_alone(fn, *a):
    """`timed` in a fresh (spawned) process, set up as prob_map.py sets itself up: each
    method is timed as a user runs it, alone in its process. Timed one after another in
    one process, a method's time depended on what ran before it: dense took 27.5-30.5 s
    right after lattice, 22.5-24.9 s after another dense (same slide and model)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_fresh, fn, *a).result()


def _fresh(fn, *a):
    retain_freed_memory()
    return timed(fn, *a)


def best_alone(jobs: dict[str, tuple], runs: int) -> tuple[dict, dict[str, float]]:
    """Each job's `(function, arguments)` result and its best time over `runs` rounds (all
    printed), every run `timed_alone`, the jobs taking turns so that a slow spell of this
    noisy machine falls on all of them alike (one dense map took 24.3-32.8 s, alone)."""
    out, times = {}, {name: [] for name in jobs}
    for _ in range(runs):
        for name, (fn, a) in jobs.items():
            out[name], t = timed_alone(fn, *a)
            times[name].append(t)
    print("runs (s): " + "; ".join(f"{name} " + " ".join(f"{t:.1f}" for t in ts) for name, ts in times.items()))
    return out, {name: min(ts) for name, ts in times.items()}


def map_of(model: CRFNet, path: Path, mask: np.ndarray, downsample: tuple, patch: int, crop: int, method: str,
           opts: inference.Options) -> np.ndarray:
    """The map `prob_map.py --method <method>` writes."""
    return inference.probability_map(model, path, mask, downsample, patch, crop, method, opts)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lattice-side", type=int, default=220, help="tissue span in lattice points")
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--ckpt", type=Path, help="a trained grid checkpoint instead of the varied random model")
    p.add_argument("--naive-points", type=int, default=200)
    p.add_argument("--runs", type=int, default=2, help="times each map is timed (the best is kept)")
    p.add_argument("--model-only-patches", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dense-tile", type=int, default=inference.Options.dense_tile, help="as prob_map.py's")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: prob_map.py's: 0 on the CPU, 2 with CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", help="of naive, lattice, dense and the model alone")
    p.add_argument("--keep", type=Path, help="write (or reuse) the synthetic slide at this path (and the large one beside it)")
    p.add_argument("--large-side", type=int, default=40000, help="side of the peak-memory slide (0: skip)")
    args = p.parse_args()
    retain_freed_memory()  # as prob_map.py does
    device = resolve_device(args.device)
    args.workers = reader_workers(args.workers, device)
    precision = resolve_precision(device, args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "bench.tif"
        t = time.perf_counter()
        side = write_bench_slide(path, args.lattice_side, args.stride, args.patch)
        print(f"slide {side}x{side} ready in {time.perf_counter() - t:.0f} s")
        mask, meta = masks.make_mask(path, "tissue", downsample=args.stride)
        rows, cols = np.nonzero(mask)
        model, ckpt = bench_model(args, path, Path(tmp))
        model = inference_copy(model).to(device, memory_format=torch.channels_last)  # as probability_map does
        print(f"tissue: {mask.sum()} lattice points, spans {np.ptp(rows) + 1} x {np.ptp(cols) + 1}; patch {args.patch}, "
              f"crop {args.crop}, stride {args.stride}; {'checkpoint ' + str(args.ckpt) if args.ckpt else 'varied model'}; "
              f"device {device}, precision {precision}, {torch.get_num_threads()} threads; load {os.getloadavg()[0]:.1f}; "
              f"each map timed {args.runs} times alone, the best kept")
        opts = inference.Options(batch_size=args.batch_size, workers=args.workers, device=device,
                                 precision=precision, quiet=True, dense_tile=args.dense_tile)
        geom = inference.Geometry(3, args.patch, args.crop, tuple(meta["downsample"]))

        pick = np.random.default_rng(0).choice(len(rows), min(args.naive_points, len(rows)), replace=False)
        sub = (rows[pick], cols[pick])
        on_slide = (model, path, mask, meta["downsample"], args.patch, args.crop)
        out, secs = best_alone({
            "lattice": (map_of, (*on_slide, "lattice", opts)),
            "whole": (map_of, (*on_slide, "lattice", replace(opts, share_stem=False))),
            "naive": (inference.naive_map, (model, path, mask, geom, opts, sub)),
            "dense": (map_of, (*on_slide, "dense", opts)),
            "dense16": (map_of, (*on_slide, "dense", replace(opts, precision="bf16"))),
        }, args.runs)
        lat, whole, ref, den, den16 = (out[k] for k in ("lattice", "whole", "naive", "dense", "dense16"))
        t_lat, t_whole, t_den, t_den16 = (secs[k] for k in ("lattice", "whole", "dense", "dense16"))
        t_naive = secs["naive"] * len(rows) / len(pick)
        n_lat = len(inference.needed_points(mask, geom.node_offsets()))
        diff = float(np.abs(lat[sub] - ref[sub]).max())
        job = dense.DenseJob(model, path, mask, geom, opts)
        px = job.backbone_pixels()

        model_rate = model_only_rate(model, path, geom, rows, cols, args.batch_size, device, precision,
                                     args.model_only_patches)
        e2e = n_lat / t_lat
        print(f"lattice: {t_lat:.1f} s, {n_lat} CNN patches ({n_lat / len(rows):.2f} per tissue point), "
              f"{e2e:.1f} patches/s end to end")
        print(f"lattice, each crop whole (share_stem off): {t_whole:.1f} s, {n_lat / t_whole:.1f} patches/s; the "
              f"shared stem: {t_whole / t_lat:.2f}x, max abs diff {np.abs(lat - whole).max():.2e}")
        print(f"naive:   {t_naive:.1f} s (scaled from {len(pick)} points), "
              f"{9 * len(rows)} CNN patches (9 per tissue point)")
        print(f"dense:   {t_den:.1f} s, {len(job.tiles)} tiles (--dense-tile {args.dense_tile}), "
              f"{px / 1e6:.0f} Mpx through the backbone "
              f"({px / (len(rows) * args.stride ** 2):.2f} per tissue pixel; lattice: "
              f"{n_lat * args.crop ** 2 / (len(rows) * args.stride ** 2):.2f})")
        print(f"dense + bf16: {t_den16:.1f} s ({t_den / t_den16:.2f}x dense fp32), max abs diff to dense fp32 "
              f"{np.abs(den16 - den).max():.2e}, to lattice {np.abs(den16 - lat).max():.2e}")
        print(f"map: mean {lat[mask].mean():.3f}, std {lat[mask].std():.3f} over the tissue (lattice); "
              f"dense mean {den[mask].mean():.3f}, std {den[mask].std():.3f}")
        per_m = 1e6 / len(rows)  # the unit of a Camelyon-size extrapolation
        print(f"seconds per 1M tissue points: naive {t_naive * per_m:.0f}, lattice {t_lat * per_m:.0f}, "
              f"dense {t_den * per_m:.0f}, dense + bf16 {t_den16 * per_m:.0f} ({device})")
        print(f"model-only forward: {model_rate:.1f} patches/s (batch {args.batch_size}, "
              f"{args.model_only_patches} real crops)")
        if args.large_side:
            large_slide_memory(args, ckpt, Path(tmp), precision)
        print(f"speedup={t_naive / t_lat:.2f} max_abs_diff={diff:.2e} io_efficiency={n_lat / t_whole / model_rate:.2f}")
        r = np.corrcoef(lat[mask], den[mask])[0, 1]
        print(f"dense: speedup_vs_naive={t_naive / t_den:.2f} speedup_vs_lattice={t_lat / t_den:.2f} "
              f"pearson={r:.4f} max_abs_diff={np.abs(den - lat).max():.2e}")


if __name__ == "__main__":
    main()
