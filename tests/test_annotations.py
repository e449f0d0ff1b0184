import importlib.util
import json
import os
import warnings

import numpy as np
import pytest
import shapely.geometry
from defusedxml import ElementTree as SafeET
from matplotlib.path import Path as MplPath

from crfcore import annotations as an
from crfcore import evaluation as ev
from crfcore.cli import run
from conftest import ROOT, shared

_spec = importlib.util.spec_from_file_location("xml2json", ROOT / "xml2json.py")
xml2json = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(xml2json)


def convert(*args) -> None:
    """xml2json.py in-process; it must succeed."""
    assert xml2json.main([str(a) for a in args]) == 0


def script(capsys, *args) -> tuple[int, str]:
    """xml2json.py as its `__main__` runs it: (exit status, stderr)."""
    with pytest.raises(SystemExit) as done:
        run(xml2json.main, [str(a) for a in args])
    return done.value.code, capsys.readouterr().err


def error(capsys, *args) -> str:
    """The one-line error of a run of xml2json.py that must fail with status 2."""
    code, err = script(capsys, *args)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def signed_area(ring) -> float:
    """Shoelace area of a ring in its coordinate values: > 0 counter-clockwise."""
    x, y = np.asarray(ring, float).T
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def xml_doc(polygons) -> str:
    """ASAP XML of `(name, group, vertices)`; vertex values are written as given (strings kept)."""
    annos = "".join(
        f'<Annotation Name="{n}" Type="Polygon" PartOfGroup="{g}"><Coordinates>'
        + "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(v))
        + "</Coordinates></Annotation>" for n, g, v in polygons)
    return f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{annos}</Annotations></ASAP_Annotations>'


def square(x0, y0, side, clockwise=False):
    v = [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]]
    return v[::-1] if clockwise else v


def closed(v):
    return [*v, v[0]]


# ----------------------------------------------------------------------------- XML and NCRF JSON


def test_tumor_001_xml_converts_exactly_like_ncrf(tmp_path, capsys):
    out = tmp_path / "t.json"
    convert(shared("annotations", "tumor_001.xml"), "-o", out)
    assert json.loads(out.read_text()) == json.loads(shared("annotations", "tumor_001.json").read_text())
    assert "2 positive, 0 negative" in capsys.readouterr().out


