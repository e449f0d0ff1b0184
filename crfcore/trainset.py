"""NCRF's training-set folder: `list.txt` (one `slide_id,x,y` per image) and the images
`0.png, 1.png, ...` in the same order, gathered from Patch_gen folders; beside them
`sides.txt`, one `w,h` per image: the level-0 pixels it covers, which is its own size
only when it was cut at level 0 (NCRF's folders have no sides.txt: level 0).

Crash safety: images are hard-linked, copied through a temporary file, or moved (a
rename); list.txt is written last, atomically. A move first writes a journal
(`.move-journal.json`) naming every move and the list.txt it leads to; a later run that
finds the journal completes nothing by guesswork: if list.txt is the promised one it
drops the journal, otherwise it moves the images back, so a kill at any moment leaves
either the old state or the new one. sides.txt is written before list.txt and read only
as far as list.txt goes, so a kill between the two leaves the old state readable.

--overwrite builds the new set in DATASET_DIR/.overwrite.new (`replace`); until it is
complete the old set is untouched, and a run killed while building is undone by the next
run. Then the new set is moved over the old one by renames within the folder
(`swap_in`), which a killed run's successor finishes (`recover_replacement`). Moves across
file systems copy atomically before deleting, so a kill never leaves only part of an image.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .errors import CrfError, OutputError
from .io import (atomic_copy, atomic_path, atomic_write_json, atomic_write_text, lock_folder, make_folder, read_json,
                 remove_empty)
from .tilefolder import interrupted
from .tiling import TileInfo, collect_tiles, read_coords

JOURNAL = ".move-journal.json"
BUILD = ".overwrite.new"  # inside DATASET_DIR: where --overwrite builds the new set
MARK = ".made-by-coord_list_gen"  # inside BUILD: a folder of that name the user made is never touched
SIDES = "sides.txt"
LEGACY_FIX = (f"if they were cut at level 0, write {SIDES} with one `S,S` line per image (S: the image side); "
              "else make the folder again (coord_list_gen.py --overwrite)")
SIDE_LINE = re.compile(r"^[1-9]\d{0,8},[1-9]\d{0,8}$")  # whole pixels, at most 9 digits


class TrainSetError(CrfError):
    """A patch folder or training-set folder that is incomplete or inconsistent."""


@dataclass(frozen=True)
class Entry:
    line: str              # `slide_id,x,y`
    source: Path           # the tile image
    side: tuple[int, int]  # level-0 width and height it covers


def gather(patch_dir: Path) -> tuple[dict[str, list[TileInfo]], list[Path]]:
    """Tiles per slide of a patch folder, each slide checked against its completion marker
    `<slide_id>.txt` (Patch_gen writes it last); also the unparsable PNG names."""
    if not patch_dir.is_dir():
        raise TrainSetError(f"{patch_dir}: not a directory")
    stopped = interrupted(patch_dir)
    if stopped:
        raise TrainSetError(f"{patch_dir}: Patch_gen.py was stopped while replacing the tiles of "
                            f"{', '.join(stopped)} (run it again)")
    tiles, bad = collect_tiles(patch_dir)
    for marker in sorted(patch_dir.glob("*.txt")):
        sid = marker.stem
        if (patch_dir / sid).is_dir() and sid not in tiles and any(s == sid for s, _, _ in read_coords(marker)):
            raise TrainSetError(f"{patch_dir / sid}: no tiles, but {marker.name} lists centres "
                                "(run Patch_gen.py --overwrite)")
    for sid, infos in tiles.items():
        flat = infos[0].path.parent == patch_dir  # a histolab tiler folder: no marker to check
        marker = patch_dir / f"{sid}.txt"
        if flat:
            warnings.warn(f"{patch_dir}: tiles without a {marker.name} (histolab layout); completeness not checked")
        elif not marker.exists():
            raise TrainSetError(f"{patch_dir / sid}: no {marker.name}: Patch_gen.py did not finish this slide "
                                "(run it again)")
        else:
            listed = sorted((x, y) for s, x, y in read_coords(marker) if s == sid)
            if listed != sorted(t.centre for t in infos):
                raise TrainSetError(f"{patch_dir / sid}: {len(infos)} tiles do not match the {len(listed)} "
                                    f"centres of {marker.name} (stale tiles? run Patch_gen.py --overwrite)")
    return tiles, bad


def image_size(path: Path) -> tuple[int, int]:
    """An image's (width, height) in pixels, from its header."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError) as err:
        raise TrainSetError(f"{path}: not a readable image ({err})") from None


