"""Lesion annotations: polygons split into positive (tumour) and negative (non-tumour
islands inside tumour) parts, read from ASAP XML, NCRF JSON, GeoJSON (QuPath) or
vertex-list txt and written as NCRF JSON, ASAP XML or GeoJSON. All vertices are level-0
`(x, y)`.

Coordinates. Every vertex value must be a number (not a boolean, not null), finite and
of magnitude at most `MAX_COORDINATE` (2**31: no slide is larger); anything else is an
`AnnotationError` naming the file, the polygon and the vertex index.

Groups. Each polygon remembers its group (XML `PartOfGroup`, GeoJSON
`classification.name`); polygons from NCRF JSON or vertex txt have none and are written
as `Tumor` / `Exclusion`. `Annotation.renamed` puts all positives into one group and all
negatives into another.

GeoJSON reading: a FeatureCollection, a bare list of features or one Feature. Polygon and
MultiPolygon geometries are regions, their class mapped to a part by the same group lists
as XML; unknown classes, unclassified features and other geometries (Point, LineString)
are ignored with one warning each. A hole of a positive polygon becomes a negative
polygon; a hole of a negative polygon cannot be expressed (`contains` is: inside a
positive and inside no negative) and is ignored with a warning.

GeoJSON writing (RFC 7946): one Polygon feature per positive polygon, holding as holes the
negative polygons that lie inside it (valid polygons only, holes not overlapping each
other); the other negatives are features of their own. Exterior rings are
counter-clockwise and holes clockwise in the coordinate values as written (signed area),
rings are closed, integral values are written as integers. So that reading gives back
exactly the Annotation written (names, groups, order, vertices), each feature carries
`properties["crfcore"]`:

    {"index": i, "reversed": bool,
     "holes": [{"name": str, "group": str, "index": j, "reversed": bool}, ...]}

`index`: the polygon's position in its part (positive or negative) of the Annotation;
`reversed`: its vertices were written in reverse order to get the orientation; `holes`:
one entry per hole, in ring order. Reading drops each ring's closing vertex, flips
reversed rings back and sorts each part by `index` when every polygon has one. A file
without these properties (QuPath's own export) reads in feature order, rings as written,
holes named `<name> hole <k>`.
"""
from __future__ import annotations

import json
import math
import re
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import shapely
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from ..errors import CrfError
from ..io import atomic_write_text

POSITIVE_GROUPS = ("Tumor", "_0", "_1", "metastases")
NEGATIVE_GROUPS = ("_2", "Exclusion")
# Group and ASAP-style colour of a polygon that has no group of its own.
DEFAULT_GROUP = {"positive": "Tumor", "negative": "Exclusion"}
DEFAULT_COLOUR = {"positive": "#F4FA58", "negative": "#64FE2E"}
# Predicted lesions (crfcore.evaluation) are a class of their own, never the truth's.
LESION_CLASS, LESION_COLOUR = "Predicted lesion", "#FF00FF"
# No whole-slide image is larger than 2**31 pixels a side: a vertex beyond is no position.
MAX_COORDINATE = 2 ** 31


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
        v = float(value) if text or number else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        v = None
    except OverflowError:  # an integer beyond any float
        v = math.inf
    if v is None:
        raise AnnotationError(f"{where} is {shown}, not a number")
    if not math.isfinite(v):
        raise AnnotationError(f"{where} is {shown}, not a finite coordinate")
    if abs(v) > MAX_COORDINATE:
        raise AnnotationError(f"{where} is {shown}, beyond the {MAX_COORDINATE} pixels no slide exceeds")
    return v