def test_xml_json_xml_json_is_identity(tmp_path):
    convert(shared("annotations", "tumor_001.xml"), "-o", tmp_path / "a.json")
    convert(tmp_path / "a.json", "-o", tmp_path / "b.xml", "--to", "xml")
    convert(tmp_path / "b.xml", "-o", tmp_path / "c.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "c.json").read_text()


def test_negative_polygons_and_groups_survive_xml(tmp_path):
    ann = an.Annotation()
    ann.add("positive", "Tumor A", np.array([[0, 0], [100, 0], [100, 100], [0, 100]]))
    ann.add("negative", "Hole", np.array([[40, 40], [60, 40], [60, 60], [40, 60]]))
    an.write_annotation(ann, tmp_path / "a.xml", to="xml")
    back = an.load_annotation(tmp_path / "a.xml")
    assert back.positive_names == ["Tumor A"] and back.negative_names == ["Hole"]
    assert back.positive_groups == ["Tumor"] and back.negative_groups == ["Exclusion"]
    assert back.contains(np.array([[10, 10], [50, 50], [150, 50]])).tolist() == [True, False, False]


def groups_of(xml_path) -> tuple[list[str], dict[str, str]]:
    """(PartOfGroup of every Annotation, AnnotationGroups name -> colour)."""
    root = SafeET.parse(str(xml_path)).getroot()
    return ([a.get("PartOfGroup") for a in root.iter("Annotation")],
            {g.get("Name"): g.get("Color") for g in root.iter("Group")})


def test_xml_output_keeps_camelyon_groups_or_renames_them(tmp_path, capsys):
    convert(shared("annotations", "tumor_001.xml"), "-o", tmp_path / "k.xml", "--to", "xml")
    used, listed = groups_of(tmp_path / "k.xml")
    assert used == ["_0", "_1"] and listed == {"_0": "#00FF00", "_1": "#00FFFF"}  # the input's colours
    convert(shared("annotations", "tumor_001.xml"), "-o", tmp_path / "r.xml", "--to", "xml",
            "--rename-groups", "Tumor,Exclusion")
    used, listed = groups_of(tmp_path / "r.xml")
    assert used == ["Tumor", "Tumor"] and listed == {"Tumor": an.DEFAULT_COLOUR["positive"]}
    # NCRF JSON has no groups: Tumor / Exclusion, both listed
    ann = an.Annotation()
    ann.add("positive", "p", square(0, 0, 10))
    ann.add("negative", "n", square(2, 2, 2))
    an.write_annotation(ann, tmp_path / "n.json")
    convert(tmp_path / "n.json", "-o", tmp_path / "n.xml", "--to", "xml")
    assert groups_of(tmp_path / "n.xml")[0] == ["Tumor", "Exclusion"]
    assert set(groups_of(tmp_path / "n.xml")[1]) == {"Tumor", "Exclusion"}
    err = error(capsys, tmp_path / "n.json", "-o", tmp_path / "x.xml", "--to", "xml", "--rename-groups", "A")
    assert "--rename-groups" in err and "'A'" in err
    assert "--to xml" in error(capsys, tmp_path / "n.json", "-o", tmp_path / "x.json", "--rename-groups", "A,B")


def test_vertex_txt_with_crlf(tmp_path):
    ann = an.load_annotation(shared("annotations", "Annotation0.txt"))
    assert len(ann.positive) == 1 and not ann.negative
    first = shared("annotations", "Annotation0.txt").read_text().split()[:2]
    assert ann.positive[0][0].tolist() == [float(v) for v in first]
    neg = an.load_annotation(shared("annotations", "Annotation0.txt"), txt_part="negative")
    assert len(neg.negative) == 1


def test_contains_matches_matplotlib_and_excludes_negatives():
    ann = an.load_annotation(shared("annotations", "tumor_001.xml"))
    x0, y0, x1, y1 = ann.bounds()
    pts = np.random.default_rng(0).uniform((x0, y0), (x1, y1), (50000, 2))
    ref = np.zeros(len(pts), bool)
    for p in ann.positive:
        ref |= MplPath(p).contains_points(pts)
    assert 0.05 < ref.mean() < 0.95
    assert (ann.contains(pts) == ref).mean() > 0.9999
    # the second polygon used as a hole removes its points
    holed = an.Annotation(ann.positive[:1] + ann.positive[1:], [ann.positive[1]], ["a", "b"], ["h"])
    assert not holed.contains(pts)[MplPath(ann.positive[1]).contains_points(pts)].any()


# ----------------------------------------------------------------------------- GeoJSON output


def test_geojson_for_qupath(tmp_path):
    out = tmp_path / "t.geojson"
    convert(shared("annotations", "tumor_001.xml"), "-o", out, "--to", "geojson")
    gj = json.loads(out.read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    f = gj["features"][0]
    assert f["geometry"]["type"] == "Polygon"
    ring = f["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and f["properties"]["classification"]["name"] == "_0"
    for f in gj["features"]:
        assert signed_area(f["geometry"]["coordinates"][0]) > 0  # RFC 7946: exterior counter-clockwise
    values = [v for f in gj["features"] for r in f["geometry"]["coordinates"] for xy in r for v in xy]
    assert all(type(v) is int for v in values if float(v).is_integer())
    assert any(type(v) is float for v in values)
    # and back: XML -> GeoJSON -> XML -> JSON is XML -> JSON exactly
    convert(out, "-o", tmp_path / "back.xml", "--to", "xml")
    convert(tmp_path / "back.xml", "-o", tmp_path / "back.json")
    convert(shared("annotations", "tumor_001.xml"), "-o", tmp_path / "direct.json")
    assert (tmp_path / "back.json").read_text() == (tmp_path / "direct.json").read_text()
    assert groups_of(tmp_path / "back.xml")[0] == ["_0", "_1"]


EXCLUSIONS = [
    ("hole far", "_2", square(600, 600, 50)),               # inside tumour A, counter-clockwise
    ("tumour A", "_0", square(0, 0, 1000, clockwise=True)),
    ("island", "_2", square(5000, 5000, 100.5)),            # outside any tumour
    ("tumour B", "_1", square(2000, 0, 800)),
    ("hole near", "_2", closed(square(100, 100, 50, clockwise=True))),  # closed ring, in A
    ("tumour C", "_0", [[3000.25, 0], [3400, 0], [3400, 400.75]]),
]


def test_geojson_round_trip_with_exclusions_is_exact(tmp_path):
    xml = tmp_path / "ex.xml"
    xml.write_text(xml_doc(EXCLUSIONS))
    convert(xml, "-o", tmp_path / "direct.json")
    convert(xml, "-o", tmp_path / "ex.geojson", "--to", "geojson")
    convert(tmp_path / "ex.geojson", "-o", tmp_path / "back.xml", "--to", "xml")
    convert(tmp_path / "back.xml", "-o", tmp_path / "back.json")
    assert (tmp_path / "back.json").read_text() == (tmp_path / "direct.json").read_text()
    assert groups_of(tmp_path / "back.xml")[0] == ["_0", "_0", "_1", "_2", "_2", "_2"]
    # the Annotation read back equals the original one, vertex for vertex
    a, b = an.load_annotation(xml), an.load_annotation(tmp_path / "ex.geojson")
    for x, y in ((a.positive, b.positive), (a.negative, b.negative)):
        assert len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y))
    assert (a.positive_names, a.negative_names) == (b.positive_names, b.negative_names)
    assert (a.positive_groups, a.negative_groups) == (b.positive_groups, b.negative_groups)
    # the two exclusions inside tumour A are its holes, the island stays a feature of its own
    feats = json.loads((tmp_path / "ex.geojson").read_text())["features"]
    assert [(f["properties"]["name"], f["properties"]["classification"]["name"],
             len(f["geometry"]["coordinates"])) for f in feats] == [
        ("tumour A", "_0", 3), ("tumour C", "_0", 1), ("tumour B", "_1", 1), ("island", "_2", 1)]
    for f in feats:
        exterior, *holes = f["geometry"]["coordinates"]
        assert signed_area(exterior) > 0 and all(signed_area(h) < 0 for h in holes)
        assert all(r[0] == r[-1] for r in f["geometry"]["coordinates"])
    corner = feats[3]["geometry"]["coordinates"][0][1]
    assert corner == [5100.5, 5000] and type(corner[1]) is int  # integers where integral


def test_geojson_holes_keep_contains(tmp_path):
    ann = an.load_annotation(_write(tmp_path / "ex.xml", xml_doc(EXCLUSIONS)))
    an.write_annotation(ann, tmp_path / "ex.geojson", to="geojson")
    gj = json.loads((tmp_path / "ex.geojson").read_text())
    for f in gj["features"]:
        del f["properties"]["crfcore"]  # as QuPath would write it back: no crfcore properties
    back = an.load_annotation(_write(tmp_path / "q.geojson", json.dumps(gj)))
    pts = np.random.default_rng(1).uniform(-100, 5200, (20000, 2))
    assert back.contains(pts).tolist() == ann.contains(pts).tolist()
    assert back.negative_names == ["tumour A hole 1", "tumour A hole 2", "island"]


def _write(path, text):
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- GeoJSON input (QuPath)


def qupath_feature(geometry, cls=None, name=None, colour=None):
    props = {"objectType": "annotation"}
    if name:
        props["name"] = name
    if cls:
        props["classification"] = {"name": cls, **({"color": colour} if colour else {})}
    return {"type": "Feature", "id": "0b1c", "geometry": geometry, "properties": props}


QUPATH = [
    qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 100)), closed(square(40, 40, 20, True))]},
                   "Tumor", "T1", [200, 0, 0]),
    qupath_feature({"type": "MultiPolygon", "coordinates": [
        [closed(square(200, 0, 100))],
        [closed(square(400, 0, 100)), closed(square(410, 10, 10, True)), closed(square(450, 50, 10, True))]]},
        "Tumor", "M"),
    qupath_feature({"type": "Polygon", "coordinates": [closed(square(600, 0, 100))]}, "Stroma", "S"),
    qupath_feature({"type": "Polygon", "coordinates": [closed(square(800, 0, 100))]}),
    qupath_feature({"type": "Point", "coordinates": [5, 5]}, "Tumor", "dot"),
    qupath_feature({"type": "LineString", "coordinates": [[0, 0], [9, 9]]}, "Tumor", "line"),
]


@pytest.mark.parametrize("shape", ["collection", "list", "json"])
def test_qupath_geojson_reads(tmp_path, shape):
    data = {"type": "FeatureCollection", "features": QUPATH} if shape == "collection" else QUPATH
    path = _write(tmp_path / ("q.json" if shape == "json" else "q.geojson"), json.dumps(data))
    with pytest.warns(an.AnnotationWarning) as caught:
        ann = an.load_annotation(path)
    said = " ".join(str(w.message) for w in caught)
    assert "'Stroma'" in said and "(none)" in said and "'Tumor'" in said  # classes found
    assert "2 feature(s) of type LineString, Point ignored" in said
    assert ann.positive_names == ["T1", "M", "M"] and ann.positive_groups == ["Tumor"] * 3
    assert ann.negative_names == ["T1 hole 1", "M hole 1", "M hole 2"]
    assert [len(v) for v in ann.positive] == [4, 4, 4]  # closing vertex dropped
    pts = [[10, 10], [50, 50], [250, 50], [415, 15], [455, 55], [430, 80], [650, 50], [850, 50]]
    assert ann.contains(np.array(pts)).tolist() == [True, False, True, False, False, True, False, False]
    assert ann.colours == {"Tumor": "#C80000"}


