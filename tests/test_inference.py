import numpy as np
import pytest
import torch

from crfcore import heatmap, inference, masks, synthetic
from crfcore import slide as sl
from crfcore.datasets import to_tensor
from crfcore.model import CRFNet, ModelConfig, save_checkpoint
from conftest import run_script

PATCH, CROP = 32, 28


@pytest.fixture(scope="module")
def border_slide(tmp_path_factory):
    """Tissue running off the left and top edges, a tumour inside, and its tissue mask."""
    d = tmp_path_factory.mktemp("border")
    s = synthetic.write_slide(d / "edge.tif", 768, 640, tumours=1, seed=5, tumour_radius=0.15,
                              tissue=[(0.2, 0.3, 0.45, 0.5)])
    mask, meta = masks.make_mask(s.path, "tissue", downsample=16)
    masks.save_mask(d / "edge_tissue.npy", mask, meta)
    assert mask[:, 0].any() and mask[0, :].any()
    return s, mask, meta


def varied_model(grid: int, slide_path) -> CRFNet:
    """A small random model whose outputs vary with the input: batch-norm statistics taken
    from real patches of the slide, a non-zero CRF W."""
    torch.manual_seed(grid)
    model = CRFNet(ModelConfig(grid=grid, width_mult=0.25))
    s = sl.open_slide(slide_path)
    xy = np.random.default_rng(0).uniform(0, 600, (64, 2)).astype(int)
    x = torch.stack([to_tensor(sl.read_rgb(s, tuple(p), 0, (CROP, CROP))) for p in xy])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model.embed(x)
        model.fc.weight.mul_(20)
        if model.crf is not None:
            model.crf.W.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("grid", [1, 3])
def test_lattice_equals_naive_including_the_slide_border(border_slide, grid, monkeypatch):
    s, mask, meta = border_slide
    monkeypatch.setattr(inference, "CRF_CHUNK", 50)  # many CRF chunks per band
    model = varied_model(grid, s.path)
    opts = inference.Options(batch_size=48, workers=0, quiet=True, band_rows=8)
    lat, m1 = inference.probability_map(model, s.path, mask, meta["downsample"], PATCH, CROP, "lattice", opts)
    ref, m2 = inference.probability_map(model, s.path, mask, meta["downsample"], PATCH, CROP, "naive", opts)
    assert (m1, m2) == ("lattice", "naive")
    assert lat[mask].std() > 0.05  # a meaningful comparison, not two constant maps
    assert np.abs(lat - ref).max() < 1e-4
    assert (lat[~mask] == 0).all()


def test_tta8_lattice_equals_naive_on_a_subset(border_slide, monkeypatch):
    s, mask, meta = border_slide
    monkeypatch.setattr(inference, "CRF_CHUNK", 50)
    model = varied_model(3, s.path)
    sub = np.zeros_like(mask)
    rows, cols = np.nonzero(mask)
    pick = np.random.default_rng(1).choice(len(rows), 25, replace=False)
    sub[rows[pick], cols[pick]] = True
    sub[rows[0], cols[0]] = True  # a border point
    opts = inference.Options(batch_size=64, workers=0, quiet=True, tta=8)
    lat, _ = inference.probability_map(model, s.path, sub, meta["downsample"], PATCH, CROP, "lattice", opts)
    ref, _ = inference.probability_map(model, s.path, sub, meta["downsample"], PATCH, CROP, "naive", opts)
    assert np.abs(lat - ref).max() < 1e-4
    one, _ = inference.probability_map(model, s.path, sub, meta["downsample"], PATCH, CROP, "lattice",
                                       inference.Options(workers=0, quiet=True))
    assert np.abs(one - lat)[sub].max() > 1e-4  # TTA is really applied


def test_patch_not_multiple_of_stride_falls_back_to_naive(border_slide):
    s, mask, meta = border_slide
    sub = np.zeros_like(mask)
    sub[np.nonzero(mask)[0][:3], np.nonzero(mask)[1][:3]] = True
    model = varied_model(3, s.path)
    with pytest.warns(UserWarning, match="not a multiple"):
        _, method = inference.probability_map(model, s.path, sub, meta["downsample"], 40, 28, "lattice",
                                              inference.Options(workers=0, quiet=True))
    assert method == "naive"


@pytest.fixture(scope="module")
def grid_ckpt(border_slide, tmp_path_factory):
    s, _, _ = border_slide
    path = tmp_path_factory.mktemp("ckpt") / "m.ckpt"
    cfg = {"mode": "grid", "grid": 3, "crf_iters": 10, "width_mult": 0.25, "num_classes": 1,
           "image_size": 3 * PATCH, "patch_size": PATCH, "crop_size": CROP}
    save_checkpoint(path, varied_model(3, s.path), cfg)
    return path


