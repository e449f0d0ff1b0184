"""One slide's tiles in a Patch_gen.py folder, replaced so that nothing is lost.

`PATCH_DIR/<slide_id>/tile_*.png` are the tiles and `PATCH_DIR/<slide_id>.txt` (the centres)
marks them complete. A new set is cut into the hidden staging folder `.<slide_id>.partial`
and replaces the old one only once complete: the old tiles, then the old .txt, are moved
aside into `.<slide_id>.old`, the new tiles move in and the new .txt is written; then the
aside folder is renamed `.<slide_id>.discarded`, the one step that lets the old set go.
A run that fails or is stopped before that step puts the old set back, and so does the
next run after a kill (readers refuse the folder while `.old` exists); after it, the new
set is complete. An undo that is itself killed is finished by the next run.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import CrfError
from .io import atomic_write_text
from .tiling import parse_tile_name, read_coords


RESTORING = "restoring.txt"  # the old .txt, in the aside folder, once the new tiles are gone
ASIDE = ".old"  # suffix of the folder holding the old set while it is replaced


class TileFolderError(CrfError):
    """A slide's tile folder that cannot be cut into or replaced."""


def tiles_in(folder: Path) -> list[Path]:
    """The tile PNGs in `folder` (other files are the user's and left alone)."""
    return [p for p in folder.glob("*.png") if parse_tile_name(p)] if folder.is_dir() else []


def interrupted(out: Path) -> list[str]:
    """The slides of PATCH_DIR `out` whose replacement was stopped half-way (readers
    refuse the folder until the next Patch_gen run puts their old set back)."""
    return sorted(p.name[1:-len(ASIDE)] for p in out.glob(f".*{ASIDE}") if p.is_dir())


@dataclass(frozen=True)
class TileFolder:
    """The tile folder of slide `sid` in `out` (PATCH_DIR). `prepare` before cutting into
    the staging folder it returns; `replace` with the names cut and the new .txt's text."""

    out: Path
    sid: str

    @property
    def marker(self) -> Path:
        return self.out / f"{self.sid}.txt"

    @property
    def folder(self) -> Path:
        return self.out / self.sid

    @property
    def staging(self) -> Path:
        return self.out / f".{self.sid}.partial"

    @property
    def aside(self) -> Path:  # the old set while it is being replaced
        return self.out / f".{self.sid}{ASIDE}"

    @property
    def discarded(self) -> Path:  # the old set once the new one is in
        return self.out / f".{self.sid}.discarded"

    def prepare(self, overwrite: bool) -> Path:
        """Check that the slide may be cut and return an empty staging folder. A complete
        set is refused unless `overwrite`, and then stays in place until the new one is
        complete; tiles of a killed run (no .txt) are stale and cleared, and so is whatever
        a killed run left in the staging folder (the tool's own)."""
        self.check_replaceable()
        self.undo_interrupted()
        self.abandon()  # what a killed run cut
        if self.marker.exists() and not overwrite:
            raise TileFolderError(f"{self.out}: slide {self.sid} already has its patches ({self.marker.name}); "
                                  "use --overwrite to cut them again")
        stale = [] if self.marker.exists() else tiles_in(self.folder)
        if stale:
            warnings.warn(f"{self.folder}: removing {len(stale)} tiles of an unfinished earlier run")
        for p in stale:
            p.unlink()
        self.staging.mkdir(parents=True)
        return self.staging

    def check_replaceable(self) -> None:
        """Refuse, before any cutting, a slide folder whose tiles could not be replaced (a
        link, a file, read-only), or a link or file where the tool keeps its own folders."""
        for own in (self.staging, self.aside, self.discarded):
            if own.is_symlink() or (own.exists() and not own.is_dir()):
                raise TileFolderError(f"{own}: not a folder of Patch_gen's own (a link or a file); remove it")
        if self.marker.is_file() and not self.own_marker():
            raise TileFolderError(f"{self.marker}: is not Patch_gen's list of {self.sid}'s patch centres (an "
                                  "annotation?); it would be replaced: move it, or choose another PATCH_DIR")
        folder = self.folder
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise TileFolderError(f"{folder}: is a link or a file, not the slide's tile folder")
        if folder.is_dir():
            try:
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe."):
                    pass
            except OSError as err:
                raise TileFolderError(f"{folder}: cannot replace its tiles ({err.strerror or err})") from None

    def complete_count(self) -> int:
        """How many tiles the slide's complete set holds (0 without one)."""
        return len(tiles_in(self.folder)) if self.marker.is_file() and self.folder.is_dir() else 0

    def own_marker(self) -> bool:
        """Whether the .txt is a coords list of this slide's centres, as `replace` writes it."""
        try:
            return all(sid == self.sid for sid, _, _ in read_coords(self.marker))
        except CrfError:
            return False

    def replace(self, names: list[str], marker_text: str) -> None:
        """Put the complete new tiles (`names`, in the staging folder) in place of the old,
        and write the new .txt (`marker_text`)."""
        if sorted(p.name for p in tiles_in(self.staging)) != sorted(names):  # e.g. a second run on this slide
            raise TileFolderError(f"{self.staging}: holds other tiles than this run cut; "
                                  f"is another Patch_gen cutting {self.sid}?")
        self.aside.mkdir()
        try:
            for p in tiles_in(self.folder):  # the .txt last: while it is here, so are its tiles
                os.replace(p, self.aside / p.name)
            if self.marker.exists():
                os.replace(self.marker, self.aside / self.marker.name)
            self.folder.mkdir(exist_ok=True)
            for p in tiles_in(self.staging):
                os.replace(p, self.folder / p.name)
            atomic_write_text(self.marker, marker_text)
        except BaseException:  # a tile that cannot be moved (immutable, another user's), a full disk, Ctrl-C
            self.undo_interrupted()
            raise
        os.replace(self.aside, self.discarded)  # the one step that lets the old set go
        shutil.rmtree(self.discarded, ignore_errors=True)  # leftovers are removed by the next run
        self.abandon()  # the emptied staging folder

    def abandon(self) -> None:
        """Remove the staging folder with what it holds: the new tiles of a cut that failed
        or was stopped (the old set is untouched), or nothing once they have moved in."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def undo_interrupted(self) -> None:
        """Put back the old set of a replacement that failed or was killed before it let
        the old set go (its aside folder still exists); remove what a finished one left."""
        shutil.rmtree(self.discarded, ignore_errors=True)
        if not self.aside.is_dir():
            return
        old_marker, restoring = self.aside / self.marker.name, self.aside / RESTORING
        if old_marker.exists():  # all old tiles were aside: those in the folder are new
            for p in tiles_in(self.folder):
                p.unlink()
            os.replace(old_marker, restoring)  # done: from here the folder holds old tiles only
        self.folder.mkdir(exist_ok=True)
        for p in tiles_in(self.aside):
            os.replace(p, self.folder / p.name)
        if restoring.exists():
            os.replace(restoring, self.marker)
        shutil.rmtree(self.aside)