def test_qupath_classes_mapped_by_options(tmp_path, capsys):
    path = _write(tmp_path / "q.geojson", json.dumps({"type": "FeatureCollection", "features": QUPATH}))
    code, err = script(capsys, path, "-o", tmp_path / "q.xml", "--to", "xml",
                       "--positive-groups", "Tumor", "--negative-groups", "Stroma")
    assert code == 0 and "(none)" in err and "Stroma" not in err.split("ignored")[0]
    ann = an.load_annotation(tmp_path / "q.xml", ("Tumor",), ("Exclusion", "Stroma"))
    assert ann.negative_names == ["T1 hole 1", "M hole 1", "M hole 2", "S"]
    assert groups_of(tmp_path / "q.xml")[1] == {"Tumor": "#C80000", "Exclusion": an.DEFAULT_COLOUR["negative"],
                                                "Stroma": an.DEFAULT_COLOUR["negative"]}
    one = _write(tmp_path / "one.geojson", json.dumps(QUPATH[0]))  # a single Feature
    assert an.load_annotation(one).positive_names == ["T1"]


def test_hole_of_a_negative_polygon_is_ignored_with_a_warning(tmp_path):
    feat = qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 100)),
                                                              closed(square(40, 40, 20, True))]}, "Exclusion", "E")
    with pytest.warns(an.AnnotationWarning, match="holes of 1 negative polygon"):
        ann = an.load_annotation(_write(tmp_path / "e.geojson", json.dumps([feat])))
    assert ann.negative_names == ["E"] and not ann.positive


def test_a_tumour_island_inside_a_hole_is_warned_of(tmp_path):
    """Valid QuPath GeoJSON that NCRF's format cannot hold (every hole is subtracted from
    every tumour): the island is not tumour in the mask, and the warning says so."""
    ring = qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 100)),
                                                              closed(square(20, 20, 60, True))]}, "Tumor", "R")
    island = qupath_feature({"type": "Polygon", "coordinates": [closed(square(40, 40, 20))]}, "Tumor", "I")
    outside = qupath_feature({"type": "Polygon", "coordinates": [closed(square(200, 0, 20))]}, "Tumor", "O")
    with pytest.warns(an.AnnotationWarning, match="polygon 'I' overlaps 'R hole 1'") as seen:
        ann = an.load_annotation(_write(tmp_path / "i.geojson", json.dumps([ring, island, outside])))
    assert len(seen) == 1 and not ann.contains(np.array([[50.0, 50.0]]))[0] and ann.contains(np.array([[10.0, 10.0]]))[0]


def test_a_tumour_polygon_partly_over_a_hole_is_warned_of(tmp_path):
    """A tumour polygon reaching into another's hole loses the overlap in NCRF's format;
    one merely touching the hole, or a polygon's own hole, draws no warning."""
    ring = qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 400)),
                                                              closed(square(200, 200, 100, True))]}, "Tumor", "A")
    part = qupath_feature({"type": "Polygon", "coordinates": [closed(square(250, 250, 350))]}, "Tumor", "B")
    with pytest.warns(an.AnnotationWarning, match="polygon 'B' overlaps 'A hole 1'"):
        ann = an.load_annotation(_write(tmp_path / "p.geojson", json.dumps([ring, part])))
    assert not ann.contains(np.array([[275.0, 275.0]]))[0]  # what the warning is about
    touching = qupath_feature({"type": "Polygon", "coordinates": [closed(square(500, 0, 100))]}, "Tumor", "C")
    hole_edge = qupath_feature({"type": "Polygon", "coordinates": [closed([[300, 200], [350, 200], [350, 300],
                                                                           [300, 300]])]}, "Tumor", "D")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        an.load_annotation(_write(tmp_path / "t.geojson", json.dumps([ring, touching, hole_edge])))


