"""One slide's tiles in a Patch_gen.py folder, replaced so that nothing is lost.

`PATCH_DIR/<slide_id>/tile_*.png` are the tiles and `PATCH_DIR/<slide_id>.txt` (the centres,
written last) marks them complete. A new set is cut into the hidden staging folder
`.<slide_id>.partial` and replaces the old one only once complete: the old tiles are moved
aside into `.<slide_id>.old` first (put back if one cannot be moved), then the .txt goes and
the new tiles move in. A failed or stopped run keeps the old set; a kill while the old tiles
are moved aside is undone by the next run; only a kill in the last renames leaves the slide
marked unfinished (no .txt), which readers refuse and the next run clears.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import CrfError
from .tiling import parse_tile_name


class TileFolderError(CrfError):
    """A slide's tile folder that cannot be cut into or replaced."""


def tiles_in(folder: Path) -> list[Path]:
    """The tile PNGs in `folder` (other files are the user's and left alone)."""
    return [p for p in folder.glob("*.png") if parse_tile_name(p)] if folder.is_dir() else []


@dataclass(frozen=True)
class TileFolder:
    out: Path  # PATCH_DIR
    sid: str   # slide id

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
    def held(self) -> Path:
        return self.out / f".{self.sid}.old"

    def prepare(self, overwrite: bool) -> Path:
        """Check that the slide may be cut and return an empty staging folder. A complete
        set is refused unless `overwrite`, and then stays in place until the new one is
        complete; tiles of a killed run (no .txt) are stale and cleared, and so is whatever
        a killed run left in the staging folder (the tool's own)."""
        self.check_replaceable()
        shutil.rmtree(self.staging, ignore_errors=True)
        self.finish_replacing()
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
        """Refuse, before any cutting, a slide folder whose tiles could not be replaced
        (not a folder, read-only), or a staging path that is not the tool's folder."""
        staging, folder = self.staging, self.folder
        if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
            raise TileFolderError(f"{staging}: not Patch_gen's staging folder (a link or a file); remove it")
        if folder.exists() and not folder.is_dir():
            raise TileFolderError(f"{folder}: is a file, not the slide's tile folder")
        if folder.is_dir():
            try:
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe."):
                    pass
            except OSError as err:
                raise TileFolderError(f"{folder}: cannot replace its tiles ({err.strerror or err})") from None

    def replace(self, names: list[str]) -> None:
        """Put the complete new tiles (`names`, in the staging folder) in place of the old."""
        if sorted(p.name for p in tiles_in(self.staging)) != sorted(names):  # e.g. a second run on this slide
            raise TileFolderError(f"{self.staging}: holds other tiles than this run cut; "
                                  f"is another Patch_gen cutting {self.sid}?")
        self.move_old_aside()
        self.marker.unlink(missing_ok=True)  # from here until the new .txt, the slide reads as unfinished
        self.folder.mkdir(exist_ok=True)
        for p in tiles_in(self.staging):
            os.replace(p, self.folder / p.name)
        shutil.rmtree(self.staging)
        shutil.rmtree(self.held)

    def move_old_aside(self) -> None:
        """Move the old tiles into the `held` folder, all or none."""
        self.held.mkdir(exist_ok=True)
        moved = []
        try:
            for p in tiles_in(self.folder):
                os.replace(p, self.held / p.name)
                moved.append(p)
        except OSError:  # an immutable tile, or another user's
            for p in moved:
                os.replace(self.held / p.name, p)
            self.held.rmdir()
            raise

    def finish_replacing(self) -> None:
        """After a run killed while replacing: with the .txt still there, the old tiles were
        being moved aside and go back; without it, they are discarded."""
        if not self.held.is_dir() or self.held.is_symlink():
            return
        if self.marker.exists():
            for p in tiles_in(self.held):
                os.replace(p, self.folder / p.name)
        shutil.rmtree(self.held)
