#!/usr/bin/env python3
"""Cut image_size patches around centres inside a mask (grid, random or from a coords
list): PATCH_DIR/<slide_id>/tile_<i>_level<L>_<x0>-<y0>-<x1>-<y1>.png (level-0 box),
then PATCH_DIR/<slide_id>.txt (the centres, an NCRF coords list), then a preview PNG.

The .txt, written once every tile is in, marks the slide's patches complete, and coord_list_gen.py
refuses a folder without it. Tiles left by a killed run (no .txt) are cleared; a complete
slide folder is refused unless --overwrite, and replaced only once the new set is cut
(crfcore.tilefolder: a run that fails or is stopped keeps the old set).

SLIDE and --mask may be directories: each slide `<stem>.*` takes `<stem>_<kind>.npy`
(--mask-kind, needed when a slide has several masks there).

  python Patch_gen.py SLIDE --mask MASK.npy -o PATCH_DIR --mode random --num 1000
"""
from __future__ import annotations

from crfcore.startup import quiet_ctrl_c

quiet_ctrl_c()  # first: Ctrl-C while the libraries below load is one line

import argparse
import fcntl
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crfcore import masks, tiling
from crfcore import slide as sl
from crfcore.cli import PROBABILITY, UserError, add_workers, for_each, given_path, number, parser, run
from crfcore.datasets import extract_patches
from crfcore.io import (check_fits_slide, check_output_path, companion, lock_folder, make_folder, remove_empty,
                        resolved_folder, write_image)
from crfcore.scale import ReadScale, read_scale
from crfcore.tilefolder import TileFolder, tiles_in


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


def centres_for(args, slide_path: Path, mask: np.ndarray, meta: dict, rng, side: np.ndarray) -> np.ndarray:
    ds = tuple(meta["downsample"])
    if args.mode == "grid":
        return tiling.grid_centres(mask, ds, side, args.min_mask_fraction)
    if args.mode == "random":
        return tiling.random_centres(mask, ds, args.num, rng)
    sid = sl.slide_id(slide_path)
    rows = tiling.read_coords(args.coords)
    listed = [(x, y) for s, x, y in rows if s == sid]
    if not listed:  # a normal slide of a hard-negative list, say; or ids written with the extension
        ids = sorted({s for s, _, _ in rows})
        named = f"it names {', '.join(map(repr, ids[:3]))}{' ...' if len(ids) > 3 else ''}" if ids else "it is empty"
        warnings.warn(f"{args.coords}: no line names slide {sid!r} ({named}; a slide id is the file name "
                      "without its extension): no patches")
    unique = list(dict.fromkeys(listed))  # a centre twice would be two equal tiles, refused later
    if len(unique) < len(listed):
        warnings.warn(f"{args.coords}: {len(listed) - len(unique)} repeated centre(s) of {sid} cut once")
    return np.array(unique, int).reshape(-1, 2)


def slide_rng(seed: int, slide: Path) -> np.random.Generator:
    """Random mode's generator for one slide: the seed and the slide's id, so that cutting
    one slide again gives the centres the whole batch gave it."""
    return np.random.default_rng([seed, zlib.crc32(sl.slide_id(slide).encode())])


def on_level_pixels(centres: np.ndarray, side: np.ndarray, d: float) -> tuple[np.ndarray, int]:
    """Centres moved (under half a level pixel) so that their boxes start where
    prob_map.py starts its crops on that level (`ReadScale.read`: whole level pixels of
    downsample `d`, rounded to level 0), so that each tile's name gives the box its reader
    (`ReadScale`, as for the crops the model later sees) reads. Returns the centres (those
    that meet, kept once) and how many met."""
    corners = centres - (side + 1) // 2
    moved = np.round(np.round(corners / d) * d).astype(int) + (side + 1) // 2
    _, first = np.unique(moved, axis=0, return_index=True)
    return moved[np.sort(first)], len(moved) - len(first)