def test_qupath_detections_and_cells_are_not_regions(tmp_path):
    """QuPath exports can hold detections and cells (0.3+: `objectType`; 0.2: the feature
    `id` names the class): a cell classified Tumor is not a tumour region."""
    geom = {"type": "Polygon", "coordinates": [closed(square(0, 0, 10))]}
    cell = {**qupath_feature(geom, "Tumor", "cell"), "properties": {"objectType": "cell",
                                                                  "classification": {"name": "Tumor"}}}
    old_detection = {"type": "Feature", "id": "PathDetectionObject", "geometry": geom,
                     "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016}}}
    old_annotation = {**old_detection, "id": "PathAnnotationObject", "properties": {"name": "kept",
                                                                                   "classification": {"name": "Tumor"}}}
    plain = {"type": "Feature", "geometry": geom, "properties": {"name": "plain", "classification": "Tumor"}}
    no_geometry = {"type": "Feature", "geometry": None, "properties": {"classification": {"name": "Tumor"}}}
    path = _write(tmp_path / "q.geojson", json.dumps([cell, old_detection, old_annotation, plain, no_geometry]))
    with pytest.warns(an.AnnotationWarning) as seen:
        ann = an.load_annotation(path)
    said = " ".join(str(w.message) for w in seen)
    assert "1 cell(s), 1 detection(s) ignored" in said and "of type null ignored" in said
    assert ann.positive_names == ["kept", "plain"]


def test_a_hole_touching_its_tumour_is_written_as_its_own_feature(tmp_path):
    """An exclusion sharing an edge with its tumour polygon would make an invalid
    polygon as a hole (RFC 7946 wants valid ones): it is written as a feature of its own."""
    ann = an.Annotation()
    ann.add("positive", "p", np.array(square(0, 0, 100), float), "_0")
    ann.add("negative", "edge", np.array(square(0, 0, 50), float), "_2")
    ann.add("negative", "inner", np.array(square(60, 60, 20), float), "_2")
    feats = an.to_geojson(ann)["features"]
    assert len(feats) == 2 and len(feats[0]["geometry"]["coordinates"]) == 2  # only "inner" is a hole
    assert all(shapely.geometry.shape(f["geometry"]).is_valid for f in feats)
    back = an.load_annotation(_write(tmp_path / "h.geojson", json.dumps(an.to_geojson(ann))))
    assert back.negative_names == ["edge", "inner"] and back.positive_names == ["p"]


# ----------------------------------------------------------------------------- predicted lesions


def test_predicted_lesions_have_their_own_class_and_rounded_probabilities():
    les = np.array([[0.912345678, 100, 200], [0.5, 300.0, 400.0]])
    feats = ev.lesions_geojson(les)["features"]
    props = feats[0]["properties"]
    assert props["classification"]["name"] == "Predicted lesion" != "Tumor"
    assert props["classification"]["color"] == [255, 0, 255]
    assert props["measurements"]["probability"] == 0.9123 and feats[0]["geometry"]["coordinates"] == [100, 200]
    root = SafeET.fromstring(ev.lesions_asap_xml(les))
    annos = root.findall("./Annotations/Annotation")
    assert [a.get("PartOfGroup") for a in annos] == ["Predicted lesion"] * 2
    assert annos[0].get("Name") == "lesion 0 p=0.9123" and annos[0].get("Type") == "Dot"
    assert [(c.get("X"), c.get("Y")) for c in annos[1].iter("Coordinate")] == [("300", "400")]
    assert [g.get("Name") for g in root.iter("Group")] == ["Predicted lesion"]


# ----------------------------------------------------------------------------- refused coordinates

FINITE, BEYOND, NAN = "not a finite coordinate", "beyond the 2147483648 pixels", "not a number"
TEXT_CASES = {"nan": FINITE, "inf": FINITE, "-Infinity": FINITE, "1e300": BEYOND, "-3e9": BEYOND, "1,5": NAN}
JSON_CASES = {"NaN": FINITE, "Infinity": FINITE, "-Infinity": FINITE, "1e300": BEYOND, "1e400": FINITE,
              "3000000000": BEYOND, "null": NAN, "true": NAN, "false": NAN, '"12"': NAN}
GOOD = [[0, 0], [100, 0], [100, 100], [0, 100]]


def bad_file(tmp_path, fmt: str, value: str):
    """An annotation whose polygon 'P' has `value` as X of vertex 2."""
    if fmt == "xml":
        verts = [list(map(str, v)) for v in GOOD]
        verts[2][0] = value
        return _write(tmp_path / "bad.xml", xml_doc([("ok", "Tumor", GOOD), ("P", "Tumor", verts)]))
    if fmt == "txt":
        lines = [f"{x} {y}" for x, y in GOOD]
        lines[2] = f"{value} 100"
        return _write(tmp_path / "P.txt", "\n".join(lines) + "\n")
    verts = json.dumps(GOOD).replace("[100, 100]", f"[{value}, 100]")
    if fmt == "json":
        return _write(tmp_path / "bad.json", f'{{"positive": [{{"name": "P", "vertices": {verts}}}]}}')
    ring = verts.replace("]]", "], [0, 0]]")
    return _write(tmp_path / "bad.geojson", '{"type": "FeatureCollection", "features": [{"type": "Feature", '
                  f'"geometry": {{"type": "Polygon", "coordinates": [{ring}]}}, '
                  '"properties": {"name": "P", "classification": {"name": "Tumor"}}}]}')


@pytest.mark.parametrize("fmt,value,reason", [(f, v, r) for f in ("xml", "txt") for v, r in TEXT_CASES.items()
                                              if not (f == "txt" and v == "1,5")]
                         + [(f, v, r) for f in ("json", "geojson") for v, r in JSON_CASES.items()])
def test_bad_coordinates_are_refused_by_file_polygon_and_vertex(tmp_path, capsys, fmt, value, reason):
    path = bad_file(tmp_path, fmt, value)
    err = error(capsys, path, "-o", tmp_path / "o.json")
    where = f"{path.name}:3: polygon 'P' vertex 2: X is " if fmt == "txt" else f"{path.name}: polygon 'P' vertex 2: X is "
    assert where in err and reason in err, err
    assert not (tmp_path / "o.json").exists()


def test_missing_xml_coordinate_and_programmatic_nan_are_refused(tmp_path, capsys):
    path = _write(tmp_path / "m.xml", xml_doc([("P", "Tumor", GOOD)]).replace(' Y="0"/>', "/>", 1))
    assert "polygon 'P' vertex 0: Y is missing, not a number" in error(capsys, path, "-o", tmp_path / "o.json")
    with pytest.raises(an.AnnotationError, match=r"polygon 'p' vertex 1: Y is NaN, not a finite coordinate"):
        an.Annotation().add("positive", "p", [[0, 0], [1, np.nan], [2, 2]])


# ----------------------------------------------------------------------------- errors, warnings, folders


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    bad = _write(tmp_path / "bad.xml", '<?xml version="1.0"?>\n<ASAP_Annotations>\n<Annotations>\n</Oops>\n')
    assert "line 4" in error(capsys, bad, "-o", tmp_path / "o.json")
    txt = _write(tmp_path / "v.txt", "1 2\n3 4\nfoo bar\n")
    assert "v.txt:3" in error(capsys, txt, "-o", tmp_path / "o.json")
    assert "missing.xml" in error(capsys, tmp_path / "missing.xml", "-o", tmp_path / "o.json")
    notgeo = _write(tmp_path / "n.geojson", '"just a string"')
    assert "n.geojson: not GeoJSON" in error(capsys, notgeo, "-o", tmp_path / "o.json")
    other = _write(tmp_path / "o.json", '{"features": 3}')
    assert "neither an NCRF annotation" in error(capsys, other, "-o", tmp_path / "p.json")


def test_warnings_exit_zero(tmp_path, capsys):
    xml = _write(tmp_path / "w.xml", xml_doc([("a", "Mystery", [[0, 0], [9, 0], [9, 9]]),
                                               ("line", "Tumor", [[0, 0], [9, 0], [0, 0]])]))
    code, err = script(capsys, xml, "-o", tmp_path / "w.json")  # nothing usable, and a group not mapped
    assert code == 2 and "'line'" in err and "(groups found: ['Mystery']; tumour marks that are no region " \
        "(fewer than 3 distinct vertices, points, lines): ['line']); nothing written" in err.splitlines()[-1]
    assert not (tmp_path / "w.json").exists()
    line = _write(tmp_path / "l.xml", xml_doc([("line", "Tumor", [[0, 0], [9, 0], [0, 0]])]))
    code, err = script(capsys, line, "-o", tmp_path / "l.json")  # a review: written empty, a normal slide
    assert code == 2 and "tumour marks that are no region (fewer than 3 distinct vertices, points, lines): ['line']" in err
    assert not (tmp_path / "l.json").exists()
    convert(xml, "-o", tmp_path / "m.json", "--positive-groups", "Mystery")
    assert len(json.loads((tmp_path / "m.json").read_text())["positive"]) == 1


def test_directory_of_inputs(tmp_path):
    convert(shared("annotations"), "-o", tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["Annotation0.json", "tumor_001.json"]  # tumor_001.json itself is skipped
    assert json.loads((tmp_path / "out" / "tumor_001.json").read_text())["positive"][0]["name"] == "_0"


def test_qupath_derived_classes_are_read_by_their_full_name(tmp_path):
    square = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
              "properties": {"objectType": "annotation", "classification": {"names": ["Tumor", "Positive"],
                                                                             "color": [200, 0, 0]}}}]
    (tmp_path / "d.geojson").write_text(json.dumps(feats))
    ann = an.load_annotation(tmp_path / "d.geojson", positive_groups=["Tumor: Positive"])
    assert len(ann.positive) == 1 and ann.contains(np.array([[50, 50]])).all()


def test_asap_xml_drops_control_characters_it_cannot_hold(tmp_path):
    """A name from JSON may hold control characters, which XML 1.0 cannot: the XML written
    drops them and reads back (it used to be a file no reader could open)."""
    ann = an.Annotation()
    ann.add("positive", "bad\x01name\x1f", np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]), "Tu\x02mor")
    an.write_annotation(ann, tmp_path / "c.xml", to="xml")
    back = an.load_annotation(tmp_path / "c.xml", positive_groups=("Tumor",))
    assert back.positive_names == ["badname"] and np.array_equal(back.positive[0], ann.positive[0])


def test_xml2json_never_writes_over_an_input_or_another_format(tmp_path, capsys):
    """From a hostile review: `-o` the input itself, or a name of another format (a slide),
    was replaced by the JSON with exit 0."""
    src = tmp_path / "t.xml"
    src.write_text(xml_doc([("a", "_0", square(0, 0, 10))]))
    before = src.read_text()
    assert "is also an input" in error(capsys, src, "-o", src, "--to", "xml")
    assert "end -o with .json" in error(capsys, src, "-o", tmp_path / "slide.svs")
    assert src.read_text() == before and not (tmp_path / "slide.svs").exists()
    convert(src, "-o", tmp_path / "t.json")


