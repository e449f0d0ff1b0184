import json

import numpy as np
import pytest
import sklearn.metrics

from crfcore import evaluation as ev
from crfcore import masks
from crfcore import slide as sl
from crfcore import synthetic
from crfcore.annotations import Annotation, write_annotation
from crfcore.heatmap import save_probability_map
from conftest import call


def square(x0, y0, side):
    return np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], float)


def test_nms_smooths_as_ncrf_does():
    """From a review: --sigma smoothed with scipy's `reflect` border, where NCRF's nms.py
    calls skimage's gaussian (border `nearest`): maps differed at the border."""
    prob = np.zeros((30, 40))
    prob[0, 0] = prob[15, 20] = 1.0
    from scipy.ndimage import gaussian_filter
    ncrf = gaussian_filter(prob, 2.0, mode="nearest")  # what skimage.filters.gaussian runs for a float map
    got = ev.find_lesions(prob, (1.0, 1.0), threshold=0.0, radius=100, sigma=2.0)
    assert got[0, 0] == pytest.approx(ncrf.max()) and got[0, 1:].tolist() == [0, 0]  # the corner: 0.36 (reflect: 0.14)


def test_nms_finds_peaks_and_suppresses_their_neighbourhood():
    prob = np.zeros((40, 60), np.float32)
    prob[10, 20] = 0.9
    prob[11, 21] = 0.8   # inside the first peak's square: suppressed
    prob[30, 50] = 0.7
    prob[5, 5] = 0.4     # below threshold
    les = ev.find_lesions(prob, (64.0, 64.0), threshold=0.5, radius=3)
    assert les.tolist() == [[pytest.approx(0.9), 20.5 * 64 // 1, 10.5 * 64 // 1],
                            [pytest.approx(0.7), 50.5 * 64 // 1, 30.5 * 64 // 1]]
    assert len(ev.find_lesions(prob, (64.0, 64.0), threshold=0.5, radius=0)) == 3


@pytest.fixture()
def truth():
    """Two large tumours and one isolated-tumour-cell region (0.243 um/px, level 5)."""
    ann = Annotation()
    ann.add("positive", "big1", square(3200, 3200, 3200))     # 778 um
    ann.add("positive", "big2", square(12800, 3200, 3200))
    ann.add("positive", "itc", square(3200, 12800, 320))      # 78 um: an ITC
    return ann


def test_froc_hand_computed(truth, tmp_path):
    ds = 32.0
    xs, ys = (np.arange(600) + 0.5) * ds, (np.arange(600) + 0.5) * ds
    labels = ev.evaluation_mask(truth.rasterise(xs, ys), ds)
    itc = ev.isolated_tumour_cells(labels, ds)
    assert labels.max() == 3 and len(itc) == 1
    lesions = np.array([[0.9, 4800, 4800],      # on big1
                        [0.8, 9000, 16000],     # normal tissue: a false positive
                        [0.7, 3360, 12960]])    # on the ITC: neither hit nor miss
    fp, tp, n = ev.slide_hits(lesions, labels, itc, (ds, ds))
    assert fp == [0.8] and sorted(tp.tolist()) == [0.0, pytest.approx(0.9)] and n == 2
    avg_fp, sens = ev.froc([fp], [tp])
    score, at = ev.froc_score(avg_fp, sens)
    assert at.tolist() == [0.5] * 6 and score == pytest.approx(0.5)
    # a perfect detector: every tumour found, nothing else
    perfect = np.array([[0.9, 4800, 4800], [0.95, 14400, 4800]])
    fp, tp, _ = ev.slide_hits(perfect, labels, itc, (ds, ds))
    assert ev.froc_score(*ev.froc([fp, []], [tp, np.zeros(0)]))[0] == pytest.approx(1.0)


def test_dilation_by_75um_joins_close_regions():
    ds = 32.0
    tumour = np.zeros((100, 100), bool)
    tumour[20:60, 20:40] = True
    tumour[20:60, 44:64] = True   # 4 px = 128 level-0 px = 31 um apart: < 75 um, joined
    tumour[20:60, 80:95] = True   # 16 px = 124 um apart: separate
    assert ev.evaluation_mask(tumour, ds).max() == 2


def test_slide_roc_on_known_lists():
    r = ev.slide_roc(np.array([0, 0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.7, 0.6, 0.8, 0.9]), n_boot=200)
    assert r["auc"] == pytest.approx(8 / 9)
    assert r["specificity"] == pytest.approx(2 / 3) and r["sensitivity"] == 1.0
    assert r["auc_low"] <= r["auc"] <= r["auc_high"]


def test_evaluate_cli_end_to_end(truth, tmp_path):
    ds = 32.0
    prob = np.zeros((600, 600), np.float32)
    prob[150, 150] = 0.9       # level-0 (4816, 4816): big1
    prob[500, 280] = 0.8       # false positive
    meta = {"slide": "t1.tif", "level": 5, "downsample": [ds, ds]}
    save_probability_map(tmp_path / "maps" / "t1_prob.npy", prob, meta)
    save_probability_map(tmp_path / "maps" / "n1_prob.npy", prob * 0.5, {**meta, "slide": "n1.tif"})
    (tmp_path / "truth").mkdir()
    write_annotation(truth, tmp_path / "truth" / "t1.json")
    les = tmp_path / "les"
    call("evaluate.py", "lesions", tmp_path / "maps" / "t1_prob.npy", "-o", les / "t1.csv", "--to", "xml")
    call("evaluate.py", "lesions", tmp_path / "maps" / "n1_prob.npy", "-o", les / "n1.csv",
               "--to", "geojson", "--threshold", "0.3")
    assert (les / "t1.csv").read_text().splitlines() == ["0.90000,4816,4816", "0.80000,8976,16016"]
    assert "Dot" in (les / "t1.xml").read_text()
    assert json.loads((les / "n1.geojson").read_text())["features"][0]["geometry"]["type"] == "Point"
    proc = call("evaluate.py", "froc", les, tmp_path / "truth", "--plot", tmp_path / "froc.png")
    assert "FROC=0.5000" in proc.stdout and "n1" in proc.stdout and (tmp_path / "froc.png").exists()
    (tmp_path / "labels.csv").write_text("slide,label\nt1.tif,tumor\nn1.tif,normal\n")
    proc = call("evaluate.py", "slides", tmp_path / "maps", tmp_path / "labels.csv", "--plot",
                      tmp_path / "roc.png")
    assert "AUC=1.0000" in proc.stdout and "specificity" in proc.stdout
    proc = call("evaluate.py", "froc", tmp_path / "nothing", tmp_path / "truth", check=False)
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    # an export never replaces the truth beside it; an earlier export is replaced
    write_annotation(truth, les / "n1.xml", to="xml")
    before = (les / "n1.xml").read_text()
    proc = call("evaluate.py", "lesions", tmp_path / "maps" / "n1_prob.npy", "-o", les / "n1.csv", "--to", "xml",
                check=False)
    assert proc.returncode == 2 and "holds annotations other than predicted lesions" in proc.stderr
    assert (les / "n1.xml").read_text() == before
    for truth_xml in (before.replace('"', "'"),  # valid ASAP XML too, single-quoted
                      "<ASAP_Annotations><Annotations/><AnnotationGroups/></ASAP_Annotations>"):  # empty truth
        (les / "n1.xml").write_text(truth_xml)
        proc = call("evaluate.py", "lesions", tmp_path / "maps" / "n1_prob.npy", "-o", les / "n1.csv", "--to",
                    "xml", check=False)
        assert proc.returncode == 2 and (les / "n1.xml").read_text() == truth_xml
    call("evaluate.py", "lesions", tmp_path / "maps" / "t1_prob.npy", "-o", les / "t1.csv", "--to", "xml",
         "--threshold", "0.85")
    assert (les / "t1.xml").read_text().count("Dot") == 1
    call("evaluate.py", "lesions", tmp_path / "maps" / "n1_prob.npy", "-o", les / "n1.csv", "--to", "geojson")
    # no tumour to find: FROC is undefined, not 0
    (tmp_path / "truth" / "t1.json").unlink()
    proc = call("evaluate.py", "froc", les, tmp_path / "truth", check=False)
    assert proc.returncode == 2 and "no tumour to find on these 2 slides" in proc.stderr


def lesion_setup(tmp_path, truth):
    les, tdir = tmp_path / "les", tmp_path / "truth"
    les.mkdir(), tdir.mkdir()
    write_annotation(truth, tdir / "t1.json")
    (les / "t1.csv").write_text("0.9,4800,4800\n0.8,9000,16000\n")
    return les, tdir


def test_froc_ignores_hidden_files_and_pairs_by_exact_stem(truth, tmp_path):
    les, tdir = lesion_setup(tmp_path, truth)
    (les / ".t1.csv.4242.abc.csv").write_text("0.99,1,1\n")  # a killed writer's temporary file
    (les / "t10.csv").write_text("0.7,4800,4800\n")          # t10 is not t1: a normal slide
    res = call("evaluate.py", "froc", les, tdir)
    assert "2 slides" in res.stdout and "normal slides (no tumour in" in res.stdout and "t10" in res.stdout
    assert "no --slides, so every slide is taken at --mpp 0.243" in res.stdout  # the ITC rule is in microns
    (tdir / "t2_mask.tif").write_bytes(b"")  # a Camelyon16 truth mask without a lesion list is named too
    assert "note: no lesion list for t2 " in call("evaluate.py", "froc", les, tdir).stdout
    (tdir / "t3.xml").write_text(ev.lesions_asap_xml(np.array([[0.9, 5.0, 5.0]])))  # an export: no truth to list
    assert "t3" not in call("evaluate.py", "froc", les, tdir).stdout


def test_froc_refuses_an_absurd_truth_raster(tmp_path):
    ann = Annotation()
    ann.add("positive", "far", square(1e9, 1e9, 1000))
    les, tdir = lesion_setup(tmp_path, ann)
    res = call("evaluate.py", "froc", les, tdir, check=False)
    assert res.returncode == 2 and "too large an evaluation raster" in res.stderr and "t1.json" in res.stderr


def test_froc_without_the_slide_keeps_the_dilation_past_the_annotation(tmp_path):
    """From a review: without --slides the truth raster ended 2 level-5 pixels past the
    annotation, short of the 75 um dilation (4.8 pixels at 0.243 um/px): a hit 24 um right
    of the last tumour scored as a miss, and a 182 um square (a 275 um region once
    dilated) became an isolated tumour cell cluster. With the slide both were right."""
    ann = Annotation()
    ann.add("positive", "t", square(3000, 3000, 2000))
    les, tdir = lesion_setup(tmp_path, ann)
    (les / "t1.csv").write_text("0.9,5100,4000\n")  # level-5 column 159: 4 pixels from the tumour's last, 155
    assert "FROC=1.0000" in call("evaluate.py", "froc", les, tdir).stdout
    small = Annotation()
    small.add("positive", "t", square(4000, 4000, 750))
    write_annotation(small, tdir / "t1.json")
    (les / "t1.csv").write_text("0.9,4375,4375\n")
    res = call("evaluate.py", "froc", les, tdir, "--slides", tmp_path)  # no slide there: noted, as without
    assert "FROC=1.0000" in res.stdout and "1 tumours" in res.stdout
    assert f"no slide in {tmp_path} for t1: taken at --mpp 0.243" in res.stdout


def test_froc_an_empty_mask_tiff_is_a_normal_slide(tmp_path):
    """From a review: an all-zero truth mask made a phantom isolated-tumour-cell region
    around (0, 0) (the distance transform of an image without tumour), so a detection
    there was ignored instead of counted as a false positive."""
    (tmp_path / "truth").mkdir(), (tmp_path / "les").mkdir()
    write_mask_tiff(tmp_path / "truth" / "z_mask.tif", np.zeros((1536, 2048), np.uint8))
    tumour = np.zeros((1536, 2048), np.uint8)
    tumour[:, 1024:] = 255
    write_mask_tiff(tmp_path / "truth" / "t_mask.tif", tumour)
    (tmp_path / "les" / "z.csv").write_text("0.9,10,10\n")     # a false positive on the normal slide
    (tmp_path / "les" / "t.csv").write_text("0.7,1500,700\n")  # the tumour, found below it
    assert not ev.evaluation_mask(np.zeros((48, 64), bool), 32.0).any()
    res = call("evaluate.py", "froc", tmp_path / "les", tmp_path / "truth")
    assert "normal slides (no tumour in" in res.stdout and ": z" in res.stdout
    assert "FROC=0.8333" in res.stdout  # found at 0.5 false positives per slide and above: 5 of the 6 rates


def test_froc_uses_the_real_downsample_of_a_shallow_mask_pyramid(tmp_path):
    """A Camelyon16-style mask TIFF with levels 0 and 1 only, evaluated at --level 5: the
    truth comes from level 1 and the lesions are looked up at its real downsample."""
    w, h = 2048, 1536
    tumour = np.zeros((h, w), np.uint8)
    tumour[600:1000, 1200:1700] = 255                    # 97 x 122 um at 0.243 um/px: an ITC? no:
    (tmp_path / "truth").mkdir(), (tmp_path / "les").mkdir()
    write_mask_tiff(tmp_path / "truth" / "s1_mask.tif", tumour, levels=2)  # 2048 and 1024: a shallow pyramid
    with sl.open_slide(tmp_path / "truth" / "s1_mask.tif") as m:
        assert m.level_dimensions == ((2048, 1536), (1024, 768))
    (tmp_path / "les" / "s1.csv").write_text("0.9,1450,800\n")  # in the tumour
    res = call("evaluate.py", "froc", tmp_path / "les", tmp_path / "truth", "--level", "5", "--mpp", "2.0")
    assert "FROC=1.0000" in res.stdout and "1 tumours" in res.stdout
    # negatives reads the same truth (a review: it took such a slide for a normal one)
    prob = np.full((48, 64), 0.9, np.float32)  # everything looks like tumour: false positives outside it only
    save_probability_map(tmp_path / "maps" / "s1_prob.npy", prob, {"slide": "s1.tif", "downsample": [32.0, 32.0],
                                                                   "slide_dimensions": [w, h]})
    call("evaluate.py", "negatives", tmp_path / "maps", tmp_path / "truth", "-o", tmp_path / "neg.txt",
         "--per-slide", "5000", "--margin-um", "0")
    xy = np.array([[int(v) for v in line.split(",")[1:]] for line in (tmp_path / "neg.txt").read_text().split()])
    inside = (xy[:, 0] >= 1200) & (xy[:, 0] < 1700) & (xy[:, 1] >= 600) & (xy[:, 1] < 1000)
    assert len(xy) > 2000 and not inside.any()


def test_pixel_scores_auc_over_tissue(tmp_path):
    truth = np.zeros((10, 10), bool)
    truth[2:5, 2:5] = True
    tissue = np.zeros((10, 10), bool)
    tissue[1:8, 1:8] = True
    prob = np.where(truth, 0.8, np.where(tissue, 0.3, 0)).astype(np.float32)
    prob[6, 6] = 0.9  # one normal tissue pixel scores above every tumour pixel
    r = ev.pixel_scores(prob, truth, tissue, 0.5)
    assert r["auc"] == pytest.approx(1 - 9 / (9 * 40)) and r["tissue_pixels"] == 49
    assert r["dice"] == pytest.approx(2 * 9 / (10 + 9))
    assert np.isnan(ev.pixel_scores(prob, np.zeros_like(truth), tissue, 0.5)["auc"])
    assert r["iou"] == pytest.approx(9 / 10) and sklearn.metrics.f1_score(truth.ravel(), prob.ravel() >= 0.5) == \
        pytest.approx(r["dice"])
    normal = ev.pixel_scores(np.full_like(prob, 0.1), np.zeros_like(truth), tissue, 0.5)  # a review: was IoU 0
    assert np.isnan(normal["iou"]) and np.isnan(normal["dice"])
    meta = {"slide": "s.tif", "level": 0, "downsample": [16, 16]}
    save_probability_map(tmp_path / "s_prob.npy", prob, meta)
    from crfcore.masks import save_mask
    save_mask(tmp_path / "s_tumor.npy", truth, {**meta, "kind": "tumor"})
    save_mask(tmp_path / "s_tissue.npy", tissue, {**meta, "kind": "tissue"})
    res = call("evaluate.py", "pixels", tmp_path / "s_prob.npy", tmp_path / "s_tumor.npy", "--tissue",
               tmp_path / "s_tissue.npy")
    assert "AUC=0.9750" in res.stdout and "Dice=0.9474" in res.stdout
    save_mask(tmp_path / "s_none.npy", np.zeros_like(truth), {**meta, "kind": "tumor"})
    res = call("evaluate.py", "pixels", tmp_path / "s_prob.npy", tmp_path / "s_none.npy")
    assert "AUC=nan (the truth has only one class" in res.stdout
    # the tissue mask as the truth, and a truth on another lattice of the same shape, are refused
    res = call("evaluate.py", "pixels", tmp_path / "s_prob.npy", tmp_path / "s_tissue.npy", check=False)
    assert res.returncode == 2 and "expected 'tumor'" in res.stderr
    save_mask(tmp_path / "s_coarse.npy", truth, {**meta, "kind": "tumor", "downsample": [32, 32]})
    res = call("evaluate.py", "pixels", tmp_path / "s_prob.npy", tmp_path / "s_coarse.npy", check=False)
    assert res.returncode == 2 and "downsample 32" in res.stderr
    save_mask(tmp_path / "s_coarse_tissue.npy", tissue, {**meta, "kind": "tissue", "downsample": [32, 32]})
    res = call("evaluate.py", "pixels", tmp_path / "s_prob.npy", tmp_path / "s_tumor.npy", "--tissue",
               tmp_path / "s_coarse_tissue.npy", check=False)  # a review: only the tissue's shape was checked
    assert res.returncode == 2 and "s_coarse_tissue.npy: a 10x10 lattice at downsample 32x32, but the map's is 10x10 at 16x16" in res.stderr
    res = call("evaluate.py", "pixels", tmp_path / "s_prob.npy", tmp_path / "s_none.npy")
    assert "IoU=0.0000" in res.stdout  # the map calls one pixel tumour where there is none


def test_a_margin_keeps_every_point_of_a_slide_without_tumour():
    prob = np.full((50, 60), 0.9, np.float32)
    none = np.zeros(prob.shape, bool)
    got = ev.hard_negatives(prob, none, (32.0, 32.0), 0.5, 10_000, margin_px=1000)
    assert len(got) == prob.size  # a review found the margin measured from the corner here


def test_hard_negatives_are_false_positives_beyond_the_margin(truth, tmp_path):
    ds = 32.0
    prob = np.zeros((600, 600), np.float32)
    prob[100:200, 100:200] = 0.95  # on big1 (3200..6400 level-0 = 100..200 map pixels): true positives
    prob[300:310, 300:310] = 0.8   # normal tissue: false positives
    prob[98:100, 120:130] = 0.9    # just outside big1: within a 100 um margin
    meta = {"slide": "t1.tif", "level": 5, "downsample": [ds, ds], "mpp": [0.243, 0.243]}
    (tmp_path / "maps").mkdir(), (tmp_path / "truth").mkdir()
    save_probability_map(tmp_path / "maps" / "t1_prob.npy", prob, meta)
    save_probability_map(tmp_path / "maps" / "n1_prob.npy", prob, {**meta, "slide": "n1.tif"})
    write_annotation(truth, tmp_path / "truth" / "t1.json")
    call("evaluate.py", "negatives", tmp_path / "maps", tmp_path / "truth", "-o", tmp_path / "neg.txt",
         "--margin-um", "100", "--per-slide", "1000")
    lines = [ln.split(",") for ln in (tmp_path / "neg.txt").read_text().split()]
    t1 = np.array([[int(x), int(y)] for s, x, y in lines if s == "t1"])
    n1 = [ln for ln in lines if ln[0] == "n1"]
    assert len(t1) == 100 and not truth.contains(t1).any()
    assert ((t1 // ds >= 300) & (t1 // ds < 310)).all()  # the margin kept the edge pixels out
    assert len(n1) == 1000  # a normal slide: 10,120 pixels above the threshold, capped
    assert all(prob[int(y) // 32, int(x) // 32] > 0.5 for _, x, y in n1)
    call("evaluate.py", "negatives", tmp_path / "maps", tmp_path / "truth", "-o", tmp_path / "top.txt",
         "--per-slide", "5", "--sample", "top")
    top = [ln.split(",") for ln in (tmp_path / "top.txt").read_text().split() if ln.startswith("n1")]
    assert len(top) == 5 and all(prob[int(y) // 32, int(x) // 32] == pytest.approx(0.95) for _, x, y in top)
    # the truth of another slide (all of it off this map) would make its tumour "normal"
    far = Annotation()
    far.add("positive", "far", square(30000, 30000, 3200))  # the map covers 19,200 pixels
    write_annotation(far, tmp_path / "truth" / "t1.json")
    res = call("evaluate.py", "negatives", tmp_path / "maps", tmp_path / "truth", "-o", tmp_path / "far.txt",
               check=False)
    assert res.returncode == 2 and "the truth of another slide?" in res.stderr
    tiny = Annotation()
    tiny.add("positive", "itc", square(3200, 3200, 10))  # smaller than a map cell: still this slide's truth
    write_annotation(tiny, tmp_path / "truth" / "t1.json")
    call("evaluate.py", "negatives", tmp_path / "maps", tmp_path / "truth", "-o", tmp_path / "tiny.txt")


def test_no_output_replaces_an_input_or_a_foreign_file(truth, tmp_path):
    """From a hostile review: each of these overwrote a truth, a map or a slide with exit 0."""
    prob = np.zeros((600, 600), np.float32)
    prob[150, 150] = 0.9
    maps, les, tdir = tmp_path / "maps", tmp_path / "les", tmp_path / "truth"
    save_probability_map(maps / "t1_prob.npy", prob, {"slide": "t1.tif", "level": 5, "downsample": [32.0, 32.0]})
    tdir.mkdir()
    write_annotation(truth, tdir / "t1.json")
    call("evaluate.py", "lesions", maps / "t1_prob.npy", "-o", les / "t1.csv")
    (tmp_path / "labels.csv").write_text("slide,label\nt1.tif,tumor\n")
    cases = [("negatives", maps, tdir, "-o", tdir / "t1.json"),             # the truth it reads
             ("negatives", maps, tdir, "-o", tmp_path / "labels.csv"),      # not a coords list
             ("lesions", maps / "t1_prob.npy", "-o", tmp_path / "labels.csv"),  # not a lesion list
             ("froc", les, tdir, "--plot", les / "t1.csv"),                 # not a picture format
             ("slides", maps, tmp_path / "labels.csv", "--plot", tmp_path / "roc.xyz")]
    for args in cases:
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        res = call("evaluate.py", *args, check=False)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, (args, res.stderr)
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, args
    # an empty GeoJSON truth (a normal slide's) is not taken for an empty lesion export
    (les / "n1.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    save_probability_map(maps / "n1_prob.npy", prob * 0, {"slide": "n1.tif", "level": 5, "downsample": [32.0, 32.0]})
    res = call("evaluate.py", "lesions", maps / "n1_prob.npy", "-o", les / "n1.csv", "--to", "geojson", check=False)
    assert res.returncode == 2 and "other than predicted lesions" in res.stderr
    (les / "n1.geojson").unlink()
    for _ in range(2):  # but our own empty export is replaced
        call("evaluate.py", "lesions", maps / "n1_prob.npy", "-o", les / "n1.csv", "--to", "geojson")


def test_froc_and_slides_refuse_what_would_count_twice_or_wrongly(truth, tmp_path):
    les, tdir = lesion_setup(tmp_path, truth)
    (les / "t1_lesions.csv").write_text("0.9,4800,4800\n")  # a second list of t1
    res = call("evaluate.py", "froc", les, tdir, check=False)
    assert res.returncode == 2 and "both lesion lists of slide t1" in res.stderr
    (les / "t1_lesions.csv").unlink()
    write_annotation(truth, tdir / "t2.json")  # a tumour slide without a lesion list is named
    assert "no lesion list for t2" in call("evaluate.py", "froc", les, tdir).stdout
    (les / "t1.csv").write_text("0.9,-20,-20\n")  # no negative positions, no probability above 1
    assert "coordinates of 0 or more" in call("evaluate.py", "froc", les, tdir, check=False).stderr
    # a slide folder given as the truth folder: a colour slide is no truth mask
    slides = tmp_path / "slides"
    synthetic.write_slide(slides / "t1.tif", 256, 256, tumours=0, seed=1)
    (les / "t1.csv").write_text("0.9,10,10\n")
    res = call("evaluate.py", "froc", les, slides, check=False)
    assert res.returncode == 2 and "not a truth mask" in res.stderr
    # two maps of one slide in `slides`; a uint8 map is not a probability map
    prob = np.full((8, 8), 0.5, np.float32)
    meta = {"slide": "case.01.tif", "level": 5, "downsample": [32.0, 32.0]}
    save_probability_map(tmp_path / "maps" / "case.01_prob.npy", prob, meta)
    save_probability_map(tmp_path / "maps" / "case.02_prob.npy", prob * 0.5, {**meta, "slide": "case.02.tif"})
    (tmp_path / "labels.csv").write_text("slides/case.01,tumor\ncase.02.svs,normal\n")  # .01 is no extension
    assert "2 slides (1 tumour): AUC=1.0000" in call("evaluate.py", "slides", tmp_path / "maps",
                                                     tmp_path / "labels.csv").stdout
    (tmp_path / "empty.csv").write_text("slide,label\n")
    res = call("evaluate.py", "slides", tmp_path / "maps", tmp_path / "empty.csv", check=False)
    assert res.returncode == 2 and "empty.csv: no 'slide,label' lines" in res.stderr
    save_probability_map(tmp_path / "maps" / "copy_prob.npy", prob, meta)
    res = call("evaluate.py", "slides", tmp_path / "maps", tmp_path / "labels.csv", check=False)
    assert res.returncode == 2 and "second map of slide case.01.tif" in res.stderr
    save_probability_map(tmp_path / "maps" / "copy_prob.npy", (prob * 255).astype(np.uint8), meta)
    res = call("evaluate.py", "lesions", tmp_path / "maps" / "copy_prob.npy", "-o", tmp_path / "x.csv", check=False)
    assert res.returncode == 2 and "a probability map holds floats from 0 to 1" in res.stderr


def test_label_names_drop_folders_and_slide_extensions_only(tmp_path):
    from conftest import load_script

    (tmp_path / "l.csv").write_text("slides/a.svs,tumor\nTCGA-A1.DX1,normal\ncase.01,1\nb.TIF,0\n")
    assert load_script("evaluate.py").read_labels(tmp_path / "l.csv") == {"a": 1, "TCGA-A1.DX1": 0, "case.01": 1,
                                                                           "b": 0}


def write_mask_tiff(path, mask: np.ndarray, levels: int = 2, colour: bool = False) -> None:
    """A Camelyon16-style truth mask TIFF (grey, or a coloured picture) with `levels` levels."""
    from crfcore.heatmap import pyramid_sizes, write_pyramid
    h, w = mask.shape
    sizes = pyramid_sizes(w, h, min_size=64)[:levels]

    def tiles(level, lw, lh):
        img = mask[::2 ** level, ::2 ** level]
        for y in range(0, lh, 256):
            for x in range(0, lw, 256):
                t = np.zeros((256, 256, 3), np.uint8)
                part = img[y:y + 256, x:x + 256]
                t[:part.shape[0], :part.shape[1]] = part[..., None]
                if colour:
                    t[..., 1] //= 2
                yield t
    write_pyramid(path, sizes, tiles, 0.243, compression="zlib")


def test_negatives_read_a_mask_tiff_any_tumour_pixel_counts(tmp_path):
    """From a review: a mask of value 1 (not 255) lost its thin parts to area averaging, a
    mask of another size was squeezed onto the map, and a slide in TRUTH_DIR made the
    whole slide tumour."""
    mask = np.zeros((1536, 2048), np.uint8)
    mask[600:1000, 1963:1973] = 1  # a 10-pixel strip, value 1
    (tmp_path / "truth").mkdir()
    write_mask_tiff(tmp_path / "truth" / "s1_mask.tif", mask, levels=4)
    save_probability_map(tmp_path / "maps" / "s1_prob.npy", np.full((48, 64), 0.9, np.float32),
                         {"slide": "s1.tif", "downsample": [32.0, 32.0]})
    neg = ["evaluate.py", "negatives", tmp_path / "maps", tmp_path / "truth", "-o", tmp_path / "n.txt",
           "--per-slide", "5000", "--margin-um", "0"]
    call(*neg)
    xy = np.array([[int(v) for v in line.split(",")[1:]] for line in (tmp_path / "n.txt").read_text().split()])
    assert len(xy) > 2000 and not ((xy[:, 0] // 32 == 1963 // 32) & (xy[:, 1] >= 600) & (xy[:, 1] < 1000)).any()
    write_mask_tiff(tmp_path / "truth" / "s1_mask.tif", np.zeros((3072, 4096), np.uint8))  # another slide's size
    res = call(*neg, check=False)
    assert res.returncode == 2 and "covers 2048x1536 level-0 pixels, but the slide is 4096x3072" in res.stderr
    write_mask_tiff(tmp_path / "truth" / "s1_mask.tif", np.zeros((1510, 2020), np.uint8))  # within a cell
    save_probability_map(tmp_path / "maps" / "s1_prob.npy", np.full((48, 64), 0.9, np.float32),
                         {"slide": "s1.tif", "downsample": [32.0, 32.0], "slide_dimensions": [2048, 1536]})
    res = call(*neg, check=False)  # the map's slide is known: the mask must be its size exactly
    assert res.returncode == 2 and "the truth mask is 2020x1510, but its slide (s1.tif, as s1_prob.npy records) is " \
        "2048x1536" in res.stderr
    write_mask_tiff(tmp_path / "truth" / "s1_mask.tif", np.full((1536, 2048), 200, np.uint8), colour=True)
    res = call(*neg, check=False)
    assert res.returncode == 2 and "has colours, so it is not a truth mask" in res.stderr


def test_any_on_lattice_sets_every_cell_a_tumour_pixel_touches():
    """From a review: cells began at the floor of their first pixel, so a pixel across a
    border went to the later cell only; with 0.995 or 1.98 pixels a cell, most were lost."""
    from crfcore.masks import any_on_lattice
    rng = np.random.default_rng(0)
    for per in (0.995, 1.98, 2048 / 1023 * 8, 32.0, 0.5):
        for _ in range(50):
            b = np.zeros((150, 200), bool)
            y, x = rng.integers(0, 150), rng.integers(0, 200)
            b[y, x] = True
            out = any_on_lattice(b, (per, per), (int(150 / per) + 2, int(200 / per) + 2))

            def overlap(cell: np.ndarray, p: int) -> np.ndarray:  # of cell [c*per, (c+1)*per) and pixel [p, p+1)
                return np.minimum((cell + 1) * per, p + 1) - np.maximum(cell * per, p)
            oy, ox = overlap(np.arange(out.shape[0]), y), overlap(np.arange(out.shape[1]), x)
            must = (oy[:, None] > 0.02) & (ox[None, :] > 0.02)  # a real share of the pixel
            never = (oy[:, None] <= 0) | (ox[None, :] <= 0)
            assert must.any() and out[must].all() and not out[never].any(), (per, y, x)


def sparse(path) -> None:
    """Drop every all-zero tile of each page of a tiled TIFF (offset and byte count 0),
    as sparse truth masks leave out empty tiles: OpenSlide reads them as transparent."""
    import tifffile
    with tifffile.TiffFile(path) as tif:
        plan = []
        for page in tif.pages:
            offsets, counts = page.tags["TileOffsets"], page.tags["TileByteCounts"]
            img, tw, th = page.asarray(), page.tilewidth, page.tilelength
            across = -(-img.shape[1] // tw)
            empty = [i for i in range(len(offsets.value))
                     if not img[i // across * th:(i // across + 1) * th, i % across * tw:(i % across + 1) * tw].any()]
            size = np.dtype(tif.byteorder + ("Q" if tif.is_bigtiff else "I")).itemsize
            plan.append((offsets.valueoffset, counts.valueoffset, size, counts.dtype, empty))
    with open(path, "r+b") as fh:
        for off_at, cnt_at, size, cnt_type, empty in plan:
            csize = 8 if cnt_type == 16 else 4 if cnt_type == 4 else 2
            for i in empty:
                fh.seek(off_at + i * size), fh.write(bytes(size))
                fh.seek(cnt_at + i * csize), fh.write(bytes(csize))


def test_a_hostile_test_of_evaluate(truth, tmp_path):
    """From a hostile test of evaluate.py: each of these printed a wrong figure with exit 0,
    replaced a file it should not, or said something false."""
    les, tdir = lesion_setup(tmp_path, truth)  # t1's tumour spans (4000-5000, 4000-5000) and more
    slides = tmp_path / "slides"
    synthetic.write_slide(slides / "t1.tif", 2048, 2048, tumours=0, seed=1)  # the truth lies wholly outside it
    (les / "t1.csv").write_text("0.9,1000,1000\n")
    res = call("evaluate.py", "froc", les, tdir, "--slides", slides, check=False)
    assert res.returncode == 2 and "t1.json: lies wholly outside t1.tif's 2048x2048" in res.stderr
    (les / "t1.csv").write_text("0.9,1000,1000\n0.8,3000,100\n")  # a lesion off the slide
    (tdir / "t1.json").unlink()
    res = call("evaluate.py", "froc", les, tdir, "--slides", slides, check=False)
    assert res.returncode == 2 and "t1.csv: 1 lesion(s) outside t1.tif's 2048x2048" in res.stderr
    # a sparse truth mask TIFF: its missing tiles are no tumour (they read as white: all tumour)
    mask = np.zeros((3072, 4096), np.uint8)
    mask[200:1400, 200:1600] = 255  # 290 x 340 um: no isolated tumour cells
    (tmp_path / "t2").mkdir(), (tmp_path / "l2").mkdir()
    write_mask_tiff(tmp_path / "t2" / "t_mask.tif", mask, levels=3)
    sparse(tmp_path / "t2" / "t_mask.tif")
    with sl.open_slide(tmp_path / "t2" / "t_mask.tif") as m:
        assert np.asarray(m.read_region((3500, 2500), 0, (1, 1)))[0, 0, 3] == 0  # transparent: the test holds
    (tmp_path / "l2" / "t.csv").write_text("0.9,800,800\n0.7,3500,2500\n")
    res = call("evaluate.py", "froc", tmp_path / "l2", tmp_path / "t2", "--level", "1")
    assert "1 tumours" in res.stdout and "FROC=1.0000" in res.stdout, res.stdout
    # a truth whose name differs from its lesion list's in case is used, and not called missing
    (les / "t1.csv").write_text("0.9,4800,4800\n")
    write_annotation(truth, tdir / "T1.json")
    res = call("evaluate.py", "froc", les, tdir)
    assert "no lesion list" not in res.stdout and "FROC=" in res.stdout
    (les / "t1.csv").write_text("\ufeff0.9,4800,4800\n")  # a spreadsheet's byte-order mark
    assert "FROC=" in call("evaluate.py", "froc", les, tdir).stdout
    # slides: names paired as companion pairs them; a map or a label left over is refused
    maps = tmp_path / "maps"
    meta = {"level": 5, "downsample": [32.0, 32.0]}
    for name, v in (("m0", .9), ("m1", .8), ("m2", .85), ("m3", .1)):
        save_probability_map(maps / f"{name}_prob.npy", np.full((8, 8), v, np.float32), {**meta, "slide": f"{name}.tif"})
    (tmp_path / "labels.csv").write_text("M0,tumor\nm1,tumor\nm2,normal\nm3,normal\n")
    assert "4 slides (2 tumour): AUC=0.7500" in call("evaluate.py", "slides", maps, tmp_path / "labels.csv").stdout
    (tmp_path / "labels.csv").write_text("m0,tumor\nm1,tumor\nm2x,normal\nm3,normal\nm4,tumor\n")
    res = call("evaluate.py", "slides", maps, tmp_path / "labels.csv", check=False)
    assert res.returncode == 2 and "no label for m2_prob.npy (m2)" in res.stderr and "for m2x, m4" in res.stderr
    # negatives: never over a lesion list or a training set's list.txt; one map per slide
    save_probability_map(maps / "m0_prob.npy", np.full((8, 8), 0.9, np.float32), {**meta, "slide": "m0.tif"})
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "list.txt").write_text("a,10,10\n")
    (tmp_path / "ds" / "0.png").write_bytes(b"")
    for out, why in ((les / "t1.csv", "is a lesion list"), (tmp_path / "ds" / "list.txt", "a training set's list")):
        before = out.read_bytes()
        res = call("evaluate.py", "negatives", maps, tdir, "-o", out, check=False)
        assert res.returncode == 2 and why in res.stderr and out.read_bytes() == before
    save_probability_map(maps / "copy_prob.npy", np.full((8, 8), 0.9, np.float32), {**meta, "slide": "m0.tif"})
    res = call("evaluate.py", "negatives", maps, tdir, "-o", tmp_path / "n.txt", check=False)
    assert res.returncode == 2 and "second map of slide m0.tif" in res.stderr and not (tmp_path / "n.txt").exists()


def test_pixels_takes_the_recorded_mask_from_any_folder(tmp_path, monkeypatch):
    """From a hostile test: the sidecar's relative mask path was read from the working
    folder, so `cd` changed the AUC (over the mask, or over map > 0 when not found)."""
    prob = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    tumour, tissue = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    tumour[4:8, 4:8], tissue[2:12, 2:12] = True, True
    meta = {"slide": "a.tif", "level": 5, "downsample": [32.0, 32.0]}
    p = tmp_path / "p"
    masks.save_mask(p / "a_tumor.npy", tumour, {**meta, "kind": "tumor"})
    masks.save_mask(p / "a_tissue.npy", tissue, {**meta, "kind": "tissue"})
    monkeypatch.chdir(tmp_path)
    save_probability_map(p / "a_prob.npy", prob, {**meta, "mask": "p/a_tissue.npy"})  # as prob_map.py wrote it
    here = call("evaluate.py", "pixels", "p/a_prob.npy", "p/a_tumor.npy").stdout
    assert "over tissue (p/a_tissue.npy)" in here
    monkeypatch.chdir(p)
    res = call("evaluate.py", "pixels", "a_prob.npy", "a_tumor.npy", check=False)
    assert res.returncode == 2 and "made with tissue mask p/a_tissue.npy, not found from here" in res.stderr
    assert here.split("AUC=")[1][:6] == call("evaluate.py", "pixels", "a_prob.npy", "a_tumor.npy", "--tissue",
                                             "a_tissue.npy").stdout.split("AUC=")[1][:6]


def test_a_regression_review_of_the_evaluate_fixes(truth, tmp_path, monkeypatch):
    """From a regression review: a project tree copied elsewhere lost its recorded mask,
    `--tissue MISSING` blamed the map, a file of the slide's name in the working folder was
    taken for the slide, `lesions -o .` was a traceback, `--slides` found `Tumor_001.tif`
    for no lesion list, and `negatives -o` replaced a Patch_gen list."""
    import shutil
    from crfcore.io import file_sha256
    prob = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    tumour, tissue = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    tumour[4:8, 4:8], tissue[2:12, 2:12] = True, True
    meta = {"slide": "a.tif", "level": 5, "downsample": [32.0, 32.0]}
    old = tmp_path / "old" / "p"
    masks.save_mask(old / "a_tumor.npy", tumour, {**meta, "kind": "tumor", "slide_bytes": 123})
    masks.save_mask(old / "a_tissue.npy", tissue, {**meta, "kind": "tissue"})
    save_probability_map(old / "a_prob.npy", prob, {**meta, "mask": str(old / "a_tissue.npy"), "mask_given":
                         "p/a_tissue.npy", "mask_sha256": file_sha256(old / "a_tissue.npy")})
    new = tmp_path / "new"
    shutil.copytree(tmp_path / "old", new)
    shutil.rmtree(tmp_path / "old")
    monkeypatch.chdir(new)
    (new / "a.tif").write_text("junk")  # a file of the slide's name here is not the slide
    res = call("evaluate.py", "pixels", "p/a_prob.npy", "p/a_tumor.npy")
    assert "over tissue (p/a_tissue.npy)" in res.stdout
    masks.save_mask(new / "p" / "a_tissue.npy", tissue[::-1], {**meta, "kind": "tissue"})  # another mask there
    res = call("evaluate.py", "pixels", "p/a_prob.npy", "p/a_tumor.npy", check=False)
    assert res.returncode == 2 and "p/a_tissue.npy is not it (its SHA-256 differs" in res.stderr
    res = call("evaluate.py", "pixels", "p/a_prob.npy", "p/a_tumor.npy", "--tissue", "none.npy", check=False)
    assert res.returncode == 2 and "none.npy: no such file" in res.stderr
    for out in (".", "/"):
        res = call("evaluate.py", "lesions", "p/a_prob.npy", "-o", out, check=False)
        assert res.returncode == 2 and "is a folder; -o names the lesion list" in res.stderr
    les, tdir = lesion_setup(tmp_path, truth)
    slides = tmp_path / "slides"
    synthetic.write_slide(slides / "T1.tif", 2048, 2048, tumours=0, seed=1)  # t1's, in another case
    res = call("evaluate.py", "froc", les, tdir, "--slides", slides, check=False)
    assert res.returncode == 2 and "outside T1.tif" in res.stderr  # the slide was found
    (les / "t1.csv").rename(les / "TT.csv")  # a second review: of tt.tif and TT.tif, neither is TT's alone...
    write_annotation(truth, tdir / "TT.json")
    for name in ("tt.tif", "Tt.tif"):
        synthetic.write_slide(slides / name, 2048, 2048, tumours=0, seed=1)
    (les / "TT.csv").rename(les / "tT.csv")
    res = call("evaluate.py", "froc", les, tdir, "--slides", slides, check=False)
    assert f"no slide in {slides} for tT" in res.stdout  # ...so it is not taken for one
    patches = tmp_path / "patches"
    (patches / "s1").mkdir(parents=True)
    (patches / "s1" / "tile_0_level0_0-0-64-64.png").write_bytes(b"")
    (patches / "s1.txt").write_text("s1,32,32\n")
    save_probability_map(tmp_path / "maps" / "a_prob.npy", prob, meta)
    res = call("evaluate.py", "negatives", tmp_path / "maps", tdir, "-o", patches / "s1.txt", check=False)
    assert res.returncode == 2 and "is the list of the tiles in s1/" in res.stderr
    assert (patches / "s1.txt").read_text() == "s1,32,32\n"


def test_lesions_takes_the_export_format_from_the_output_name(tmp_path):
    """From a hostile review: `lesions -o a.geojson` wrote a.csv alone, exit 0."""
    p = np.zeros((40, 40), np.float32)
    p[10, 12] = 0.9
    save_probability_map(tmp_path / "t_prob.npy", p, {"slide": "t.tif", "downsample": [16.0, 16.0]})
    call("evaluate.py", "lesions", tmp_path / "t_prob.npy", "-o", tmp_path / "a.geojson")
    feats = json.loads((tmp_path / "a.geojson").read_text())["features"]
    assert len(feats) == 1 and (tmp_path / "a.csv").read_text().count("\n") == 1
    call("evaluate.py", "lesions", tmp_path / "t_prob.npy", "-o", tmp_path / "b.xml")
    assert (tmp_path / "b.xml").exists() and (tmp_path / "b.csv").exists()
    for args, why in ((["-o", tmp_path / "c.geojson", "--to", "xml"], "a .geojson name, but --to xml"),
                      (["-o", tmp_path / "e.xml", "--to", "csv"], "but --to csv: end -o with .csv, or drop --to"),
                      (["-o", tmp_path / "d.txt"], "-o ends with .csv")):
        res = call("evaluate.py", "lesions", tmp_path / "t_prob.npy", *args, check=False)
        assert res.returncode == 2 and why in res.stderr, res.stderr
    assert not (tmp_path / "c.csv").exists() and not (tmp_path / "d.csv").exists()


def test_a_lesion_list_with_a_header_says_so(tmp_path):
    """From a hostile review: a header line was refused as "expected 'prob,x,y', got 'prob,x,y'"."""
    (tmp_path / "t.csv").write_text("prob,x,y\n0.9,100,200\n")
    with pytest.raises(ev.EvaluationError, match=r"t.csv:1: a header line \('prob,x,y'\); a lesion list has none"):
        ev.read_lesions(tmp_path / "t.csv")
    (tmp_path / "u.csv").write_text("0.9,100,200\nabc,1,2\n")  # text on a later line is no header
    with pytest.raises(ev.EvaluationError, match=r"u.csv:2: expected 'prob,x,y'"):
        ev.read_lesions(tmp_path / "u.csv")
    (tmp_path / "v.csv").write_text("0.9,,100\n")  # a review: a lesion missing a value is no header to remove
    with pytest.raises(ev.EvaluationError, match=r"v.csv:1: expected 'prob,x,y'"):
        ev.read_lesions(tmp_path / "v.csv")


def test_labels_may_carry_columns_after_the_label(tmp_path):
    """A hostile review found a third column accepted without a word; it is meant (a
    reference list may add a metastasis size), and documented."""
    from conftest import load_script

    (tmp_path / "l.csv").write_text("slide,label,size\ntest_001,Tumor,Macro\ntest_002,normal,\n")
    assert load_script("evaluate.py").read_labels(tmp_path / "l.csv") == {"test_001": 1, "test_002": 0}


def test_truth_named_after_the_slide_file_is_refused_not_taken_for_a_normal_slide(truth, tmp_path):
    """From a hostile test of the review loop: QuPath scripts export `t1.tif.geojson`; negatives
    called t1 normal and mined 108 points inside its tumour, froc counted its lesions as
    false positives."""
    prob = np.zeros((600, 600), np.float32)
    prob[100:200, 100:200] = 0.95
    (tmp_path / "maps").mkdir(), (tmp_path / "truth").mkdir(), (tmp_path / "lesions").mkdir()
    save_probability_map(tmp_path / "maps" / "t1_prob.npy", prob,
                         {"slide": "t1.tif", "level": 5, "downsample": [32.0, 32.0], "mpp": [0.243, 0.243]})
    write_annotation(truth, tmp_path / "truth" / "T1.tif.geojson", to="geojson")
    (tmp_path / "lesions" / "t1.csv").write_text("0.95,4800,4800\n")
    for args in (("negatives", tmp_path / "maps", tmp_path / "truth", "-o", tmp_path / "neg.txt"),
                 ("froc", tmp_path / "lesions", tmp_path / "truth")):
        res = call("evaluate.py", *args, check=False)
        assert res.returncode == 2 and res.stderr.strip().endswith(
            "holds no truth named t1.json, .xml or .geojson, but T1.tif.geojson: rename it t1.geojson (or move it "
            "out if t1 is a normal slide)"), res.stderr
    assert not (tmp_path / "neg.txt").exists()
    # a hostile review: an old (empty) t1.json beside QuPath's t1.tif.geojson hid it
    write_annotation(Annotation(), tmp_path / "truth" / "t1.json")
    res = call("evaluate.py", "negatives", tmp_path / "maps", tmp_path / "truth", "-o", tmp_path / "neg.txt",
               check=False)
    assert res.returncode == 2 and "t1.json (which would be used) and T1.tif.geojson hold different polygons" in res.stderr
    write_annotation(truth, tmp_path / "truth" / "t1.json")  # the same polygons: either is the truth
    call("evaluate.py", "negatives", tmp_path / "maps", tmp_path / "truth", "-o", tmp_path / "neg.txt")
    assert (tmp_path / "neg.txt").read_text() == ""  # every point above 0.5 is tumour
    (tmp_path / "truth" / "t1.json").unlink()
    (tmp_path / "truth" / "T1.tif.geojson").rename(tmp_path / "truth" / "t1.geojson")
    (tmp_path / "truth" / "t1.svs.txt").write_text("notes")  # a notes file is no truth
    call("evaluate.py", "negatives", tmp_path / "maps", tmp_path / "truth", "-o", tmp_path / "neg.txt")
    assert (tmp_path / "neg.txt").read_text() == ""
