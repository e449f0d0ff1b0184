"""bench/idc_wsi.py: the protocol's fixed choices and its cell-level scoring (the bench
itself trains for many minutes and is never run by the tests)."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from crfcore import dense, inference, mosaic
from crfcore.model import CRFNet, ModelConfig
from crfcore.scale import ReadScale
from crfcore.io import save_array


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/idc_wsi.py")


def test_split_and_geometry(bench):
    for split in bench.FOLDS:  # three patients in three roles, none among the partial slides
        assert len({split.test, split.valid, split.train, *bench.TRAIN_PARTIAL}) == 3 + len(bench.TRAIN_PARTIAL)
    assert sorted(s.test for s in bench.FOLDS) == sorted(s.valid for s in bench.FOLDS) == ["8863", "8864", "8865"]
    assert bench.FOLDS[0] == bench.Split("8864", "8865", "8863")  # the README's figures
    assert bench.PATCH % bench.D == 0 and mosaic.CELL % bench.D == 0  # lattice method; points on cells
    assert bench.CROP <= bench.PATCH


def test_the_dense_bench_geometry_lets_dense_run(bench):
    """bench/idc_dense.py reads a 50-pixel cell as 64 pixels: the lattice stride (D = 25)
    is then 32 model pixels and `dense` applies; at idc_wsi.py's level 0 it does not."""
    dense_bench = load_script("bench/idc_dense.py")
    cut = dense_bench.CUT
    model = CRFNet(ModelConfig(grid=bench.GRID, width_mult=0.5))
    for read, applies in ((ReadScale(cut.mpp / 4.0, 0, 1.0), True), (ReadScale(), False)):
        patch = cut.patch if applies else bench.PATCH
        geom = inference.Geometry(bench.GRID, patch, patch, (bench.D, bench.D), read)
        assert geom.lattice_step() == 2
        assert (dense.dense_applies(geom, dense.feature_stride(model)) is None) == applies
    assert bench.config(Path("o"), 6, "none", cut=cut)["mpp"] == 3.125 and "mpp" not in bench.config(Path("o"), 6, "none")
    assert bench.config(Path("o"), 6, "none")["seed"] == 0 and bench.config(Path("o"), 6, "none", seed=2)["seed"] == 2


def write_map(folder, prob, tissue, downsample):
    """A probability map and the tissue mask it names, as prob_map.py and Mask_gen.py write them."""
    meta = {"slide": "s.tif", "level": None, "downsample": [downsample, downsample]}
    save_array(folder / "s_tissue.npy", tissue, {**meta, "kind": "tissue"})
    save_array(folder / "s_prob.npy", prob.astype(np.float32), {**meta, "kind": "probability",
                                                                 "mask": str(folder / "s_tissue.npy")})
    return folder / "s_prob.npy"


def test_score_is_cell_level_f1_over_tissue_points(bench, tmp_path, capsys):
    # three cells in a row at downsample 25 (2 x 2 map pixels each); IDC, IDC, other
    cells = np.array([[0, 0, 50, 50, 1], [50, 0, 100, 50, 1], [100, 0, 150, 50, 0]])
    (tmp_path / "s_cells.csv").write_text(mosaic.CELLS_HEADER + "\n" + "\n".join(",".join(map(str, c)) for c in cells))
    prob = np.array([[0.9, 0.9, 0.2, 0.0, 0.7, 0.7], [0.9, 0.9, 0.2, 0.0, 0.7, 0.7]])
    tissue = prob > 0  # the second cell's right half is not tissue: its score is 0.2, not 0.1
    path = write_map(tmp_path, prob, tissue, 25.0)
    scores, labels = bench.cell_scores(path, tmp_path / "s_cells.csv")
    np.testing.assert_allclose(scores, [0.9, 0.2, 0.7])
    # at 0.5: cells 1 and 3 are called IDC -> one TP, one FP, one FN
    assert bench.main(["--score", str(path), str(tmp_path / "s_cells.csv"), "--threshold", "0.5"]) == 0
    assert "cell-level F1=0.5000 (precision 0.5000, recall 0.5000, 3 cells)" in capsys.readouterr().out
    assert bench.cell_f1(path, tmp_path / "s_cells.csv", 0.15)["f1"] == pytest.approx(0.8)


def test_threshold_is_youdens_j(bench):
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.8, 0.9])
    # cutting at 0.5 keeps all IDC and one false positive (J = 1 - 1/4), the best
    assert bench.choose_threshold(scores, labels) == pytest.approx(0.5)


def test_a_folder_is_reused_only_by_its_split_and_config(bench, tmp_path):
    cfg = bench.config(tmp_path, 6, "none")
    bench.check_reuse(tmp_path, bench.FOLDS[1], cfg)  # a new folder takes any split, and keeps it
    (tmp_path / "slides").mkdir()
    bench.check_reuse(tmp_path, bench.FOLDS[1], cfg)
    with pytest.raises(bench.UserError, match="held out, not 8863; give another --out for --fold 2"):
        bench.check_reuse(tmp_path, bench.FOLDS[2], cfg)
    (tmp_path / "split.json").unlink()  # prepared before --fold: fold 0
    with pytest.raises(bench.UserError, match="patient 8864 held out, not 8865"):
        bench.check_reuse(tmp_path, bench.FOLDS[1], cfg)
    (tmp_path / "config.json").write_text(json.dumps(bench.config(tmp_path, 6, "none", seed=1)))
    bench.check_reuse(tmp_path, bench.FOLDS[0], cfg)  # no model yet: the config is rewritten
    (tmp_path / "crf.ckpt").write_bytes(b"")
    with pytest.raises(bench.UserError, match="crf.ckpt was trained with another config .DIR/config.json differs in seed"):
        bench.check_reuse(tmp_path, bench.FOLDS[0], cfg)
    (tmp_path / "config.json").write_text(json.dumps(bench.config(tmp_path.relative_to(tmp_path.parent), 6, "none")))
    bench.check_reuse(tmp_path, bench.FOLDS[0], cfg)  # the same folder named another way (a review)
