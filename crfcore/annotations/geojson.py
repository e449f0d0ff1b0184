"""GeoJSON annotations as QuPath reads and writes them.

GeoJSON reading: a FeatureCollection, a bare list of features or one Feature. Polygon and
MultiPolygon geometries are regions, their class mapped to a part by the same group lists
as XML; unknown classes, unclassified features, other geometries (Point, LineString) and
empty ones are ignored with one warning each (a file of only such features of a tumour
class, or of classified points of unknown classes, is no normal slide as truth:
`nothing_read`; unclassified points leave it normal). A hole of a positive polygon
becomes a negative polygon; a hole of a negative polygon cannot be expressed (`contains`
is: inside a positive and inside no negative) and is ignored with a warning.

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
holes named `<name> hole <k>` (in group `_2` when the polygon's class is `_0` or `_1`,
as Camelyon's XML has them; else without a group: `Exclusion` when written).
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import shapely

from .model import (NEGATIVE_GROUPS, POSITIVE_GROUPS, UNGROUPED, Annotation, AnnotationError, AnnotationWarning,
                    Polygon, checked_vertices, load_json, remember_colour, three_distinct,
                    warn_unknown)


# ----------------------------------------------------------------------------- reading


def is_geojson(data: object) -> bool:
    return isinstance(data, list) or (isinstance(data, dict) and data.get("type") in ("FeatureCollection", "Feature"))


def read_geojson(path: str | Path, positive_groups: Sequence[str] = POSITIVE_GROUPS,
                 negative_groups: Sequence[str] = NEGATIVE_GROUPS) -> Annotation:
    """GeoJSON as QuPath exports it (see the module docstring)."""
    path = Path(path)
    return from_geojson(path, load_json(path), positive_groups, negative_groups)


class _Ring(NamedTuple):
    part: str
    index: object  # the stored crfcore index, if any
    name: str
    group: str | None
    vertices: np.ndarray
    hole: bool = False  # a hole of a positive polygon (a negative ring of its own)


def _features(path: Path, data: object) -> list[dict]:
    """The features of a FeatureCollection, a bare list of features or one Feature."""
    if not is_geojson(data):
        raise AnnotationError(f"{path}: not GeoJSON (a FeatureCollection, a Feature or a list of features)")
    feats = data if isinstance(data, list) else [data] if data.get("type") == "Feature" else data.get("features")
    if not isinstance(feats, list):
        raise AnnotationError(f"{path}: a GeoJSON FeatureCollection without a 'features' list")
    for i, feat in enumerate(feats):
        if not isinstance(feat, dict):
            raise AnnotationError(f"{path}: feature {i} is not a JSON object")
        if feat.get("type") == "FeatureCollection":  # not GeoJSON; its polygons would be lost without a word
            raise AnnotationError(f"{path}: feature {i} is a FeatureCollection inside the FeatureCollection "
                                  "(GeoJSON has no nesting: list its features at the top)")
    return feats


def from_geojson(path: Path, data: object, positive_groups: Sequence[str],
                 negative_groups: Sequence[str]) -> Annotation:
    ann, found, classes, others, objects, holed = Annotation(), [], [], Counter(), Counter(), 0
    other_classes: list[str] = []  # of the features that are no region
    for i, feat in enumerate(_features(path, data)):
        props = feat.get("properties") if isinstance(feat.get("properties"), dict) else {}
        if (obj := _object_type(feat, props)) != "annotation":
            objects[obj] += 1
            if (cls := _class_name(props)) not in (None, *negative_groups):  # "Tumor: Positive" cells, say
                ann.skipped.append(f"{obj} {cls}")
            continue
        geom = feat.get("geometry") if isinstance(feat.get("geometry"), dict) else {}
        kind = geom.get("type")
        cls = _class_name(props)
        group = UNGROUPED if cls is None else cls  # so that --positive-groups "(none)" takes unclassified ones
        polys = geom.get("coordinates") if kind == "MultiPolygon" else [geom.get("coordinates")]
        polys = [p for p in polys if p != []] if isinstance(polys, list) else [None]  # RFC 7946: [] is empty
        if kind not in ("Polygon", "MultiPolygon") or not polys:
            what = "null" if kind is None else str(kind) if polys else f"empty {kind}"  # GeoJSON: null, no geometry
            others[what] += 1
            other_classes.append(group)
            if group in positive_groups:  # a tumour marked by a point or line: no region, no normal slide
                ann.dropped.append(f"{what} {cls}")
            continue
        classes.append(cls)
        part = "positive" if group in positive_groups else "negative" if group in negative_groups else None
        if part is None:
            continue
        remember_colour(ann, cls, _class_colour(props))
        name = str(props.get("name") or f"{cls} {i}")
        meta = props.get("crfcore") if kind == "Polygon" and isinstance(props.get("crfcore"), dict) else {}
        for poly in polys:
            mine, ignored = _polygon_rings(path, part, name, cls, poly, meta)
            found.append(mine)
            holed += ignored
    for r in _ordered([r for rings in found for r in rings]):
        ann.add_checked(str(path), r.part, r.name, r.vertices, r.group)
    known = (*positive_groups, *negative_groups)
    ann.unmapped = warn_unknown(str(path), "class(es)", classes, known)
    # points of a class, such as the lesion export's, make no normal slide (as XML's Dots);
    # unclassified ones (QuPath's default: notes, counts) leave it normal
    ann.unmapped += [g for g in other_classes if g not in (*known, UNGROUPED)]
    if objects:
        warnings.warn(f"{path}: {_counted(objects)} ignored (only QuPath annotations are regions, not its "
                      "detections or cells)", AnnotationWarning, stacklevel=3)
    if others:
        warnings.warn(f"{path}: {sum(others.values())} feature(s) of type {', '.join(sorted(others))} "
                      f"ignored (only non-empty Polygon and MultiPolygon geometries are regions; their classes: "
                      f"{', '.join(sorted(set(other_classes)))})", AnnotationWarning, stacklevel=3)
    if holed:
        warnings.warn(f"{path}: the holes of {holed} negative polygon(s) ignored (what lies inside a "
                      "negative polygon is never tumour)", AnnotationWarning, stacklevel=3)
    _warn_islands(path, found)
    return ann


QUPATH_0_2_IDS = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
                  "PathCellObject": "cell", "PathTileObject": "tile", "TMACoreObject": "tma_core"}


def _object_type(feat: dict, props: dict) -> str:
    """QuPath's kind of object: `properties.objectType` (0.3+), else the feature `id` 0.2
    wrote ("PathDetectionObject"); a feature with neither (other tools) is an annotation."""
    obj = props.get("objectType")
    if isinstance(obj, str) and obj:
        return obj.lower()  # QuPath writes lower case; another tool's "Annotation" means the same
    return QUPATH_0_2_IDS.get(feat.get("id"), "annotation") if isinstance(feat.get("id"), str) else "annotation"


def _counted(objects: Counter) -> str:
    """`Counter({"cell": 3, "detection": 1})` as "3 cell(s), 1 detection(s)"."""
    return ", ".join(f"{n} {kind}(s)" for kind, n in sorted(objects.items()))


def _warn_islands(path: Path, polys: list[list[_Ring]]) -> None:
    """Warn of tumour drawn inside another polygon's hole, wholly or partly: NCRF's format
    subtracts every negative polygon from every positive one, so that part is not tumour
    in the mask. `polys`: each GeoJSON polygon's rings, exterior first."""
    holes = [(k, h) for k, rings in enumerate(polys) for h in rings[1:] if h.hole and three_distinct(h.vertices)]
    tumours = [(k, rings[0]) for k, rings in enumerate(polys)
               if rings[0].part == "positive" and three_distinct(rings[0].vertices)]
    if not holes or not tumours:
        return
    hole_areas = np.array([shapely.Polygon(h.vertices) for _, h in holes])
    tumour_areas = np.array([shapely.Polygon(t.vertices) for _, t in tumours])
    t_at, h_at = shapely.STRtree(hole_areas).query(tumour_areas, predicate="intersects")  # bounding boxes first: fast
    pairs = [(t, h) for t, h in zip(t_at, h_at) if tumours[t][0] != holes[h][0]  # a polygon's own hole is meant
             and not shapely.touches(tumour_areas[t], hole_areas[h])]
    if pairs:
        t, h = pairs[0]
        more = f" (and {len(pairs) - 1} more such pair(s))" if len(pairs) > 1 else ""
        warnings.warn(f"{path}: tumour polygon {tumours[t][1].name!r} overlaps {holes[h][1].name!r}{more}; NCRF's "
                      "format subtracts every hole from every tumour polygon, so the overlap is not tumour in the "
                      "mask (draw the ring around it as two polygons instead)", AnnotationWarning, stacklevel=4)


