#!/usr/bin/env python3
"""Rebuild whole-mount H&E slides from IDC patches (<patient>_idx5_x<X>_y<Y>_class<C>.png,
in PATCH_DIR or in sub-folders such as 0/ and 1/). For each patient, OUT_DIR gets
<patient>.tif (pyramidal TIFF for OpenSlide, approximate mpp), <patient>.xml (ASAP: the
union of the IDC patches in group Tumor, holes in Exclusion) and <patient>_cells.csv
(x0,y0,x1,y1,label per patch), and one line is printed. A patient is complete when its
patches hold both classes, partial otherwise (only some of its patches are there).

  python bench/idc_slides.py ../shared/data/idc -o /tmp/idc_out
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from crfcore import mosaic
from crfcore.cli import UserError, one_line, parser, run
from crfcore.errors import CrfError
from crfcore.io import write_image

PREVIEW_SIDE = 768  # long side of the --preview picture, pixels


def choose(found: mosaic.PatchFolder, folder: Path, wanted: list[str] | None) -> list[str]:
    """The patients to build: all found, or those asked for (each must be there)."""
    if not found.patients:
        raise UserError(f"{folder}: no IDC patch files (<patient>_idx5_x<X>_y<Y>_class<C>.png) in it "
                        f"or its sub-folders ({len(found.unparsable)} other file(s))")
    missing = [p for p in wanted or [] if p not in found.patients]
    if missing:
        raise UserError(f"{folder}: no patches of patient(s) {', '.join(missing)}; "
                        f"found {', '.join(found.patients)}")
    return list(dict.fromkeys(wanted)) if wanted else list(found.patients)


def build_one(patient: str, patches: list[mosaic.PatchFile], out: Path, mpp: float,
              preview: bool) -> tuple[str, bool]:
    """Build and write one patient's slide; return its report line and completeness."""
    m = mosaic.build(patient, patches)
    paths = mosaic.write_outputs(m, out, mpp)
    if preview:
        ann = mosaic.idc_annotation(m.cells)
        write_image(out / f"{patient}_outline.png", mosaic.outline(m.image, ann, PREVIEW_SIDE / max(m.size)))
    w, h = m.size
    state = "complete" if m.complete else f"partial (class {int(m.cells[0, 4])} only)"
    return (f"{patient}: {w} x {h} px, {len(m.cells)} cells, {m.idc_cells} IDC, {state} -> "
            f"{paths['tif'].name}, {paths['xml'].name}, {paths['csv'].name}"), m.complete


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("patch_dir", type=Path, metavar="PATCH_DIR")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT_DIR")
    p.add_argument("--patients", nargs="+", metavar="P", help="only these patients (default: all found)")
    p.add_argument("--mpp", type=float, default=4.0,
                   help="approximate microns per pixel written to the TIFFs (the IDC slides are ~2.5x)")
    p.add_argument("--preview", action="store_true", help="also write <patient>_outline.png (IDC outline drawn)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not (math.isfinite(args.mpp) and args.mpp > 0):
        raise UserError(f"--mpp must be a positive number of microns per pixel, got {args.mpp}")
    found = mosaic.scan(args.patch_dir)
    if found.unparsable:
        warnings.warn(f"{args.patch_dir}: {len(found.unparsable)} file(s) without an IDC patch name skipped "
                      f"(first: {found.unparsable[0]})")
    patients = choose(found, args.patch_dir, args.patients)
    start, built, failed = time.perf_counter(), [], []  # built: completeness of each slide
    for patient in tqdm(patients, desc="patients", disable=args.quiet or len(patients) < 2):
        try:
            line, complete = build_one(patient, found.patients[patient], args.output, args.mpp, args.preview)
        except CrfError as err:
            tqdm.write(f"error: {one_line(err)}", file=sys.stderr)
            failed.append(patient)
            continue
        built.append(complete)
        tqdm.write(line)
    complete = sum(built)
    print(f"{len(built)} slide(s) ({complete} complete, {len(built) - complete} partial) in "
          f"{time.perf_counter() - start:.1f} s -> {args.output}; mpp {args.mpp:g} (approximate)")
    if built and not complete:
        warnings.warn(f"{args.patch_dir}: no complete patient among those built (none has patches of both "
                      "classes): every slide and annotation is partial")
    if failed:
        raise UserError(f"{len(failed)} of {len(patients)} patient(s) failed: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    run(main)
