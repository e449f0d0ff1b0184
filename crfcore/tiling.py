"""Where patches go: centre sampling inside masks (grid, random, from a coords list),
the patch-grid geometry, coords lists and tile file names.

A training sample is an `image_size` square centred on a level-0 point, cut into
`grid x grid` cells of `patch_size`, each centre-cropped to `crop_size`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import CrfError
from .io import visible_files

class TilingError(CrfError):
    """A patch geometry or coords list that is invalid; the message names it."""


TILE_NAME = re.compile(r"^(?P<prefix>.*?)tile_(?P<index>\d+)_level(?P<level>\d+)_"
                       r"(?P<x0>-?\d+)-(?P<y0>-?\d+)-(?P<x1>-?\d+)-(?P<y1>-?\d+)\.png$")


@dataclass(frozen=True)
class GridGeometry:
    """An `image_size` square cut into `grid x grid` cells of `patch_size`, cropped to
    `crop_size`. Node `k = grid * row + col`."""

    image_size: int = 768
    patch_size: int = 256
    crop_size: int = 224

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise TilingError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0 < self.crop_size <= self.patch_size:
            raise TilingError(f"crop_size {self.crop_size} must be in 1..patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def cell_offsets(self) -> np.ndarray:
        """`(grid*grid, 2)` level-0 offsets `(dx, dy)` of the cell centres from the square's
        centre, row-major (level 0 patches)."""
        g, p = self.grid, self.patch_size
        idx = (np.arange(g) - (g - 1) / 2) * p
        gy, gx = np.meshgrid(idx, idx, indexing="ij")
        return np.stack([gx.ravel(), gy.ravel()], axis=1)


def _integral(mask: np.ndarray) -> np.ndarray:
    ii = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    ii[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    return ii


def mask_fraction(mask: np.ndarray, downsample: tuple[float, float],
                  boxes: np.ndarray) -> np.ndarray:
    """For level-0 boxes `(n, 4)`, the fraction of mask pixels (by centre) inside each box;
    a box smaller than a mask pixel takes the value of the pixel under its centre."""
    dx, dy = downsample
    h, w = mask.shape
    # pixel c has its centre in [x0, x1) when x0 <= (c + .5) dx < x1
    c0 = np.clip(np.ceil(boxes[:, 0] / dx - 0.5), 0, w).astype(int)
    c1 = np.clip(np.ceil(boxes[:, 2] / dx - 0.5), 0, w).astype(int)
    r0 = np.clip(np.ceil(boxes[:, 1] / dy - 0.5), 0, h).astype(int)
    r1 = np.clip(np.ceil(boxes[:, 3] / dy - 0.5), 0, h).astype(int)
    ii = _integral(mask)
    n = (c1 - c0) * (r1 - r0)
    inside = ii[r1, c1] - ii[r0, c1] - ii[r1, c0] + ii[r0, c0]
    cx = np.clip(((boxes[:, 0] + boxes[:, 2]) / 2 / dx).astype(int), 0, w - 1)
    cy = np.clip(((boxes[:, 1] + boxes[:, 3]) / 2 / dy).astype(int), 0, h - 1)
    return np.where(n > 0, inside / np.maximum(n, 1), mask[cy, cx])


def grid_centres(mask: np.ndarray, downsample: tuple[float, float], size: int | tuple[int, int],
                 min_fraction: float = 0.2) -> np.ndarray:
    """Centres of a regular grid of `size` boxes (level-0 pixels, one side or (w, h): a
    level's downsample may differ by axis) over the mask's bounding box (as histolab's
    GridTiler lays it) that lie at least `min_fraction` inside the mask."""
    rows, cols = np.nonzero(mask)
    if not rows.size:
        return np.zeros((0, 2), int)
    side = np.maximum(1, np.broadcast_to(np.rint(size), (2,)).astype(int))  # whole pixels, as Patch_gen cuts them
    x0, y0 = cols.min() * downsample[0], rows.min() * downsample[1]
    x1, y1 = (cols.max() + 1) * downsample[0], (rows.max() + 1) * downsample[1]
    xs = np.arange(int(x0), int(np.ceil(x1)), side[0])
    ys = np.arange(int(y0), int(np.ceil(y1)), side[1])
    gx, gy = np.meshgrid(xs, ys)
    boxes = np.stack([gx.ravel(), gy.ravel(), gx.ravel() + side[0], gy.ravel() + side[1]], 1)
    keep = mask_fraction(mask, downsample, boxes) >= min_fraction
    return boxes[keep, :2] + (side + 1) // 2  # the centre of a box, as TileInfo.centre takes it


def random_centres(mask: np.ndarray, downsample: tuple[float, float], n: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Up to `n` distinct level-0 centres uniform inside the mask: mask pixels drawn
    (without replacement while there are enough), then a uniform point inside each pixel."""
    rows, cols = np.nonzero(mask)
    if not rows.size:
        return np.zeros((0, 2), int)
    pick = rng.choice(rows.size, size=n, replace=n > rows.size)
    u = rng.uniform(0, 1, (n, 2))
    centres = np.stack([_pixel_in_cell(cols[pick], u[:, 0], downsample[0]),
                        _pixel_in_cell(rows[pick], u[:, 1], downsample[1])], 1)
    _, first = np.unique(centres, axis=0, return_index=True)  # a pixel drawn twice may give one centre twice
    return centres[np.sort(first)]


def _pixel_in_cell(cell: np.ndarray, u: np.ndarray, d: float) -> np.ndarray:
    """A level-0 pixel uniform among those of mask cell `cell` (pixel x is in cell
    floor(x / d)), at fraction `u`: never a pixel of the next cell, where d is fractional."""
    lo, hi = np.ceil(cell * d), np.maximum(np.ceil((cell + 1) * d), np.ceil(cell * d) + 1)
    return (lo + np.floor(u * (hi - lo))).astype(int)


MAX_COORD = 2**31  # no slide is larger; a bigger coordinate is a corrupt line


def read_coords(path: str | Path) -> list[tuple[str, int, int]]:
    """An NCRF coords list: `slide_id,x,y` per line (level-0 centre); a first line whose x
    and y are not numbers (a spreadsheet's header, `slide_id,x,y`) is skipped."""
    out: list[tuple[str, int, int]] = []
    header_allowed = True
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # a spreadsheet's BOM
    except (OSError, UnicodeDecodeError) as err:
        raise TilingError(f"{path}: cannot read the coords list ({getattr(err, 'strerror', None) or err})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            sid, x, y = parts
            xy = float(x), float(y)
        except ValueError:
            if header_allowed and len(parts) == 3 and not any(map(is_number, parts[1:])):
                header_allowed = False
                continue
            raise TilingError(f"{path}:{lineno}: expected 'slide_id,x,y' with numbers x and y, "
                              f"got {line.strip()!r}") from None
        header_allowed = False
        if not all(math.isfinite(v) and abs(v) < MAX_COORD for v in xy):
            raise TilingError(f"{path}:{lineno}: coordinates {x}, {y} are not finite pixel positions")
        out.append((sid, int(round(xy[0])), int(round(xy[1]))))
    return out


def is_number(text: str) -> bool:
    """Whether `text` reads as a float (a header's `x` does not)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_coords_id(slide_id: str, source: str | Path) -> None:
    """Refuse a slide id that a coords list cannot hold: its lines are `slide_id,x,y` in
    UTF-8, read with str.splitlines and stripped fields (`source`: where the id comes from)."""
    try:
        slide_id.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 (its bytes kept as surrogates)
        raise TilingError(f"{source}: the slide's name is not UTF-8 text, which a coords list needs; "
                          "rename the file") from None
    if "," in slide_id or len(f"{slide_id}.".splitlines()) > 1 or slide_id != slide_id.strip():
        raise TilingError(f"{source}: a comma, line break or space at either end of the slide's name "
                          f"({slide_id!r}) cannot go in a coords list; rename the slide")


def format_coords(slide_id: str, centres: np.ndarray, source: str | Path | None = None) -> str:
    """NCRF's coords-list lines of one slide (the id checked when there is a line to write)."""
    if len(centres):
        check_coords_id(slide_id, source or slide_id)
    return "".join(f"{slide_id},{int(x)},{int(y)}\n" for x, y in centres)


def tile_name(index: int, level: int, box: tuple[int, int, int, int]) -> str:
    """histolab's tile file name, with the level-0 box."""
    x0, y0, x1, y1 = box
    return f"tile_{index}_level{level}_{x0}-{y0}-{x1}-{y1}.png"


@dataclass(frozen=True)
class TileInfo:
    path: Path
    index: int
    level: int
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        # Patch_gen's box of a centre c is c - side / 2 truncated: an odd side puts c one
        # pixel past the box's lower middle, so round the middle up
        return (x0 + x1 + 1) // 2, (y0 + y1 + 1) // 2

    @property
    def side(self) -> tuple[int, int]:
        """Level-0 width and height the tile covers."""
        x0, y0, x1, y1 = self.box
        return x1 - x0, y1 - y0


def parse_tile_name(path: Path) -> TileInfo | None:
    m = TILE_NAME.match(path.name)
    if not m:
        return None
    box = tuple(int(m[k]) for k in ("x0", "y0", "x1", "y1"))
    x0, y0, x1, y1 = box
    if not (x0 < x1 < MAX_COORD and y0 < y1 < MAX_COORD):  # an empty or absurd box: not a tile we cut
        return None
    return TileInfo(path, int(m["index"]), int(m["level"]), box)  # type: ignore[arg-type]


def group_boxes(boxes: np.ndarray, block: int = 4096,
                max_waste: float = 3.0) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Group level-0 boxes `(n, 4)` into regions to read once and slice: boxes bucketed by
    `block` of their top-left corner; a bucket whose bounding region is more than
    `max_waste` times the boxes' own area (sparse random patches) is read box by box."""
    groups: list[tuple[tuple[int, int, int, int], np.ndarray]] = []
    if not len(boxes):
        return groups
    keys = (boxes[:, 1] // block) * (1 << 20) + boxes[:, 0] // block
    order = np.argsort(keys, kind="stable")
    for chunk in np.split(order, np.flatnonzero(np.diff(keys[order])) + 1):
        b = boxes[chunk]
        region = (int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max()))
        area = (region[2] - region[0]) * (region[3] - region[1])
        own = float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum())
        if area <= max_waste * own:
            groups.append((region, chunk))
        else:
            groups += [(tuple(int(v) for v in boxes[i]), np.array([i])) for i in chunk]
    return groups


def preview_boxes(thumb: np.ndarray, boxes: np.ndarray, downsample: tuple[float, float],
                  colour: tuple[int, int, int] = (0, 160, 0)) -> np.ndarray:
    """The thumbnail (at `downsample`) with each level-0 box outlined."""
    img = np.ascontiguousarray(thumb.copy())
    for x0, y0, x1, y1 in boxes:
        p0 = (int(x0 / downsample[0]), int(y0 / downsample[1]))
        p1 = (int(x1 / downsample[0]) - 1, int(y1 / downsample[1]) - 1)
        cv2.rectangle(img, p0, p1, colour, 1)
    return img


def collect_tiles(patch_dir: Path) -> tuple[dict[str, list[TileInfo]], list[Path]]:
    """Tiles per slide id in a Patch_gen folder (`<slide_id>/tile_*.png` sub-folders) or a
    histolab tiler folder (tiles directly inside: the folder's name is the slide id),
    sorted by tile index; also the PNG files whose names do not parse."""
    patch_dir = Path(patch_dir)
    direct = visible_files(patch_dir, (".png",))
    folders = {patch_dir.name: direct} if any(TILE_NAME.match(p.name) for p in direct) else {}
    for sub in sorted(p for p in patch_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        folders[sub.name] = visible_files(sub, (".png",))
    tiles: dict[str, list[TileInfo]] = {}
    bad: list[Path] = []
    for sid, files in folders.items():
        infos = []
        for f in files:
            info = parse_tile_name(f)
            (infos.append(info) if info else bad.append(f))
        if infos:
            tiles[sid] = sorted(infos, key=lambda t: t.index)
    return tiles, bad
