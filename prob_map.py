#!/usr/bin/env python3
"""Whole-slide tumour probability map on a tissue mask's lattice: float32 OUT.npy (0
outside the mask) + a sidecar recording the slide, the checkpoint (SHA-256) and the
settings. `lattice` (default) runs each needed patch through the CNN once and equals
NCRF's `naive` computation; `dense` runs the backbone over whole slide tiles, each pixel
about twice (tile margins), and pools each crop's window: several times faster, an
approximation (see README).

SLIDE, MASK and OUT may be directories: each slide `<stem>.*` takes the tissue mask
`<stem>_tissue.npy` and writes `<stem>_prob.npy`. A map whose sidecar matches the
checkpoint and settings is skipped (a batch run resumes); a stale one (another
checkpoint or settings) stops the slide unless --overwrite. Under torchrun the slides
are shared out between ranks.

  python prob_map.py SLIDE CKPT MASK.npy -o OUT.npy
  python prob_map.py SLIDE_DIR CKPT MASK_DIR -o OUT_DIR
"""
from __future__ import annotations

from crfcore.startup import quiet_ctrl_c

quiet_ctrl_c()  # first: Ctrl-C while the libraries below load is one line

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crfcore import dense, inference, masks
from crfcore import slide as sl
from crfcore.cli import (UserError, add_workers, check_npy_or_folder, for_each, given_path, number, one_line, parser,
                         run)
from crfcore.device import PRECISIONS, DistEnv, resolve_device, resolve_precision, retain_freed_memory
from crfcore.heatmap import load_probability_map, save_probability_map
from crfcore.io import (ArrayFileError, ValuesChangedWarning, check_array_output, check_fits_slide, check_spares_inputs,
                        companion, ensure_free_space, file_sha256, own_sidecar, settle, sidecar_path)
from crfcore.model import model_from_checkpoint
from crfcore.scale import ReadScale, check_patch_fits, read_scale
from crfcore.stain import MacenkoNormaliser


@dataclass(frozen=True)
class Job:
    slide: Path
    mask: Path
    out: Path


def jobs(slide: Path, mask: Path, out: Path) -> list[Job]:
    """One job per slide; directories are paired by the slide's exact stem."""
    if not slide.is_dir():
        check_npy_or_folder(out, "a map")
        if out.is_dir() or out.suffix != ".npy":
            out = out / f"{slide.stem}_prob.npy"
        return [Job(slide, mask_in(mask, slide.stem) if mask.is_dir() else mask, out)]
    if not mask.is_dir():
        raise UserError(f"SLIDE is a directory, so MASK must be one too: {mask}")
    # a slide without a mask is reported by its job, and the others go on
    todo = [Job(s, mask_in(mask, s.stem), out / f"{s.stem}_prob.npy") for s in sl.find_slides(slide)]
    if not todo:
        raise UserError(f"{slide}: no slide files in this directory")
    return todo


def mask_in(folder: Path, stem: str) -> Path:
    """The slide's tissue mask in a folder of them (the name it would have when missing:
    its job then says so)."""
    return companion(folder, stem, "tissue") or folder / f"{stem}_tissue.npy"


def resolution(args, cfg: dict) -> dict:
    """The resolution crops are read at: --level, else --mpp, else the checkpoint's `mpp`
    (none of them: level 0, as NCRF)."""
    if args.level is not None:
        return {"level": args.level}
    mpp = args.mpp if args.mpp is not None else cfg.get("mpp")
    return {"mpp": mpp} if mpp is not None else {}


LATER_SETTINGS = {"read_at": {}}  # settings newer than some sidecars: absent there means this value
UNRECORDED = ("mask_sha256", "slide_bytes")  # inputs older sidecars do not record: not compared there


def settings(args, ckpt_sha: str, precision: str, read_at: dict) -> dict:
    """What decides a map's numbers: a map whose sidecar has the same is up to date."""
    return {"checkpoint_sha256": ckpt_sha, "method_asked": args.method, "tta": args.tta, "precision": precision,
            "read_at": read_at}


MIN_DENSE_TILE = 256  # --dense-tile: below the tiles' margin (256 px a side), margins would be most of the work


def up_to_date(out: Path, wanted: dict, overwrite: bool) -> bool:
    """True when `out` exists with these settings; a stale map is an error unless --overwrite."""
    settle(out)  # a save a kill stopped: finished or undone, so its sidecar is its array's
    if not (out.exists() and sidecar_path(out).exists()):
        return False
    meta = own_sidecar(sidecar_path(out)) or {}  # a foreign file there is refused before writing
    stale = [k for k, v in wanted.items()
             if (k in meta or k not in UNRECORDED) and meta.get(k, LATER_SETTINGS.get(k)) != v]
    if not stale:
        return readable(out)
    if not overwrite:
        verb = "is" if len(stale) == 1 else "are"
        raise UserError(f"{out}: exists but is stale (its recorded {', '.join(stale)} {verb} not this run's); "
                        "use --overwrite to recompute")
    return False


