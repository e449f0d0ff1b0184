"""viewer.py through Flask's test client: every route, the pairing of maps, lesions and
annotations with slides, and the faults that must answer 4xx with one line, never 500.
The headless-browser test is tests/test_viewer_browser.py."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, shared
from crfcore import masks, synthetic
from crfcore.annotations import Annotation, write_annotation
from crfcore.heatmap import colourise, load_probability_map, save_probability_map
from crfcore.io import save_array

LOW_BOX = (256, 160, 448, 320)  # level-0 (x0, y0, x1, y1) of v's low-valued (0.3) map block
HIGH, LOW = 0.9, 0.3


def load_viewer():
    """viewer.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("viewer", ROOT / "viewer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["viewer"] = module  # dataclasses look their module up while classes are made
    spec.loader.exec_module(module)
    return module


def write_viewer_data(d: Path) -> synthetic.SyntheticSlide:
    """slides/sub/v.tif with its truth v.xml; maps/v_prob.npy: HIGH on the planted tumour,
    LOW on LOW_BOX, 0 elsewhere (16-pixel lattice); maps/v.csv: one lesion at (500, 400)."""
    s = synthetic.write_slide(d / "slides" / "sub" / "v.tif", 1024, 768, tumours=1, seed=2,
                              xml=d / "slides" / "sub" / "v.xml")
    tumour, meta = masks.make_mask(s.path, "tumor", s.annotation, downsample=16)
    prob = np.where(tumour, HIGH, 0).astype(np.float32)
    x0, y0, x1, y1 = (v // 16 for v in LOW_BOX)
    assert not tumour[y0:y1, x0:x1].any(), "the low block must stay clear of the tumour"
    prob[y0:y1, x0:x1] = LOW
    save_probability_map(d / "maps" / "v_prob.npy", prob, meta)
    (d / "maps" / "v.csv").write_text("0.9,500,400\n")
    return s


def write_faults(d: Path, s: synthetic.SyntheticSlide) -> None:
    """Bad companions: for v, maps in sub-folders that are pickled, without sidecar, of
    another slide, with NaN (and a good second map `crf`); slides/w.tif (a copy of v) with
    a malformed annotation, a malformed lesion CSV and a map on the wrong lattice; g.tif
    (another copy) with GeoJSON truth; a broken slide; a prefix trap."""
    good = d / "maps" / "v_prob.npy"
    meta = json.loads(good.with_suffix(".json").read_text())
    prob = np.load(good)
    for name in ("pickled", "nosidecar", "other", "nan", "crf", "empty", "deep"):
        (d / "maps" / name).mkdir()
    (d / "maps" / "empty" / "v_prob.npy").write_bytes(b"")  # a zero-byte map
    shutil.copy(good.with_suffix(".json"), d / "maps" / "empty" / "v_prob.json")
    np.save(d / "maps" / "deep" / "v_prob.npy", prob)
    (d / "maps" / "deep" / "v_prob.json").write_text("[" * 100000 + "]" * 100000)  # a sidecar nested too deeply
    np.save(d / "maps" / "pickled" / "v_prob.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    shutil.copy(good.with_suffix(".json"), d / "maps" / "pickled" / "v_prob.json")
    np.save(d / "maps" / "nosidecar" / "v_prob.npy", prob)
    save_array(d / "maps" / "other" / "v_prob.npy", prob, {**meta, "slide": "w.tif"})
    save_array(d / "maps" / "nan" / "v_prob.npy", np.where(prob > 0, np.nan, 0).astype(np.float32), meta)
    save_probability_map(d / "maps" / "crf" / "v_prob.npy", prob[::-1], meta)  # a second, good map
    (d / "maps" / "crf" / "v.csv").write_text("0.8,100,100\n0.7,200,200\n")
    (d / "maps" / "v10_prob.npy").write_text("not v's: the pairing rule never takes a bare prefix")
    shutil.copy(s.path, d / "slides" / "g.tif")  # truth as GeoJSON in MAPS_DIR
    write_annotation(s.annotation, d / "maps" / "g.geojson", to="geojson")
    shutil.copy(s.path, d / "slides" / "w.tif")
    (d / "slides" / "w.xml").write_text("<ASAP_Annotations><Annotations>\n<Annotation")
    (d / "maps" / "w.csv").write_text("0.9,500,400\n0.8,oops,3\n")
    save_probability_map(d / "maps" / "w_prob.npy", prob[:20], {**meta, "slide": "w.tif"})
    shutil.copy(s.path, d / "elsewhere.tif")  # a slide linked into SLIDE_DIR is served
    (d / "slides" / "linked.tif").symlink_to(d / "elsewhere.tif")
    (d / "slides" / "broken.svs").write_text("not a slide")
    (d / "secret.txt").write_text("outside")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    viewer = load_viewer()
    d = tmp_path_factory.mktemp("view")
    s = write_viewer_data(d)
    write_faults(d, s)
    app = viewer.create_app(d / "slides", d / "maps")
    app.testing = True
    return viewer, app.test_client(), s, d


def config(c, url: str) -> dict:
    """The JSON the slide page hands its script."""
    html = c.get(url).get_data(as_text=True)
    return json.loads(html.split('<script id="config" type="application/json">', 1)[1].split("</script>", 1)[0])


def png(resp) -> np.ndarray:
    assert resp.status_code == 200 and resp.mimetype == "image/png", resp.get_data(as_text=True)[:200]
    return np.asarray(Image.open(io.BytesIO(resp.data)))


# ----------------------------------------------------------------------------- index and slides


def test_index_lists_slides_thumbnails_maps_and_broken_ones(env):
    _, c, _, _ = env
    html = c.get("/").get_data(as_text=True)
    assert 'href="/sub/v.tif"' in html and 'src="/_thumb/sub/v.tif"' in html and 'href="/w.tif"' in html
    assert "1024 x 768 px, 0.250 um/px, generic-tiff" in html
    row = html.split('href="/sub/v.tif"', 1)[1].split("</tr>", 1)[0]
    assert all(f'<span class="tag">{m}</span>' in row for m in ("maps", "crf", "nan", "other"))
    assert "v10" not in html and "v.xml" in row  # the map of another stem is never paired with v
    assert "broken.svs" in html and "cannot be opened" in html


def test_thumbnail_dzi_and_tiles(env):
    _, c, _, _ = env
    thumb = c.get("/_thumb/sub/v.tif")
    assert thumb.mimetype == "image/jpeg" and max(Image.open(io.BytesIO(thumb.data)).size) == 200
    dzi = c.get("/sub/v.tif.dzi")
    assert dzi.status_code == 200 and 'Width="1024"' in dzi.get_data(as_text=True)
    tile = c.get("/sub/v.tif_files/10/0_0.jpeg")  # 1024 px wide: levels 0..10
    assert tile.status_code == 200 and tile.mimetype == "image/jpeg" and tile.data[:2] == b"\xff\xd8"
    assert c.get("/sub/v.tif_files/99/0_0.jpeg").status_code == 404
    assert c.get("/sub/v.tif_files/10/0_0.gif").status_code == 404
    assert c.get("/linked.tif.dzi").status_code == 200 and c.get("/linked.tif").status_code == 200


def test_page_has_the_review_controls_and_neighbours(env):
    viewer, c, _, _ = env
    html = c.get("/sub/v.tif").get_data(as_text=True)
    assert "1024 x 768 px, 0.250 um/px" in html
    # the page's script needs OpenSeadragon (npm, optional): without it the page says how to get it
    script = "/_static/viewer.js" if (viewer.OSD / "openseadragon.min.js").exists() else 'id="no-osd"'
    for control in ('id="heat"', 'id="map"', 'id="threshold"', 'id="opacity"', 'id="truth"', 'class="lesion-set"',
                    'id="legend"', 'id="help"', "next / previous slide", script):
        assert control in html, control
    cfg = config(c, "/sub/v.tif")
    assert [m["name"] for m in cfg["maps"]] == ["_", "crf", "deep", "empty", "nan", "nosidecar", "other", "pickled"]
    assert [s["name"] for s in cfg["lesions"]] == ["maps", "crf"] and cfg["truth"] == "/_truth/sub/v.tif"
    assert (cfg["prev"], cfg["next"]) == ("/linked.tif", "/w.tif")  # sorted by path; broken.svs is skipped
    assert (config(c, "/w.tif")["prev"], config(c, "/w.tif")["next"]) == ("/sub/v.tif", None)
    assert c.get("/_static/viewer.js").status_code == 200 and c.get("/_static/viewer.css").status_code == 200


def test_openseadragon_is_served_from_node_modules_or_the_page_says_how_to_get_it(env, monkeypatch):
    viewer, c, _, d = env
    if (viewer.OSD / "openseadragon.min.js").exists():
        assert c.get("/_osd/openseadragon.min.js").status_code == 200
    assert c.get("/_osd/%2e%2e/package.json").status_code == 404
    monkeypatch.setattr(viewer, "OSD", d / "no-such-folder")
    html = c.get("/sub/v.tif").get_data(as_text=True)
    assert "OpenSeadragon is missing: run <code>npm install</code>" in html and "viewer.js" not in html


# ----------------------------------------------------------------------------- map overlays


def test_overlay_has_the_slides_geometry_and_sharp_rgba_cells(env):
    _, c, s, _ = env
    dzi = c.get("/_map/_/sub/v.tif.dzi").get_data(as_text=True)
    assert 'Width="1024"' in dzi and 'Height="768"' in dzi and 'Format="png"' in dzi
    whole = png(c.get("/_map/_/sub/v.tif_files/7/0_0.png"))  # level 7: 128 x 96, 8 level-0 px per pixel
    assert whole.shape == (96, 128, 4)
    assert whole[2, 2].tolist() == [0, 0, 0, 0]  # glass, outside tissue: transparent, not veiled
    x0, y0, x1, y1 = s.annotation.bounds()
    tumour = whole[int((y0 + y1) / 16), int((x0 + x1) / 16)]
    low = whole[(LOW_BOX[1] + LOW_BOX[3]) // 16, (LOW_BOX[0] + LOW_BOX[2]) // 16]
    hi_rgb, lo_rgb = colourise(np.array([HIGH, LOW])).tolist()
    assert tumour.tolist() == [*hi_rgb, 255] and low.tolist() == [*lo_rgb, 255]
    # blocks, never smoothed: every pixel is a cell's exact colour, fully opaque or transparent
    shown = whole[whole[..., 3] > 0][:, :3]
    assert set(np.unique(whole[..., 3])) == {0, 255}
    assert {tuple(p) for p in shown} == {tuple(hi_rgb), tuple(lo_rgb)}


def test_threshold_hides_cells_below_it(env):
    _, c, _, _ = env
    at = lambda t: png(c.get(f"/_map/_/sub/v.tif_files/7/0_0.png?t={t}"))[..., 3] > 0  # noqa: E731
    r, col = (LOW_BOX[1] + LOW_BOX[3]) // 16, (LOW_BOX[0] + LOW_BOX[2]) // 16
    assert at(0)[r, col] and not at(0.5)[r, col] and at(0.3)[r, col]
    hidden = png(c.get("/_map/_/sub/v.tif_files/7/0_0.png?t=0.5"))
    assert hidden[r, col].tolist() == [0, 0, 0, 0]
    assert at(0.5).sum() == at(0.9).sum() > 0 and not at(0.95).any()
    for bad in ("2", "nan", "x"):
        assert c.get(f"/_map/_/sub/v.tif_files/7/0_0.png?t={bad}").status_code == 400
    assert c.get("/_map/_/sub/v.tif_files/99/0_0.png").status_code == 404
    assert c.get("/_map/nothing/sub/v.tif.dzi").status_code == 404


def test_value_under_the_cursor(env):
    _, c, s, _ = env
    x0, y0, x1, y1 = s.annotation.bounds()
    value = lambda x, y: c.get(f"/_value/_/sub/v.tif?x={x}&y={y}").get_json()["value"]  # noqa: E731
    assert value((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx(HIGH)
    assert value(LOW_BOX[0] + 1, LOW_BOX[1] + 1) == pytest.approx(LOW)
    assert value(LOW_BOX[0] - 1, LOW_BOX[1] + 1) == 0  # the next cell to the left
    assert value(5000, 10) is None
    missing = c.get("/_value/_/sub/v.tif?x=3")
    assert missing.status_code == 400 and "&#39;y&#39; must be a finite number" in missing.get_data(as_text=True)
    assert "inf" not in missing.get_data(as_text=True)  # no bounds to name


def test_lesions_and_truth(env):
    _, c, s, _ = env
    assert c.get("/_lesions/_/sub/v.tif").get_json() == [[0.9, 500.0, 400.0]]
    assert c.get("/_lesions/crf/sub/v.tif").get_json() == [[0.8, 100.0, 100.0], [0.7, 200.0, 200.0]]
    truth = c.get("/_truth/sub/v.tif").get_json()
    assert truth["file"] == "v.xml" and truth["negative"] == []
    np.testing.assert_allclose(truth["positive"][0], s.annotation.positive[0])
    geo = c.get("/_truth/g.tif").get_json()
    assert geo["file"] == "g.geojson" and len(geo["positive"]) == 1
    assert set(map(tuple, geo["positive"][0])) == set(map(tuple, s.annotation.positive[0].tolist()))


# ----------------------------------------------------------------------------- faults: 4xx, one line


@pytest.mark.parametrize("url, words", [
    ("/_map/pickled/sub/v.tif.dzi", "cannot read the array"),
    ("/_map/empty/sub/v.tif.dzi", "cannot read the array (empty or truncated file)"),
    ("/_map/deep/sub/v.tif.dzi", "malformed JSON (nested too deeply)"),
    ("/_map/nosidecar/sub/v.tif.dzi", "sidecar v_prob.json is missing"),
    ("/_map/other/sub/v.tif.dzi", "belongs to slide 'w.tif'"),
    ("/_map/nan/sub/v.tif.dzi", "NaN or infinite"),
    ("/_map/nan/sub/v.tif_files/7/0_0.png", "NaN or infinite"),
    ("/_value/nan/sub/v.tif?x=1&y=1", "NaN or infinite"),
    ("/_map/_/w.tif.dzi", "but the slide is 1024x768"),
    ("/_lesions/_/w.tif", "w.csv:2: expected 'prob,x,y'"),
    ("/_truth/w.tif", "w.xml: malformed XML"),
    ("/broken.svs", "broken.svs: not a slide format"),
    ("/broken.svs.dzi", "broken.svs: not a slide format"),
])
def test_bad_files_answer_4xx_with_one_line(env, url, words):
    _, c, _, _ = env
    resp = c.get(url)
    text = resp.get_data(as_text=True)
    assert 400 <= resp.status_code < 500 and resp.mimetype == "text/plain", (resp.status_code, text)
    assert words in text and text.count("\n") == 1, text
    assert str(ROOT.parent) not in text and "/tmp" not in text  # names, not this machine's paths


def test_path_traversal_is_refused(env):
    _, c, _, _ = env
    for url in ("/../secret.txt", "/%2e%2e/secret.txt.dzi", "/nothing.tif.dzi", "/_thumb/%2e%2e/secret.txt",
                "/_map/_/%2e%2e/secret.txt.dzi", "/_truth/%2e%2e/secret.txt", "/_lesions/_/%2e%2e/secret.txt"):
        assert c.get(url).status_code == 404, url


# ----------------------------------------------------------------------------- caches, DICOM, CLI


def test_cache_is_bounded_lru_and_makes_one_value_per_key(env):
    viewer, _, _, _ = env
    cache = viewer.LRUCache(2)
    cache.get("a", lambda: 1), cache.get("b", lambda: 2), cache.get("a", lambda: 0), cache.get("c", lambda: 3)
    assert len(cache) == 2 and cache.get("a", lambda: -1) == 1 and cache.get("b", lambda: -2) == -2  # b was evicted
    got, gate = [], threading.Barrier(8)

    def racer():
        gate.wait()
        got.append(cache.get("shared", object))

    threads = [threading.Thread(target=racer) for _ in range(8)]
    [t.start() for t in threads], [t.join() for t in threads]
    assert len({id(v) for v in got}) == 1  # every thread sees the one stored value


def test_threaded_requests_with_a_tiny_cache(env):
    viewer, _, _, d = env
    client = viewer.create_app(d / "slides", d / "maps", cache_size=1).test_client()
    urls = ["/sub/v.tif_files/9/1_1.jpeg", "/w.tif_files/9/0_1.jpeg", "/_map/_/sub/v.tif_files/8/1_0.png",
            "/_map/crf/sub/v.tif_files/8/0_0.png"] * 4
    codes = []
    threads = [threading.Thread(target=lambda u=u: codes.append(client.get(u).status_code)) for u in urls]
    [t.start() for t in threads], [t.join() for t in threads]
    assert codes == [200] * len(urls)


def test_dicom_series_is_one_slide(tmp_path):
    viewer = load_viewer()
    for name in ("boxes_0.dcm", "boxes_1.dcm", "small.svs"):
        shutil.copy(shared("slides", name), tmp_path / name)
    c = viewer.create_app(tmp_path).test_client()
    html = c.get("/").get_data(as_text=True)
    assert 'href="/boxes_0.dcm"' in html and 'href="/boxes_1.dcm"' not in html and 'href="/small.svs"' in html
    assert "DICOM series of 2 files: boxes_0.dcm, boxes_1.dcm" in html
    assert config(c, "/boxes_1.dcm")["next"] == "/small.svs"  # a member navigates as its series
    assert c.get("/boxes_1.dcm.dzi").status_code == 200


def test_main_refuses_a_missing_folder(env, tmp_path):
    viewer, _, _, _ = env
    with pytest.raises(viewer.UserError, match="not a directory"):
        viewer.main([str(tmp_path / "none")])
    with pytest.raises(viewer.UserError, match="not a directory"):
        viewer.main([str(tmp_path), "--maps", str(tmp_path / "none")])


def test_a_port_in_use_is_one_line(tmp_path):
    import socket

    from conftest import call
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        res = call("viewer.py", tmp_path, "--port", port, check=False)
    assert res.returncode == 2 and res.stderr.startswith(f"error: cannot serve on 127.0.0.1:{port} (")
    assert "another viewer running?" in res.stderr and res.stderr.count("\n") == 1


def test_a_linked_folder_in_slide_dir_opens_nothing_through_it(env, tmp_path):
    """From a hostile review: `ln -s / SLIDE_DIR/rootlink` served any file under / by its path."""
    viewer, _, _, _ = env
    slides = tmp_path / "slides"
    slides.mkdir()
    outside = tmp_path / "outside"
    synthetic.write_slide(outside / "o.tif", 256, 256, tumours=0, seed=1)
    (outside / "secret.json").write_text('{"positive": [], "negative": []}')
    (slides / "rootlink").symlink_to(outside)
    (slides / "linked.tif").symlink_to(outside / "o.tif")  # a linked slide is still served
    c = viewer.create_app(slides).test_client()
    for url in ("/_thumb/rootlink/o.tif", "/_truth/rootlink/o.tif", "/rootlink/o.tif.dzi",
                "/_truth/rootlink/secret.json"):
        assert c.get(url).status_code == 404, url
    assert c.get("/_thumb/linked.tif").status_code == 200


@pytest.mark.filterwarnings("ignore::UserWarning")  # said again on every listing; checked once below
def test_review_findings_truth_listing_and_names(tmp_path):
    """From a hostile review of the viewer: a lesion export sorted before the truth's folder
    was shown as the (empty) truth; a non-UTF-8 slide name made the index a 500; this
    tool's heat-map TIFF, and slides under folders named like the viewer's URLs, were
    listed; a sub-folder `_` passed for MAPS_DIR's own maps; truth and lesions of another
    slide were drawn nowhere without a word; folders were listed once per slide."""
    viewer = load_viewer()
    from crfcore import evaluation as ev
    from crfcore.heatmap import write_map_tiff

    s = write_viewer_data(tmp_path)
    maps = tmp_path / "maps"
    (tmp_path / "slides" / "sub" / "v.xml").rename(maps / "v.xml")  # the truth in MAPS_DIR, as Camelyon's XML
    (maps / "a_lesions").mkdir()  # sorts before nothing but after MAPS_DIR: a sub-folder of exports
    (maps / "a_lesions" / "v.geojson").write_text(json.dumps(ev.lesions_geojson(np.array([[0.9, 5.0, 5.0]]))))
    (maps / "_").mkdir()
    save_probability_map(maps / "_" / "v_prob.npy", *load_probability_map(maps / "v_prob.npy"))
    slides = tmp_path / "slides"
    write_map_tiff(slides / "v_heat.tif", load_probability_map(maps / "v_prob.npy")[0], (s.width, s.height), None)
    (slides / "_thumb").mkdir()
    shutil.copy(s.path, slides / "_thumb" / "x.tif")
    shutil.copy(s.path, slides / os.fsdecode(b"bad\xffname.tif"))
    c = viewer.create_app(slides, maps).test_client()
    with pytest.warns(UserWarning) as caught:
        index = c.get("/")
    html = index.get_data(as_text=True)
    assert index.status_code == 200 and 'href="/sub/v.tif"' in html
    assert "v_heat.tif" not in html and "_thumb/x.tif" not in html
    said = " ".join(str(w.message) for w in caught)
    assert "whose name is not UTF-8" in said and "named like the viewer's URLs" in said and "folder named '_' is not read" in said
    truth = c.get("/_truth/sub/v.tif").get_json()
    assert truth["file"] == "v.xml" and len(truth["positive"]) == 1
    assert [m["name"] for m in config(c, "/sub/v.tif")["maps"]] == ["_"]
    moved = Annotation()  # another slide's: far off this one
    moved.add("positive", "t", s.annotation.positive[0] + 100_000)
    write_annotation(moved, maps / "v.xml", to="xml")
    res = c.get("/_truth/sub/v.tif")
    assert res.status_code == 422 and "lies wholly outside the 1024x768 slide" in res.get_data(as_text=True)
    (maps / "v.csv").write_text("0.9,100000,100000\n")
    res = c.get("/_lesions/_/sub/v.tif")
    assert res.status_code == 422 and "every lesion lies outside the 1024x768 slide" in res.get_data(as_text=True)
    lib = viewer.Library(slides.resolve(), maps.resolve())
    calls = []
    real = viewer.visible_names
    viewer.visible_names = lambda folder: calls.append(folder) or real(folder)
    try:
        for _ in range(3):
            lib.companions(s.path, "prob"), lib.truth(s.path)
    finally:
        viewer.visible_names = real
    assert len(calls) == len(set(calls))  # each folder listed once while it is unchanged
    assert {r.rule.split("/")[1] for r in c.application.url_map.iter_rules() if r.rule.startswith("/_")} == viewer.ROUTES
