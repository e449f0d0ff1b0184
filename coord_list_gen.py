#!/usr/bin/env python3
"""Gather Patch_gen.py (or histolab tiler) folders into NCRF's training-set folder:
DATASET_DIR/list.txt with one `slide_id,x,y` line per patch (level-0 centre) and the
images 0.png, 1.png, ... in the same order (sorted by slide, then tile index)."""
from __future__ import annotations

import errno
import os
import shutil
import warnings
from pathlib import Path

from crfcore import tiling
from crfcore.cli import UserError, parser, run
from crfcore.io import atomic_write_text


def place(src: Path, dst: Path, how: str) -> None:
    """Hard-link (copy when across devices), copy or move `src` to `dst`."""
    if how == "link":
        try:
            os.link(src, dst)
            return
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
        how = "copy"
    (shutil.copy2 if how == "copy" else shutil.move)(src, dst)


def existing(out: Path) -> list[str]:
    lst = out / "list.txt"
    return lst.read_text().splitlines() if lst.exists() else []


def prepare(out: Path, append: bool, overwrite: bool) -> list[str]:
    """The lines already in DATASET_DIR to keep (append) or none; refuse a non-empty folder."""
    out.mkdir(parents=True, exist_ok=True)
    if not any(out.iterdir()):
        return []
    if overwrite:
        for f in out.iterdir():
            if f.name == "list.txt" or (f.suffix == ".png" and f.stem.isdigit()):
                f.unlink()
        return []
    if append:
        lines = existing(out)
        missing = [i for i in range(len(lines)) if not (out / f"{i}.png").exists()]
        if missing:
            raise UserError(f"{out}: list.txt names {len(lines)} images but {len(missing)} are missing "
                            f"(first: {missing[0]}.png)")
        return lines
    raise UserError(f"{out} is not empty; use --append to add to it or --overwrite to replace it")


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("patch_dirs", nargs="+", type=Path, metavar="PATCH_DIR")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DATASET_DIR")
    how = p.add_mutually_exclusive_group()
    for mode, text in (("link", "hard-link the images (copy across devices; default)"),
                       ("copy", "copy the images"), ("move", "move the images")):
        how.add_argument(f"--{mode}", dest="how", action="store_const", const=mode, help=text)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--append", action="store_true", help="add to an existing DATASET_DIR")
    again.add_argument("--overwrite", action="store_true", help="replace an existing DATASET_DIR")
    p.set_defaults(how="link")
    args = p.parse_args(argv)

    found: dict[str, list[tiling.TileInfo]] = {}
    for d in args.patch_dirs:
        if not d.is_dir():
            raise UserError(f"{d}: not a directory")
        tiles, bad = tiling.collect_tiles(d)
        for f in bad:
            warnings.warn(f"{f}: not a tile name (tile_<i>_level<L>_<x0>-<y0>-<x1>-<y1>.png); skipped")
        if bad:
            warnings.warn(f"{len(bad)} file(s) in {d} skipped")
        for sid, infos in tiles.items():
            if sid in found:
                raise UserError(f"slide id {sid!r} appears in more than one PATCH_DIR")
            found[sid] = infos
            listed = d / f"{sid}.txt"
            if listed.exists() and len(tiling.read_coords(listed)) > len(infos):
                warnings.warn(f"{listed} lists {len(tiling.read_coords(listed))} patches but only "
                              f"{len(infos)} images were found")
    if not found:
        raise UserError(f"no tiles found in {', '.join(map(str, args.patch_dirs))}")
    lines = prepare(args.output, args.append, args.overwrite)
    seen = set(lines)
    new = []
    for sid in sorted(found):
        for t in found[sid]:
            line = f"{sid},{t.centre[0]},{t.centre[1]}"
            if line in seen:
                raise UserError(f"duplicate patch {line} ({t.path})")
            seen.add(line)
            new.append((line, t.path))
    start = len(lines)
    for i, (line, src) in enumerate(new, start):
        place(src, args.output / f"{i}.png", args.how)
        lines.append(line)
    atomic_write_text(args.output / "list.txt", "".join(f"{ln}\n" for ln in lines))
    print(f"{len(new)} patches from {len(found)} slide(s) -> {args.output} ({len(lines)} in all)")
    return 0


if __name__ == "__main__":
    run(main)
