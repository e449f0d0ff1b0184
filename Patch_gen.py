#!/usr/bin/env python3
"""Cut image_size patches around centres inside a mask (grid, random or from a coords
list): PATCH_DIR/<slide_id>/tile_<i>_level<L>_<x0>-<y0>-<x1>-<y1>.png (level-0 box),
then PATCH_DIR/<slide_id>.txt (the centres, an NCRF coords list) and a preview PNG.

The .txt is written last: it marks the slide's patches complete, and coord_list_gen.py
refuses a folder without it. Tiles left by a killed run (no .txt) are cleared; a complete
slide folder is refused unless --overwrite. New tiles are cut into a hidden staging
folder (PATCH_DIR/.<slide_id>.partial) and replace the old ones only once all are cut,
so a run that fails or is stopped keeps the old set; the old tiles are moved aside
(PATCH_DIR/.<slide_id>.old) before the .txt goes, so a kill then is undone by the next run.

SLIDE and --mask may be directories: each slide `<stem>.*` takes `<stem>_<kind>.npy`
(--mask-kind, needed when a slide has several masks there).

  python Patch_gen.py SLIDE --mask MASK.npy -o PATCH_DIR --mode random --num 1000
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crfcore import masks, tiling
from crfcore import slide as sl
from crfcore.cli import PROBABILITY, UserError, add_workers, for_each, number, parser, run
from crfcore.datasets import extract_patches
from crfcore.io import atomic_write_text, check_fits_slide, companion, write_image
from crfcore.scale import read_scale


@dataclass(frozen=True)
class Job:
    slide: Path
    mask: Path


def jobs(slide: Path, mask: Path, kind: str | None) -> list[Job]:
    """One job per slide; directories are paired by the slide's exact stem."""
    if not slide.is_dir():
        return [Job(slide, mask)]
    if not mask.is_dir():
        raise UserError(f"SLIDE is a directory, so --mask must be one too: {mask}")
    todo = [Job(s, mask_for(mask, s, kind)) for s in sl.find_slides(slide)]
    if not todo:
        raise UserError(f"{slide}: no slide files in this directory")
    return todo


def mask_for(folder: Path, slide: Path, kind: str | None) -> Path:
    kinds = (kind,) if kind else masks.KINDS
    found = [m for k in kinds if (m := companion(folder, slide.stem, k))]
    if not found:
        raise UserError(f"no mask {slide.stem}_{kind or '<kind>'}.npy in {folder} for slide {slide.name}")
    if len(found) > 1:
        raise UserError(f"slide {slide.name} has several masks in {folder} "
                        f"({', '.join(m.name for m in found)}); choose one with --mask-kind")
    return found[0]


def centres_for(args, slide_path: Path, mask: np.ndarray, meta: dict, rng, side: float) -> np.ndarray:
    ds = tuple(meta["downsample"])
    if args.mode == "grid":
        return tiling.grid_centres(mask, ds, side, args.min_mask_fraction)
    if args.mode == "random":
        return tiling.random_centres(mask, ds, args.num, rng)
    sid = sl.slide_id(slide_path)
    return np.array([(x, y) for s, x, y in tiling.read_coords(args.coords) if s == sid], int).reshape(-1, 2)


def tiles_in(folder: Path) -> list[Path]:
    """The tile PNGs in `folder` (other files are the user's and left alone)."""
    return [p for p in folder.glob("*.png") if tiling.parse_tile_name(p)] if folder.is_dir() else []


def prepare_folder(out: Path, sid: str, overwrite: bool) -> Path:
    """Check that a slide may be cut and return an empty staging folder for its new tiles.
    A complete set (its .txt exists) is refused unless `overwrite`, and then stays in place
    until the new set is complete; tiles of a killed run (no .txt) are stale and cleared,
    and so is whatever a killed run left in the staging folder (the tool's own)."""
    marker, folder, staging = out / f"{sid}.txt", out / sid, out / f".{sid}.partial"
    check_replaceable(folder, staging)
    shutil.rmtree(staging, ignore_errors=True)
    finish_replacing(out, sid)
    if marker.exists() and not overwrite:
        raise UserError(f"{out}: slide {sid} already has its patches ({marker.name}); "
                        "use --overwrite to cut them again")
    stale = [] if marker.exists() else tiles_in(folder)
    if stale:
        warnings.warn(f"{folder}: removing {len(stale)} tiles of an unfinished earlier run")
    for p in stale:
        p.unlink()
    staging.mkdir(parents=True)
    return staging


def check_replaceable(folder: Path, staging: Path) -> None:
    """Refuse, before any cutting, a slide folder whose tiles could not be replaced (not a
    folder, read-only, another user's), or a staging path that is not the tool's folder."""
    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        raise UserError(f"{staging}: not Patch_gen's staging folder (a link or a file); remove it")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: is a file, not the slide's tile folder")
    if folder.is_dir():
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe."):
                pass
        except OSError as err:
            raise UserError(f"{folder}: cannot replace its tiles ({err.strerror or err})") from None