def check_one_size(firsts: list[Path], out: Path | None) -> None:
    """A set trains at one `image_size`: refuse images of another pixel size than the set
    in `out` (--append) or than each other. `firsts`: one tile of each new slide (a
    Patch_gen.py run cuts all of a slide's tiles at one size)."""
    images = [out / "0.png"] if out is not None and (out / "0.png").exists() else []
    sizes = [(p, image_size(p)) for p in images + firsts]
    (first, want), *rest = sizes
    other = next(((p, wh) for p, wh in rest if wh != want), None)
    if other is not None:
        raise TrainSetError(f"{other[0]}: is {other[1][0]}x{other[1][1]} pixels, but {first} is {want[0]}x{want[1]}: "
                            "a training set holds one image size (cut it with the set's Patch_gen.py --image-size)")


def existing_lines(out: Path, append: bool, overwrite: bool) -> list[str]:
    """The lines of DATASET_DIR to keep (--append) or none; a non-empty folder needs one of
    the two. Images beyond list.txt (an interrupted earlier run) are removed."""
    out.mkdir(parents=True, exist_ok=True)
    lines = listed(out)
    numbered = sorted((i, p) for p in out.glob("*.png") if (i := image_index(p)) is not None)
    if numbered and not lines and not (append or overwrite):  # a first run killed before its list.txt
        raise TrainSetError(f"{out}: holds {len(numbered)} numbered images but no list.txt (a run that was "
                            "interrupted?); --append removes them and writes the set")
    if (lines or numbered) and not (append or overwrite):
        raise TrainSetError(f"{out} is not empty; use --append to add to it or --overwrite to replace it")
    if overwrite:
        return []  # the old set stays until `replace` swaps the new one in
    have = {i for i, _ in numbered}
    missing = [i for i in range(len(lines)) if i not in have]
    if missing:
        raise TrainSetError(f"{out}: list.txt names {len(lines)} images but {len(missing)} are missing "
                            f"(first: {missing[0]}.png)")
    extra = [p for i, p in numbered if i >= len(lines)]
    if extra:
        warnings.warn(f"{out}: removing {len(extra)} images beyond list.txt left by an interrupted run")
        for p in extra:
            p.unlink()
    return lines


def image_index(path: Path) -> int | None:
    """N for the set's own image `N.png` (a file named 0, 1, ... exactly), else None."""
    return int(path.stem) if path.is_file() and re.fullmatch(r"0|[1-9][0-9]*", path.stem) else None


