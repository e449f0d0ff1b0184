#!/usr/bin/env python3
"""Gather Patch_gen.py (or histolab tiler) folders into NCRF's training-set folder:
DATASET_DIR/list.txt with one `slide_id,x,y` line per patch (level-0 centre) and the
images 0.png, 1.png, ... in the same order (sorted by slide, then tile index), and
sides.txt: one `w,h` line per image, the level-0 pixels it covers (more than its own
size when Patch_gen.py cut it at --level or --mpp), which places its cells' labels.

Only slides whose Patch_gen run finished (its `<slide_id>.txt` marker matches the tiles)
are taken. list.txt is written last; an interrupted --move is undone on the next run.

  python coord_list_gen.py PATCH_DIR [PATCH_DIR ...] -o DATASET_DIR [--append]
"""
from __future__ import annotations

from crfcore.startup import quiet_ctrl_c

quiet_ctrl_c()  # first: Ctrl-C while the libraries below load is one line

import argparse
import warnings
from pathlib import Path

from crfcore import trainset
from crfcore.cli import UserError, given_path, parser, run
from crfcore.io import resolved_folder
from crfcore.tiling import collect_tiles, read_coords


def entries(patch_dirs: list[Path], keep: list[str]) -> tuple[list[trainset.Entry], int]:
    """The new images in order, and how many slides they come from; duplicates refused."""
    found = {}
    for d in patch_dirs:
        tiles, bad = trainset.gather(d)
        for f in bad:
            warnings.warn(f"{f}: not a tile name (tile_<i>_level<L>_<x0>-<y0>-<x1>-<y1>.png); skipped")
        if bad:
            warnings.warn(f"{len(bad)} file(s) in {d} skipped")
        for sid, infos in tiles.items():
            if sid in found:
                raise UserError(f"slide id {sid!r} appears in more than one PATCH_DIR")
            found[sid] = infos
    if not found:
        raise UserError(f"no tiles found in {', '.join(map(str, patch_dirs))}")
    seen, new = set(keep), []
    for sid in sorted(found):
        for t in found[sid]:
            line = f"{sid},{t.centre[0]},{t.centre[1]}"
            if line in seen:
                raise UserError(f"duplicate patch {line} ({t.path})")
            seen.add(line)
            new.append(trainset.Entry(line, t.path, t.side))
    return new, len(found)


def firsts(new: list[trainset.Entry]) -> list[Path]:
    """The first image of each slide in `new`."""
    found: dict[str, Path] = {}
    for e in new:
        found.setdefault(e.line.split(",")[0], e.source)
    return list(found.values())


def moved_into(patch_dirs: list[Path], out: Path) -> bool:
    """Whether the patch folders have no tiles left and DATASET_DIR lists every centre
    of their markers: a --move that finished, or that a kill stopped and this run's
    recovery finished."""
    listed = set(trainset.listed(out))
    markers = [m for d in patch_dirs for m in d.glob("*.txt") if (d / m.stem).is_dir()]
    return bool(markers) and not any(collect_tiles(d)[0] for d in patch_dirs) and all(
        f"{s},{x},{y}" in listed for m in markers for s, x, y in read_coords(m))


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("patch_dirs", nargs="+", type=given_path, metavar="PATCH_DIR", help="Patch_gen.py output folders")
    p.add_argument("-o", "--output", type=given_path, required=True, metavar="DATASET_DIR", help="training-set folder")
    how = p.add_mutually_exclusive_group()
    for mode, text in (("link", "hard-link the images, copying across devices (the default)"),
                       ("copy", "copy the images"), ("move", "move the images (journaled: a kill is undone)")):
        how.add_argument(f"--{mode}", dest="how", action="store_const", const=mode, help=text)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--append", action="store_true", help="add to an existing DATASET_DIR")
    again.add_argument("--overwrite", action="store_true", help="replace an existing DATASET_DIR")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.output = resolved_folder(args.output)  # `new/../ds` is `ds`, and makes no `new`
    missing = next((d for d in args.patch_dirs if not d.is_dir()), None)
    if missing is not None:  # before DATASET_DIR is made
        raise UserError(f"{missing}: no such PATCH_DIR (a folder of Patch_gen.py output)")
    inside = next((d for d in args.patch_dirs if args.output.resolve().is_relative_to(d.resolve())), None)
    if inside is not None:  # the set's images would land among the tiles it is made of
        raise UserError(f"{args.output}: lies in PATCH_DIR {inside}; give the training set a folder of its own")
    with trainset.locked(args.output):
        trainset.recover_replacement(args.output)  # first: they may put images back into the patch folders
        trainset.recover_moves(args.output)
        try:
            new, slides = entries(args.patch_dirs, trainset.listed(args.output) if args.append else [])
        except trainset.TrainSetError:
            if args.how == "move" and moved_into(args.patch_dirs, args.output):
                print(f"{args.output}: already holds the patches of {', '.join(map(str, args.patch_dirs))}, moved "
                      "there by an earlier run (one that was killed?); nothing left to gather")
                return 0
            raise
        keep = trainset.existing_lines(args.output, args.append, args.overwrite)
        trainset.check_one_size(firsts(new), args.output if keep else None)
        if args.overwrite:
            lines = trainset.replace(args.output, new, args.how or "link")
        else:
            lines = trainset.write(args.output, keep, new, args.how or "link")
    print(f"{len(new)} patches from {slides} slide(s) -> {args.output} ({len(lines)} in all)")
    return 0


if __name__ == "__main__":
    run(main)
