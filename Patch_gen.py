#!/usr/bin/env python3
"""Cut image_size patches around centres inside a mask (grid, random or from a coords
list): PATCH_DIR/<slide_id>/tile_<i>_level<L>_<x0>-<y0>-<x1>-<y1>.png (level-0 box),
PATCH_DIR/<slide_id>.txt (the centres, NCRF coords list) and a preview PNG."""
from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np

from crfcore import masks, tiling
from crfcore import slide as sl
from crfcore.cli import UserError, parser, run
from crfcore.datasets import extract_patches
from crfcore.io import atomic_write_text


def pairs(slide: Path, mask: Path) -> list[tuple[Path, Path]]:
    """`(slide, mask)` pairs; directories are matched by stem (`<stem>*.npy`)."""
    if not slide.is_dir():
        return [(slide, mask)]
    if not mask.is_dir():
        raise UserError(f"SLIDE is a directory, so --mask must be one too: {mask}")
    out = []
    for s in sl.find_slides(slide):
        found = sorted(mask.glob(f"{s.stem}*.npy"))
        if not found:
            raise UserError(f"no mask {s.stem}*.npy in {mask} for slide {s.name}")
        out.append((s, found[0]))
    if not out:
        raise UserError(f"{slide}: no slide files in this directory")
    return out


def centres_for(args, slide_path: Path, mask: np.ndarray, meta: dict, rng) -> np.ndarray:
    ds = tuple(meta["downsample"])
    if args.mode == "grid":
        with sl.open_slide(slide_path) as s:
            size = args.image_size * sl.level_downsamples(s)[args.level][0]
        return tiling.grid_centres(mask, ds, size, args.min_mask_fraction)
    if args.mode == "random":
        if not args.num:
            raise UserError("--mode random needs --num N")
        return tiling.random_centres(mask, ds, args.num, rng)
    if not args.coords:
        raise UserError("--mode coords needs --coords COORDS.txt")
    sid = sl.slide_id(slide_path)
    return np.array([(x, y) for s, x, y in tiling.read_coords(args.coords) if s == sid], int).reshape(-1, 2)


def cut_slide(args, slide_path: Path, mask_path: Path, rng) -> None:
    mask, meta = masks.load_mask(mask_path, slide=slide_path)
    centres = centres_for(args, slide_path, mask, meta, rng)
    sid = sl.slide_id(slide_path)
    with sl.open_slide(slide_path) as s:
        w0, h0 = s.dimensions
        if not 0 <= args.level < s.level_count:
            raise UserError(f"{slide_path}: --level {args.level} out of range ({s.level_count} levels)")
        dx, dy = sl.level_downsamples(s)[args.level]
        thumb_ds = max(w0, h0) / 1024
        thumb = sl.thumbnail(s, thumb_ds)
    side = (round(args.image_size * dx), round(args.image_size * dy))
    boxes = np.array([(int(x - side[0] / 2), int(y - side[1] / 2)) for x, y in centres], int).reshape(-1, 2)
    boxes = np.concatenate([boxes, boxes + side], 1)
    on = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w0) & (boxes[:, 3] <= h0)
    boxes, centres = boxes[on], centres[on]
    out = Path(args.output)
    names = [tiling.tile_name(i, args.level, tuple(b)) for i, b in enumerate(boxes)]
    n = extract_patches(slide_path, boxes, args.level, args.image_size, out / sid, names,
                        args.workers, args.quiet)
    atomic_write_text(out / f"{sid}.txt", tiling.format_coords(sid, centres))
    img = tiling.preview_boxes(thumb, boxes, (w0 / thumb.shape[1], h0 / thumb.shape[0]))
    cv2.imwrite(str(out / f"{sid}_preview.png"), img[..., ::-1])
    skipped = int((~on).sum())
    print(f"{slide_path.name}: {n} patches -> {out / sid}"
          + (f"; {skipped} squares off the slide skipped" if skipped else ""))


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("slide", type=Path, help="slide file, or a directory of slides")
    p.add_argument("--mask", type=Path, required=True, help="mask .npy (Mask_gen.py), or a directory")
    p.add_argument("-o", "--output", type=Path, required=True, help="PATCH_DIR")
    p.add_argument("--mode", choices=("grid", "random", "coords"), default="grid")
    p.add_argument("--num", type=int, help="patches per slide (random mode)")
    p.add_argument("--coords", type=Path, help="NCRF coords list (coords mode)")
    p.add_argument("--image-size", type=int, default=768, help="patch side in pixels at --level")
    p.add_argument("--level", type=int, default=0, help="pyramid level the patches are read at")
    p.add_argument("--min-mask-fraction", type=float, default=0.2,
                   help="grid mode: keep squares at least this much inside the mask")
    p.add_argument("--seed", type=int, default=0, help="random mode seed")
    p.add_argument("--workers", type=int, default=min(4, math.ceil((os.cpu_count() or 1) / 2)),
                   help="DataLoader worker processes reading the slide")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for slide_path, mask_path in pairs(args.slide, args.mask):
        cut_slide(args, slide_path, mask_path, rng)
    return 0


if __name__ == "__main__":
    run(main)
