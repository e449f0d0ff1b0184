#!/usr/bin/env python3
"""Make a tumour, tissue or normal mask of a slide at a pyramid level: a bool .npy
(`[row, col]`), its sidecar .json and a .png preview (mask outlined on the slide)."""
from __future__ import annotations

import warnings
from pathlib import Path

import cv2
from tqdm import tqdm

from crfcore import annotations as an
from crfcore import masks
from crfcore import slide as sl
from crfcore.cli import UserError, parser, run


def find_annotation(folder: Path, stem: str) -> Path | None:
    """`folder/<stem>.{json,xml,txt}`, matching the stem case-insensitively."""
    for p in sorted(folder.iterdir()):
        if p.stem.lower() == stem.lower() and p.suffix.lower() in (".json", ".xml", ".txt"):
            return p
    return None


def jobs(args) -> list[tuple[Path, Path | None, Path]]:
    """`(slide, annotation or None, output .npy)` for each slide to mask."""
    slide, ann, out = Path(args.slide), args.annotation and Path(args.annotation), Path(args.output)
    needs_ann = args.kind != "tissue"
    if needs_ann and ann is None:
        raise UserError(f"--kind {args.kind} needs --annotation")
    if not slide.is_dir():
        if ann is not None and ann.is_dir():
            ann = find_annotation(ann, slide.stem)
            if ann is None:
                raise UserError(f"no annotation for slide {slide.name} in {args.annotation}")
        elif ann is not None and ann.stem.lower() != slide.stem.lower():
            warnings.warn(f"annotation {ann.name} and slide {slide.name} have different names")
        return [(slide, ann, out if out.suffix == ".npy" else out / f"{slide.stem}_{args.kind}.npy")]
    slides = sl.find_slides(slide)
    if not slides:
        raise UserError(f"{slide}: no slide files in this directory")
    if ann is not None and not ann.is_dir():
        raise UserError(f"SLIDE is a directory, so --annotation must be one too: {ann}")
    pairs = [(s, find_annotation(ann, s.stem) if ann else None) for s in slides]
    missing = [s.name for s, a in pairs if needs_ann and a is None]
    if missing:
        raise UserError(f"no annotation in {ann} for: {', '.join(missing)}")
    return [(s, a, out / f"{s.stem}_{args.kind}.npy") for s, a in pairs]


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("slide", help="slide file, or a directory of slides")
    p.add_argument("-o", "--output", required=True, help="OUT.npy, or a directory")
    p.add_argument("--kind", required=True, choices=masks.KINDS)
    p.add_argument("--annotation", help="annotation (.json/.xml/.txt), or a directory of them")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--level", type=int, help="pyramid level of the mask")
    g.add_argument("--downsample", type=float,
                   help=f"mask downsample (default {masks.DEFAULT_DOWNSAMPLE:g}, NCRF's level 6)")
    p.add_argument("--method", choices=("otsu", "histolab"), default="otsu",
                   help="tissue detector (tissue and normal masks)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    todo = jobs(args)
    for slide_path, ann_path, out in tqdm(todo, desc="slides", disable=args.quiet or len(todo) == 1):
        ann = an.load_annotation(ann_path) if ann_path else None
        mask, meta = masks.make_mask(slide_path, args.kind, ann, args.level, args.downsample, args.method)
        masks.save_mask(out, mask, meta)
        with sl.open_slide(slide_path) as s:
            img = masks.preview(s, mask, tuple(meta["downsample"]))
        cv2.imwrite(str(out.with_suffix(".png")), img[..., ::-1])
        print(f"{slide_path.name}: {args.kind} mask {mask.shape[1]}x{mask.shape[0]} at downsample "
              f"{meta['downsample'][0]:.2f}, {mask.mean():.1%} set -> {out}")
    return 0


if __name__ == "__main__":
    run(main)