def test_prob_map_cli_and_rendering(border_slide, grid_ckpt, tmp_path):
    s, mask, meta = border_slide
    mask_path = s.path.parent / "edge_tissue.npy"
    proc = run_script("prob_map.py", s.path, grid_ckpt, mask_path, tmp_path / "p.npy", "--workers", "2",
                      "--quiet")
    assert "lattice" in proc.stdout
    prob, side = heatmap.load_probability_map(tmp_path / "p.npy", slide=s.path)
    assert prob.dtype == np.float32 and prob.shape == mask.shape and side["kind"] == "probability"
    assert side["method"] == "lattice" and side["grid"] == 3 and side["tta"] == 1 and "seconds" in side
    run_script("prob_map_show.py", tmp_path / "p.npy", "-o", tmp_path / "p.png")
    run_script("prob_map_show.py", tmp_path / "p.npy", "-o", tmp_path / "o.png", "--slide", s.path,
               "--tiff", tmp_path / "p.tif")
    t = sl.open_slide(tmp_path / "p.tif")
    assert t.dimensions == (768, 640)
    assert sl.slide_mpp(t) == pytest.approx((0.25, 0.25))


def test_overlay_puts_the_map_where_the_tumour_is(syn_slide, tmp_path):
    """A map that is 1 exactly on the planted tumour shows red there and not elsewhere."""
    tumour, meta = masks.make_mask(syn_slide.path, "tumor", syn_slide.annotation, downsample=16)
    tissue, _ = masks.make_mask(syn_slide.path, "tissue", downsample=16)
    prob = np.where(tumour, 1.0, np.where(tissue, 0.01, 0)).astype(np.float32)
    thumb = sl.thumbnail(sl.open_slide(syn_slide.path), 16)
    img = heatmap.overlay(thumb, prob, alpha=1.0).astype(int)
    red = (img[..., 0] > 100) & (img[..., 2] < 60)
    assert (red == tumour).mean() > 0.99
    tif = tmp_path / "m.tif"
    heatmap.write_map_tiff(tif, prob, (2048, 1536), 0.25)
    full = sl.read_rgb(sl.open_slide(tif), (0, 0), 0, (2048, 1536))
    xy = np.array([[x, y] for x in range(8, 2048, 97) for y in range(8, 1536, 89)])
    is_red = (full[xy[:, 1], xy[:, 0], 0] > 100) & (full[xy[:, 1], xy[:, 0], 2] < 60)
    inside = syn_slide.annotation.contains(xy)
    assert (is_red == inside).mean() > 0.97


def test_prob_map_errors(border_slide, grid_ckpt, syn_slide, tmp_path):
    s, mask, meta = border_slide
    mask_path = s.path.parent / "edge_tissue.npy"
    proc = run_script("prob_map.py", syn_slide.path, grid_ckpt, mask_path, tmp_path / "x.npy", check=False)
    assert proc.returncode == 2 and "belongs to slide" in proc.stderr and "Traceback" not in proc.stderr
    cls = tmp_path / "cls.ckpt"
    save_checkpoint(cls, CRFNet(ModelConfig(grid=1, num_classes=2, width_mult=0.25)),
                    {"mode": "classify", "grid": 1, "num_classes": 2, "width_mult": 0.25})
    proc = run_script("prob_map.py", s.path, cls, mask_path, tmp_path / "x.npy", check=False)
    assert proc.returncode == 2 and "mode" in proc.stderr
    if not torch.cuda.is_available():
        proc = run_script("prob_map.py", s.path, grid_ckpt, mask_path, tmp_path / "x.npy", "--device", "cuda",
                          check=False)
        assert proc.returncode == 2 and "CUDA" in proc.stderr
    empty = tmp_path / "edge_empty.npy"
    masks.save_mask(empty, np.zeros_like(mask), meta)
    proc = run_script("prob_map.py", s.path, grid_ckpt, empty, tmp_path / "e.npy", "--quiet")
    assert "empty" in proc.stderr
    assert not heatmap.load_probability_map(tmp_path / "e.npy")[0].any()


def test_directory_mode_skips_finished_maps(border_slide, grid_ckpt, tmp_path):
    s, mask, meta = border_slide
    slides, mdir, out = tmp_path / "slides", tmp_path / "masks", tmp_path / "out"
    slides.mkdir(), mdir.mkdir()
    (slides / s.path.name).symlink_to(s.path)
    sub = np.zeros_like(mask)
    sub[np.nonzero(mask)[0][:5], np.nonzero(mask)[1][:5]] = True
    masks.save_mask(mdir / "edge_tissue.npy", sub, meta)
    run_script("prob_map.py", slides, grid_ckpt, mdir, out, "--workers", "0", "--quiet")
    assert (out / "edge_prob.npy").exists()
    proc = run_script("prob_map.py", slides, grid_ckpt, mdir, out, "--workers", "0", "--quiet")
    assert "skipped" in proc.stdout
