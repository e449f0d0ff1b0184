"""The Annotation model: named polygons split into positive (tumour) and negative
(non-tumour islands inside tumour) parts, `contains` and `rasterise`; the constants, errors
and warnings; and the checked vertices and shared checks every reader uses. All vertices
are level-0 `(x, y)`.

Coordinates. Every vertex value must be a number (not a boolean, not null), finite and
of magnitude at most `MAX_COORDINATE` (2**31: no slide is larger); anything else is an
`AnnotationError` naming the file, the polygon and the vertex index.

Groups. Each polygon remembers its group (XML `PartOfGroup`, GeoJSON
`classification.name`); polygons from NCRF JSON or vertex txt have none and are written
as `Tumor` / `Exclusion`. `Annotation.renamed` puts all positives into one group and all
negatives into another.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from ..errors import CrfError
from ..io import read_json

POSITIVE_GROUPS = ("Tumor", "_0", "_1", "metastases")
NEGATIVE_GROUPS = ("_2", "Exclusion")
# Group and ASAP-style colour of a polygon that has no group of its own.
DEFAULT_GROUP = {"positive": "Tumor", "negative": "Exclusion"}
DEFAULT_COLOUR = {"positive": "#F4FA58", "negative": "#64FE2E"}
# Predicted lesions (crfcore.evaluation) are a class of their own, never the truth's.
LESION_CLASS, LESION_COLOUR = "Predicted lesion", "#FF00FF"
# No whole-slide image is larger than 2**31 pixels a side: a vertex beyond is no position.
MAX_COORDINATE = 2 ** 31
# a coordinate written as text: ASCII decimal, as ASAP writes it (Python's float() would
# also take "1_000" and full-width digits, which no annotation tool writes)
# (nan and inf pass here, to be refused as "not a finite coordinate")
DECIMAL = re.compile(r"\s*[+-]?((\d+\.?\d*|\.\d+)(e[+-]?\d+)?|nan|inf|infinity)\s*", re.ASCII | re.IGNORECASE)


class AnnotationError(CrfError):
    """An annotation file that cannot be read; the message names the file and the fault."""


class AnnotationWarning(UserWarning):
    """Something odd but recoverable in an annotation (skipped polygon, unknown group)."""


class Polygon(NamedTuple):
    part: str           # "positive" or "negative"
    index: int          # position within its part
    name: str
    group: str          # its own group, or the part's default
    vertices: np.ndarray


@dataclass
class Annotation:
    """Named polygons; `contains` = inside some positive and inside no negative."""

    positive: list[np.ndarray] = field(default_factory=list)
    negative: list[np.ndarray] = field(default_factory=list)
    positive_names: list[str] = field(default_factory=list)
    negative_names: list[str] = field(default_factory=list)
    positive_groups: list[str | None] = field(default_factory=list)
    negative_groups: list[str | None] = field(default_factory=list)
    colours: dict[str, str] = field(default_factory=dict)  # group -> "#RRGGBB" read from the input
    unmapped: list[str] = field(default_factory=list)  # groups of the polygons left out (in neither part)
    skipped: list[str] = field(default_factory=list)  # QuPath objects left out with a class not negative ("cell Tumor")
    dropped: list[str] = field(default_factory=list)  # tumour marks that are no region (< 3 distinct vertices, a point)

    def add_checked(self, source: str, part: str, name: str, vertices: np.ndarray, group: str | None = None) -> None:
        """`add`, unless the polygon has fewer than 3 distinct vertices: then a warning, and
        a positive one is named in `dropped` (a file of only such polygons is no normal slide)."""
        if check_polygon(source, name, vertices):
            self.add(part, name, vertices, group)
        elif part == "positive":
            self.dropped.append(name)

    def add(self, part: str, name: str, vertices: np.ndarray, group: str | None = None) -> None:
        verts = np.asarray(vertices, dtype=float).reshape(-1, 2)
        bad = np.argwhere(~np.isfinite(verts) | (np.abs(verts) > MAX_COORDINATE))
        if bad.size:
            i, k = bad[0]
            _coordinate(float(verts[i, k]), False, f"polygon {name!r} vertex {i}: {'XY'[k]}")
        groups = getattr(self, f"{part}_groups")
        groups += [None] * (len(getattr(self, part)) - len(groups))  # built without groups
        getattr(self, part).append(verts)
        getattr(self, f"{part}_names").append(name)
        groups.append(group)

    def __len__(self) -> int:
        return len(self.positive) + len(self.negative)

    def group(self, part: str, index: int) -> str:
        """The polygon's group, or `Tumor` / `Exclusion` when it has none."""
        groups = getattr(self, f"{part}_groups")
        return (groups[index] if index < len(groups) else None) or DEFAULT_GROUP[part]

    def colour(self, group: str, part: str) -> str:
        """The group's colour as read, else the part's default."""
        return self.colours.get(group) or DEFAULT_COLOUR[part]

    def parts(self, only: str | None = None) -> Iterator[Polygon]:
        """Every polygon (of part `only` when given), positives first."""
        for part in (only,) if only else ("positive", "negative"):
            for i, (n, v) in enumerate(zip(getattr(self, f"{part}_names"), getattr(self, part))):
                yield Polygon(part, i, n, self.group(part, i), v)

    def renamed(self, positive: str, negative: str) -> Annotation:
        """A copy with every positive polygon in group `positive`, every negative in `negative`."""
        return replace(self, positive_groups=[positive] * len(self.positive),
                       negative_groups=[negative] * len(self.negative))

    def bounds(self) -> tuple[float, float, float, float] | None:
        """`(xmin, ymin, xmax, ymax)` over all polygons, or None when empty."""
        if not len(self):
            return None
        allv = np.concatenate(self.positive + self.negative)
        return (*allv.min(axis=0), *allv.max(axis=0))

    def contains(self, points: np.ndarray) -> np.ndarray:
        """`(M,)` bool: each `(x, y)` of `points` is tumour by this annotation."""
        points = np.asarray(points, dtype=float).reshape(-1, 2)
        inside = _inside_any(self.positive, points, np.zeros(len(points), bool))
        if self.negative:
            inside &= ~_inside_any(self.negative, points, np.zeros(len(points), bool))
        return inside

    def rasterise(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """`contains` on the grid of level-0 columns `xs` x rows `ys`: bool `(len(ys), len(xs))`.
        Only the annotation's bounding box is tested, so it stays cheap on large grids."""
        out = np.zeros((len(ys), len(xs)), bool)
        box = self.bounds()
        if box is None:
            return out
        c0, c1 = np.searchsorted(xs, box[0]), np.searchsorted(xs, box[2], side="right")
        r0, r1 = np.searchsorted(ys, box[1]), np.searchsorted(ys, box[3], side="right")
        if c1 > c0 and r1 > r0:
            gx, gy = np.meshgrid(xs[c0:c1], ys[r0:r1])
            out[r0:r1, c0:c1] = self.contains(np.stack([gx.ravel(), gy.ravel()], 1)).reshape(gx.shape)
        return out


def _inside_any(polygons: Sequence[np.ndarray], points: np.ndarray, out: np.ndarray) -> np.ndarray:
    """OR into `out` the points inside any polygon; a bounding-box test first keeps it fast."""
    for poly in polygons:
        lo, hi = poly.min(axis=0), poly.max(axis=0)
        cand = np.flatnonzero(~out & np.all((points >= lo) & (points <= hi), axis=1))
        if cand.size:
            out[cand] = _even_odd(poly, points[cand])
    return out


def _even_odd(poly: np.ndarray, points: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Crossing-number test, vectorised: points sorted by y and cut into horizontal
    strips, so each strip is tested only against the few edges that span it."""
    a, b = poly, np.roll(poly, -1, axis=0)
    keep = a[:, 1] != b[:, 1]  # horizontal edges never cross a horizontal ray
    a, b = a[keep], b[keep]
    ylo, yhi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    slope = (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
    order = np.argsort(points[:, 1], kind="stable")
    inside = np.zeros(len(points), bool)
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        px, py = points[idx, 0:1], points[idx, 1:2]
        e = (yhi >= py[0, 0]) & (ylo <= py[-1, 0])
        spans = (a[e, 1] > py) != (b[e, 1] > py)
        xcross = a[e, 0] + (py - a[e, 1]) * slope[e]
        inside[idx] = np.count_nonzero(spans & (px < xcross), axis=1) % 2 == 1
    return inside


# ----------------------------------------------------------------------------- checked vertices


def _coordinate(value: object, text: bool, where: str) -> float:
    """One vertex value as a float, or an AnnotationError `<where> is <value>, ...`.
    `text`: the value is a string from XML or txt (else a JSON value: numbers only)."""
    shown = ("missing" if value is None else repr(value)) if text else json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:36] + "..."
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        if text and not (isinstance(value, str) and DECIMAL.fullmatch(value)):
            raise ValueError
        v = float(value) if text or number else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        v = None
    except OverflowError:  # an integer beyond any float
        v = math.inf
    if v is None:
        comma = isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+,\d+\s*", value)
        hint = " (a decimal comma, as some locales write? use a point)" if comma else ""
        raise AnnotationError(f"{where} is {shown}, not a number{hint}")
    if not math.isfinite(v):
        raise AnnotationError(f"{where} is {shown}, not a finite coordinate")
    if abs(v) > MAX_COORDINATE:
        raise AnnotationError(f"{where} is {shown}, beyond the {MAX_COORDINATE} pixels no slide exceeds")
    return v


def checked_vertices(source: str, polygon: str, pairs: Sequence[object], text: bool,
                     lines: Sequence[int] | None = None) -> np.ndarray:
    """`(n, 2)` floats from raw `[x, y]` pairs (extra values, like GeoJSON's z, ignored);
    a bad pair or value is refused naming the file (and line), polygon and vertex."""
    fast = _good_vertices(pairs, text)
    if fast is not None:
        return fast
    out = np.empty((len(pairs), 2))
    for i, pair in enumerate(pairs):
        where = f"{source}{f':{lines[i]}' if lines else ''}: polygon {polygon!r} vertex {i}"
        if not isinstance(pair, (list, tuple)) or len(pair) < 2:
            raise AnnotationError(f"{where}: expected [x, y], got {json.dumps(pair)[:40]}")
        out[i] = [_coordinate(pair[k], text, f"{where}: {'XY'[k]}") for k in (0, 1)]
    return out


def _good_vertices(pairs: Sequence[object], text: bool) -> np.ndarray | None:
    """The common case at numpy speed: every pair holds good values (JSON: numbers only);
    None when anything is off, for `checked_vertices` to find and name it."""
    try:
        if not text and not {type(c) for p in pairs for c in p[:2]} <= {int, float}:  # type: ignore[index]
            return None
        if text and not all(isinstance(c, str) and DECIMAL.fullmatch(c) for p in pairs for c in p[:2]):  # type: ignore[index]
            return None
        out = np.array([p[:2] for p in pairs], dtype=float)  # type: ignore[index]
    except (TypeError, ValueError, OverflowError):
        return None
    good = out.shape == (len(pairs), 2) and np.isfinite(out).all() and (np.abs(out) <= MAX_COORDINATE).all()
    return out if good else None


def three_distinct(vertices: np.ndarray) -> bool:
    """Whether the polygon has at least 3 distinct vertices (in linear time)."""
    other = np.any(vertices != vertices[:1], axis=1)
    return bool(other.any() and (other & np.any(vertices != vertices[np.argmax(other)], axis=1)).any())


def check_polygon(source: str, name: str, vertices: np.ndarray) -> bool:
    if not three_distinct(vertices):
        warnings.warn(f"{source}: polygon {name!r} has fewer than 3 distinct vertices; skipped",
                      AnnotationWarning, stacklevel=4)
        return False
    return True


UNGROUPED = "(none)"  # the group name of a polygon without one (name it in --positive-groups, say)


def warn_unknown(source: str, kind: str, found: Iterable[str | None], known: Sequence[str]) -> list[str]:
    """One warning naming the groups (XML) or classes (GeoJSON) that are neither positive
    nor negative (None stands for a polygon without one); returns the group of each
    polygon that leaves out."""
    found = [UNGROUPED if g is None else g for g in found]
    names = sorted(set(found))
    unknown = [g for g in names if g not in known]
    if unknown:
        warnings.warn(f"{source}: polygons of unknown {kind} {unknown} ignored; {kind} found: {names} "
                      "(set --positive-groups / --negative-groups)", AnnotationWarning, stacklevel=3)
    return [g for g in found if g not in known]


# ----------------------------------------------------------------------------- shared by the readers


def load_json(path: Path) -> object:
    return read_json(path, "annotation", AnnotationError)


def remember_colour(ann: Annotation, group: str | None, colour: str | None) -> None:
    if group and colour and re.fullmatch(r"#[0-9A-Fa-f]{6}", colour):
        ann.colours.setdefault(group, colour.upper())
