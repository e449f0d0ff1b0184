import json
import os

import numpy as np
import pytest
import torch

from crfcore import heatmap, inference, masks, synthetic
from crfcore.errors import CrfError
from crfcore import slide as sl
from crfcore.model import CRFNet, ModelConfig, save_checkpoint
from crfcore.testing import varied_model
from conftest import call

PATCH, CROP = 32, 28


def small_model(grid: int, slide_path) -> CRFNet:
    return varied_model(slide_path, CROP, grid, width=0.25, head_scale=20, crf_std=0.3, seed=grid)


def test_the_cnn_input_is_normalised_in_place_and_stays_channels_last():
    """The identity transform hands the batch over as it is (no NCHW copy), and the one-pass
    normalisation gives ImageNet's (x / 255 - mean) / std."""
    from crfcore.datasets import IMAGENET_MEAN, IMAGENET_STD, normalise_batch

    u8 = torch.randint(0, 256, (4, 9, 7, 3), dtype=torch.uint8)
    x = normalise_batch(u8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (u8.permute(0, 3, 1, 2).double() / 255 - mean.double()) / std.double(),
                               check_dtype=False, atol=1e-6, rtol=0)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert inference.dihedral_images(x, 0, False) is x
    for k, flip in inference.DIHEDRAL[1:]:
        want = np.rot90(x.numpy()[..., ::-1] if flip else x.numpy(), k, axes=(-2, -1))
        assert np.array_equal(inference.dihedral_images(x, k, flip).numpy(), want)


def test_the_normalisation_constants_made_under_inference_mode_serve_later_calls_too():
    from crfcore import datasets
    datasets.scale_and_shift.cache_clear()
    with torch.inference_mode():
        datasets.normalise_batch(torch.zeros(1, 2, 2, 3, dtype=torch.uint8))
    assert not any(t.is_inference() for t in datasets.scale_and_shift(torch.device("cpu")))


@pytest.mark.parametrize("grid", [1, 3])
def test_lattice_equals_naive_including_the_slide_border(border_slide, grid, monkeypatch):
    s, mask, meta = border_slide
    monkeypatch.setattr(inference, "CRF_CHUNK", 50)  # many CRF chunks per band
    model = small_model(grid, s.path)
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
    model = small_model(3, s.path)
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


@pytest.mark.parametrize("method", ["lattice", "dense"])
def test_patch_not_multiple_of_stride_falls_back_to_naive(border_slide, method):
    s, mask, meta = border_slide
    sub = np.zeros_like(mask)
    sub[np.nonzero(mask)[0][:3], np.nonzero(mask)[1][:3]] = True
    model = small_model(3, s.path)
    with pytest.warns(UserWarning, match="not a multiple"):
        _, used = inference.probability_map(model, s.path, sub, meta["downsample"], 40, 28, method,
                                            inference.Options(workers=0, quiet=True))
    assert used == "naive"


@pytest.fixture(scope="module")
def grid_ckpt(border_slide, tmp_path_factory):
    s, _, _ = border_slide
    path = tmp_path_factory.mktemp("ckpt") / "m.ckpt"
    save_checkpoint(path, small_model(3, s.path), ckpt_config())
    return path


def ckpt_config() -> dict:
    return {"mode": "grid", "grid": 3, "crf_iters": 10, "width_mult": 0.25, "num_classes": 1,
            "image_size": 3 * PATCH, "patch_size": PATCH, "crop_size": CROP}


def mask_path(s) -> str:
    return s.path.parent / "edge_tissue.npy"


@pytest.fixture(scope="module")
def few_points(border_slide):
    """A tissue mask of the border slide with 30 points: enough for a varied map, quick."""
    s, mask, meta = border_slide
    sub = np.zeros_like(mask)
    rows, cols = np.nonzero(mask)
    pick = np.random.default_rng(2).choice(len(rows), 30, replace=False)
    sub[rows[pick], cols[pick]] = True
    path = s.path.parent / "few" / "edge_tissue.npy"
    path.parent.mkdir()
    masks.save_mask(path, sub, meta)
    return path


