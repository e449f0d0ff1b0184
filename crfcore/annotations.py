"""Lesion annotations: polygons split into positive (tumour) and negative (non-tumour
islands inside tumour) parts, read from ASAP XML, NCRF JSON or vertex-list txt and
written as NCRF JSON, ASAP XML or GeoJSON. All vertices are level-0 `(x, y)`.
"""
from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from defusedxml import ElementTree as SafeET

from .errors import CrfError
from .io import atomic_write_text

POSITIVE_GROUPS = ("Tumor", "_0", "_1", "metastases")
NEGATIVE_GROUPS = ("_2", "Exclusion")
# Group written to ASAP XML / GeoJSON for each part, with ASAP-style colours.
GROUP_OF = {"positive": ("Tumor", "#F4FA58"), "negative": ("Exclusion", "#64FE2E")}


class AnnotationError(CrfError):
    """An annotation file that cannot be read; the message names the file and the fault."""


class AnnotationWarning(UserWarning):
    """Something odd but recoverable in an annotation (skipped polygon, unknown group)."""


@dataclass
class Annotation:
    """Named polygons; `contains` = inside some positive and inside no negative."""

    positive: list[np.ndarray] = field(default_factory=list)
    negative: list[np.ndarray] = field(default_factory=list)
    positive_names: list[str] = field(default_factory=list)
    negative_names: list[str] = field(default_factory=list)

    def add(self, part: str, name: str, vertices: np.ndarray) -> None:
        getattr(self, part).append(np.asarray(vertices, dtype=float).reshape(-1, 2))
        getattr(self, f"{part}_names").append(name)

    def __len__(self) -> int:
        return len(self.positive) + len(self.negative)

    def parts(self) -> Iterable[tuple[str, str, np.ndarray]]:
        """`(part, name, vertices)` for every polygon, positives first."""
        for part in ("positive", "negative"):
            yield from ((part, n, v) for n, v in zip(getattr(self, f"{part}_names"), getattr(self, part)))

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


def _distinct_vertices(vertices: np.ndarray) -> int:
    return len(np.unique(vertices, axis=0))


def _check_polygon(source: str, name: str, vertices: np.ndarray) -> bool:
    if _distinct_vertices(vertices) < 3:
        warnings.warn(f"{source}: polygon {name!r} has fewer than 3 distinct vertices; skipped",
                      AnnotationWarning, stacklevel=3)
        return False
    return True


def read_asap_xml(path: str | Path, positive_groups: Sequence[str] = POSITIVE_GROUPS,
                  negative_groups: Sequence[str] = NEGATIVE_GROUPS) -> Annotation:
    """ASAP/Camelyon XML. Like NCRF, polygons are taken group by group in the order of
    `positive_groups` (then `negative_groups`), document order within a group."""
    path = Path(path)
    try:
        root = SafeET.parse(str(path)).getroot()
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: malformed XML at line {err.position[0]}: {err.msg}") from None
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read ({err.strerror})") from None
    annos = root.findall("./Annotations/Annotation")
    ann = Annotation()
    for part, groups in (("positive", positive_groups), ("negative", negative_groups)):
        for group in groups:
            for anno in annos:
                if anno.get("PartOfGroup") != group:
                    continue
                name = anno.get("Name", "")
                try:
                    verts = np.array([[float(c.get("X")), float(c.get("Y"))]
                                      for c in anno.findall("./Coordinates/Coordinate")])
                except (TypeError, ValueError):
                    raise AnnotationError(f"{path}: annotation {name!r} has a coordinate "
                                          "without numeric X and Y") from None
                if _check_polygon(str(path), name, verts.reshape(-1, 2)):
                    ann.add(part, name, verts)
    found = sorted({a.get("PartOfGroup", "") for a in annos})
    unknown = [g for g in found if g not in (*positive_groups, *negative_groups)]
    if unknown:
        warnings.warn(f"{path}: annotations in unknown group(s) {unknown} ignored; groups found: "
                      f"{found} (set --positive-groups / --negative-groups)", AnnotationWarning,
                      stacklevel=2)
    return ann