# A hole with no group of its own (QuPath keeps no crfcore properties) in a polygon of
# Camelyon's tumour groups is Camelyon's exclusion group, not the generic `Exclusion`.
CAMELYON_HOLE_GROUP = {"_0": "_2", "_1": "_2"}


def _polygon_rings(path: Path, part: str, name: str, cls: str, poly: object,
                   meta: dict) -> tuple[list[_Ring], int]:
    """One GeoJSON polygon: its exterior ring in `part` and, for a positive polygon, its
    holes as negative rings; and 1 when it is a negative polygon whose holes are dropped."""
    if not isinstance(poly, list):
        raise AnnotationError(f"{path}: polygon {name!r} has no list of coordinate rings")
    rings = [_Ring(part, meta.get("index"), name, cls, _ring(path, name, poly[0], meta))]
    if part == "negative":
        return rings, int(len(poly) > 1)
    holes = meta.get("holes") if isinstance(meta.get("holes"), list) else []
    for k, hole in enumerate(poly[1:]):
        hm = holes[k] if k < len(holes) and isinstance(holes[k], dict) else {}
        hname = str(hm.get("name") or f"{name} hole {k + 1}")
        group = hm.get("group") if isinstance(hm.get("group"), str) else CAMELYON_HOLE_GROUP.get(cls)
        rings.append(_Ring("negative", hm.get("index"), hname, group, _ring(path, hname, hole, hm), True))
    return rings, 0