def test_numbers_are_ascii_decimals_and_points_or_shuffled_orders_are_named(tmp_path, capsys):
    """From a hostile review: X="1_000" and full-width digits were read as numbers, and a
    PointSet or vertices out of their Order were taken as a polygon without a word."""
    for x in ("1_000", "\uff15", "0x10"):
        (tmp_path / "n.xml").write_text(xml_doc([("a", "_0", [(x, 0), (10, 0), (10, 10)])]), encoding="utf-8")
        assert "not a number" in error(capsys, tmp_path / "n.xml", "-o", tmp_path / "n.json")
    doc = xml_doc([("a", "_0", square(0, 0, 10))])
    for odd in (doc.replace('Type="Polygon"', 'Type="PointSet"'), doc.replace('Order="0"', 'Order="9"'),
                doc.replace('Order="0"', 'Order="x"'), doc.replace('Order="0"', 'Order="\u00b2"'),
                doc.replace('Order="0"', 'Order="-1"')):  # reviews: no word for "x", a traceback for "²"
        (tmp_path / "o.xml").write_text(odd, encoding="utf-8")
        code, err = script(capsys, tmp_path / "o.xml", "-o", tmp_path / "o.json")
        assert code == 0 and ("not a region" in err or "out of their Order" in err or "not a count" in err), err


def test_group_options_name_each_group_once(tmp_path, capsys):
    src = tmp_path / "t.xml"
    src.write_text(xml_doc([("a", "_0", square(0, 0, 10))]))
    assert "named twice" in error(capsys, src, "-o", tmp_path / "t.json", "--positive-groups", "_0,_0,_1")
    assert "named both" in error(capsys, src, "-o", tmp_path / "t.json", "--negative-groups", "_0")
    convert(src, "-o", tmp_path / "t2.json", "--positive-groups", "_0,_1,_2")  # _2 leaves the default negatives
    convert(src, "-o", tmp_path / "q.json", "--to", "geojson")  # QuPath's GeoJSON as .json
    assert "two different" in error(capsys, src, "-o", tmp_path / "t.xml2.xml", "--to", "xml",
                                    "--rename-groups", "A,A")


def test_a_fifo_is_refused_not_read_forever(tmp_path, capsys):
    import os

    os.mkfifo(tmp_path / "p.xml")
    assert "not a regular file" in error(capsys, tmp_path / "p.xml", "-o", tmp_path / "p.json")


def test_negative_groups_given_as_the_default_list_still_clash(tmp_path, capsys):
    src = tmp_path / "t.xml"
    src.write_text(xml_doc([("a", "_0", square(0, 0, 10))]))
    assert "named both" in error(capsys, src, "-o", tmp_path / "t.json", "--positive-groups", "_0,_2",
                                 "--negative-groups", "_2,Exclusion")


def test_an_original_xml_beside_its_json_is_not_converted_over(tmp_path, capsys):
    """From a hostile review: `xml2json d -o d --to xml` wrote the JSON's XML over the
    original Camelyon XML (rounded coordinates, renamed groups)."""
    d = tmp_path / "d"
    d.mkdir()
    original = xml_doc([("a", "_0", [(0.5, 0), (10, 0), (10, 10.25)])])
    (d / "t.xml").write_text(original)
    convert(d / "t.xml", "-o", d / "t.json")
    code, err = script(capsys, d, "-o", d, "--to", "xml")  # t.xml is left out as an input, and named
    assert code == 2 and "left out" in err and "was not written by this tool" in err.splitlines()[-1]
    assert (d / "t.xml").read_text() == original
    out = tmp_path / "out"
    for _ in range(2):  # its own outputs are replaced on a second run, XML and GeoJSON alike
        convert(d, "-o", out, "--to", "xml")
        convert(d / "t.json", "-o", out / "t.geojson", "--to", "geojson")


def test_a_qupath_geojson_saved_as_json_is_an_input_never_an_output(tmp_path, capsys):
    """From a hostile review: `--to json` replaced a QuPath export saved as `.json` (QuPath's
    own suffix for it), and a folder of them was converted without it."""
    d = tmp_path / "d"
    d.mkdir()
    qupath = json.dumps([qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 10))]}, "Tumor", "q")])
    (d / "q.json").write_text(qupath)
    (d / "t.xml").write_text(xml_doc([("a", "_0", square(0, 0, 10))]))
    assert "was not written by this tool" in error(capsys, d / "t.xml", "-o", d / "q.json")
    code, err = script(capsys, d, "-o", d)  # q.json would be its own output: skipped; t.xml is converted
    assert code == 2 and "q.json: its output would replace it" in err and (d / "t.json").is_file()
    assert "error: 1 input(s) not converted, each would be its own output: q.json" in err  # not exit 0
    assert (d / "q.json").read_text() == qupath
    (d / "t.json").unlink()
    convert(d, "-o", tmp_path / "out")
    assert an.load_annotation(tmp_path / "out" / "q.json").positive_names == ["q"]
    convert(d / "t.xml", "-o", d / "t.json")
    convert(d / "t.xml", "-o", d / "t.json")  # NCRF JSON (its own output) is replaced, as always


def test_several_annotations_of_one_slide_must_agree(tmp_path):
    """From a hostile review: with `s.xml` and an edited `s.geojson` in one folder, Mask_gen
    and evaluate took the old XML without a word. Files that agree (xml2json's JSON beside
    its XML) are fine; files that differ are refused, naming both."""
    (tmp_path / "s.xml").write_text(xml_doc([("a", "_0", [(0.4, 0), (10, 0), (10, 10.3)])]))
    assert an.find_annotation(tmp_path, "s") == tmp_path / "s.xml"
    convert(tmp_path / "s.xml", "-o", tmp_path / "s.json")  # rounded to whole pixels: the same polygons
    assert an.find_annotation(tmp_path, "s") == tmp_path / "s.json"
    edited = [qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 50))]}, "Tumor", "a")]
    _write(tmp_path / "s.geojson", json.dumps(edited))
    with pytest.raises(an.AnnotationError, match=r"s.json \(which would be used\) and s.geojson both annotate slide s"):
        an.find_annotation(tmp_path, "s")
    assert an.find_annotation(tmp_path, "other") is None