def read_json(path: str | Path) -> Annotation:
    """NCRF JSON: `{"positive": [{"name", "vertices"}], "negative": [...]}`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}") from None
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(data, dict) or not set(data) <= {"positive", "negative"}:
        raise AnnotationError(f"{path}: not an NCRF annotation (keys 'positive'/'negative')")
    ann = Annotation()
    for part in ("positive", "negative"):
        for i, poly in enumerate(data.get(part, [])):
            try:
                name, verts = str(poly.get("name", f"{part}{i}")), np.array(poly["vertices"], float)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise AnnotationError(f"{path}: {part}[{i}] has no valid 'vertices'") from None
            if _check_polygon(str(path), name, verts.reshape(-1, 2)):
                ann.add(part, name, verts)
    return ann


def read_txt(path: str | Path, part: str = "positive") -> Annotation:
    """The original repository's vertex list: one `x y` pair per line, any whitespace."""
    path = Path(path)
    verts = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: cannot read ({err})") from None
    for lineno, line in enumerate(lines, 1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        try:
            x, y = (float(v) for v in fields)
        except ValueError:
            raise AnnotationError(f"{path}:{lineno}: expected 'x y', got {line.strip()!r}") from None
        verts.append((x, y))
    ann = Annotation()
    verts_arr = np.array(verts, float).reshape(-1, 2)
    if _check_polygon(str(path), path.stem, verts_arr):
        ann.add(part, path.stem, verts_arr)
    return ann


def load_annotation(path: str | Path, positive_groups: Sequence[str] = POSITIVE_GROUPS,
                    negative_groups: Sequence[str] = NEGATIVE_GROUPS,
                    txt_part: str = "positive") -> Annotation:
    """Read an annotation by extension: `.xml` (ASAP), `.json` (NCRF), `.txt` (vertices)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".xml":
        return read_asap_xml(path, positive_groups, negative_groups)
    if suffix == ".json":
        return read_json(path)
    if suffix == ".txt":
        return read_txt(path, txt_part)
    raise AnnotationError(f"{path}: unknown annotation type (expected .xml, .json or .txt)")


def to_json_dict(ann: Annotation) -> dict:
    """NCRF's JSON object: integer vertices rounded as `numpy.round` does."""
    return {part: [{"name": n, "vertices": np.round(v).astype(int).tolist()}
                   for n, v in zip(getattr(ann, f"{part}_names"), getattr(ann, part))]
            for part in ("positive", "negative")}


def to_asap_xml(ann: Annotation) -> str:
    """ASAP XML with one group for positive and one for negative polygons."""
    root = ET.Element("ASAP_Annotations")
    annos = ET.SubElement(root, "Annotations")
    for part, name, verts in ann.parts():
        group, colour = GROUP_OF[part]
        el = ET.SubElement(annos, "Annotation", Name=name, Type="Polygon",
                           PartOfGroup=group, Color=colour)
        coords = ET.SubElement(el, "Coordinates")
        for i, (x, y) in enumerate(verts):
            ET.SubElement(coords, "Coordinate", Order=str(i), X=_num(x), Y=_num(y))
    groups = ET.SubElement(root, "AnnotationGroups")
    for group, colour in GROUP_OF.values():
        ET.SubElement(ET.SubElement(groups, "Group", Name=group, PartOfGroup="None",
                                    Color=colour), "Attributes")
    ET.indent(root, space="\t")
    return '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def to_geojson(ann: Annotation) -> dict:
    """A FeatureCollection of closed Polygons with QuPath's `classification` property."""
    feats = []
    for part, name, verts in ann.parts():
        ring = verts.tolist() + [verts[0].tolist()]
        cls = "Tumor" if part == "positive" else "Exclusion"
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"objectType": "annotation", "name": name,
                                     "classification": {"name": cls, "color": _rgb(part)}}})
    return {"type": "FeatureCollection", "features": feats}


def _rgb(part: str) -> list[int]:
    h = GROUP_OF[part][1].lstrip("#")
    return [int(h[i:i + 2], 16) for i in (0, 2, 4)]


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

