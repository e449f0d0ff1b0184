"""Lesion annotations: polygons split into positive (tumour) and negative (non-tumour
islands inside tumour) parts, read from ASAP XML, NCRF JSON, GeoJSON (QuPath) or
vertex-list txt and written as NCRF JSON, ASAP XML or GeoJSON. All vertices are level-0
`(x, y)`.

The package, one module per concern (other code imports every name from
`crfcore.annotations`, never from the modules):

    model.py    Annotation (named positive / negative polygons, `contains`, `rasterise`),
                Polygon, the group / colour / coordinate constants, AnnotationError and
                AnnotationWarning, checked vertices and the checks the readers share
    asap.py     ASAP XML: read_asap_xml, asap_xml, to_asap_xml
    ncrf.py     NCRF JSON and vertex txt: read_json, read_txt, to_json_dict, lost_in_json
    geojson.py  GeoJSON (QuPath): read_geojson, geojson_feature, to_geojson
    __init__    the public API re-exported; load_annotation / write_annotation choose the
                format by extension / name

Imports point one way: asap and geojson import model; ncrf imports model and geojson (a
`.json` may hold GeoJSON); this __init__ imports them all.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from defusedxml import ElementTree as SafeET

from ..errors import CrfError
from ..io import all_companions, atomic_write_text
from ..io import read_json as load_json
from .asap import WRITTEN_BY, asap_xml, read_asap_xml, to_asap_xml
from .geojson import geojson_feature, is_geojson, read_geojson, to_geojson
from .model import (DEFAULT_COLOUR, DEFAULT_GROUP, LESION_CLASS, LESION_COLOUR, MAX_COORDINATE,
                    NEGATIVE_GROUPS, POSITIVE_GROUPS, Annotation, AnnotationError, AnnotationWarning,
                    Polygon, three_distinct)
from .ncrf import is_ncrf, lost_in_json, read_json, read_txt, to_json_dict

__all__ = [
    "DEFAULT_COLOUR", "DEFAULT_GROUP", "LESION_CLASS", "LESION_COLOUR", "MAX_COORDINATE",
    "NEGATIVE_GROUPS", "POSITIVE_GROUPS", "Annotation", "AnnotationError", "AnnotationWarning",
    "Polygon", "asap_xml", "geojson_feature", "load_annotation", "read_asap_xml", "read_geojson",
    "lost_in_json", "read_json", "read_txt", "to_asap_xml", "to_geojson", "to_json_dict", "write_annotation",
    "written_by_crfcore", "holds_geojson", "replaceable", "find_annotation", "same_polygons", "load_truth",
    "nothing_read", "rounded", "is_lesion_export",
]


def load_annotation(path: str | Path, positive_groups: Sequence[str] = POSITIVE_GROUPS,
                    negative_groups: Sequence[str] = NEGATIVE_GROUPS,
                    txt_part: str = "positive") -> Annotation:
    """Read an annotation by extension: `.xml` (ASAP), `.json` (NCRF, or GeoJSON by
    content), `.geojson` (QuPath), `.txt` (vertices)."""
    suffix = Path(path).suffix.lower()
    if Path(path).exists() and not Path(path).is_file():  # a FIFO would block the read forever
        raise AnnotationError(f"{path}: not a regular file")
    if suffix == ".xml":
        return read_asap_xml(path, positive_groups, negative_groups)
    if suffix == ".json":
        return read_json(path, positive_groups, negative_groups)
    if suffix == ".geojson":
        return read_geojson(path, positive_groups, negative_groups)
    if suffix == ".txt":
        return read_txt(path, txt_part)
    raise AnnotationError(f"{path}: unknown annotation type (expected .xml, .json, .geojson or .txt)")


def written_by_crfcore(path: str | Path) -> bool:
    """Whether the ASAP XML or GeoJSON file `path` was written by this tool (which a new
    output may replace; an original annotation of the same name may not)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".xml":
            with path.open(encoding="utf-8", errors="replace") as fh:
                return f"<!-- {WRITTEN_BY} -->" in fh.read(200)
        data = load_json(path, "GeoJSON file")
    except (OSError, CrfError):
        return False
    feats = data.get("features") if isinstance(data, dict) else None
    if not isinstance(feats, list):
        return False
    marked = data.get("generator") == "crfcore" or data.get("name") == LESION_CLASS  # annotations; lesion exports
    # older annotation GeoJSON: every feature carries the `crfcore` property `to_geojson` writes
    older = bool(feats) and all(isinstance(f, dict) and "crfcore" in (f.get("properties") or {}) for f in feats)
    return marked or older


