"""Whole-mount H&E slides rebuilt from the IDC breast-histology patches.

The IDC data set (Janowczyk & Madabhushi 2016) cut each patient's whole-mount slide,
shown at about 2.5x (roughly 4 um per pixel; every mpp here is approximate), into
patches named `<patient>_idx5_x<X>_y<Y>_class<C>.png`, C = 1 when the patch shows
invasive ductal carcinoma (IDC). Pasting the patches back gives the slide, and the
union of the class-1 patches gives its IDC annotation at patch (cell) resolution.

Coordinates, as checked on the real data: X and Y are 1-based, on a 50-pixel step (all
6,689 patches have X % 50 == Y % 50 == 1). A patch's level-0 box is
`x0 = X - 1, y0 = Y - 1, x1 = x0 + width, y1 = y0 + height` (edge patches are smaller
than 50 x 50: the slide ends there). Placed so, neighbours abut with neither overlap
nor gap: on patient 8863 the colour step across a seam (mean |difference| 17.7
across columns, 18.5 across rows) equals the step between adjacent pixels inside a patch
(17.5-18.8), where a one-pixel overlap would give identical lines and a one-pixel gap
the step of pixels two apart (23-25). The slide spans `(0, 0)` to the largest `x1, y1`,
rounded up to a whole number of 50-pixel cells with glass: so a mask or map lattice
whose downsample divides 50 (`Mask_gen.py --downsample 50`) lies exactly on the cells,
with no drift from a rounded-up last column.

A patient is *complete* when its patches hold both classes (as for 8863-8865 in
../shared/data/idc, whose every tissue patch is there) and *partial* otherwise (only its
IDC patches, or only its others, were kept): then the slide and the CSV show those only.

The annotation is exact at cell level: `load_annotation(xml).contains(p)` is True
exactly when `p`, strictly inside some cell, is inside a class-1 cell. The union's
exteriors are positive polygons (group `Tumor`), its holes negative ones (`Exclusion`).
A negative wins over every positive, so a polygon with a hole that holds a class-1
island is instead written as one ring with all its holes bridged in by zero-width cuts
(a keyhole): for the even-odd test a cut's two copies cancel, so the ring's inside is
exactly the polygon.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.geometry.polygon import orient
from shapely.ops import unary_union

from .annotations import Annotation, write_annotation
from .errors import CrfError
from .heatmap import TILE, pyramid_sizes, write_pyramid
from .io import atomic_write_text
from .synthetic import GLASS

PATCH_NAME = re.compile(r"(?P<patient>\d+)_idx5_x(?P<x>[1-9]\d*)_y(?P<y>[1-9]\d*)_class(?P<label>[01])\.png",
                        re.IGNORECASE)
# The glass of the real patches is (245, 243, 245) (median of their brightest 5 %), so the
# synthetic slides' glass colour fills the slide around the tissue without a visible edge
# around each patch, as pure white would draw.
BACKGROUND = GLASS.astype(np.uint8)
CELLS_HEADER = "x0,y0,x1,y1,label"
CELL = 50  # the patch step: slides are padded to whole cells


class MosaicError(CrfError):
    """A patch folder that cannot be made into a slide (unreadable patch, mixed-up class)."""


class PatchConflict(MosaicError):
    """Two patches of one patient at the same coordinates or with overlapping boxes."""


@dataclass(frozen=True)
class PatchFile:
    """One patch file: its patient, level-0 top-left corner `(x, y)` (0-based) and class."""

    path: Path
    patient: str
    x: int
    y: int
    label: int


@dataclass
class PatchFolder:
    """The patch files of a folder by patient, and the files whose names do not parse."""

    patients: dict[str, list[PatchFile]] = field(default_factory=dict)
    unparsable: list[Path] = field(default_factory=list)


@dataclass
class Mosaic:
    """A patient's rebuilt slide: RGB `image` `(H, W, 3)` and `cells` `(N, 5)` rows
    `x0, y0, x1, y1, label` (level-0 boxes, row-major order)."""

    patient: str
    image: np.ndarray
    cells: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]

    @property
    def idc_cells(self) -> int:
        return int((self.cells[:, 4] == 1).sum())

    @property
    def complete(self) -> bool:
        return 0 < self.idc_cells < len(self.cells)


def parse_name(path: Path) -> PatchFile | None:
    """The patch a file name describes, or None when the name is not an IDC patch name."""
    m = PATCH_NAME.fullmatch(path.name)
    if m is None:
        return None
    return PatchFile(path, m["patient"], int(m["x"]) - 1, int(m["y"]) - 1, int(m["label"]))


def scan(folder: str | Path) -> PatchFolder:
    """Every visible file under `folder` (directly or in sub-folders such as the class
    folders `0/`, `1/`), parsed and grouped by patient, sorted. A class folder that
    disagrees with the class in the name is refused: which one is the truth?"""
    folder = Path(folder)
    if not folder.is_dir():
        raise MosaicError(f"{folder}: not a folder of IDC patches")
    found = PatchFolder()
    groups: dict[str, list[PatchFile]] = defaultdict(list)
    for path in _visible_files_below(folder):
        patch = parse_name(path)
        if patch is None:
            found.unparsable.append(path)
            continue
        if path.parent != folder and path.parent.name in ("0", "1") and int(path.parent.name) != patch.label:
            raise MosaicError(f"{path}: class {patch.label} in the name but in class folder {path.parent.name}")
        groups[patch.patient].append(patch)
    found.patients = {p: groups[p] for p in sorted(groups)}
    return found


def _visible_files_below(folder: Path) -> list[Path]:
    """The files under `folder`, sorted, hidden files and folders left out. Linked folders
    are followed (a training split made of links to the class folders), each once."""
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link loop, or the same folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(root, n) for n in names if not n.startswith(".") and os.path.isfile(os.path.join(root, n))]
    return sorted(files)


def read_patch(path: Path) -> np.ndarray:
    """The patch's RGB pixels; an unreadable image is a `MosaicError` naming it."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise MosaicError(f"{path}: not a readable image")
    return bgr[..., ::-1]