def readable(out: Path) -> bool:
    """Whether a finished map reads as one; else a warning, and it is computed again (a
    truncated copy with its sidecar intact would be skipped as done, run after run)."""
    try:
        with warnings.catch_warnings():  # load_array's check of the values, raised here
            warnings.simplefilter("error", ValuesChangedWarning)
            load_probability_map(out)
    except ArrayFileError as err:
        warnings.warn(f"{one_line(err)}; computed again")
        return False
    except ValuesChangedWarning:  # two runs wrote it at once, or edited since
        warnings.warn(f"{out}: its values are not those its sidecar records; computed again")
        return False
    return True


def warn_off_resolution(slide: Path, slide_mpp: tuple | None, read: ReadScale, trained: float | None) -> None:
    """A note when crops are read more than 5 % off the resolution the model was trained at,
    or at another scale than level 0 when the checkpoint does not record its resolution."""
    if trained is None and not read.identity:
        warnings.warn(f"{slide}: crops read at {read.scale:.3g} times level 0 (--mpp / --level), but the checkpoint "
                      "records no training resolution (its patches were cut at level 0 of their slides)")
    if trained is None or slide_mpp is None:
        return
    at = slide_mpp[0] * read.scale
    if abs(at / trained - 1) > 0.05:
        warnings.warn(f"{slide}: crops read at {at:.3g} um per pixel, but the model was trained at {trained:g} "
                      "(its config mpp)")


def job_files(job: Job) -> list[Path]:
    """The files a job reads: an output must be none of them."""
    return [job.slide, job.mask, sidecar_path(job.mask)]


def inputs(job: Job) -> dict:
    """What identifies a slide's inputs: another mask, or another slide of the same name,
    makes its map stale."""
    return {"mask_sha256": file_sha256(job.mask) if job.mask.is_file() else None,
            "slide_bytes": job.slide.stat().st_size if job.slide.is_file() else None}