def is_lesion_export(path: Path) -> bool:
    """Whether the .xml or .geojson file `path` is an earlier export of predicted lesions
    (which a new one may replace; truth may not be): every annotation a point (Dot) of the
    one group "Predicted lesion"; an empty GeoJSON only when it is named so (an empty truth
    is not)."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".xml":
            root = SafeET.parse(str(path)).getroot()
            groups = {g.get("Name") for g in root.iter("Group")}
            return root.tag == "ASAP_Annotations" and groups == {LESION_CLASS} and all(
                a.get("PartOfGroup") == LESION_CLASS and a.get("Type") == "Dot" for a in root.iter("Annotation"))
        if suffix != ".geojson":
            return False
        collection = load_json(path, "GeoJSON file")
        features = collection["features"]
        return (bool(features) or collection.get("name") == LESION_CLASS) and all(
            f["properties"]["classification"]["name"] == LESION_CLASS and f["geometry"]["type"] == "Point"
            for f in features)
    except Exception:  # unreadable, or not shaped as an export: not one of ours
        return False


def nothing_read(ann: Annotation) -> str | None:
    """Why a file that holds polygons or classified objects gave no tumour region (their
    groups, the QuPath objects skipped), or None: read as truth, it would say a normal
    slide. (Exclusions alone do not make it one: an Exclusion among tumour cells, say.)"""
    if ann.positive or not (ann.unmapped or ann.skipped or ann.dropped):
        return None
    why = [f"groups found: {sorted(set(ann.unmapped))}"] if ann.unmapped else []
    why += [f"QuPath objects skipped, not regions: {sorted(set(ann.skipped))}"] if ann.skipped else []
    why += [f"tumour marks that are no region (fewer than 3 distinct vertices, points, lines): {ann.dropped[:3]}"
            ] if ann.dropped else []
    return f"no tumour region read from it ({'; '.join(why)})"


def load_truth(path: str | Path) -> Annotation:
    """`load_annotation` for truth and labels: a file of which nothing is read (a class not
    in the default groups, tumour drawn as cells) is refused, not taken for a normal slide."""
    ann = load_annotation(path)
    why = nothing_read(ann)
    if why:
        raise AnnotationError(f"{path}: {why}; as truth it would mean a normal slide: name its groups with "
                              "xml2json.py --positive-groups / --negative-groups, and draw tumour as regions (not "
                              "cells, points or lines)")
    return ann


def find_annotation(folder: str | Path, stem: str) -> Path | None:
    """The annotation of slide `stem` in `folder` (`io.companion`'s choice: `.json` first),
    or None. Where the folder holds several (`t.json` beside `t.xml`, as xml2json leaves
    them) they must hold the same polygons, or which one is meant is not known (an edited
    `t.geojson` beside the old `t.xml`, say). A sibling that is no annotation this run
    could use is passed over: one that does not read as an annotation (notes in a `.txt`,
    another tool's XML) or holds no polygon of the default groups (converted with other
    groups, lesion points beside the truth, an empty export); with a warning where it is
    newer than the file used and not this tool's output (QuPath's export after every
    polygon was deleted, or a broken one, would otherwise leave the old truth in use)."""
    found = [f for f in all_companions(folder, stem, "annotation") if not is_lesion_export(f)]  # never truth
    if len(found) > 1:
        chosen = _quietly(load_annotation, found[0])  # its faults are the run's: they are raised
        for other in found[1:]:
            try:
                sibling = _quietly(load_annotation, other)
            except AnnotationError as err:
                if other.suffix.lower() != ".txt":  # a .txt of notes is no review tool's export
                    _warn_if_newer(found[0], other, f"does not read as an annotation "
                                                    f"({str(err).replace(str(other), other.name)})")
                continue
            if len(sibling) and not same_polygons(chosen, sibling):
                raise AnnotationError(f"{folder}: {found[0].name} (which would be used) and {other.name} both "
                                      f"annotate slide {stem} and hold different polygons; keep one of them there")
            unread = nothing_read(sibling)  # tumour in unknown groups, cells, points: not used, yet not nothing
            if not len(sibling) and (len(chosen) or unread):
                _warn_if_newer(found[0], other, unread or "holds no tumour or exclusion polygon")
    return found[0] if found else None


def _warn_if_newer(used: Path, other: Path, why: str) -> None:
    """Warn that `other`, passed over, may be the newer truth (see `find_annotation`)."""
    if other.stat().st_mtime > used.stat().st_mtime and not written_by_crfcore(other):
        warnings.warn(f"{other}: newer than {used.name}, but {why}; {used.name} is used (remove {used.name} "
                      "if the slide's truth changed)",
                      AnnotationWarning, stacklevel=3)


def _quietly(fn, *args):
    """`fn(*args)` without its warnings: the file used warns when it is read for the work."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def rounded(polys: list[np.ndarray]) -> list[np.ndarray]:
    """Polygons as NCRF JSON holds them: whole pixels, and a polygon left with fewer than 3
    distinct vertices dropped, as reading the JSON drops it."""
    return [r for r in (np.round(v) for v in polys) if three_distinct(r)]


def same_polygons(a: Annotation, b: Annotation) -> bool:
    """Whether two annotations hold the same polygons once both are `rounded` as NCRF JSON
    rounds them, in any order and from any start vertex in either direction: QuPath
    writes a ring back counter-clockwise and a hole after the polygon that holds it."""
    return all(sorted(map(_ring_key, rounded(pa))) == sorted(map(_ring_key, rounded(pb)))
               for pa, pb in ((a.positive, b.positive), (a.negative, b.negative)))


def _ring_key(v: np.ndarray) -> tuple:
    """A ring's vertices as one comparable value, the same from any start and direction
    and with a vertex repeated in a row (a closing vertex) taken once: the least of its
    readings that start at its least vertex."""
    v = v[(v != np.roll(v, 1, axis=0)).any(axis=1)]
    starts = np.flatnonzero((v == v[np.lexsort(v.T[::-1])[0]]).all(axis=1))
    n = len(v)
    readings = [np.roll(v, -k, axis=0) for k in starts] + [np.roll(v[::-1], -(n - 1 - k), axis=0) for k in starts]
    return min(tuple(map(tuple, r.tolist())) for r in readings)


def holds_geojson(path: str | Path) -> bool:
    """Whether the JSON file `path` holds GeoJSON (QuPath saves it as `.json` too)."""
    try:
        return is_geojson(load_json(path, "annotation"))
    except CrfError:
        return False


def replaceable(path: str | Path, to: str) -> bool:
    """Whether an existing `path` may be replaced by a `to` output: NCRF JSON (no room for
    a mark: replaced as always), or XML / GeoJSON this tool wrote; never an original ASAP
    XML or a QuPath GeoJSON, whatever its suffix."""
    if to != "json":
        return written_by_crfcore(path)
    try:
        data = load_json(path, "annotation")
    except CrfError:
        return False
    return is_ncrf(data)


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