def test_siblings_that_are_no_usable_annotation_are_passed_over(tmp_path):
    """From a regression review: xml2json's own JSON beside its source was refused when the
    source took other groups or held a polygon under a pixel, and notes in a .txt or
    another tool's XML beside a good JSON stopped the run."""
    custom, tiny, notes = (tmp_path / d for d in ("custom", "tiny", "notes"))
    for d in (custom, tiny, notes):
        d.mkdir()
    (custom / "s.xml").write_text(xml_doc([("a", "Metastasis", square(0, 0, 10))]))
    convert(custom / "s.xml", "-o", custom / "s.json", "--positive-groups", "Metastasis")
    (tiny / "s.xml").write_text(xml_doc([("a", "_0", square(0, 0, 10)), ("b", "_0", [(50, 50), (50.4, 50), (50, 50.4)])]))
    convert(tiny / "s.xml", "-o", tiny / "s.json")
    convert(custom / "s.xml", "-o", notes / "s.json", "--positive-groups", "Metastasis")
    (notes / "s.txt").write_text("scanned on Monday\n")
    (notes / "s.xml").write_text('<?xml version="1.0"?><Annotations><Annotation/></Annotations>')  # Aperio's
    os.utime(notes / "s.xml", (0, 0))  # older than the JSON (a newer one is named: the test below)
    sliver = tmp_path / "sliver"  # a review: 0.6 px rounds to a whole pixel, 0.4 px to none
    sliver.mkdir()
    (sliver / "s.xml").write_text(xml_doc([("a", "_0", [(300.2, 300.2), (300.8, 300.2), (300.8, 300.8), (300.2, 300.8)]),
                                           ("b", "_0", [(0, 10.3), (500, 10.3), (500, 10.7), (0, 10.7)])]))
    convert(sliver / "s.xml", "-o", sliver / "s.json")
    for d in (custom, tiny, notes, sliver):
        assert an.find_annotation(d, "s") == d / "s.json", d
    (notes / "s.geojson").write_text(json.dumps(ev.lesions_geojson(np.array([[0.9, 5.0, 5.0]]))))  # lesions
    assert an.find_annotation(notes, "s") == notes / "s.json"  # points beside the truth are no rival truth


def test_a_newer_sibling_passed_over_is_named(tmp_path):
    """From the closing notes: deleting every polygon in QuPath and exporting again (the
    slide judged normal) left the old JSON in use without a word. A passed-over sibling
    newer than the file used, and not this tool's output, is now named in a warning."""
    (tmp_path / "s.xml").write_text(xml_doc([("a", "_0", square(0, 0, 10))]))
    convert(tmp_path / "s.xml", "-o", tmp_path / "s.json")
    (tmp_path / "s.xml").unlink()
    empty, lesions = tmp_path / "s.geojson", tmp_path / "s.txt"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    used = (tmp_path / "s.json").stat().st_mtime
    os.utime(empty, (used - 60, used - 60))  # older: an export from before the conversion, passed over quietly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert an.find_annotation(tmp_path, "s") == tmp_path / "s.json"
    os.utime(empty, (used + 60, used + 60))
    with pytest.warns(an.AnnotationWarning, match=r"s.geojson: newer than s.json, but holds no tumour or exclusion "
                                                  r"polygon; s.json is used"):
        assert an.find_annotation(tmp_path, "s") == tmp_path / "s.json"
    empty.write_text("{not json")
    with pytest.warns(an.AnnotationWarning, match=r"s.geojson: newer than s.json, but does not read as an annotation"):
        an.find_annotation(tmp_path, "s")
    normal = tmp_path / "normal"  # a review: an empty (normal) JSON used, a newer export of unknown tumour unsaid
    normal.mkdir()
    (normal / "s.json").write_text('{"positive": [], "negative": []}')
    os.utime(normal / "s.json", (used - 60, used - 60))
    feats = [qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 10))]}, "Tumour", "t")]
    (normal / "s.geojson").write_text(json.dumps(feats))
    with pytest.warns(an.AnnotationWarning, match=r"newer than s.json, but no tumour region read from it "
                                                  r"\(groups found: \['Tumour'\]\); s.json is used"):
        assert an.find_annotation(normal, "s") == normal / "s.json"
    empty.write_text(json.dumps(ev.lesions_geojson(np.array([[0.9, 5.0, 5.0]]))))  # this tool's lesion points
    lesions.write_text("")
    os.utime(lesions, (used - 60, used - 60))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert an.find_annotation(tmp_path, "s") == tmp_path / "s.json"


def test_another_tools_xml_is_refused_not_read_as_empty(tmp_path, capsys):
    """From a hostile review: an Aperio ImageScope XML read as an empty annotation (exit 0),
    so a tumour slide's truth said normal."""
    (tmp_path / "a.xml").write_text('<?xml version="1.0"?><Annotations><Annotation><Regions><Region><Vertices>'
                                    '<Vertex X="1" Y="2"/></Vertices></Region></Regions></Annotation></Annotations>')
    assert "not an ASAP annotation: its root element is <Annotations>" in error(capsys, tmp_path / "a.xml", "-o",
                                                                                 tmp_path / "a.json")
    assert not (tmp_path / "a.json").exists()


def test_a_decimal_comma_is_named(tmp_path, capsys):
    (tmp_path / "c.xml").write_text(xml_doc([("a", "_0", [("1000,5", 0), (10, 0), (10, 10)])]))
    assert "not a number (a decimal comma" in error(capsys, tmp_path / "c.xml", "-o", tmp_path / "c.json")


def test_a_file_whose_groups_are_all_unknown_is_refused_not_written_empty(tmp_path, capsys):
    """From a README walk-through: a QuPath export of classes not in --positive-groups gave
    warnings and an empty annotation with exit 0: a tumour slide made normal."""
    feats = [qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 10))]}, "Metastasis", "m")]
    path = _write(tmp_path / "m.geojson", json.dumps(feats))
    code, err = script(capsys, path, "-o", tmp_path / "m.json")
    assert code == 2 and "no tumour region read from it (groups found: ['Metastasis']); " \
        "nothing written (a normal slide's regions or cells? name their classes in --negative-groups; tumour must " \
        "be drawn as regions, not cells, points or lines)" in err.splitlines()[-1]
    with pytest.raises(an.AnnotationError, match="as truth it would mean a normal slide"):  # Mask_gen, evaluate
        an.load_truth(path)
    assert not (tmp_path / "m.json").exists()
    cells = [{**f, "properties": {**f["properties"], "objectType": "cell", "classification": {"name": "Tumor"}}}
             for f in feats]  # a review's bypass: tumour cells only, skipped, written as a normal slide
    for kind in ("cell", "Annotation"):
        cells[0]["properties"]["objectType"] = kind
        code, err = script(capsys, _write(tmp_path / "c.geojson", json.dumps(cells)), "-o", tmp_path / "c.json")
        assert (code, kind) == (2, "cell") and "QuPath objects skipped, not regions: ['cell Tumor']" in err or (code, kind) == (0, "Annotation")
    for cls in ("Tumor: Positive", "Metastasis", "Other"):  # derived, unknown: not taken for a normal slide
        cell = [{**cells[0], "properties": {"objectType": "cell", "classification": {"name": cls}}}]
        code, err = script(capsys, _write(tmp_path / "n.geojson", json.dumps(cell)), "-o", tmp_path / "n.json")
        assert code == 2 and f"['cell {cls}']" in err and "name their classes in --negative-groups" in err
    exclusion = [qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 10))]}, "Exclusion", "x")]
    tumour_cell = {**cells[0], "properties": {**cells[0]["properties"], "objectType": "cell"}}
    for extra in ([tumour_cell], feats):  # an exclusion among tumour cells or unknown groups: still no normal slide
        code, err = script(capsys, _write(tmp_path / "x.geojson", json.dumps(exclusion + extra)), "-o", tmp_path / "x.json")
        assert code == 2 and "no tumour region read from it" in err and not (tmp_path / "x.json").exists()
    normal = [{**cells[0], "properties": {"objectType": "detection"}}]  # unclassified, or of a class named negative
    code, err = script(capsys, _write(tmp_path / "n.geojson", json.dumps(normal)), "-o", tmp_path / "n.json")
    assert code == 0 and json.loads((tmp_path / "n.json").read_text()) == {"positive": [], "negative": []}
    other = [{**cells[0], "properties": {"objectType": "cell", "classification": {"name": "Other"}}}]
    convert(_write(tmp_path / "o.geojson", json.dumps(other)), "-o", tmp_path / "o.json",
            "--negative-groups", "_2,Exclusion,Other")  # the way the message names for a normal slide
    convert(path, "-o", tmp_path / "m.json", "--positive-groups", "Metastasis")
    _write(tmp_path / "empty.geojson", json.dumps({"type": "FeatureCollection", "features": []}))
    convert(tmp_path / "empty.geojson", "-o", tmp_path / "empty.json")  # a normal slide's: written, empty