def test_prob_map_cli_and_rendering(border_slide, grid_ckpt, tmp_path):
    s, mask, meta = border_slide
    res = call("prob_map.py", s.path, grid_ckpt, mask_path(s), tmp_path / "p.npy", "--workers", "2", "--quiet")
    assert "lattice" in res.stdout
    prob, side = heatmap.load_probability_map(tmp_path / "p.npy", slide=s.path)
    assert prob.dtype == np.float32 and prob.shape == mask.shape and side["kind"] == "probability"
    assert side["method"] == "lattice" and side["grid"] == 3 and side["tta"] == 1 and "seconds" in side
    call("prob_map_show.py", tmp_path / "p.npy", "-o", tmp_path / "p.png")
    call("prob_map_show.py", tmp_path / "p.npy", "-o", tmp_path / "o.png", "--slide", s.path,
         "--tiff", tmp_path / "p.tif")
    t = sl.open_slide(tmp_path / "p.tif")
    assert t.dimensions == (768, 640)
    assert sl.slide_mpp(t) == pytest.approx((0.25, 0.25))


def test_dash_o_is_the_positional_out(border_slide, grid_ckpt, few_points, tmp_path):
    s, _, _ = border_slide
    call("prob_map.py", s.path, grid_ckpt, few_points, tmp_path / "a.npy", "--workers", "0", "--quiet")
    call("prob_map.py", s.path, grid_ckpt, few_points, "-o", tmp_path / "b.npy", "--workers", "0", "--quiet")
    a, b = heatmap.load_probability_map(tmp_path / "a.npy")[0], heatmap.load_probability_map(tmp_path / "b.npy")[0]
    assert a.any() and np.array_equal(a, b)
    both = call("prob_map.py", s.path, grid_ckpt, few_points, tmp_path / "a.npy", "-o", tmp_path / "b.npy",
                check=False)
    assert both.returncode == 2 and "once" in both.stderr


def test_a_map_of_another_checkpoint_is_not_kept(border_slide, grid_ckpt, few_points, tmp_path):
    """A map made by another checkpoint is stale: refused (the map untouched) unless
    --overwrite, which recomputes it with the new checkpoint."""
    s, _, _ = border_slide
    out = tmp_path / "p.npy"
    call("prob_map.py", s.path, grid_ckpt, few_points, out, "--workers", "0", "--quiet")
    first, meta = heatmap.load_probability_map(out)
    other = tmp_path / "other.ckpt"
    save_checkpoint(other, varied_model(s.path, CROP, 3, width=0.25, head_scale=20, seed=7), ckpt_config())
    res = call("prob_map.py", s.path, other, few_points, out, "--workers", "0", "--quiet", check=False)
    assert res.returncode == 2 and "stale" in res.stderr and "checkpoint_sha256" in res.stderr
    assert np.array_equal(heatmap.load_probability_map(out)[0], first)
    call("prob_map.py", s.path, other, few_points, out, "--workers", "0", "--quiet", "--overwrite")
    second, meta2 = heatmap.load_probability_map(out)
    assert meta2["checkpoint_sha256"] != meta["checkpoint_sha256"] and np.abs(second - first).max() > 1e-3
    again = call("prob_map.py", s.path, other, few_points, out, "--workers", "0", "--quiet")
    assert "up to date, skipped" in again.stdout
    out.write_bytes(out.read_bytes()[:150])  # a review: a truncated map with its sidecar was skipped for ever
    again = call("prob_map.py", s.path, other, few_points, out, "--workers", "0", "--quiet")
    assert "cannot read the array" in again.stderr and "computed again" in again.stderr
    assert np.array_equal(heatmap.load_probability_map(out)[0], second)
    fewer = tmp_path / "fewer" / "edge_tissue.npy"  # another mask of the slide: the map is stale
    mask, mask_meta = masks.load_mask(few_points)
    masks.save_mask(fewer, mask & (np.cumsum(mask.ravel()).reshape(mask.shape) <= 10), mask_meta)
    res = call("prob_map.py", s.path, other, fewer, out, "--workers", "0", "--quiet", check=False)
    assert res.returncode == 2 and "its recorded mask_sha256 is not this run's" in res.stderr
    twin = tmp_path / "twin" / s.path.name  # another slide of the same name and size
    synthetic.write_slide(twin, 768, 640, tumours=1, seed=6, tumour_radius=0.15, tissue=[(0.2, 0.3, 0.45, 0.5)])
    res = call("prob_map.py", twin, other, few_points, out, "--workers", "0", "--quiet", check=False)
    assert res.returncode == 2 and "another slide of the same name?" in res.stderr  # its mask is the other's
    twin_mask = tmp_path / "twin" / "edge_tissue.npy"  # a mask sidecar from before masks recorded slide_bytes
    masks.save_mask(twin_mask, mask, {k: v for k, v in mask_meta.items() if k != "slide_bytes"})
    res = call("prob_map.py", twin, other, twin_mask, out, "--workers", "0", "--quiet", check=False)
    assert res.returncode == 2 and "slide_bytes" in res.stderr  # the map's own record still tells


