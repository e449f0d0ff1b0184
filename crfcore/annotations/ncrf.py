"""NCRF's annotation JSON (`{"positive": [{"name", "vertices"}], "negative": [...]}`, integer
vertices) and the original repository's vertex-list txt. A `.json` holding GeoJSON is read
as GeoJSON."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .geojson import from_geojson, is_geojson
from .model import (NEGATIVE_GROUPS, POSITIVE_GROUPS, Annotation, AnnotationError,
                    checked_vertices, load_json, three_distinct)


def read_json(path: str | Path, positive_groups: Sequence[str] = POSITIVE_GROUPS,
              negative_groups: Sequence[str] = NEGATIVE_GROUPS) -> Annotation:
    """NCRF JSON (`{"positive": [{"name", "vertices"}], "negative": [...]}`), or GeoJSON
    when the content is GeoJSON (see `read_geojson`)."""
    path = Path(path)
    data = load_json(path)
    if is_geojson(data):
        return from_geojson(path, data, positive_groups, negative_groups)
    if not is_ncrf(data):
        raise AnnotationError(f"{path}: neither an NCRF annotation (keys 'positive'/'negative') nor GeoJSON")
    ann = Annotation()
    for part in ("positive", "negative"):
        polys = data.get(part, [])
        for i, poly in enumerate(polys if isinstance(polys, list) else [None]):
            if not isinstance(poly, dict) or not isinstance(poly.get("vertices"), list):
                raise AnnotationError(f"{path}: {part}[{i}] has no valid 'vertices'")
            name = str(poly.get("name", f"{part}{i}"))
            verts = checked_vertices(str(path), name, poly["vertices"], text=False)
            ann.add_checked(str(path), part, name, verts)
    return ann


def is_ncrf(data: object) -> bool:
    """Whether parsed JSON is shaped as NCRF's annotation: an object of "positive" and
    "negative" parts only."""
    return isinstance(data, dict) and set(data) <= {"positive", "negative"}


def read_txt(path: str | Path, part: str = "positive") -> Annotation:
    """The original repository's vertex list: one `x y` pair per line, any whitespace."""
    path = Path(path)
    pairs, lines = [], []
    try:
        text = path.read_text(encoding="utf-8-sig").splitlines()  # Windows editors' BOM
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
    verts = checked_vertices(str(path), path.stem, pairs, text=True, lines=lines).reshape(-1, 2)
    ann.add_checked(str(path), part, path.stem, verts)
    return ann


def to_json_dict(ann: Annotation) -> dict:
    """NCRF's JSON object: integer vertices rounded as `numpy.round` does; a polygon left
    with fewer than 3 distinct vertices (`lost_in_json`) is not written, as reading drops it."""
    return {part: [{"name": n, "vertices": r.astype(int).tolist()}
                   for n, r in zip(getattr(ann, f"{part}_names"), map(np.round, getattr(ann, part)))
                   if three_distinct(r)]
            for part in ("positive", "negative")}


def lost_in_json(ann: Annotation) -> list[str]:
    """The names of the polygons NCRF JSON's whole pixels leave with fewer than 3 distinct vertices."""
    return [p.name for p in ann.parts() if not three_distinct(np.round(p.vertices))]