def map_slide(job: Job, model, ckpt: dict, args, opts: inference.Options, wanted: dict) -> None:
    cfg = ckpt["config"]
    with sl.open_slide(job.slide) as s:  # first: a file that is not a slide is named as such
        if not job.mask.is_file():
            raise UserError(f"{job.slide.name}: no tissue mask {job.mask} (make it with Mask_gen.py --kind tissue)")
        mask, meta = masks.load_mask(job.mask, slide=job.slide, kind="tissue")
        check_fits_slide(job.mask, mask.shape, meta["downsample"], s.dimensions)
        size, mpp = s.dimensions, sl.slide_mpp(s)
        read = read_scale(s, job.slide, **wanted["read_at"])
        check_patch_fits(read, cfg["patch_size"], size, job.slide)
    check_array_output(job.out, "probability")  # before the staleness test: a mask there is named as such
    wanted = {**wanted, **inputs(job)}
    if up_to_date(job.out, wanted, args.overwrite):
        print(f"{job.out}: up to date, skipped")
        return
    warn_off_resolution(job.slide, mpp, read, cfg.get("mpp"))
    ensure_free_space(job.out, mask.size * 4 + 4096, "probability map")
    if not mask.any():
        warnings.warn(f"{job.mask}: the mask is empty; writing an all-zero map")
    t = time.perf_counter()
    prob, method = inference.probability_map(model, job.slide, mask, tuple(meta["downsample"]),
                                             cfg["patch_size"], cfg["crop_size"], args.method, opts, read)
    seconds = round(time.perf_counter() - t, 2)
    if method == "dense" and not cfg.get("dense_consistency"):  # said once: the text is the same for every slide
        warnings.warn(f"{args.ckpt}: not fine-tuned for --method dense (dense_consistency 0), so its dense map "
                      "differs from lattice's more than a fine-tuned model's does (docs/speed.md: dense whole-slide inference)")
    bad = int((~np.isfinite(prob)).sum())
    if bad:  # an overflowing model: later steps would refuse the map, so it is not written
        raise UserError(f"{job.slide}: the model gives {bad} NaN or infinite probabilities; no map written")
    save_probability_map(job.out, prob, {
        "slide": job.slide.name, "slide_path": str(job.slide), "slide_dimensions": list(size),
        "mpp": list(mpp) if mpp else None, "level": meta["level"], "downsample": meta["downsample"],
        "mask": os.path.abspath(job.mask), "mask_given": str(job.mask), "checkpoint": str(args.ckpt), **wanted,
        "grid": cfg["grid"],
        "patch_size": cfg["patch_size"], "crop_size": cfg["crop_size"], "method": method,
        "stain_normalised": bool(cfg.get("stain_reference")), **read.describe(), "seconds": seconds,
        "device": str(opts.device)})
    n = int(mask.sum())
    print(f"{job.slide.name}: {n} tissue points in {seconds:.1f} s ({method}), "
          f"max probability {float(prob.max()) if n else 0:.3f} -> {job.out}")


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("slide", type=given_path, help="slide, or a directory of slides")
    p.add_argument("ckpt", type=given_path, help="checkpoint from train.py (grid mode)")
    p.add_argument("mask", type=given_path, help="tissue mask .npy (Mask_gen.py), or a directory")
    p.add_argument("out", type=given_path, nargs="?", help="OUT.npy or a directory (or give -o)")
    p.add_argument("-o", "--output", type=given_path, help="OUT.npy, or a directory")
    p.add_argument("--method", choices=("lattice", "dense", "naive"), default="lattice",
                   help="lattice: each patch through the CNN once (exact); dense: each pixel through the "
                        "backbone about twice (tile margins), crop windows pooled (approximate); "
                        "naive: NCRF's loop (reference)")
    at = p.add_mutually_exclusive_group()
    at.add_argument("--mpp", type=number(float, most=1000, above=0), help="read crops at this many microns per pixel (the pyramid level "
                    "that fits, resized by the remainder); default: the checkpoint's mpp, else level 0")
    at.add_argument("--level", type=number(int, 0), help="read crops at this pyramid level of every slide")
    p.add_argument("--tta", type=int, choices=(1, 8), default=1, help="mean over the 8 flips/rotations")
    p.add_argument("--batch-size", type=number(int, 1), default=64, help="patches per CNN batch (lattice, naive; dense runs whole tiles)")
    p.add_argument("--dense-tile", type=number(int, MIN_DENSE_TILE), default=inference.Options.dense_tile,
                   metavar="PX", help="dense: model pixels of new lattice rows per tile, and per band of rows whose logits and "
                        "features are held at once (memory grows with it); each band's tiles take the width, from half "
                        f"that to {dense.WIDEST} times it, that runs the CNN over the fewest pixels; the map is the same")
    add_workers(p, beside_cnn=True)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when present")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: mixed precision on CUDA, fp32 on the CPU")
    p.add_argument("--overwrite", action="store_true", help="recompute maps that are stale")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.out is None) == (args.output is None):
        p.error("give the output once: OUT as the 4th argument or -o OUT")
    out = args.output or args.out
    retain_freed_memory()  # the CNN's buffers are reused, not faulted back in
    env = DistEnv.from_env()
    device = resolve_device(args.device, env.local_rank)
    precision = resolve_precision(device, args.precision)
    model, ckpt = model_from_checkpoint(args.ckpt, expect={"mode": "grid"},
                                        needs=("grid", "patch_size", "crop_size"))
    ref = ckpt["config"].get("stain_reference")
    opts = inference.Options(batch_size=args.batch_size, workers=args.workers, device=device,
                             precision=precision, tta=args.tta, quiet=args.quiet, dense_tile=args.dense_tile,
                             normaliser=MacenkoNormaliser.from_dict(ref) if ref else None)
    wanted = settings(args, file_sha256(args.ckpt), precision, resolution(args, ckpt["config"]))
    todo, clash = split_clashes(jobs(args.slide, args.mask, out))
    todo = todo[env.rank::env.world]
    check_spares_inputs([j.out for j in todo], [args.ckpt] + [f for j in todo for f in job_files(j)])
    for_each(todo, lambda j: j.slide.name, lambda j: map_slide(j, model, ckpt, args, opts, wanted))
    if clash:
        raise UserError(f"not mapped: {', '.join(j.slide.name for j in clash)}: slides of one name in two formats "
                        "would write one map; map each on its own with its own -o")
    return 0


def split_clashes(todo: list[Job]) -> tuple[list[Job], list[Job]]:
    """The jobs whose maps are their own, and those whose slides share a stem (`a.tif` and
    `a.svs`: one `a_prob.npy`): those are left out, and the others go on."""
    outs = [j.out for j in todo]
    clash = [j for j in todo if outs.count(j.out) > 1]
    for j in clash:
        print(f"error: {j.slide}: another slide of this run is named {j.slide.stem} too; not mapped", file=sys.stderr)
    return [j for j in todo if j not in clash], clash


if __name__ == "__main__":
    run(main)
