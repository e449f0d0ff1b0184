import json

import numpy as np
import pytest

from crfcore import evaluation as ev
from crfcore.annotations import Annotation, write_annotation
from crfcore.heatmap import save_probability_map
from conftest import run_script


def square(x0, y0, side):
    return np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], float)


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
    run_script("evaluate.py", "lesions", tmp_path / "maps" / "t1_prob.npy", "-o", les / "t1.csv", "--to", "xml")
    run_script("evaluate.py", "lesions", tmp_path / "maps" / "n1_prob.npy", "-o", les / "n1.csv",
               "--to", "geojson", "--threshold", "0.3")
    assert (les / "t1.csv").read_text().splitlines() == ["0.90000,4816,4816", "0.80000,8976,16016"]
    assert "Dot" in (les / "t1.xml").read_text()
    assert json.loads((les / "n1.geojson").read_text())["features"][0]["geometry"]["type"] == "Point"
    proc = run_script("evaluate.py", "froc", les, tmp_path / "truth", "--plot", tmp_path / "froc.png")
    assert "FROC=0.5000" in proc.stdout and "n1" in proc.stdout and (tmp_path / "froc.png").exists()
    (tmp_path / "labels.csv").write_text("slide,label\nt1.tif,tumor\nn1.tif,normal\n")
    proc = run_script("evaluate.py", "slides", tmp_path / "maps", tmp_path / "labels.csv", "--plot",
                      tmp_path / "roc.png")
    assert "AUC=1.0000" in proc.stdout and "specificity" in proc.stdout
    proc = run_script("evaluate.py", "froc", tmp_path / "nothing", tmp_path / "truth", check=False)
    assert proc.returncode == 2 and "not a directory" in proc.stderr
