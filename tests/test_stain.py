"""Stain augmentation (HED jitter) and Macenko normalisation."""
import json

import cv2
import numpy as np
import pytest

from crfcore import slide as sl
from crfcore.datasets import normalise_cells
from crfcore.stain import HEDJitter, MacenkoNormaliser, StainError
from conftest import call, shared


@pytest.fixture(scope="module")
def tissue(syn_slide):
    """A 256 x 256 RGB crop of stained synthetic tissue (tumour and stroma)."""
    x0, y0, x1, y1 = syn_slide.annotation.bounds()
    return sl.read_rgb(sl.open_slide(syn_slide.path), (int(x0) - 64, int(y0) - 64), 0, (256, 256))


@pytest.fixture(scope="module")
def real_he():
    """Two 256 x 256 crops of real H&E (CMU-1-Small-Region)."""
    s = sl.open_slide(shared("slides", "CMU-1-Small-Region.svs"))
    return sl.read_rgb(s, (900, 1500), 0, (256, 256)), sl.read_rgb(s, (1300, 900), 0, (256, 256))


def test_hed_jitter_changes_stains_reproducibly(tissue, real_he):
    same = HEDJitter(0.0)(real_he[1], np.random.default_rng(0))
    assert np.abs(same.astype(int) - real_he[1]).mean() < 1  # scikit-image's deconvolution round trip only
    a = HEDJitter(0.2)(tissue, np.random.default_rng(1))
    b = HEDJitter(0.2)(tissue, np.random.default_rng(1))
    c = HEDJitter(0.2)(tissue, np.random.default_rng(2))
    assert a.dtype == np.uint8 and a.shape == tissue.shape and np.array_equal(a, b)
    assert np.abs(a.astype(int) - tissue).mean() > 3 and not np.array_equal(a, c)


def test_macenko_makes_a_restained_image_look_like_the_original(real_he, tmp_path):
    ref, tissue = real_he
    cv2.imwrite(str(tmp_path / "ref.png"), ref[..., ::-1])
    norm = MacenkoNormaliser.fit(tmp_path / "ref.png")
    # the same tissue, re-stained (haematoxylin weaker, eosin stronger): after normalisation the two agree
    from skimage.color import hed2rgb, rgb2hed
    restained = np.clip(hed2rgb(rgb2hed(tissue) * np.array([0.6, 1.5, 1.0])) * 255 + 0.5, 0, 255).astype(np.uint8)
    before = np.abs(restained.astype(int) - tissue).mean()
    after = np.abs(norm(restained).astype(int) - norm(tissue)).mean()
    assert after < before / 2, (before, after)
    again = MacenkoNormaliser.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert np.array_equal(again(restained), norm(restained))
    glass = np.full((64, 64, 3), 242, np.uint8)
    assert norm(glass) is glass  # nothing to fit: left as it is


def test_a_bad_reference_is_one_clear_error(tmp_path):
    (tmp_path / "x.png").write_text("no image")
    with pytest.raises(StainError, match="x.png"):
        MacenkoNormaliser.fit(tmp_path / "x.png")
    cv2.imwrite(str(tmp_path / "glass.png"), np.full((64, 64, 3), 240, np.uint8))
    with pytest.raises(StainError, match="too little stained tissue"):
        MacenkoNormaliser.fit(tmp_path / "glass.png")


def test_training_normalises_exactly_the_crops_inference_normalises(tissue, tmp_path):
    cv2.imwrite(str(tmp_path / "ref.png"), tissue[..., ::-1])
    norm = MacenkoNormaliser.fit(tmp_path / "ref.png")
    grid = np.concatenate([np.concatenate([tissue[:96, :96]] * 3, 1)] * 3, 0)  # 288 x 288, cells of 96
    out = normalise_cells(grid, 96, 80, norm)
    for r in range(3):
        for c in range(3):
            y, x = r * 96 + 8, c * 96 + 8
            assert np.array_equal(out[y:y + 80, x:x + 80], norm(grid[y:y + 80, x:x + 80]))
    assert np.array_equal(out[:8], grid[:8])  # outside the crops: untouched (never seen by the CNN)


def test_stain_keys_reach_the_checkpoint_and_prob_map(tissue, syn_slide, tmp_path):
    """train.py with stain_norm stores the fitted reference in the checkpoint; a reference
    that cannot be fitted is refused before training starts."""
    cv2.imwrite(str(tmp_path / "ref.png"), tissue[..., ::-1])
    d = tmp_path / "set" / "0"
    d.mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(d / f"{i}.png"), tissue[i * 40:i * 40 + 48, :48, ::-1])
    (tmp_path / "set" / "1").mkdir()
    for i in range(4):
        cv2.imwrite(str(tmp_path / "set" / "1" / f"{i}.png"), tissue[:48, i * 40:i * 40 + 48, ::-1])
    cfg = {"mode": "classify", "grid": 1, "data_path_train": str(tmp_path / "set"), "patch_size": 48,
           "width_mult": 0.25, "batch_size": 4, "workers": 0, "epochs": 1, "hed_jitter": 0.05,
           "stain_norm": str(tmp_path / "ref.png")}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    call("train.py", tmp_path / "cfg.json", tmp_path / "run", "--quiet")
    from crfcore.model import load_checkpoint
    ref = load_checkpoint(tmp_path / "run" / "train.ckpt")["config"]["stain_reference"]
    assert ref == MacenkoNormaliser.fit(tmp_path / "ref.png").to_dict()
    res = call("train.py", tmp_path / "cfg.json", tmp_path / "run2", "--set", f'stain_norm="{tmp_path / "nope.png"}"',
               check=False)
    assert res.returncode == 2 and "nope.png" in res.stderr