def test_a_map_never_replaces_a_mask(border_slide, grid_ckpt, few_points, tmp_path):
    """From a hostile review: `-o` the run's own tissue mask, or another mask, with
    --overwrite replaced the mask by the map (exit 0); without it the message was
    'stale ... use --overwrite'."""
    s, _, _ = border_slide
    d = tmp_path / "m"
    d.mkdir()
    for name in ("edge_tissue", "edge_tumor"):
        mask, meta = masks.load_mask(few_points)
        masks.save_mask(d / f"{name}.npy", mask, {**meta, "kind": name.split("_")[1]})
    before = (d / "edge_tissue.npy").read_bytes()
    run = [s.path, grid_ckpt, d / "edge_tissue.npy", "--workers", "0", "--quiet", "--overwrite"]
    res = call("prob_map.py", *run, "-o", d / "edge_tissue.npy", check=False)
    assert res.returncode == 2 and "is also an input of this run" in res.stderr
    res = call("prob_map.py", *run, "-o", d / "edge_tumor.npy", check=False)
    assert res.returncode == 2 and "holds a tumor array, which a probability array would replace" in res.stderr
    assert (d / "edge_tissue.npy").read_bytes() == before and masks.load_mask(d / "edge_tumor.npy")[1]["kind"] == "tumor"


def test_a_folder_run_reports_a_slide_without_a_mask_and_goes_on(border_slide, grid_ckpt, few_points, tmp_path):
    """From a hostile review: one slide without a mask stopped the whole folder, and the
    tool's own heat-map TIFF beside the slides was taken for a slide."""
    s, _, _ = border_slide
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "edge.tif").symlink_to(s.path)
    (slides / "lonely.tif").symlink_to(s.path)
    prob = np.full((40, 48), 0.5, np.float32)
    heatmap.write_map_tiff(slides / "edge_heatmap.tif", prob, (768, 640), None)  # what prob_map_show --tiff writes
    res = call("prob_map.py", slides, grid_ckpt, few_points.parent, tmp_path / "maps", "--workers", "0", "--quiet",
               check=False)
    assert res.returncode == 2 and "lonely.tif: no tissue mask" in res.stderr and "edge_heatmap" not in res.stderr
    assert (tmp_path / "maps" / "edge_prob.npy").is_file() and not (tmp_path / "maps" / "lonely_prob.npy").exists()
    assert [p.name for p in sl.find_slides(slides)] == ["edge.tif", "lonely.tif"]


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
    heatmap.write_map_tiff(tif, prob, (2048, 1536), 0.25, values="colour")
    full = sl.read_rgb(sl.open_slide(tif), (0, 0), 0, (2048, 1536))
    xy = np.array([[x, y] for x in range(8, 2048, 97) for y in range(8, 1536, 89)])
    is_red = (full[xy[:, 1], xy[:, 0], 0] > 100) & (full[xy[:, 1], xy[:, 0], 2] < 60)
    inside = syn_slide.annotation.contains(xy)
    assert (is_red == inside).mean() > 0.97


def test_a_mask_of_another_slide_is_refused(border_slide, grid_ckpt, syn_slide, tmp_path):
    s, _, _ = border_slide
    res = call("prob_map.py", syn_slide.path, grid_ckpt, mask_path(s), tmp_path / "x.npy", check=False)
    assert res.returncode == 2 and "belongs to slide" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.npy").exists()


def test_prob_map_errors(border_slide, grid_ckpt, tmp_path):
    s, mask, meta = border_slide
    cls = tmp_path / "cls.ckpt"
    save_checkpoint(cls, CRFNet(ModelConfig(grid=1, num_classes=2, width_mult=0.25)),
                    {"mode": "classify", "grid": 1, "num_classes": 2, "width_mult": 0.25})
    res = call("prob_map.py", s.path, cls, mask_path(s), tmp_path / "x.npy", check=False)
    assert res.returncode == 2 and "mode" in res.stderr
    for flag, least in (("--dense-tile", 256), ("--batch-size", 1)):  # a review: --dense-tile 1 ran 13x slower
        res = call("prob_map.py", s.path, grid_ckpt, mask_path(s), tmp_path / "x.npy", flag, "0", check=False)
        assert res.returncode == 2 and f"{flag}: expected an integer >= {least}" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.npy").exists()
    if not torch.cuda.is_available():
        res = call("prob_map.py", s.path, grid_ckpt, mask_path(s), tmp_path / "x.npy", "--device", "cuda",
                   check=False)
        assert res.returncode == 2 and "CUDA" in res.stderr
    empty = tmp_path / "edge_empty.npy"
    masks.save_mask(empty, np.zeros_like(mask), meta)
    res = call("prob_map.py", s.path, grid_ckpt, empty, tmp_path / "e.npy", "--quiet")
    assert "empty" in res.stderr
    assert not heatmap.load_probability_map(tmp_path / "e.npy")[0].any()


