import json

import numpy as np
from matplotlib.path import Path as MplPath

from crfcore import annotations as an
from conftest import run_script, shared


def test_tumor_001_xml_converts_exactly_like_ncrf(tmp_path):
    out = tmp_path / "t.json"
    run_script("xml2json.py", shared("annotations", "tumor_001.xml"), "-o", out)
    assert json.loads(out.read_text()) == json.loads(shared("annotations", "tumor_001.json").read_text())


def test_xml_json_xml_json_is_identity(tmp_path):
    run_script("xml2json.py", shared("annotations", "tumor_001.xml"), "-o", tmp_path / "a.json")
    run_script("xml2json.py", tmp_path / "a.json", "-o", tmp_path / "b.xml", "--to", "xml")
    run_script("xml2json.py", tmp_path / "b.xml", "-o", tmp_path / "c.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "c.json").read_text()


def test_negative_polygons_and_groups_survive_xml(tmp_path):
    ann = an.Annotation()
    ann.add("positive", "Tumor A", np.array([[0, 0], [100, 0], [100, 100], [0, 100]]))
    ann.add("negative", "Hole", np.array([[40, 40], [60, 40], [60, 60], [40, 60]]))
    an.write_annotation(ann, tmp_path / "a.xml", to="xml")
    back = an.load_annotation(tmp_path / "a.xml")
    assert back.positive_names == ["Tumor A"] and back.negative_names == ["Hole"]
    assert back.contains(np.array([[10, 10], [50, 50], [150, 50]])).tolist() == [True, False, False]


def test_vertex_txt_with_crlf(tmp_path):
    ann = an.load_annotation(shared("annotations", "Annotation0.txt"))
    assert len(ann.positive) == 1 and not ann.negative
    first = shared("annotations", "Annotation0.txt").read_text().split()[:2]
    assert ann.positive[0][0].tolist() == [float(v) for v in first]
    neg = an.load_annotation(shared("annotations", "Annotation0.txt"), txt_part="negative")
    assert len(neg.negative) == 1


def test_geojson_for_qupath(tmp_path):
    out = tmp_path / "t.geojson"
    run_script("xml2json.py", shared("annotations", "tumor_001.xml"), "-o", out, "--to", "geojson")
    gj = json.loads(out.read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    f = gj["features"][0]
    assert f["geometry"]["type"] == "Polygon"
    ring = f["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and f["properties"]["classification"]["name"] == "Tumor"


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


def test_bad_inputs_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text('<?xml version="1.0"?>\n<ASAP_Annotations>\n<Annotations>\n</Oops>\n')
    proc = run_script("xml2json.py", bad, "-o", tmp_path / "o.json", check=False)
    assert proc.returncode == 2 and "line 4" in proc.stderr and "Traceback" not in proc.stderr
    txt = tmp_path / "v.txt"
    txt.write_text("1 2\n3 4\nfoo bar\n")
    proc = run_script("xml2json.py", txt, "-o", tmp_path / "o.json", check=False)
    assert proc.returncode == 2 and "v.txt:3" in proc.stderr
    proc = run_script("xml2json.py", tmp_path / "missing.xml", "-o", tmp_path / "o.json", check=False)
    assert proc.returncode == 2 and "missing.xml" in proc.stderr


def test_warnings_exit_zero(tmp_path):
    xml = tmp_path / "w.xml"
    xml.write_text('<?xml version="1.0"?><ASAP_Annotations><Annotations>'
                   '<Annotation Name="a" PartOfGroup="Mystery"><Coordinates>'
                   '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="9" Y="0"/>'
                   '<Coordinate Order="2" X="9" Y="9"/></Coordinates></Annotation>'
                   '<Annotation Name="line" PartOfGroup="Tumor"><Coordinates>'
                   '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="9" Y="0"/>'
                   '<Coordinate Order="2" X="0" Y="0"/></Coordinates></Annotation>'
                   '</Annotations></ASAP_Annotations>')
    proc = run_script("xml2json.py", xml, "-o", tmp_path / "w.json")
    assert "Mystery" in proc.stderr and "'line'" in proc.stderr and "no polygons" in proc.stderr
    assert json.loads((tmp_path / "w.json").read_text()) == {"positive": [], "negative": []}
    proc = run_script("xml2json.py", xml, "-o", tmp_path / "m.json", "--positive-groups", "Mystery")
    assert len(json.loads((tmp_path / "m.json").read_text())["positive"]) == 1


def test_directory_of_inputs(tmp_path):
    run_script("xml2json.py", shared("annotations"), "-o", tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["Annotation0.json", "tumor_001.json"]  # tumor_001.json itself is skipped
    assert json.loads((tmp_path / "out" / "tumor_001.json").read_text())["positive"][0]["name"] == "_0"