def _ring(path: Path, name: str, ring: object, meta: dict) -> np.ndarray:
    """A ring's vertices without the closing one, in the order first written."""
    if not isinstance(ring, list):
        raise AnnotationError(f"{path}: polygon {name!r} has a ring that is not a list of positions")
    verts = checked_vertices(str(path), name, ring, text=False)
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
    """The feature's class: `classification.name`, or a QuPath 0.4+ derived class written
    as `classification.names` (["Tumor", "Positive"] is "Tumor: Positive", QuPath's own
    spelling), or a bare string."""
    cls = props.get("classification")
    if isinstance(cls, dict):
        names = cls.get("names")
        cls = cls.get("name") or (": ".join(names) if isinstance(names, list)
                                  and names and all(isinstance(n, str) for n in names) else None)
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


# ----------------------------------------------------------------------------- writing


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
    return shapely.Polygon(verts) if three_distinct(verts) else shapely.Polygon()


def _hosts(ann: Annotation) -> list[int | None]:
    """For each negative polygon, the first positive polygon that contains it without
    touching its boundary and takes it as a hole (both valid, no contact with its earlier
    holes: the polygon with its holes stays valid), or None."""
    hosts: list[int | None] = [None] * len(ann.negative)
    if not ann.positive or not ann.negative:
        return hosts
    pos, neg = np.array([_shape(v) for v in ann.positive]), np.array([_shape(v) for v in ann.negative])
    pv, nv = np.flatnonzero(shapely.is_valid(pos)), np.flatnonzero(shapely.is_valid(neg))
    # (positive, negative) pairs, the negative inside and off the boundary (a hole touching
    # its exterior makes an invalid polygon); the tree keeps this fast for thousands of each
    p_at, n_at = shapely.STRtree(neg[nv]).query(pos[pv], predicate="contains_properly")
    holes: dict[int, list] = {}
    host_of, neg_of = pv[p_at], nv[n_at]  # the pairs as indices into the annotation's parts
    for j in nv:
        for i in sorted(host_of[neg_of == j]):
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
    return {"type": "FeatureCollection", "generator": "crfcore", "features": feats}  # a foreign member: readers skip it