def listed(out: Path) -> list[str]:
    """The lines of DATASET_DIR/list.txt (none when there is none), read as train.py reads
    them (`tiling.read_coords`): a BOM and blank lines are not lines."""
    path = out / "list.txt"
    try:
        text = path.read_text(encoding="utf-8-sig") if path.exists() else ""
        return [line for line in text.splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise TrainSetError(f"{path}: not a text file (expected a coords list)") from None


class CannotLink(Exception):
    """A hard link is impossible here (another file system, or not allowed): copy instead."""


def place(src: Path, dst: Path, how: str) -> None:
    """Hard-link (copy across devices), copy or move `src` to `dst`; never a partial `dst`."""
    if how == "link":
        try:
            with atomic_path(dst) as tmp:
                tmp.unlink()
                try:
                    os.link(src, tmp)
                except OSError as err:  # raised past atomic_path, which would make it an OutputError
                    if err.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise CannotLink from None
                    raise
            return
        except CannotLink:
            how = "copy"
    if how == "copy":
        atomic_copy(src, dst)
    else:
        move_file(src, dst)


def move_file(src: Path, dst: Path) -> None:
    """A rename on one file system; across them an atomic copy, then `src` deleted: at
    every moment a whole copy is at `src` or at `dst` (a kill never leaves only a part)."""
    try:
        os.replace(src, dst)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        atomic_copy(src, dst)
        Path(src).unlink()


def read_sides(folder: Path, n: int) -> np.ndarray | None:
    """The level-0 `(w, h)` of the first `n` images of a training-set folder `(n, 2)`
    (list.txt's length; lines beyond it belong to an unfinished run), or None when the
    folder has no sides.txt."""
    path = folder / SIDES
    if not path.exists():
        return None
    try:
        lines = path.read_text().splitlines()[:n]
    except UnicodeDecodeError:
        raise TrainSetError(f"{path}: not a text file of `width,height` lines") from None
    if len(lines) < n:
        raise TrainSetError(f"{path}: {len(lines)} lines for the {n} images of list.txt: {LEGACY_FIX}")
    bad = next((i for i, ln in enumerate(lines) if not SIDE_LINE.match(ln)), None)
    if bad is not None:
        raise TrainSetError(f"{path}: line {bad + 1}: {lines[bad]!r} is not `width,height` in pixels")
    return np.array([ln.split(",") for ln in lines], np.int64).reshape(-1, 2)


def write(out: Path, keep: list[str], new: list[Entry], how: str) -> list[str]:
    """Add `new` after the `keep` lines; return all lines. sides.txt, then list.txt, last."""
    kept = read_sides(out, len(keep)) if keep else np.zeros((0, 2), np.int64)
    if kept is None:
        raise TrainSetError(f"{out}: has no {SIDES} (made by an older coord_list_gen.py), so the level-0 extent "
                            f"of its images is unknown: {LEGACY_FIX}")
    lines = keep + [e.line for e in new]
    text = "".join(f"{ln}\n" for ln in lines)
    sides = [tuple(s) for s in kept.tolist()] + [e.side for e in new]
    # absolute: a later run from another folder must find them to undo the move
    moves = [(str(Path(e.source).absolute()), str((out / f"{i}.png").absolute())) for i, e in enumerate(new, len(keep))]
    if how == "move":
        atomic_write_json(out / JOURNAL, {"moves": moves, "list_sha256": _sha(text)})
    for src, dst in moves:
        place(Path(src), Path(dst), how)
    atomic_write_text(out / SIDES, "".join(f"{w},{h}\n" for w, h in sides))
    atomic_write_text(out / "list.txt", text)
    (out / JOURNAL).unlink(missing_ok=True)
    return lines


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold DATASET_DIR's lock for a run: a second coord_list_gen.py on the same folder is
    refused instead of mixing two sets."""
    if out.exists() and not out.is_dir():
        raise TrainSetError(f"{out}: exists and is not a directory (DATASET_DIR is a training set's folder)")
    made = make_folder(out)
    fd = lock_folder(out, fcntl.LOCK_EX, "another coord_list_gen.py, or a train.py run, is using", TrainSetError)
    try:
        yield
    except BaseException:  # Ctrl-C too; under the lock, so no other run is in the folder
        remove_empty(made)  # a refused run leaves none of the folders it made
        raise
    finally:
        os.close(fd)


def read_lock(folder: Path) -> int:
    """A shared lock on a training-set folder for as long as a training run reads it (the
    returned descriptor holds it): coord_list_gen.py refuses to write the folder
    meanwhile, and a folder being written is refused here."""
    return lock_folder(folder, fcntl.LOCK_SH, "coord_list_gen.py is writing", TrainSetError)


@contextmanager
def run_lock(save_dir: Path, held: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on a training run's SAVE_DIR (when `held`: torchrun's rank 0
    only): a second train.py into the same folder is refused, not mixed in."""
    fd = lock_folder(save_dir, fcntl.LOCK_EX, "another train.py run is writing", TrainSetError) if held else None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def replace(out: Path, new: list[Entry], how: str) -> list[str]:
    """--overwrite: build the new set in DATASET_DIR/.overwrite.new, then move it over the
    old one (`swap_in`). A failure while building leaves the old set as it was (moved
    images go back to their patch folders); the rest of DATASET_DIR is never touched."""
    check_names_free(out, [f"{i}.png" for i in range(len(new))] + [SIDES, "list.txt"])
    build = out / BUILD
    for leftover in out.glob(f"{BUILD}.*"):  # a kill while making the folder below
        shutil.rmtree(leftover)
    try:  # made with its marker, then renamed: a kill never leaves a build folder without it
        made = Path(tempfile.mkdtemp(prefix=f"{BUILD}.", dir=out))
        (made / MARK).touch()
        made.rename(build)
    except OSError as err:
        raise OutputError(f"{build}: cannot make the folder the new set is built in ({err.strerror})") from None
    try:
        lines = write(build, [], new, how)
    except BaseException:  # a full disk, Ctrl-C: an unfinished new set is removed, moved images go back
        discard(build)
        raise
    swap_in(out)
    return lines


def swap_in(out: Path) -> None:
    """Move the complete new set in DATASET_DIR/.overwrite.new over the old one: the old
    list.txt first (readers then refuse the folder until the end), the images and
    sides.txt, the old set's surplus images out, the new list.txt last. Renames within one
    folder, and each step can be done again: a run killed here is finished by the next."""
    build = out / BUILD
    n = len(listed(build))
    names = [p.name for p in build.iterdir() if p.name not in ("list.txt", MARK)]
    check_names_free(out, names)  # before anything moves: the old set stays whole
    (out / "list.txt").unlink(missing_ok=True)
    for name in names:
        os.replace(build / name, out / name)
    for path in out.glob("*.png"):
        if (index := image_index(path)) is not None and index >= n:
            path.unlink()
    os.replace(build / "list.txt", out / "list.txt")
    shutil.rmtree(build)


def check_names_free(out: Path, names: list[str]) -> None:
    """Refuse a folder or other non-file at a name the new set puts in DATASET_DIR."""
    blocked = next((out / n for n in names if (out / n).exists() and not (out / n).is_file()), None)
    if blocked is not None:
        raise OutputError(f"{blocked}: is not a file, and the new set's {blocked.name} goes there; move it away")


def complete(build: Path) -> bool:
    """Whether a new set `replace` built is whole (list.txt is written last, then the journal goes)."""
    return (build / "list.txt").is_file() and not (build / JOURNAL).exists()


def discard(build: Path) -> None:
    """Remove an unfinished new set, first moving back what it took from patch folders (a
    complete one is left for `recover_replacement` to swap in: after --move its images are
    nowhere else)."""
    if build.is_symlink() or build.exists():
        if build.is_symlink() or not (build / MARK).is_file():
            raise TrainSetError(f"{build}: not a folder coord_list_gen.py made; move it away")
        recover_moves(build, quiet=True)  # a finished move drops its journal: the set is then complete
        if not complete(build):
            shutil.rmtree(build)


def recover_replacement(out: Path) -> None:
    """Finish the business of a killed --overwrite: a complete new set is swapped in; an
    unfinished one is removed, its moved images put back (the old set was never touched)."""
    build = out / BUILD
    discard(build)
    if build.exists():
        swap_in(out)
        warnings.warn(f"{out}: an earlier --overwrite was interrupted after building the new set; swapped it in")


def recover_moves(out: Path, quiet: bool = False) -> None:
    """Finish the business of an interrupted --move (see the module docstring)."""
    journal = out / JOURNAL
    if not journal.is_file():
        return
    state = read_json(journal, "move journal", TrainSetError)
    moves = state.get("moves") if isinstance(state, dict) else None
    if not (isinstance(moves, list) and isinstance(state.get("list_sha256"), str)
            and all(isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m) for m in moves)):
        raise TrainSetError(f"{journal}: not a move journal of coord_list_gen.py; if no --move was interrupted, "
                            "delete it")
    lst = out / "list.txt"
    if lst.exists() and _sha(lst.read_text(encoding="utf-8")) == state["list_sha256"]:
        journal.unlink()  # the move had finished; only the journal was left
        return
    lost = [src for src, dst in moves if not (Path(src).exists() or Path(dst).exists())]
    if lost:  # journals of older versions held paths relative to the folder they ran in
        raise TrainSetError(f"{journal}: an interrupted --move, but {lost[0]} is neither in its patch folder "
                            "nor here; run coord_list_gen.py from the folder the interrupted run started in")
    back = 0
    for src, dst in ((Path(a), Path(b)) for a, b in moves):
        if dst.exists() and src.exists():  # killed between the copy and the delete: both are whole
            dst.unlink()
        elif dst.exists():
            src.parent.mkdir(parents=True, exist_ok=True)
            move_file(dst, src)
            back += 1
    journal.unlink()
    if not quiet:
        warnings.warn(f"{out}: an earlier --move was interrupted; moved {back} images back to their patch folders")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