def _vertices(source: str, polygon: str, pairs: Sequence[object], text: bool,
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
    None when anything is off, for `_vertices` to find and name it."""
    try:
        if not text and not {type(c) for p in pairs for c in p[:2]} <= {int, float}:  # type: ignore[index]
            return None
        out = np.array([p[:2] for p in pairs], dtype=float)  # type: ignore[index]
    except (TypeError, ValueError, OverflowError):
        return None
    good = out.shape == (len(pairs), 2) and np.isfinite(out).all() and (np.abs(out) <= MAX_COORDINATE).all()
    return out if good else None


def _three_distinct(vertices: np.ndarray) -> bool:
    """Whether the polygon has at least 3 distinct vertices (in linear time)."""
    other = np.any(vertices != vertices[:1], axis=1)
    return bool(other.any() and (other & np.any(vertices != vertices[np.argmax(other)], axis=1)).any())


def _check_polygon(source: str, name: str, vertices: np.ndarray) -> bool:
    if not _three_distinct(vertices):
        warnings.warn(f"{source}: polygon {name!r} has fewer than 3 distinct vertices; skipped",
                      AnnotationWarning, stacklevel=3)
        return False
    return True


def _warn_unknown(source: str, kind: str, found: Iterable[str | None], known: Sequence[str]) -> None:
    """One warning naming the groups (XML) or classes (GeoJSON) that are neither positive
    nor negative; None stands for a polygon without one."""
    names = sorted({"(none)" if g is None else g for g in found})
    unknown = [g for g in names if g not in known]
    if unknown:
        warnings.warn(f"{source}: polygons of unknown {kind} {unknown} ignored; {kind} found: {names} "
                      "(set --positive-groups / --negative-groups)", AnnotationWarning, stacklevel=3)


# ----------------------------------------------------------------------------- readers


def read_asap_xml(path: str | Path, positive_groups: Sequence[str] = POSITIVE_GROUPS,
                  negative_groups: Sequence[str] = NEGATIVE_GROUPS) -> Annotation:
    """ASAP/Camelyon XML. Like NCRF, polygons are taken group by group in the order of
    `positive_groups` (then `negative_groups`), document order within a group."""
    path = Path(path)
    try:
        root = SafeET.parse(str(path)).getroot()
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: malformed XML at line {err.position[0]}: {err.msg}") from None
    except DefusedXmlException as err:  # entities, external references: refused, never expanded
        raise AnnotationError(f"{path}: refused: the XML declares {type(err).__name__.replace('Forbidden', '').lower()} "
                              f"({getattr(err, 'name', '') or getattr(err, 'sysid', '') or 'unsafe construct'}), "
                              "which annotations never need") from None
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    annos = root.findall("./Annotations/Annotation")
    ann = Annotation()
    for g in root.findall("./AnnotationGroups/Group"):
        _remember_colour(ann, g.get("Name"), g.get("Color"))
    for part, groups in (("positive", positive_groups), ("negative", negative_groups)):
        for group in groups:
            for anno in annos:
                if anno.get("PartOfGroup") != group:
                    continue
                name = anno.get("Name", "")
                pairs = [(c.get("X"), c.get("Y")) for c in anno.findall("./Coordinates/Coordinate")]
                verts = _vertices(str(path), name, pairs, text=True)
                if _check_polygon(str(path), name, verts):
                    ann.add(part, name, verts, group)
                    _remember_colour(ann, group, anno.get("Color"))  # when AnnotationGroups lacks it
    _warn_unknown(str(path), "group(s)", (a.get("PartOfGroup") for a in annos),
                  (*positive_groups, *negative_groups))
    return ann


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: cannot read ({err})") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise AnnotationError(f"{path}: malformed JSON: {err}") from None
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read ({err.strerror})") from None


def _is_geojson(data: object) -> bool:
    return isinstance(data, list) or (isinstance(data, dict) and data.get("type") in ("FeatureCollection", "Feature"))


def read_json(path: str | Path, positive_groups: Sequence[str] = POSITIVE_GROUPS,
              negative_groups: Sequence[str] = NEGATIVE_GROUPS) -> Annotation:
    """NCRF JSON (`{"positive": [{"name", "vertices"}], "negative": [...]}`), or GeoJSON
    when the content is GeoJSON (see `read_geojson`)."""
    path = Path(path)
    data = _load_json(path)
    if _is_geojson(data):
        return _from_geojson(path, data, positive_groups, negative_groups)
    if not isinstance(data, dict) or not set(data) <= {"positive", "negative"}:
        raise AnnotationError(f"{path}: neither an NCRF annotation (keys 'positive'/'negative') nor GeoJSON")
    ann = Annotation()
    for part in ("positive", "negative"):
        polys = data.get(part, [])
        for i, poly in enumerate(polys if isinstance(polys, list) else [None]):
            if not isinstance(poly, dict) or not isinstance(poly.get("vertices"), list):
                raise AnnotationError(f"{path}: {part}[{i}] has no valid 'vertices'")
            name = str(poly.get("name", f"{part}{i}"))
            verts = _vertices(str(path), name, poly["vertices"], text=False)
            if _check_polygon(str(path), name, verts):
                ann.add(part, name, verts)
    return ann


def read_geojson(path: str | Path, positive_groups: Sequence[str] = POSITIVE_GROUPS,
                 negative_groups: Sequence[str] = NEGATIVE_GROUPS) -> Annotation:
    """GeoJSON as QuPath exports it (see the module docstring)."""
    path = Path(path)
    return _from_geojson(path, _load_json(path), positive_groups, negative_groups)


class _Ring(NamedTuple):
    part: str
    index: object  # the stored crfcore index, if any
    name: str
    group: str | None
    vertices: np.ndarray


def _features(path: Path, data: object) -> list[dict]:
    """The features of a FeatureCollection, a bare list of features or one Feature."""
    if not _is_geojson(data):
        raise AnnotationError(f"{path}: not GeoJSON (a FeatureCollection, a Feature or a list of features)")
    feats = data if isinstance(data, list) else [data] if data.get("type") == "Feature" else data.get("features")
    if not isinstance(feats, list):
        raise AnnotationError(f"{path}: a GeoJSON FeatureCollection without a 'features' list")
    for i, feat in enumerate(feats):
        if not isinstance(feat, dict):
            raise AnnotationError(f"{path}: feature {i} is not a JSON object")
    return feats


def _from_geojson(path: Path, data: object, positive_groups: Sequence[str],
                  negative_groups: Sequence[str]) -> Annotation:
    ann, rings, classes, others, holed = Annotation(), [], [], Counter(), 0
    for i, feat in enumerate(_features(path, data)):
        props = feat.get("properties") if isinstance(feat.get("properties"), dict) else {}
        geom = feat.get("geometry") if isinstance(feat.get("geometry"), dict) else {}
        kind = geom.get("type")
        if kind not in ("Polygon", "MultiPolygon"):
            others[str(kind)] += 1
            continue
        cls = _class_name(props)
        classes.append(cls)
        part = "positive" if cls in positive_groups else "negative" if cls in negative_groups else None
        if part is None:
            continue
        _remember_colour(ann, cls, _class_colour(props))
        name = str(props.get("name") or f"{cls} {i}")
        polys = geom.get("coordinates") if kind == "MultiPolygon" else [geom.get("coordinates")]
        meta = props.get("crfcore") if kind == "Polygon" and isinstance(props.get("crfcore"), dict) else {}
        for poly in polys if isinstance(polys, list) else [None]:
            mine, ignored = _polygon_rings(path, part, name, cls, poly, meta)
            rings += mine
            holed += ignored
    for r in _ordered(rings):
        if _check_polygon(str(path), r.name, r.vertices):
            ann.add(r.part, r.name, r.vertices, r.group)
    _warn_unknown(str(path), "class(es)", classes, (*positive_groups, *negative_groups))
    if others:
        warnings.warn(f"{path}: {sum(others.values())} feature(s) of type {', '.join(sorted(others))} "
                      "ignored (only Polygon and MultiPolygon are regions)", AnnotationWarning, stacklevel=3)
    if holed:
        warnings.warn(f"{path}: the holes of {holed} negative polygon(s) ignored (what lies inside a "
                      "negative polygon is never tumour)", AnnotationWarning, stacklevel=3)
    return ann


def _polygon_rings(path: Path, part: str, name: str, cls: str, poly: object,
                   meta: dict) -> tuple[list[_Ring], int]:
    """One GeoJSON polygon: its exterior ring in `part` and, for a positive polygon, its
    holes as negative rings; and 1 when it is a negative polygon whose holes are dropped."""
    if not isinstance(poly, list) or not poly:
        raise AnnotationError(f"{path}: polygon {name!r} has no coordinate rings")
    rings = [_Ring(part, meta.get("index"), name, cls, _ring(path, name, poly[0], meta))]
    if part == "negative":
        return rings, int(len(poly) > 1)
    holes = meta.get("holes") if isinstance(meta.get("holes"), list) else []
    for k, hole in enumerate(poly[1:]):
        hm = holes[k] if k < len(holes) and isinstance(holes[k], dict) else {}
        hname = str(hm.get("name") or f"{name} hole {k + 1}")
        group = hm.get("group") if isinstance(hm.get("group"), str) else None
        rings.append(_Ring("negative", hm.get("index"), hname, group, _ring(path, hname, hole, hm)))
    return rings, 0


def _ring(path: Path, name: str, ring: object, meta: dict) -> np.ndarray:
    """A ring's vertices without the closing one, in the order first written."""
    if not isinstance(ring, list):
        raise AnnotationError(f"{path}: polygon {name!r} has a ring that is not a list of positions")
    verts = _vertices(str(path), name, ring, text=False)
    if len(verts) > 1 and (verts[0] == verts[-1]).all():
        verts = verts[:-1]
    return verts[::-1] if meta.get("reversed") is True else verts


def _ordered(rings: list[_Ring]) -> list[_Ring]:
    """Positives then negatives, each part by stored index when every ring of it has one."""
    out = []
    for part in ("positive", "negative"):
        mine = [r for r in rings if r.part == part]
        if all(isinstance(r.index, int) and not isinstance(r.index, bool) for r in mine):
            mine.sort(key=lambda r: r.index)
        out += mine
    return out


def _class_name(props: dict) -> str | None:
    cls = props.get("classification")
    cls = cls.get("name") if isinstance(cls, dict) else cls
    return cls if isinstance(cls, str) and cls else None


def _class_colour(props: dict) -> str | None:
    """QuPath's class colour: `color` [r, g, b] (0.4+) or `colorRGB` packed int (older)."""
    cls = props.get("classification")
    if not isinstance(cls, dict):
        return None
    rgb = cls.get("color")
    if isinstance(cls.get("colorRGB"), int):
        packed = cls["colorRGB"] & 0xFFFFFF
        rgb = [packed >> 16, (packed >> 8) & 255, packed & 255]
    if isinstance(rgb, list) and len(rgb) == 3 and all(isinstance(c, int) and 0 <= c < 256 for c in rgb):
        return "#{:02X}{:02X}{:02X}".format(*rgb)
    return None


def _remember_colour(ann: Annotation, group: str | None, colour: str | None) -> None:
    if group and colour and re.fullmatch(r"#[0-9A-Fa-f]{6}", colour):
        ann.colours.setdefault(group, colour.upper())


def read_txt(path: str | Path, part: str = "positive") -> Annotation:
    """The original repository's vertex list: one `x y` pair per line, any whitespace."""
    path = Path(path)
    pairs, lines = [], []
    try:
        text = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: cannot read ({err})") from None
    for lineno, line in enumerate(text, 1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        if len(fields) != 2:
            raise AnnotationError(f"{path}:{lineno}: expected 'x y', got {line.strip()!r}")
        pairs.append(fields)
        lines.append(lineno)
    ann = Annotation()
    verts = _vertices(str(path), path.stem, pairs, text=True, lines=lines).reshape(-1, 2)
    if _check_polygon(str(path), path.stem, verts):
        ann.add(part, path.stem, verts)
    return ann


def load_annotation(path: str | Path, positive_groups: Sequence[str] = POSITIVE_GROUPS,
                    negative_groups: Sequence[str] = NEGATIVE_GROUPS,
                    txt_part: str = "positive") -> Annotation:
    """Read an annotation by extension: `.xml` (ASAP), `.json` (NCRF, or GeoJSON by
    content), `.geojson` (QuPath), `.txt` (vertices)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".xml":
        return read_asap_xml(path, positive_groups, negative_groups)
    if suffix == ".json":
        return read_json(path, positive_groups, negative_groups)
    if suffix == ".geojson":
        return read_geojson(path, positive_groups, negative_groups)
    if suffix == ".txt":
        return read_txt(path, txt_part)
    raise AnnotationError(f"{path}: unknown annotation type (expected .xml, .json, .geojson or .txt)")


# ----------------------------------------------------------------------------- writers


def to_json_dict(ann: Annotation) -> dict:
    """NCRF's JSON object: integer vertices rounded as `numpy.round` does."""
    return {part: [{"name": n, "vertices": np.round(v).astype(int).tolist()}
                   for n, v in zip(getattr(ann, f"{part}_names"), getattr(ann, part))]
            for part in ("positive", "negative")}


def asap_xml(items: Iterable[tuple[str, str, str, np.ndarray]], colours: dict[str, str]) -> str:
    """An ASAP XML document of `(name, type, group, vertices)` annotations; its
    AnnotationGroups lists `colours` (group -> "#RRGGBB"), which must hold every group."""
    root = ET.Element("ASAP_Annotations")
    annos = ET.SubElement(root, "Annotations")
    for name, kind, group, verts in items:
        el = ET.SubElement(annos, "Annotation", Name=name, Type=kind, PartOfGroup=group, Color=colours[group])
        coords = ET.SubElement(el, "Coordinates")
        for i, (x, y) in enumerate(verts):
            ET.SubElement(coords, "Coordinate", Order=str(i), X=_num(x), Y=_num(y))
    groups = ET.SubElement(root, "AnnotationGroups")
    for group, colour in colours.items():
        ET.SubElement(ET.SubElement(groups, "Group", Name=group, PartOfGroup="None", Color=colour), "Attributes")
    ET.indent(root, space="\t")
    return '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def to_asap_xml(ann: Annotation) -> str:
    """ASAP XML keeping each polygon's group; AnnotationGroups lists the groups used."""
    colours = {p.group: ann.colour(p.group, p.part) for p in ann.parts()}
    return asap_xml(((p.name, "Polygon", p.group, p.vertices) for p in ann.parts()), colours)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _json_num(v: float) -> int | float:
    return int(v) if v.is_integer() else v


def geojson_feature(geometry: dict, name: str, cls: str, colour: str, **properties) -> dict:
    """A QuPath annotation feature of class `cls` ("#RRGGBB" `colour`)."""
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return {"type": "Feature", "geometry": geometry,
            "properties": {"objectType": "annotation", "name": name,
                           "classification": {"name": cls, "color": rgb}, **properties}}


def _oriented(verts: np.ndarray, ccw: bool) -> tuple[list, bool]:
    """The closed ring of `verts` turning counter-clockwise (`ccw`) or clockwise in the
    coordinate values, and whether the vertices had to be reversed for it."""
    x, y = verts[:, 0], verts[:, 1]
    area2 = np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)  # twice the signed area
    flip = bool(area2 < 0) if ccw else bool(area2 > 0)
    v = verts[::-1] if flip else verts
    return [[_json_num(a), _json_num(b)] for a, b in v.tolist() + v[:1].tolist()], flip


def _shape(verts: np.ndarray) -> shapely.Polygon:
    """The shapely polygon of `verts` (empty when it has fewer than 3 distinct vertices)."""
    return shapely.Polygon(verts) if _three_distinct(verts) else shapely.Polygon()


def _hosts(ann: Annotation) -> list[int | None]:
    """For each negative polygon, the first positive polygon that contains it and takes it
    as a hole (both valid, no overlap with its earlier holes), or None."""
    hosts: list[int | None] = [None] * len(ann.negative)
    if not ann.positive or not ann.negative:
        return hosts
    pos, neg = np.array([_shape(v) for v in ann.positive]), np.array([_shape(v) for v in ann.negative])
    pv, nv = np.flatnonzero(shapely.is_valid(pos)), np.flatnonzero(shapely.is_valid(neg))
    inside = shapely.contains(pos[pv][:, None], neg[nv][None, :])
    holes: dict[int, list] = {}
    for c, j in enumerate(nv):
        for i in pv[inside[:, c]]:
            if not any(shapely.intersects(neg[j], h) for h in holes.get(i, [])):
                hosts[j] = int(i)
                holes.setdefault(i, []).append(neg[j])
                break
    return hosts


def to_geojson(ann: Annotation) -> dict:
    """A FeatureCollection of closed, oriented Polygons with QuPath's `classification`
    (see the module docstring for holes, orientation and the `crfcore` property)."""
    hosts = _hosts(ann)
    holes_of: dict[int, list[Polygon]] = {}
    for neg, host in zip(ann.parts("negative"), hosts):
        if host is not None:
            holes_of.setdefault(host, []).append(neg)
    feats = []
    for p in ann.parts():
        if p.part == "negative" and hosts[p.index] is not None:
            continue
        rings, meta = [], {"index": p.index, "holes": []}
        ring, meta["reversed"] = _oriented(p.vertices, ccw=True)
        rings.append(ring)
        for h in holes_of.get(p.index, []) if p.part == "positive" else []:
            ring, flip = _oriented(h.vertices, ccw=False)
            rings.append(ring)
            meta["holes"].append({"name": h.name, "group": h.group, "index": h.index, "reversed": flip})
        feats.append(geojson_feature({"type": "Polygon", "coordinates": rings}, p.name, p.group,
                                     ann.colour(p.group, p.part), crfcore=meta))
    return {"type": "FeatureCollection", "features": feats}


def write_annotation(ann: Annotation, path: str | Path, to: str = "json") -> None:
    """Write `ann` atomically as `json` (NCRF), `xml` (ASAP) or `geojson` (QuPath)."""
    if to == "json":
        text = json.dumps(to_json_dict(ann), indent=1)
    elif to == "xml":
        text = to_asap_xml(ann)
    elif to == "geojson":
        text = json.dumps(to_geojson(ann))
    else:
        raise ValueError(f"unknown annotation format {to!r}")
    atomic_write_text(path, text)