def test_unclassified_polygons_by_name_and_tumour_points_are_no_normal_slide(tmp_path, capsys):
    """From a regression review: the warning names unclassified polygons' group "(none)",
    but --positive-groups "(none)" dropped them silently (an empty, normal slide); a Tumor
    point, line or null geometry in a GeoJSON read as a normal slide, where an ASAP Dot is
    refused."""
    plain = [qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 10))]})]
    path = _write(tmp_path / "u.geojson", json.dumps(plain))
    assert len(an.load_annotation(path, positive_groups=["(none)"]).positive) == 1
    assert len(an.load_annotation(path, negative_groups=["(none)"]).negative) == 1
    xml = _write(tmp_path / "u.xml", xml_doc([("a", "", square(0, 0, 10))]).replace(' PartOfGroup=""', ""))
    assert len(an.load_annotation(xml, positive_groups=["(none)"]).positive) == 1
    for src in (xml, path):  # written back as Tumor from either format, so the output is truth as it stands
        convert(src, "-o", tmp_path / f"{src.stem}_{src.suffix[1:]}.xml", "--to", "xml", "--positive-groups", "(none)")
        assert len(an.load_truth(tmp_path / f"{src.stem}_{src.suffix[1:]}.xml").positive) == 1
    for geometry in ({"type": "Point", "coordinates": [5, 5]}, {"type": "LineString", "coordinates": [[0, 0], [9, 9]]},
                     None):
        marks = _write(tmp_path / "p.geojson", json.dumps([qupath_feature(geometry, "Tumor", "p")]))
        code, err = script(capsys, marks, "-o", tmp_path / "p.json")
        assert code == 2 and "tumour marks that are no region" in err and not (tmp_path / "p.json").exists()
        with pytest.raises(an.AnnotationError, match="as truth it would mean a normal slide"):
            an.load_truth(marks)


def test_a_file_whose_tumour_is_all_under_a_pixel_is_not_written_as_json(tmp_path, capsys):
    """From a regression review: a 0.4-pixel tumour triangle converted to NCRF JSON with
    '1 positive', and the JSON (rounded to nothing) was then refused as truth."""
    xml = _write(tmp_path / "d.xml", xml_doc([("t", "_0", [(50, 50), (50.4, 50), (50, 50.4)])]))
    code, err = script(capsys, xml, "-o", tmp_path / "d.json")
    assert code == 2 and "every tumour polygon is left with fewer than 3 distinct vertices once rounded" in err and not (tmp_path / "d.json").exists()
    convert(xml, "-o", tmp_path / "d.geojson", "--to", "geojson")  # other formats keep the fractions


def test_a_lesion_export_beside_the_truth_is_never_its_rival(tmp_path):
    """From a regression review: `evaluate.py lesions --to xml` beside a GeoJSON truth was
    taken first (.xml before .geojson) and the truth refused as 'different polygons'."""
    feats = [qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 10))]}, "Tumor", "t")]
    _write(tmp_path / "s.geojson", json.dumps(feats))
    (tmp_path / "s.xml").write_text(ev.lesions_asap_xml(np.array([[0.9, 5.0, 5.0]])))
    assert an.is_lesion_export(tmp_path / "s.xml")
    assert an.find_annotation(tmp_path, "s") == tmp_path / "s.geojson"
    (tmp_path / "s.geojson").unlink()  # a review: a lone export was the truth ("groups found: Predicted lesion")
    assert an.find_annotation(tmp_path, "s") is None
    drawn = [qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 10))]}, an.LESION_CLASS, "r")]
    _write(tmp_path / "s.geojson", json.dumps(drawn))  # regions redrawn in QuPath under that class: no export
    assert not an.is_lesion_export(tmp_path / "s.geojson")


def test_a_hostile_tests_xml2json_findings(tmp_path, capsys):
    """Spaces after commas in the group options dropped the groups after them (exit 0); a
    vertex list with a BOM was refused; a FeatureCollection nested in the features was
    read as a normal slide."""
    assert xml2json.group_lists("_0, _1", "Exclusion, _2") == (["_0", "_1"], ["Exclusion", "_2"])
    txt = tmp_path / "bom.txt"
    txt.write_bytes(b"\xef\xbb\xbf10 10\r\n100 10\r\n100 100\r\n")
    assert an.load_annotation(txt).positive[0].tolist() == [[10, 10], [100, 10], [100, 100]]
    inner = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {
        "classification": {"name": "Tumor"}}, "geometry": {"type": "Polygon", "coordinates": [
            [[0, 0], [50, 0], [50, 50], [0, 0]]]}}]}
    nested = tmp_path / "nested.geojson"
    nested.write_text(json.dumps({"type": "FeatureCollection", "features": [inner]}))
    code, err = script(capsys, nested, "-o", tmp_path / "n.json")
    assert code == 2 and "feature 0 is a FeatureCollection inside the FeatureCollection" in err
    assert not (tmp_path / "n.json").exists()


def test_qupath_holes_and_polygons_rounded_to_nothing(tmp_path, capsys):
    """Left open by a hostile test: a hole of a Camelyon `_0` polygon, back from QuPath
    (no crfcore properties), was written to XML in group `Exclusion`, not Camelyon's `_2`;
    a tumour polygon under a pixel, beside a real one, was written to NCRF JSON and counted."""
    ring, hole = closed(square(0, 0, 100)), closed(square(40, 40, 10, clockwise=True))
    for cls, group in (("_0", "_2"), ("_1", "_2"), ("Tumor", "Exclusion")):
        src = _write(tmp_path / f"{cls}.geojson", json.dumps(
            [qupath_feature({"type": "Polygon", "coordinates": [ring, hole]}, cls, "t")]))
        convert(src, "-o", tmp_path / f"{cls}.xml", "--to", "xml", "--positive-groups", cls)
        assert f'PartOfGroup="{group}"' in (tmp_path / f"{cls}.xml").read_text(), cls
    xml = _write(tmp_path / "d.xml", xml_doc([("big", "_0", square(0, 0, 10)),
                                              ("tiny", "_0", [(50, 50), (50.4, 50), (50, 50.4)])]))
    code, err = script(capsys, xml, "-o", tmp_path / "d.json")
    assert code == 0 and "1 polygon(s) left with fewer than 3 distinct vertices" in err and "'tiny'" in err
    written = json.loads((tmp_path / "d.json").read_text())
    assert [p["name"] for p in written["positive"]] == ["big"]
    convert(xml, "-o", tmp_path / "d2.json")
    assert ": 1 positive, 0 negative polygons" in capsys.readouterr().out


