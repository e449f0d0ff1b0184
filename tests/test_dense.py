"""The dense method: its geometry is exact (with no context and one crop per tile it is
the lattice method, TTA and shifted phases included), and its map does not depend on
how the slide is cut into tiles."""
from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest
import torch

from crfcore import dense, heatmap, inference, masks, synthetic
from crfcore.model import save_checkpoint
from crfcore.testing import varied_model
from conftest import call

CROP = 64  # two feature cells: a crop alone gives exactly its window's feature map


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """Tissue running off the top-left corner (crops reach off the slide), a tumour inside."""
    d = tmp_path_factory.mktemp("dense")
    return synthetic.write_slide(d / "edge.tif", 768, 640, tumours=1, seed=5, tumour_radius=0.15,
                                 tissue=[(0.2, 0.3, 0.45, 0.5)])


@pytest.fixture(scope="module")
def model(slide):
    return varied_model(slide.path, CROP, 3, width=0.25, head_scale=20, crf_std=0.3)


def subset(mask: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` random points of the mask and its first (border) point."""
    rows, cols = np.nonzero(mask)
    pick = np.random.default_rng(seed).choice(len(rows), n, replace=False)
    sub = np.zeros_like(mask)
    sub[rows[pick], cols[pick]] = True
    sub[rows[0], cols[0]] = True
    return sub


def test_dihedral_boxes_follow_the_image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 56))
    x0, y0 = rng.integers(0, 56 - 8, 20), rng.integers(0, 40 - 8, 20)
    for k, flip in inference.DIHEDRAL:
        t = inference.dihedral(img, k, flip)
        bx, by = inference.dihedral_boxes(x0, y0, 8, 40, 56, k, flip)
        for i in range(20):
            want = inference.dihedral(img[y0[i]:y0[i] + 8, x0[i]:x0[i] + 8], k, flip)
            assert np.array_equal(t[by[i]:by[i] + 8, bx[i]:bx[i] + 8], want)


@pytest.mark.parametrize("stride, tta", [(32, 1), (32, 8), (16, 1)])
def test_one_crop_per_tile_without_context_is_the_lattice(slide, model, stride, tta, monkeypatch):
    """With no margin and one crop per tile, a tile is exactly a crop: dense must equal
    lattice (so windows, phases, transforms and the CRF step are all in place). Stride 16
    needs 4 shifted phases."""
    monkeypatch.setattr(dense, "MARGIN", 0)
    monkeypatch.setattr(dense, "tile_widths", lambda rows: [rows])  # square tiles: one crop each
    mask, meta = masks.make_mask(slide.path, "tissue", downsample=stride)
    sub = subset(mask, 12 if tta == 1 else 4)
    opts = inference.Options(workers=0, quiet=True, tta=tta, dense_tile=stride)  # one lattice row and column per tile
    lat, _ = inference.probability_map(model, slide.path, sub, meta["downsample"], CROP, CROP, "lattice", opts)
    den, used = inference.probability_map(model, slide.path, sub, meta["downsample"], CROP, CROP, "dense", opts)
    assert used == "dense"
    assert lat[sub].std() > 0.02  # a map that varies
    assert np.abs(den - lat).max() < 1e-4
    assert (den[~sub] == 0).all()


def test_tiles_do_not_change_the_map(slide, monkeypatch):
    """With the default margin (the receptive field) the cells a window uses never see a
    tile's edge: small tiles (their stems run in many blocks) give the map of large ones. (A model whose batch-norm
    statistics come from large regions: in context, the crop-calibrated one saturates.)"""
    model = varied_model(slide.path, 256, 3, width=0.25, head_scale=20, crf_std=0.3, n=16)
    mask, meta = masks.make_mask(slide.path, "tissue", downsample=32)
    sub = np.zeros_like(mask)
    sub[4:9, 6:11] = mask[4:9, 6:11]  # a block of tissue: 1 large tile or 9 small ones
    opts = inference.Options(workers=0, quiet=True)
    big, _ = inference.probability_map(model, slide.path, sub, meta["downsample"], CROP, CROP, "dense", opts)
    monkeypatch.setattr(dense, "STEM_BLOCK_PIXELS", 5000)  # many stem blocks as well
    small, _ = inference.probability_map(model, slide.path, sub, meta["downsample"], CROP, CROP, "dense",
                                         replace(opts, dense_tile=64))
    assert big[sub].std() > 0.02
    assert np.abs(big - small).max() < 1e-4


def test_stem_blocks_give_the_whole_tiles_features(slide):
    """The stem run over blocks (partial last ones in both directions, sides off the
    stride, a rotated NCHW input) gives the features of the whole image, and the blocks
    are many (5 x 4 of 56 x 72 pixels). In float64: in float32 oneDNN picks other kernels
    for other shapes, and their rounding (1e-6 after the stem) would hide a misplaced row."""
    model = varied_model(slide.path, CROP, 3, width=0.25, n=8).double()
    u8 = torch.randint(0, 256, (1, 3, 301, 203), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    stem = dense.TileFeatures(model.features, dense.STEM_LAYERS, pixels=203 * 20)
    assert stem.stride == 8 and 0 < stem.halo < 40
    whole = dense.TileFeatures(model.features, dense.STEM_LAYERS, pixels=10 ** 9)
    with torch.no_grad():
        for x in (u8, torch.rot90(u8, 1, dims=(2, 3))):
            (want, at), (got, at_too) = whole(x), stem(x)
            assert got.shape == want.shape and want.std() > 0.1 and at == at_too == (0, 0)
            assert torch.allclose(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("need", [(96, 160, 64, 288), (0, 32, 288, 320), (200, 261, 0, 17), (150, 320, 0, 352),
                                  (304, 320, 45, 352), (176, 190, 210, 230)])
def test_later_blocks_trimmed_to_the_needed_cells_give_the_same_cells(slide, need):
    """Each block after the stem keeps only the cells that the needed ones still see: a
    tile's margins are context for the first layers only. The needed cells are the whole
    image's (float64, as above), from a box in the middle, at an edge, or off the cell grid."""
    model = varied_model(slide.path, CROP, 3, width=0.25, n=8).double()
    u8 = torch.randint(0, 256, (1, 3, 320, 352), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    stem = dense.TileFeatures(model.features, dense.STEM_LAYERS, pixels=352 * 40)
    with torch.no_grad():
        (whole, _), (cut, (oy, ox)) = stem(u8), stem(u8, need)
    assert oy % 32 == 0 and ox % 32 == 0
    y0, y1, x0, x1 = (v // 32 for v in (need[0], need[1] + 31, need[2], need[3] + 31))
    rows, cols = slice(y0 - oy // 32, y1 - oy // 32), slice(x0 - ox // 32, x1 - ox // 32)
    assert cut.numel() < whole.numel() and whole[:, :, y0:y1, x0:x1].std() > 0.1
    assert torch.allclose(cut[:, :, rows, cols], whole[:, :, y0:y1, x0:x1], atol=1e-10, rtol=0)


def test_each_band_takes_the_tile_width_with_the_fewest_backbone_pixels(slide, model):
    mask, meta = masks.make_mask(slide.path, "tissue", downsample=32)
    geom = inference.Geometry(3, CROP, CROP, tuple(meta["downsample"]))
    job = dense.DenseJob(model, slide.path, mask, geom, inference.Options(workers=0, quiet=True, dense_tile=4 * 32))
    assert job.opts.band_rows == job.tile_rows == 4 and dense.tile_widths(4) == [2, 3, 4, 6, 8, 12, 16]
    width_mattered = False
    for lo, hi in pairwise(job.starts):
        if lo < hi:
            one_phase = np.zeros(hi - lo, int)  # stride 32 = the feature stride: every crop in phase 0
            pixels = [dense.tile_pixels(job.band_tiles(lo, hi, one_phase, w)) for w in dense.tile_widths(4)]
            mine = [t for t in job.tiles if lo <= t.idx[0] < hi]
            assert dense.tile_pixels(mine) == min(pixels)
            assert all(t.idx.max() < hi for t in mine)  # a tile within its band
            width_mattered |= len(set(pixels)) > 1
    assert width_mattered
    margins = CROP + 2 * job.ext
    assert all(t.size[1] <= 3 * 32 + margins and t.size[0] <= 15 * 32 + margins for t in job.tiles)
    assert np.array_equal(np.sort(np.concatenate([t.idx for t in job.tiles])), np.arange(len(job.need)))


def test_conv_reach_refuses_layers_it_cannot_count():
    assert dense.conv_reach(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU6(),
                                                torch.nn.Conv2d(8, 8, 3, 1, 2, dilation=2))) == (2, 5)
    with pytest.raises(ValueError, match="MaxPool2d"):
        dense.conv_reach(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.MaxPool2d(3, 2, 1)))


def test_a_stride_that_needs_too_many_phases_uses_the_lattice(slide, model):
    mask, meta = masks.make_mask(slide.path, "tissue", downsample=8)
    sub = subset(mask, 3)
    with pytest.warns(UserWarning, match="feature stride 32"):
        _, used = inference.probability_map(model, slide.path, sub, meta["downsample"], 32, 28, "dense",
                                            inference.Options(workers=0, quiet=True))
    assert used == "lattice"
    geom = inference.Geometry(3, 64, 56, (64.0, 64.0))  # the demo's: one phase, crops that do not overlap
    why = dense.dense_applies(geom, 32)  # a review: this was blamed on a stride "not a multiple of 32"
    assert why.startswith("the lattice stride (64 model pixels) is at least the crop (56)") and "multiple" not in why


def test_prob_map_dense(slide, model, tmp_path):
    mask, meta = masks.make_mask(slide.path, "tissue", downsample=32)
    masks.save_mask(tmp_path / "edge_tissue.npy", mask, meta)
    cfg = {"mode": "grid", "grid": 3, "crf_iters": 10, "width_mult": 0.25, "num_classes": 1,
           "image_size": 3 * CROP, "patch_size": CROP, "crop_size": CROP}
    save_checkpoint(tmp_path / "m.ckpt", model, cfg)
    res = call("prob_map.py", slide.path, tmp_path / "m.ckpt", tmp_path / "edge_tissue.npy", tmp_path / "p.npy",
               "--method", "dense", "--workers", "1", "--quiet")
    assert "(dense)" in res.stdout and "not fine-tuned for --method dense" in res.stderr  # it ran dense: a word
    prob, side = heatmap.load_probability_map(tmp_path / "p.npy", slide=slide.path)
    assert side["method"] == "dense" and side["method_asked"] == "dense"
    assert prob.shape == mask.shape and (prob[~mask] == 0).all() and prob[mask].std() > 0.02
    lat = call("prob_map.py", slide.path, tmp_path / "m.ckpt", tmp_path / "edge_tissue.npy", tmp_path / "p.npy",
               check=False)
    assert lat.returncode == 2 and "method_asked" in lat.stderr  # a dense map is not taken for a lattice one


def test_bf16_dense_runs_and_stays_close(slide, model):
    """bf16 autocast goes through the dense path (the feature map is pooled in float32)."""
    mask, meta = masks.make_mask(slide.path, "tissue", downsample=32)
    sub = subset(mask, 20)
    a, _ = inference.probability_map(model, slide.path, sub, meta["downsample"], CROP, CROP, "dense",
                                     inference.Options(workers=0, quiet=True))
    b, _ = inference.probability_map(model, slide.path, sub, meta["downsample"], CROP, CROP, "dense",
                                     inference.Options(workers=0, quiet=True, precision="bf16"))
    assert b.dtype == np.float32 and torch.isfinite(torch.from_numpy(b)).all()
    assert 0 < np.abs(a - b)[sub].max() < 0.5