def cut_slide(args, job: Job, rng) -> None:
    sid = sl.slide_id(job.slide)
    tiling.check_coords_id(sid, job.slide)  # before any work: the set's marker is a coords list
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
            size = args.image_size * read.scale / read.downsample  # level pixels, before rounding: 0.6 is none
            if size < 1:
                raise UserError(f"{job.slide}: --image-size {args.image_size} at --mpp {args.mpp} is under one "
                                f"pixel of level {level}; give a larger --image-size or --mpp")
            size = round(size)
        thumb = sl.thumbnail(s, max(w0, h0) / 1024)
        level_ds = sl.level_downsamples(s)[level][0]  # ReadScale's: x's, for both axes
    side = np.array([round(args.image_size * dx), round(args.image_size * dy)])  # level-0 pixels, per axis
    centres = centres_for(args, job.slide, mask, meta, rng, side)
    if level:
        centres, met = on_level_pixels(centres, side, level_ds)
        if met:
            warnings.warn(f"{job.slide.name}: {met} centre(s) met another once moved onto level {level}'s pixels; "
                          "cut once")
    boxes = centres - (side + 1) // 2  # whole pixels: an odd side puts the centre past the middle (TileInfo.centre)
    boxes = np.concatenate([boxes, boxes + side], 1).reshape(-1, 4)
    on = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w0) & (boxes[:, 3] <= h0)
    out = Path(args.output)
    tiles = TileFolder(out, sid)
    if not on.any() and (len(on) or tiles.complete_count()):  # an empty set never replaces a full one
        why = (f"none of the {len(on)} centre(s) has its {side[0]}x{side[1]}-pixel square on the {w0}x{h0} slide; "
               f"the first: {', '.join(map(str, centres[0]))}") if len(on) else "no centre"
        kept = f"the {tiles.complete_count()} patches in {tiles.folder} are kept" if tiles.complete_count() else \
            "nothing written"
        raise UserError(f"{job.slide}: no patch to cut ({why}); {kept}")
    boxes, centres = boxes[on], centres[on]
    preview = check_output_path(out / f"{sid}_preview.png")  # before the work, as every output
    scale = (w0 / thumb.shape[1], h0 / thumb.shape[0])
    cut = tiles_in(tiles.folder) if tiles.marker.exists() and not args.overwrite and not preview.exists() else []
    if cut:  # a run killed after the set (its marker) and before this
        boxes_cut = np.array([tiling.parse_tile_name(p).box for p in cut])
        write_image(preview, tiling.preview_boxes(thumb, boxes_cut, scale))
        warnings.warn(f"{preview}: was missing (a run stopped after cutting the patches); drawn from their names")
    staging = tiles.prepare(args.overwrite)
    names = [tiling.tile_name(i, level, tuple(b)) for i, b in enumerate(boxes)]
    try:
        reader = ReadScale(dx, level, level_ds) if level else None  # as prob_map.py reads crops there
        n = extract_patches(job.slide, boxes, level, size, staging, names, args.workers, args.quiet,
                            out_size=args.image_size, reader=reader)
        tiles.replace(names, tiling.format_coords(sid, centres))  # and the completion marker
    except BaseException:  # a failed or interrupted run leaves the old tiles as they were
        tiles.abandon()
        raise
    write_image(preview, tiling.preview_boxes(thumb, boxes, scale))
    skipped = int((~on).sum())
    print(f"{job.slide.name}: {n} patches -> {out / sid}" + (f"; {skipped} squares off the slide skipped" if skipped else ""))


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("slide", type=given_path, help="slide file, or a directory of slides")
    p.add_argument("--mask", type=given_path, required=True, help="mask .npy (Mask_gen.py), or a directory")
    p.add_argument("--mask-kind", choices=masks.KINDS, help="which mask of each slide in a --mask directory")
    p.add_argument("-o", "--output", type=given_path, required=True, help="PATCH_DIR")
    p.add_argument("--mode", choices=("grid", "random", "coords"), default="grid",
                   help="grid: squares over the mask; random: --num centres inside it; coords: a coords list")
    p.add_argument("--num", type=number(int, 1, 10**7), help="patches per slide (random mode)")
    p.add_argument("--coords", type=given_path, help="NCRF coords list `slide_id,x,y` (coords mode)")
    p.add_argument("--image-size", type=number(int, 1), default=768, help="patch side in pixels at --level")
    read = p.add_mutually_exclusive_group()
    read.add_argument("--level", type=number(int, 0), help="pyramid level the patches are read at (default 0)")
    read.add_argument("--mpp", type=number(float, most=1000, above=0), help="read the patches at this many microns per pixel instead of "
                      "--level (the level that fits, resized by the remainder); set the training config's "
                      "mpp to the same")
    p.add_argument("--min-mask-fraction", type=PROBABILITY, default=0.2,
                   help="grid mode: keep squares at least this much inside the mask")
    p.add_argument("--seed", type=number(int, 0), default=0,
                   help="random mode seed (with the slide's id: a slide's centres do not depend on the run's other slides)")
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
    if args.mode != "coords" and args.coords:
        raise UserError(f"--coords is for --mode coords; --mode {args.mode} does not read it")
    args.level = args.level or 0  # None when not given: --level 0 --mpp X is refused by argparse
    args.output = resolved_folder(args.output)  # 'a/../b' is 'b': a refused run then leaves no 'a'
    if args.output.exists() and not args.output.is_dir():
        raise UserError(f"{args.output}: is a file; -o is PATCH_DIR, a folder")
    todo = jobs(args.slide, args.mask, args.mask_kind)
    made = make_folder(args.output)
    lock = lock_folder(args.output, fcntl.LOCK_EX, "another Patch_gen.py is cutting into")  # one run at a time
    try:
        for_each(todo, lambda j: j.slide.name, lambda j: cut_slide(args, j, slide_rng(args.seed, j.slide)), args.quiet)
    finally:
        remove_empty(made)  # every slide refused before cutting: leave no trace (under the lock: no other run is in it)
        os.close(lock)
    return 0


if __name__ == "__main__":
    run(main)
