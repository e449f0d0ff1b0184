"""ASAP / Camelyon XML annotations: read (entities and external references refused, never
expanded) and written with an AnnotationGroups list of group colours."""
from __future__ import annotations

import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from .model import (NEGATIVE_GROUPS, POSITIVE_GROUPS, UNGROUPED, Annotation, AnnotationError, AnnotationWarning,
                    checked_vertices, remember_colour, warn_unknown)


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
    except LookupError as err:  # an encoding Python does not know, declared in the XML
        raise AnnotationError(f"{path}: cannot read ({err})") from None
    if root.tag != "ASAP_Annotations":  # another tool's XML: read as ASAP, it would be an empty annotation
        aperio = " (Aperio ImageScope's format? it is not read here)" if root.tag == "Annotations" else ""
        raise AnnotationError(f"{path}: not an ASAP annotation: its root element is <{root.tag}>, not "
                              f"<ASAP_Annotations>{aperio}")
    annos = root.findall("./Annotations/Annotation")
    ann = Annotation()
    parents = {}
    for g in root.findall("./AnnotationGroups/Group"):
        remember_colour(ann, g.get("Name"), g.get("Color"))
        if g.get("PartOfGroup") not in (None, "", "None"):  # ASAP writes "None" for a top-level group
            parents[g.get("Name")] = g.get("PartOfGroup")
    known = (*positive_groups, *negative_groups)
    group_of = [mapped_group(a.get("PartOfGroup") or UNGROUPED, parents, known) for a in annos]
    for part, groups in (("positive", positive_groups), ("negative", negative_groups)):
        for group in groups:
            for anno, its in zip(annos, group_of):
                if its != group:
                    continue
                name = anno.get("Name", "")
                coords = anno.findall("./Coordinates/Coordinate")
                warn_shape(str(path), name, anno.get("Type"), [c.get("Order") for c in coords])
                pairs = [(c.get("X"), c.get("Y")) for c in coords]
                verts = checked_vertices(str(path), name, pairs, text=True)
                ann.add_checked(str(path), part, name, verts, None if group == UNGROUPED else group)
                remember_colour(ann, group, anno.get("Color"))  # when AnnotationGroups lacks it
    ann.unmapped = warn_unknown(str(path), "group(s)", group_of, known)
    return ann


def mapped_group(group: str, parents: dict[str, str | None], known: Sequence[str]) -> str:
    """`group`, or else the nearest of its parent groups (ASAP's AnnotationGroups nest
    by PartOfGroup) that is one of `known`: a polygon in a sub-group of Tumor is tumour.
    A group with no such parent stays itself (unknown)."""
    seen, g = set(), group
    while g not in known and g in parents and g not in seen:  # `seen`: a cycle of parents ends
        seen.add(g)
        g = parents[g]
    return g if g in known else group


REGION_TYPES = {"Polygon", "Spline", "Rectangle", None}  # ASAP's region types (None: no Type given)


def warn_shape(path: str, name: str, kind: str | None, order: list[str | None]) -> None:
    """Warn where NCRF's reading (every annotation a polygon, vertices in document order)
    may not be what the file means: points rather than a region, or an `Order` attribute
    that is not the document order."""
    if kind not in REGION_TYPES:
        warnings.warn(f"{path}: annotation {name!r} is a {kind}, not a region; taken as a polygon, as NCRF does",
                      AnnotationWarning, stacklevel=3)
    given = [o for o in order if o is not None]
    bad = [o for o in given if not re.fullmatch(r"[0-9]+", o.strip())]
    if bad:
        warnings.warn(f"{path}: annotation {name!r} has a vertex Order {bad[0]!r}, not a count from 0; vertices "
                      "taken in document order, as NCRF does", AnnotationWarning, stacklevel=3)
    elif len(given) == len(order) and (numbers := [int(o) for o in given]) != sorted(numbers):
        warnings.warn(f"{path}: annotation {name!r} lists its vertices out of their Order; taken in document "
                      "order, as NCRF does", AnnotationWarning, stacklevel=3)


WRITTEN_BY = "written by crfcore"  # a comment in every XML this tool writes: `written_by_crfcore` looks for it


def asap_xml(items: Iterable[tuple[str, str, str, np.ndarray]], colours: dict[str, str]) -> str:
    """An ASAP XML document of `(name, type, group, vertices)` annotations; its
    AnnotationGroups lists `colours` (group -> "#RRGGBB"), which must hold every group."""
    root = ET.Element("ASAP_Annotations")
    annos = ET.SubElement(root, "Annotations")
    for name, kind, group, verts in items:
        el = ET.SubElement(annos, "Annotation", Name=_xml_text(name), Type=kind, PartOfGroup=_xml_text(group),
                           Color=colours[group])
        coords = ET.SubElement(el, "Coordinates")
        for i, (x, y) in enumerate(verts):
            ET.SubElement(coords, "Coordinate", Order=str(i), X=_num(x), Y=_num(y))
    groups = ET.SubElement(root, "AnnotationGroups")
    for group, colour in colours.items():
        ET.SubElement(ET.SubElement(groups, "Group", Name=_xml_text(group), PartOfGroup="None", Color=colour),
                      "Attributes")
    ET.indent(root, space="\t")
    return f'<?xml version="1.0"?>\n<!-- {WRITTEN_BY} -->\n' + ET.tostring(root, encoding="unicode") + "\n"


def to_asap_xml(ann: Annotation) -> str:
    """ASAP XML keeping each polygon's group; AnnotationGroups lists the groups used."""
    colours = {p.group: ann.colour(p.group, p.part) for p in ann.parts()}
    return asap_xml(((p.name, "Polygon", p.group, p.vertices) for p in ann.parts()), colours)


def _xml_text(text: str) -> str:
    """`text` without the control characters XML 1.0 cannot hold (a name from JSON may have
    them); ElementTree would write them and no reader, ours included, could read the file."""
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]", "", text)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