def test_files_of_the_output_format_in_a_folder_are_named_when_left_out(tmp_path, capsys):
    """From a hostile review: a folder of ASAP XML with `--to xml --rename-groups` said
    "no annotation files" although it held one, and in a mixed folder the XML was dropped
    without a word. They are left out (earlier outputs, as a folder converted in place
    holds) but named, and a file named on its own is converted."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "t.xml").write_text(xml_doc([("a", "_0", square(0, 0, 10))]))
    err = error(capsys, d, "-o", tmp_path / "out", "--to", "xml")
    assert "no annotation files to convert" in err and ".xml files are taken for earlier outputs" in err
    (d / "u.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    code, err = script(capsys, d, "-o", tmp_path / "out", "--to", "xml")
    assert code == 0 and f"left out {d / 't.xml'}" in err
    convert(d / "t.xml", "-o", tmp_path / "named.xml", "--to", "xml")
    assert an.load_annotation(tmp_path / "named.xml").positive_names == ["a"]


def test_asap_sub_groups_take_the_class_of_their_parent_group(tmp_path):
    """From a hostile review: ASAP nests groups (`<Group Name="Sub" PartOfGroup="Tumor">`),
    and a polygon in such a sub-group was dropped as an unknown group."""
    def region(name, group, x):
        pts = "".join(f'<Coordinate Order="{i}" X="{px}" Y="{py}"/>'
                      for i, (px, py) in enumerate([(x, 0), (x + 10, 0), (x + 10, 10), (x, 10)]))
        return f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}"><Coordinates>{pts}</Coordinates></Annotation>'
    groups = [("Tumor", "None"), ("Sub", "Tumor"), ("SubSub", "Sub"), ("Loop", "Loop2"), ("Loop2", "Loop"),
              ("Stroma", "None")]
    doc = ("<ASAP_Annotations><Annotations>" + region("a", "SubSub", 0) + region("b", "Tumor", 20)
           + region("c", "Loop", 40) + "</Annotations><AnnotationGroups>"
           + "".join(f'<Group Name="{n}" PartOfGroup="{p}" Color="#ff0000"><Attributes/></Group>' for n, p in groups)
           + "</AnnotationGroups></ASAP_Annotations>")
    (tmp_path / "n.xml").write_text(doc)
    with pytest.warns(an.AnnotationWarning, match=r"unknown group\(s\) \['Loop'\]"):
        ann = an.load_annotation(tmp_path / "n.xml", positive_groups=["Tumor"])
    assert ann.positive_names == ["a", "b"]  # a group's sub-groups count as the group, a cycle as nothing
    (tmp_path / "s.xml").write_text(doc.replace(region("c", "Loop", 40), region("s", "Stroma", 40)))
    with pytest.warns(an.AnnotationWarning, match=r"unknown group\(s\) \['Stroma'\]"):  # a review: ASAP's
        ann = an.load_annotation(tmp_path / "s.xml", positive_groups=["Tumor", "None"])  # "None" is no parent
    assert ann.positive_names == ["a", "b"]


def test_a_qupath_round_trip_is_the_same_truth_whatever_its_ring_order(tmp_path):
    """From a hostile test of the review loop: XML -> GeoJSON -> QuPath (which drops the
    crfcore properties) beside the XML was refused as 'different polygons', because the
    rings came back reversed and the holes after their polygon."""
    xml = _write(tmp_path / "s.xml", xml_doc([("t", "_0", square(0, 0, 100)), ("u", "_0", square(200, 0, 50)),
                                              ("h", "_2", square(10, 10, 20))]))
    convert(xml, "-o", tmp_path / "export.geojson", "--to", "geojson")
    data = json.loads((tmp_path / "export.geojson").read_text())
    for feat in data["features"]:
        feat["properties"].pop("crfcore", None)
    data["features"].reverse()
    _write(tmp_path / "s.geojson", json.dumps(data))
    assert an.find_annotation(tmp_path, "s") == xml
    moved = json.loads((tmp_path / "s.geojson").read_text())
    moved["features"][0]["geometry"]["coordinates"][0][1][0] += 3  # one vertex moved in QuPath
    _write(tmp_path / "s.geojson", json.dumps(moved))
    with pytest.raises(an.AnnotationError, match="hold different polygons"):
        an.find_annotation(tmp_path, "s")

    def one(*rings):
        ann = an.Annotation()
        for r in rings:
            ann.add("positive", "t", np.array(r, float))
        return ann
    sq = square(0, 0, 10)
    assert an.same_polygons(one(sq), one(closed(sq))) and an.same_polygons(one(sq), one([sq[0], sq[1], sq[1], *sq[2:]]))
    assert an.same_polygons(one(sq), one([sq[0], [9.8, 0], [10.2, 0], *sq[2:]]))  # the same once rounded
    assert not an.same_polygons(one([*sq, [5, 5]]), one([sq[0], [5, 5], *sq[1:]]))  # the same vertices, another ring


def test_lesion_points_and_empty_geometries_are_no_normal_slide(tmp_path, capsys):
    """From a hostile test: the GeoJSON lesion export given as truth read as a normal slide
    (its Point classes were not counted, where ASAP Dots are); an empty Polygon failed the
    whole file with a made-up name while an empty MultiPolygon vanished silently."""
    export = _write(tmp_path / "lesions.geojson", json.dumps(ev.lesions_geojson(np.array([[0.9, 5.0, 5.0]]))))
    with pytest.raises(an.AnnotationError, match=r"groups found: \['Predicted lesion'\].*as truth it would mean"), \
            pytest.warns(an.AnnotationWarning, match="1 feature.s. of type Point ignored .*classes: Predicted lesion"):
        an.load_truth(export)
    notes = [qupath_feature({"type": "Point", "coordinates": [5, 5]}), qupath_feature(  # QuPath's unclassified points
        {"type": "MultiPoint", "coordinates": [[1, 1], [2, 2]]})]
    with pytest.warns(an.AnnotationWarning, match="2 feature.s. of type MultiPoint, Point ignored"):
        assert not an.load_truth(_write(tmp_path / "normal.geojson", json.dumps(notes)))  # still a normal slide
    tumour = qupath_feature({"type": "Polygon", "coordinates": [closed(square(0, 0, 10))]}, "Tumor", "t")
    for empty in ({"type": "Polygon", "coordinates": []}, {"type": "MultiPolygon", "coordinates": []}):
        path = _write(tmp_path / "e.geojson", json.dumps([tumour, qupath_feature(empty, "Tumor", "e")]))
        with pytest.warns(an.AnnotationWarning, match=f"1 feature.s. of type empty {empty['type']} ignored.*classes: Tumor"):
            assert len(an.load_annotation(path).positive) == 1
        _write(path, json.dumps([qupath_feature(empty, "Tumor", "e")]))
        code, err = script(capsys, path, "-o", tmp_path / "e.json")
        assert code == 2 and f"['empty {empty['type']} Tumor']" in err and not (tmp_path / "e.json").exists()