def build(patient: str, patches: list[PatchFile]) -> Mosaic:
    """Paste `patches` (all of one patient) at their boxes on glass. Duplicate
    coordinates and overlapping boxes are refused with a `PatchConflict` naming both files."""
    patches = sorted(patches, key=lambda f: (f.y, f.x))
    seen: dict[tuple[int, int], PatchFile] = {}
    for p in patches:
        if (p.x, p.y) in seen:
            raise PatchConflict(f"{seen[p.x, p.y].path} and {p.path}: patient {patient} has two patches "
                                f"at x={p.x + 1}, y={p.y + 1}")
        seen[p.x, p.y] = p
    pixels = [read_patch(p.path) for p in patches]
    cells = np.array([(p.x, p.y, p.x + a.shape[1], p.y + a.shape[0], p.label) for p, a in zip(patches, pixels)],
                     np.int64).reshape(-1, 5)
    w, h = (-(-int(cells[:, k].max()) // CELL) * CELL for k in (2, 3)) if len(cells) else (0, 0)
    image = np.empty((h, w, 3), np.uint8)
    image[:] = BACKGROUND
    owner = np.full((h, w), -1, np.int32)  # which patch covers each pixel, to find overlaps
    for i, ((x0, y0, x1, y1, _), a) in enumerate(zip(cells, pixels)):
        taken = owner[y0:y1, x0:x1]
        if (taken >= 0).any():
            other = patches[int(taken[taken >= 0][0])]
            raise PatchConflict(f"{other.path} and {patches[i].path}: the boxes of these patches of "
                                f"patient {patient} overlap")
        taken[:] = i
        image[y0:y1, x0:x1] = a
    return Mosaic(patient, image, cells)


def idc_annotation(cells: np.ndarray) -> Annotation:
    """The union of the class-1 cells' boxes as an exact annotation (see the module text)."""
    union = unary_union([shapely.box(*c[:4]) for c in cells if c[4] == 1])
    polys = sorted((orient(p.simplify(0), 1.0) for p in getattr(union, "geoms", [union]) if not p.is_empty),
                   key=lambda p: (p.bounds[1], p.bounds[0]))
    ann = Annotation()
    for i, poly in enumerate(polys):
        holes = [Polygon(h) for h in poly.interiors]
        if any(h.contains(q.representative_point()) for h in holes for q in polys):
            ann.add("positive", f"IDC {i}", keyhole(poly))
            continue
        ann.add("positive", f"IDC {i}", np.array(poly.exterior.coords[:-1]))
        for hole in holes:
            ann.add("negative", f"Exclusion {len(ann.negative)}", np.array(hole.exterior.coords[:-1]))
    return ann


def keyhole(poly: Polygon) -> np.ndarray:
    """One ring (vertices `(K, 2)`) whose even-odd inside is `poly` with its holes. Holes
    are taken by leftmost vertex; each is cut to the nearest point of the ring so far
    straight to its left, which lies inside the polygon or on its boundary (as in
    earcut's hole elimination), so the cuts run along cell edges and cross nothing."""
    ring = [tuple(c) for c in poly.exterior.coords[:-1]]
    for hole in sorted(([tuple(c) for c in h.coords[:-1]] for h in poly.interiors), key=min):
        k = hole.index(min(hole))
        hit, i = _ray_left(ring, hole[k])
        ring = ring[:i + 1] + [hit] + hole[k:] + hole[:k] + [hole[k], hit] + ring[i + 1:]
        ring = [v for j, v in enumerate(ring) if v != ring[j - 1]]  # drop zero-length edges
    return np.array(ring, float)


def _ray_left(ring: list[tuple[float, float]], v: tuple[float, float]) -> tuple[tuple[float, float], int]:
    """The point of `ring` nearest to `v` on the ray from `v` to the left, and the index
    of the edge it lies on (edge `i` runs from `ring[i]` to `ring[i + 1]`)."""
    vx, vy = v
    best, where = None, -1
    for i, (a, b) in enumerate(zip(ring, ring[1:] + ring[:1])):
        if not min(a[1], b[1]) <= vy <= max(a[1], b[1]):
            continue
        if a[1] == b[1]:  # a horizontal edge on the ray: its end nearest to v
            x = min(max(a[0], b[0]), vx) if min(a[0], b[0]) <= vx else None
        else:
            x = a[0] + (vy - a[1]) * (b[0] - a[0]) / (b[1] - a[1])
        if x is not None and x <= vx and (best is None or x > best):
            best, where = x, i
    if best is None:  # the exterior encloses every hole, so some edge is always hit
        raise AssertionError(f"no ring edge left of hole vertex {v}")
    return (best, vy), where


def outline(image: np.ndarray, ann: Annotation, scale: float,
            colours: tuple[tuple[int, int, int], ...] = ((0, 160, 0), (0, 90, 255))) -> np.ndarray:
    """`image` resized by `scale` with the annotation drawn on it (positive, negative colour)."""
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    small = np.ascontiguousarray(small)
    for polys, colour in zip((ann.positive, ann.negative), colours):
        rings = [np.round(p * scale).astype(np.int32) for p in polys]
        cv2.polylines(small, rings, True, colour, 2, cv2.LINE_AA)
    return small


def write_slide(path: str | Path, image: np.ndarray, mpp: float | None) -> None:
    """`image` as a lossless (zlib) tiled pyramidal TIFF that OpenSlide opens, with `mpp`
    (approximate) in the resolution tags; coarser levels averaged with cv2's INTER_AREA."""
    h, w = image.shape[:2]

    def tiles(level: int, lw: int, lh: int):
        img = image if level == 0 else cv2.resize(image, (lw, lh), interpolation=cv2.INTER_AREA)
        ph, pw = -lh % TILE, -lw % TILE
        img = np.concatenate([img, np.broadcast_to(BACKGROUND, (lh, pw, 3))], 1) if pw else img
        img = np.concatenate([img, np.broadcast_to(BACKGROUND, (ph, lw + pw, 3))], 0) if ph else img
        for y in range(0, lh, TILE):
            for x in range(0, lw, TILE):
                yield np.ascontiguousarray(img[y:y + TILE, x:x + TILE])

    write_pyramid(path, pyramid_sizes(w, h), tiles, mpp, compression="zlib")


def write_outputs(mosaic: Mosaic, out_dir: str | Path, mpp: float | None) -> dict[str, Path]:
    """Write `<patient>.tif`, `<patient>.xml` and `<patient>_cells.csv` into `out_dir`."""
    out = Path(out_dir)
    paths = {"tif": out / f"{mosaic.patient}.tif", "xml": out / f"{mosaic.patient}.xml",
             "csv": out / f"{mosaic.patient}_cells.csv"}
    write_slide(paths["tif"], mosaic.image, mpp)
    write_annotation(idc_annotation(mosaic.cells), paths["xml"], to="xml")
    lines = [CELLS_HEADER] + [",".join(map(str, row)) for row in mosaic.cells.tolist()]
    atomic_write_text(paths["csv"], "\n".join(lines) + "\n")
    return paths


# ----------------------------------------------------------------------------- cells as truth


def read_cells(path: str | Path) -> np.ndarray:
    """A `<patient>_cells.csv` as `(N, 5)` int rows `x0, y0, x1, y1, label`."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise MosaicError(f"{path}: cannot read the cells CSV ({getattr(err, 'strerror', None) or err})") from None
    if not lines or lines[0].strip() != CELLS_HEADER:
        raise MosaicError(f"{path}: not a cells CSV (expected the header {CELLS_HEADER})")
    try:
        cells = np.array([[int(v) for v in ln.split(",")] for ln in lines[1:] if ln.strip()], np.int64)
    except ValueError:
        raise MosaicError(f"{path}: expected five integers per line") from None
    cells = cells.reshape(-1, 5) if cells.size else np.zeros((0, 5), np.int64)
    if cells.shape[1] != 5 or not np.isin(cells[:, 4], (0, 1)).all():
        raise MosaicError(f"{path}: expected x0,y0,x1,y1,label lines with label 0 or 1")
    return cells


def lattice_centres(cells: np.ndarray, stride: int, image: int, complete: bool,
                    per_cell: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 centres `(n, 2)` of training images of side `image`, centred on the points of
    a map lattice of `stride` (pixel `c` centred at `floor((c + 0.5) * stride)`, as
    prob_map.py places them) that lie in a cell, split by that cell's class: `(IDC, other)`.
    So the CNN learns on exactly the patch positions the map later asks about. `per_cell`
    keeps only the first few points of each cell (row-major).

    On a complete slide every cell's points are kept (a cell without a patch is background,
    truly not IDC). On a partial slide a missing cell is unknown tissue shown as glass: a
    point is kept only when every cell its image touches has a patch, so no label is a
    guess and no pixel is made-up glass."""
    offsets = np.floor((np.arange(-(-CELL // stride) * 2) + 0.5) * stride).astype(np.int64)
    inside = offsets[offsets < CELL]  # lattice centres within one cell (stride divides CELL)
    dy, dx = (a.ravel() for a in np.meshgrid(inside, inside, indexing="ij"))
    if per_cell is not None:
        dx, dy = dx[:per_cell], dy[:per_cell]
    x0, y0 = cells[:, 0] // CELL * CELL, cells[:, 1] // CELL * CELL
    centres = np.stack([(x0[:, None] + dx).ravel(), (y0[:, None] + dy).ravel()], 1)
    label = np.repeat(cells[:, 4], len(dx))
    keep = np.ones(len(centres), bool)
    if not complete:
        have = {(int(x) // CELL, int(y) // CELL) for x, y in cells[:, :2]}
        half = image // 2
        keep = np.array([all((i, j) in have for i in range((x - half) // CELL, (x + image - half - 1) // CELL + 1)
                             for j in range((y - half) // CELL, (y + image - half - 1) // CELL + 1))
                         for x, y in centres.tolist()], bool)
    return centres[keep & (label == 1)], centres[keep & (label == 0)]


def cell_scores(prob: np.ndarray, downsample: tuple[float, float], cells: np.ndarray,
                tissue: np.ndarray | None = None) -> np.ndarray:
    """The map's mean over each cell's level-0 box, each map pixel (the square
    `[c*dx, (c+1)*dx) x [r*dy, (r+1)*dy)`) weighted by its overlap with the box. With a
    `tissue` mask on the same lattice, the mean over the cell's tissue pixels only (the
    map is not computed elsewhere), 0 for a cell without any."""
    dx, dy = downsample
    h, w = prob.shape
    weight = np.ones(prob.shape) if tissue is None else tissue.astype(float)
    out = np.zeros(len(cells))
    for i, (x0, y0, x1, y1, _) in enumerate(cells):
        (c0, wx), (r0, wy) = _overlaps(x0, x1, dx, w), _overlaps(y0, y1, dy, h)
        rows, cols = slice(r0, r0 + len(wy)), slice(c0, c0 + len(wx))
        area = float(wy @ weight[rows, cols] @ wx)
        out[i] = float(wy @ (prob[rows, cols] * weight[rows, cols]) @ wx) / area if area > 0 else 0.0
    return out


def _overlaps(a: float, b: float, step: float, n: int) -> tuple[int, np.ndarray]:
    """First map pixel touching `[a, b)` and each pixel's overlap with it (pixels of `step`)."""
    first = max(0, int(a // step))
    last = min(n, int(np.ceil(b / step)))
    edges = np.arange(first, last + 1) * step
    return first, np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0, None)
