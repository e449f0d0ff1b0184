#!/usr/bin/env python3
"""Render a probability map: a PNG with a colour bar; with --slide, the map over the
slide thumbnail (aligned pixel for pixel); with --tiff, a pyramidal TIFF of the map at
the slide's level-0 size and mpp, to overlay in other tools: the probability itself
(single channel, `uint8` 0-255 or `float32` 0-1, for thresholds and colour maps of
your own) or `colour` (the colour map as RGB).

  python prob_map_show.py PROB.npy -o OUT.png --slide SLIDE --tiff OUT.tif --tiff-values uint8
"""
from __future__ import annotations

from crfcore.startup import quiet_ctrl_c

quiet_ctrl_c()  # first: Ctrl-C while the libraries below load is one line

import argparse

from crfcore import heatmap
from crfcore import slide as sl
from crfcore.cli import PROBABILITY, UserError, given_path, parser, run
from crfcore.io import check_fits_slide, check_spares_inputs, ensure_free_space, sidecar_path


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("prob", type=given_path, help="probability map .npy (prob_map.py)")
    p.add_argument("-o", "--output", type=given_path, required=True, help="OUT.png")
    p.add_argument("--slide", type=given_path, help="draw over this slide's thumbnail")
    p.add_argument("--alpha", type=PROBABILITY, default=0.5, help="overlay opacity (0 to 1)")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map")
    p.add_argument("--vmin", type=PROBABILITY, default=0.0, help="probability at the bottom of the colour map")
    p.add_argument("--vmax", type=PROBABILITY, default=1.0, help="probability at the top of the colour map")
    p.add_argument("--tiff", type=given_path, help="also write a pyramidal TIFF at the slide's size and levels (needs "
                                              "--slide); a name ending .ome.tif writes an OME-TIFF for QuPath")
    p.add_argument("--tiff-values", choices=heatmap.TIFF_VALUES, default="uint8",
                   help="what the TIFF holds: probability x 255, the probability, or colours")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        raise UserError(f"unknown colour map {args.cmap!r}")
    if not args.vmin < args.vmax:
        raise UserError(f"--vmin {args.vmin} must be below --vmax {args.vmax}")
    if args.tiff and args.slide is None:
        raise UserError("--tiff needs --slide (the TIFF takes the slide's size and mpp)")
    if args.tiff and args.tiff.suffix.lower() not in (".tif", ".tiff"):
        raise UserError(f"{args.tiff}: --tiff writes a TIFF: end its name with .tif, .tiff or .ome.tif")
    check_spares_inputs((args.output, args.tiff), (args.prob, sidecar_path(args.prob), args.slide))
    heatmap.check_picture_output(args.output)
    if args.tiff:
        heatmap.check_tiff_output(args.tiff)
    for out in filter(None, (args.output, args.tiff)):
        ensure_free_space(out, 0, "picture")  # a path that cannot be written is refused before the work
    if args.slide is not None:
        with sl.open_slide(args.slide) as s:  # first: a file that is not a slide is named as such, not blamed on the map
            size = s.dimensions
    prob, meta = heatmap.load_probability_map(args.prob, slide=args.slide)
    dx, dy = meta["downsample"]
    if args.slide is not None:  # a map of another slide of the same name, or cut short
        check_fits_slide(args.prob, prob.shape, (dx, dy), size)
    h, w = prob.shape
    extent = (0, w * dx, h * dy, 0)
    title = f"{meta['slide']}: tumour probability ({meta.get('method', '')}, grid {meta.get('grid', '?')})"
    if args.slide is None:
        heatmap.figure(prob, args.output, args.cmap, args.vmin, args.vmax, title, extent)
        print(f"{args.prob} -> {args.output}")
        return 0
    with sl.open_slide(args.slide) as s:
        thumb, _ = sl.lattice_picture(s, prob.shape, (dx, dy), min_side=800)
        img = heatmap.overlay(thumb, prob, args.alpha, args.cmap, args.vmin, args.vmax)
        heatmap.figure(img, args.output, args.cmap, args.vmin, args.vmax, title, extent)
        print(f"{args.prob} over {args.slide.name} -> {args.output}")
        if args.tiff:
            mpp = sl.slide_mpp(s)
            heatmap.write_map_tiff(args.tiff, prob, s.dimensions, mpp[0] if mpp else None, args.tiff_values,
                                   args.cmap, args.vmin, args.vmax, slide_levels=s.level_dimensions)
            print(f"pyramidal TIFF ({args.tiff_values}) {s.dimensions[0]}x{s.dimensions[1]} -> {args.tiff}")
    return 0


if __name__ == "__main__":
    run(main)
