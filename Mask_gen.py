#!/usr/bin/env python3
"""Make a tumour, tissue or normal mask of a slide at a pyramid level: a bool .npy
(`[row, col]`), its sidecar .json and a .png preview (mask outlined on the slide).

SLIDE may be a directory: each slide `<stem>.*` writes `OUT/<stem>_<kind>.npy` and takes
the annotation `<stem>.json|.xml|.geojson|.txt` from the --annotation directory. A slide
that fails is reported and the others go on.

  python Mask_gen.py SLIDE -o OUT.npy --kind tissue --downsample 64
  python Mask_gen.py SLIDE_DIR -o MASK_DIR --kind tumor --annotation JSON_DIR
"""
from __future__ import annotations

from crfcore.startup import quiet_ctrl_c

quiet_ctrl_c()  # first: Ctrl-C while the libraries below load is one line

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path

from crfcore import annotations as an
from crfcore import masks
from crfcore import slide as sl
from crfcore.cli import UserError, check_npy_or_folder, for_each, given_path, number, parser, run
from crfcore.io import all_companions, check_array_output, check_spares_inputs, file_sha256, sidecar_path, write_image


@dataclass(frozen=True)
class Job:
    slide: Path
    annotation: Path | None
    out: Path


def exports_named(folder: Path, stem: str) -> str:
    """A note naming the slide's files in `folder` that are lesion exports (never truth)."""
    found = [f.name for f in all_companions(folder, stem, "annotation") if an.is_lesion_export(f)]
    return f" ({', '.join(found)}: predicted lesions of evaluate.py, never truth)" if found else ""


def jobs(args) -> list[Job]:
    """One job per slide to mask; directories are paired by the slide's exact stem."""
    slide, ann, out = args.slide, args.annotation, args.output  # Paths (cli.given_path)
    needs_ann = args.kind != "tissue"
    if needs_ann and ann is None:
        raise UserError(f"--kind {args.kind} needs --annotation")
    if not slide.is_dir():
        if ann is not None and ann.is_dir():
            ann = an.find_annotation(ann, slide.stem)
            if ann is None:
                raise UserError(f"no annotation {slide.stem}.json|.xml|.geojson|.txt in {args.annotation}"
                                f"{exports_named(args.annotation, slide.stem)}")
        elif ann is not None and ann.exists() and ann.stem.lower() != slide.stem.lower():
            warnings.warn(f"annotation {ann.name} and slide {slide.name} have different names")
        check_npy_or_folder(out, "a mask")
        return [Job(slide, ann, out if out.suffix == ".npy" else out / f"{slide.stem}_{args.kind}.npy")]
    slides = sl.find_slides(slide)
    if not slides:
        raise UserError(f"{slide}: no slide files in this directory")
    if ann is not None and not ann.is_dir():
        raise UserError(f"SLIDE is a directory, so --annotation must be one too: {ann}")
    todo = [Job(s, an.find_annotation(ann, s.stem) if ann else None, out / f"{s.stem}_{args.kind}.npy")
            for s in slides]
    missing = [j.slide for j in todo if needs_ann and j.annotation is None]
    if missing:
        raise UserError(f"no annotation in {ann} for: {', '.join(s.name for s in missing)}"
                        f"{''.join(exports_named(ann, stem) for stem in dict.fromkeys(s.stem for s in missing))}")
    stems = [s.stem for s in slides]
    if twice := sorted({s.name for s in slides if stems.count(s.stem) > 1}):  # a.tif and a.tiff: one mask name
        raise UserError(f"{slide}: {' and '.join(twice)} would write the same mask; rename one")
    return todo


def mask_slide(job: Job, args) -> None:
    ann = an.load_truth(job.annotation) if job.annotation else None  # nothing read: refused, not an empty mask
    check_array_output(job.out, args.kind)  # before the work (and the preview): no annotation, no mask of another kind
    check_spares_inputs((job.out, sidecar_path(job.out), job.out.with_suffix(".png")), (job.slide, job.annotation))
    mask, meta = masks.make_mask(job.slide, args.kind, ann, args.level, args.downsample, args.method)
    if job.annotation:
        meta.update(annotation=str(job.annotation), annotation_sha256=file_sha256(job.annotation))
    with sl.open_slide(job.slide) as s:  # the preview first: a full disk then leaves the old mask whole
        write_image(job.out.with_suffix(".png"), masks.preview(s, mask, tuple(meta["downsample"])))
    masks.save_mask(job.out, mask, meta)
    print(f"{job.slide.name}: {args.kind} mask {mask.shape[1]}x{mask.shape[0]} at downsample "
          f"{meta['downsample'][0]:.2f}, {mask.mean():.1%} set -> {job.out}")


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("slide", type=given_path, help="slide file, or a directory of slides")
    p.add_argument("-o", "--output", type=given_path, required=True, help="OUT.npy, or a directory")
    p.add_argument("--kind", required=True, choices=masks.KINDS,
                   help="tumor: annotation polygons; tissue: Otsu on the slide; normal: tissue minus tumour")
    p.add_argument("--annotation", type=given_path, help="annotation (.json/.xml/.geojson/.txt), or a directory of them")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--level", type=number(int, 0), help="pyramid level of the mask")
    g.add_argument("--downsample", type=number(float, 1),
                   help=f"mask downsample, level-0 pixels per mask pixel (default {masks.DEFAULT_DOWNSAMPLE:g}, "
                        "NCRF's level 6)")
    p.add_argument("--method", choices=("otsu", "histolab"), default="otsu",
                   help="tissue detector (tissue and normal masks)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    for_each(jobs(args), lambda j: j.slide.name, lambda j: mask_slide(j, args), args.quiet)
    return 0


if __name__ == "__main__":
    run(main)