def replace_tiles(out: Path, sid: str, staging: Path, names: list[str]) -> None:
    """Put the complete new tiles in `staging` in place of the slide's old ones. The old
    ones are moved aside first, and put back if one cannot be moved, so a failure leaves
    the old set and its .txt; a kill is finished by the next run (`finish_replacing`)."""
    marker, folder, held = out / f"{sid}.txt", out / sid, out / f".{sid}.old"
    if sorted(p.name for p in tiles_in(staging)) != sorted(names):  # e.g. a second run on this slide
        raise UserError(f"{staging}: holds other tiles than this run cut; is another Patch_gen cutting {sid}?")
    held.mkdir(exist_ok=True)
    moved = []
    try:
        for p in tiles_in(folder):
            os.replace(p, held / p.name)
            moved.append(p)
    except OSError:
        for p in moved:
            os.replace(held / p.name, p)
        held.rmdir()
        raise
    marker.unlink(missing_ok=True)  # from here until the new .txt, the slide reads as unfinished
    folder.mkdir(exist_ok=True)
    for p in tiles_in(staging):
        os.replace(p, folder / p.name)
    shutil.rmtree(staging)
    shutil.rmtree(held)


def finish_replacing(out: Path, sid: str) -> None:
    """After a run killed while replacing tiles: with the .txt still there, the old set was
    being moved aside and goes back; without it, the old set is discarded."""
    marker, folder, held = out / f"{sid}.txt", out / sid, out / f".{sid}.old"
    if not held.is_dir() or held.is_symlink():
        return
    if marker.exists():
        for p in tiles_in(held):
            os.replace(p, folder / p.name)
    shutil.rmtree(held)


def cut_slide(args, job: Job, rng) -> None:
    sid = sl.slide_id(job.slide)
    with sl.open_slide(job.slide) as s:  # first: a file that is not a slide is named as such
        mask, meta = masks.load_mask(job.mask, slide=job.slide)
        check_fits_slide(job.mask, mask.shape, meta["downsample"], s.dimensions)
        w0, h0 = s.dimensions
        if not 0 <= args.level < s.level_count:
            raise UserError(f"{job.slide}: --level {args.level} out of range ({s.level_count} levels)")
        if args.mpp is None:
            level, (dx, dy), size = args.level, sl.level_downsamples(s)[args.level], args.image_size
        else:  # the level that fits --mpp; patches resized by the remainder
            read = read_scale(s, job.slide, mpp=args.mpp)
            level, dx, dy = read.level, read.scale, read.scale
            size = round(args.image_size * read.scale / read.downsample)
        thumb = sl.thumbnail(s, max(w0, h0) / 1024)
    centres = centres_for(args, job.slide, mask, meta, rng, args.image_size * dx)
    side = (round(args.image_size * dx), round(args.image_size * dy))
    boxes = np.array([(int(x - side[0] / 2), int(y - side[1] / 2)) for x, y in centres], int).reshape(-1, 2)
    boxes = np.concatenate([boxes, boxes + side], 1)
    on = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w0) & (boxes[:, 3] <= h0)
    boxes, centres = boxes[on], centres[on]
    out = Path(args.output)
    staging = prepare_folder(out, sid, args.overwrite)
    names = [tiling.tile_name(i, level, tuple(b)) for i, b in enumerate(boxes)]
    try:
        n = extract_patches(job.slide, boxes, level, size, staging, names, args.workers, args.quiet,
                            out_size=args.image_size)
        replace_tiles(out, sid, staging, names)
    except BaseException:  # a failed or interrupted run leaves the old tiles as they were
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_image(out / f"{sid}_preview.png",
                tiling.preview_boxes(thumb, boxes, (w0 / thumb.shape[1], h0 / thumb.shape[0])))
    atomic_write_text(out / f"{sid}.txt", tiling.format_coords(sid, centres))  # last: the completion marker
    skipped = int((~on).sum())
    print(f"{job.slide.name}: {n} patches -> {out / sid}" + (f"; {skipped} squares off the slide skipped" if skipped else ""))


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("slide", type=Path, help="slide file, or a directory of slides")
    p.add_argument("--mask", type=Path, required=True, help="mask .npy (Mask_gen.py), or a directory")
    p.add_argument("--mask-kind", choices=masks.KINDS, help="which mask of each slide in a --mask directory")
    p.add_argument("-o", "--output", type=Path, required=True, help="PATCH_DIR")
    p.add_argument("--mode", choices=("grid", "random", "coords"), default="grid",
                   help="grid: squares over the mask; random: --num centres inside it; coords: a coords list")
    p.add_argument("--num", type=number(int, 1), help="patches per slide (random mode)")
    p.add_argument("--coords", type=Path, help="NCRF coords list `slide_id,x,y` (coords mode)")
    p.add_argument("--image-size", type=number(int, 1), default=768, help="patch side in pixels at --level")
    read = p.add_mutually_exclusive_group()
    read.add_argument("--level", type=number(int, 0), default=0, help="pyramid level the patches are read at")
    read.add_argument("--mpp", type=number(float, most=1000, above=0), help="read the patches at this many microns per pixel instead of "
                      "--level (the level that fits, resized by the remainder); set the training config's "
                      "mpp to the same")
    p.add_argument("--min-mask-fraction", type=PROBABILITY, default=0.2,
                   help="grid mode: keep squares at least this much inside the mask")
    p.add_argument("--seed", type=number(int, 0), default=0, help="random mode seed")
    p.add_argument("--overwrite", action="store_true", help="cut again slides that already have patches")
    add_workers(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.mode == "random" and not args.num:
        raise UserError("--mode random needs --num N")
    if args.mode == "coords" and not args.coords:
        raise UserError("--mode coords needs --coords COORDS.txt")
    if args.mode != "random" and args.num:
        raise UserError(f"--num is for --mode random; --mode {args.mode} cuts every square it finds")
    rng = np.random.default_rng(args.seed)
    for_each(jobs(args.slide, args.mask, args.mask_kind), lambda j: j.slide.name,
             lambda j: cut_slide(args, j, rng), args.quiet)
    return 0


if __name__ == "__main__":
    run(main)
