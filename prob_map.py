#!/usr/bin/env python3
"""Whole-slide tumour probability map on a mask's lattice: float32 OUT.npy (0 outside
the mask) + sidecar. `lattice` (default) runs each needed patch through the CNN once and
equals NCRF's `naive` computation. SLIDE, MASK and OUT may be directories (one map per
slide, finished maps skipped; under torchrun the slides are shared out between ranks)."""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path


from crfcore import inference, masks
from crfcore import slide as sl
from crfcore.cli import UserError, parser, run
from crfcore.heatmap import save_probability_map
from crfcore.io import sidecar_path
from crfcore.model import CheckpointError, model_from_checkpoint
from crfcore.training import autocast_for, resolve_device


def jobs(slide: Path, mask: Path, out: Path) -> list[tuple[Path, Path, Path]]:
    if not slide.is_dir():
        if out.is_dir() or out.suffix != ".npy":
            out = out / f"{slide.stem}_prob.npy"
        return [(slide, mask, out)]
    if not mask.is_dir():
        raise UserError(f"SLIDE is a directory, so MASK must be one too: {mask}")
    todo = []
    for s in sl.find_slides(slide):
        found = sorted(mask.glob(f"{s.stem}*tissue*.npy")) or sorted(mask.glob(f"{s.stem}*.npy"))
        if not found:
            raise UserError(f"no mask {s.stem}*.npy in {mask} for slide {s.name}")
        todo.append((s, found[0], out / f"{s.stem}_prob.npy"))
    if not todo:
        raise UserError(f"{slide}: no slide files in this directory")
    return todo


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("slide", type=Path, help="slide, or a directory of slides")
    p.add_argument("ckpt", type=Path, help="checkpoint from train.py (grid mode)")
    p.add_argument("mask", type=Path, help="tissue mask .npy (Mask_gen.py), or a directory")
    p.add_argument("out", type=Path, help="OUT.npy, or a directory")
    p.add_argument("--method", choices=("lattice", "naive"), default="lattice")
    p.add_argument("--tta", type=int, choices=(1, 8), default=1, help="mean over the 8 flips/rotations")
    p.add_argument("--batch-size", type=int, default=64, help="patches per CNN batch")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes reading the slide")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: mixed precision on CUDA, fp32 on the CPU")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    _, precision = autocast_for(device, args.precision)
    try:
        model, ckpt = model_from_checkpoint(args.ckpt, expect={"mode": "grid"})
    except CheckpointError as err:
        raise UserError(str(err)) from None
    cfg = ckpt["config"]
    opts = inference.Options(batch_size=args.batch_size, workers=args.workers, device=device,
                             precision=precision, tta=args.tta, quiet=args.quiet)
    for slide_path, mask_path, out in jobs(args.slide, args.mask, args.out)[rank::world]:
        if out.exists() and sidecar_path(out).exists():
            print(f"{out}: exists, skipped")
            continue
        mask, meta = masks.load_mask(mask_path, slide=slide_path)
        if not mask.any():
            warnings.warn(f"{mask_path}: the mask is empty; writing an all-zero map")
        t = time.perf_counter()
        prob, method = inference.probability_map(model, slide_path, mask, tuple(meta["downsample"]),
                                                 cfg["patch_size"], cfg["crop_size"], args.method, opts)
        seconds = round(time.perf_counter() - t, 2)
        save_probability_map(out, prob, {
            "slide": slide_path.name, "level": meta["level"], "downsample": meta["downsample"],
            "mask": str(mask_path), "checkpoint": str(args.ckpt), "grid": cfg["grid"], "method": method,
            "tta": args.tta, "seconds": seconds, "device": str(device), "precision": precision})
        n = int(mask.sum())
        print(f"{slide_path.name}: {n} tissue points in {seconds:.1f} s ({method}), "
              f"max probability {float(prob.max()) if n else 0:.3f} -> {out}")
    return 0



if __name__ == "__main__":
    run(main)