def test_directory_mode_skips_finished_maps(border_slide, grid_ckpt, tmp_path):
    s, mask, meta = border_slide
    slides, mdir, out = tmp_path / "slides", tmp_path / "masks", tmp_path / "out"
    slides.mkdir(), mdir.mkdir()
    (slides / s.path.name).symlink_to(s.path)
    sub = np.zeros_like(mask)
    sub[np.nonzero(mask)[0][:5], np.nonzero(mask)[1][:5]] = True
    masks.save_mask(mdir / "edge_tissue.npy", sub, meta)
    call("prob_map.py", slides, grid_ckpt, mdir, out, "--workers", "0", "--quiet")
    assert (out / "edge_prob.npy").exists()
    res = call("prob_map.py", slides, grid_ckpt, mdir, out, "--workers", "0", "--quiet")
    assert "skipped" in res.stdout
    assert json.loads((out / "edge_prob.json").read_text())["method_asked"] == "lattice"


def test_a_hostile_test_of_prob_map(border_slide, grid_ckpt, few_points, tmp_path):
    """From a hostile test of prob_map.py and prob_map_show.py: an -o with another suffix
    became a folder; a map was drawn over another slide of the same name; dense ran a
    model not tuned for it without a word; '/' as the map was a traceback."""
    s, _, _ = border_slide
    res = call("prob_map.py", s.path, grid_ckpt, few_points, "-o", tmp_path / "out.png", "--quiet", check=False)
    assert res.returncode == 2 and "a map is a .npy file" in res.stderr and not (tmp_path / "out.png").exists()
    call("prob_map.py", s.path, grid_ckpt, few_points, "-o", tmp_path / "maps.2024.05", "--quiet")  # a review
    assert (tmp_path / "maps.2024.05" / "edge_prob.npy").is_file()
    out = tmp_path / "m" / "edge_prob.npy"
    res = call("prob_map.py", s.path, grid_ckpt, few_points, "-o", out, "--quiet", "--method", "dense")
    assert "using the lattice method" in res.stderr and out.is_file()
    assert "not fine-tuned" not in res.stderr  # a review: it warned of dense tuning, then ran the lattice
    twin = tmp_path / "twin" / s.path.name  # another slide of the same name
    synthetic.write_slide(twin, 768, 640, tumours=1, seed=6, tumour_radius=0.15, tissue=[(0.2, 0.3, 0.45, 0.5)])
    res = call("prob_map_show.py", out, "-o", tmp_path / "o.png", "--slide", twin, check=False)
    assert res.returncode == 2 and "another slide of the same name?" in res.stderr
    assert not (tmp_path / "o.png").exists()
    res = call("prob_map_show.py", "/", "-o", tmp_path / "o.png", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "is no .npy file" in res.stderr


def test_an_array_under_another_runs_sidecar_is_refused_and_made_again(border_slide, grid_ckpt, few_points, tmp_path):
    """From a hostile test: two runs writing one map could leave one's array under the
    other's sidecar, then skipped as up to date. The sidecar records its array's values
    (no lock: a folder lock made a run wait, silently, on train.py's lock of SAVE_DIR)."""
    s, _, _ = border_slide
    out = tmp_path / "edge_prob.npy"
    call("prob_map.py", s.path, grid_ckpt, few_points, out, "--quiet")
    good = out.read_bytes()
    np.save(out, np.load(out) * 0.5)  # the other run's array
    with pytest.warns(UserWarning, match="its values are not those its sidecar edge_prob.json records"):
        heatmap.load_probability_map(out)  # still a map to read (a review: maps edited on purpose are read)
    res = call("prob_map.py", s.path, grid_ckpt, few_points, out, "--quiet")
    assert "its values are not those its sidecar records; computed again" in res.stderr and out.read_bytes() == good
    from crfcore.trainset import run_lock
    with run_lock(tmp_path):  # a training run's lock on the folder: the map is still written
        call("prob_map.py", s.path, grid_ckpt, few_points, tmp_path / "other_prob.npy", "--quiet")


def test_a_stride_within_1_percent_of_one_whole_number_on_both_axes_is_it():
    """From a hostile test: a mask at downsample 63.47 x 63.70 (TCGA, --downsample 64) was
    rounded axis by axis to 63 and 64, so prob_map.py fell back to the naive method, 9x slower."""
    geom = lambda stride: inference.Geometry(3, 256, 224, stride)  # noqa: E731
    assert geom((63.47, 63.70)).integer_stride() == 64
    assert geom((31.7, 32.0)).integer_stride() == 32
    assert geom((63.0, 64.0)).integer_stride() is None  # 63.5: 64 is 1.6 % from 63
    assert geom((60.0, 60.0)).integer_stride() == 60 and geom((0.4, 0.4)).integer_stride() is None


def test_messages_name_the_file_and_the_problem(grid_ckpt, tmp_path):
    """From a hostile test: a folder given as the checkpoint or the map was 'no such file',
    and a checkpoint with grid 2 was refused without naming it."""
    res = call("prob_map_show.py", tmp_path, "-o", tmp_path / "o.png", check=False)
    assert res.returncode == 2 and "is a folder, not a .npy file" in res.stderr
    res = call("evaluate.py", "patches", tmp_path, tmp_path, check=False)
    assert res.returncode == 2 and "is a folder, not a checkpoint file" in res.stderr
    ckpt = torch.load(grid_ckpt, weights_only=True)
    ckpt["config"]["grid"] = 2
    torch.save(ckpt, tmp_path / "g2.ckpt")
    from crfcore.model import model_from_checkpoint
    with pytest.raises(CrfError, match=r"g2.ckpt: .*grid"):
        model_from_checkpoint(tmp_path / "g2.ckpt")


def test_a_picture_never_replaces_a_heat_map_tiff_or_a_mask_preview(border_slide, tmp_path):
    """From a hostile test: prob_map_show.py -o replaced a --tiff pyramid and Mask_gen.py's
    mask preview with a matplotlib picture (exit 0)."""
    s, mask, meta = border_slide
    prob = np.where(mask, 0.5, 0).astype(np.float32)
    heatmap.save_probability_map(tmp_path / "edge_prob.npy", prob, {**meta, "slide": "edge.tif"})
    call("prob_map_show.py", tmp_path / "edge_prob.npy", "-o", tmp_path / "edge_prob.png", "--slide", s.path,
         "--tiff", tmp_path / "heat.tif")
    masks.save_mask(tmp_path / "edge_tissue.npy", mask, meta)
    (tmp_path / "edge_tissue.png").write_bytes(b"preview")
    for out, why in (("heat.tif", "is a heat-map TIFF"), ("edge_tissue.png", "is the preview of the tissue mask")):
        before = (tmp_path / out).read_bytes()
        res = call("prob_map_show.py", tmp_path / "edge_prob.npy", "-o", tmp_path / out, check=False)
        assert res.returncode == 2 and why in res.stderr and (tmp_path / out).read_bytes() == before
    call("prob_map_show.py", tmp_path / "edge_prob.npy", "-o", tmp_path / "edge_prob.png")  # its own, again


def test_two_slides_of_one_name_are_left_out_and_the_batch_goes_on(border_slide, grid_ckpt, few_points, tmp_path):
    """From a hostile test: a.tif beside a.svs (one a_prob.npy) refused the whole batch."""
    s, _, _ = border_slide
    slides, maskdir = tmp_path / "slides", tmp_path / "masks"
    slides.mkdir(), maskdir.mkdir()
    for name in ("edge.tif", "edge.svs", "solo.tif"):
        os.symlink(s.path, slides / name)
    mask, meta = masks.load_mask(few_points)
    masks.save_mask(maskdir / "solo_tissue.npy", mask, {**meta, "slide": "solo.tif", "slide_bytes": None})
    res = call("prob_map.py", slides, grid_ckpt, maskdir, tmp_path / "maps", "--quiet", check=False)
    assert res.returncode == 2 and (tmp_path / "maps" / "solo_prob.npy").is_file()
    assert "named edge too; not mapped" in res.stderr and "not mapped: edge.svs, edge.tif" in res.stderr
