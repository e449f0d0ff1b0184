"""Reading at a chosen resolution: the same tissue scanned at two resolutions gives the
same map (and the same training patches) when the model reads it at one resolution."""
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from crfcore import heatmap, inference, masks, synthetic
from crfcore import slide as sl
from crfcore.annotations import load_annotation, write_annotation
from crfcore.datasets import DataError, GridDataset
from crfcore.heatmap import TILE, pyramid_sizes, write_pyramid
from crfcore.model import save_checkpoint
from crfcore.scale import ReadScale, ScaleError, check_patch_fits, read_scale
from crfcore.testing import varied_model
from conftest import call

PATCH, CROP, MPP = 32, 28, 0.5  # the model's patch geometry, at 0.5 um per pixel


def write_image_slide(path, rgb: np.ndarray, mpp: float | None, every: int = 2) -> None:
    """An RGB array as a pyramidal TIFF (deflate: lossless), levels shrunk `every` times
    by area averaging."""
    sizes = pyramid_sizes(rgb.shape[1], rgb.shape[0], min_size=64)[::every // 2]

    def tiles(level, lw, lh):
        img = rgb if level == 0 else cv2.resize(rgb, (lw, lh), interpolation=cv2.INTER_AREA)
        pad = np.full((-(-lh // TILE) * TILE, -(-lw // TILE) * TILE, 3), 255, np.uint8)
        pad[:lh, :lw] = img
        for y in range(0, lh, TILE):
            for x in range(0, lw, TILE):
                yield pad[y:y + TILE, x:x + TILE]

    write_pyramid(path, sizes, tiles, mpp, compression="deflate")


SCANS = {  # name: (um per pixel, lattice downsample): one 8-um lattice
    "fine": (0.25, 32), "half": (0.5, 16), "flat": (0.25, 32), "halved": (0.5, 16), "odd": (0.4, 20)}


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """One tissue, several scans: `fine` at 0.25 um (synthetic: each level rendered on its
    own), `half` at 0.5 um (fine's level 1, pixel for pixel), `flat` (fine's level 0 with
    levels 4x apart: no level at 0.5 um), `halved` (fine's level 0 area-halved: what `flat`
    gives at 0.5 um) and `odd` at 0.4 um (fine's level 0 shrunk by area: a scale no level
    has). All have the same tissue mask and a checkpoint that says 0.5 um."""
    d = tmp_path_factory.mktemp("scans")
    fine = synthetic.write_slide(d / "fine.tif", 768, 640, tumours=1, seed=5, tumour_radius=0.15,
                                 tissue=[(0.5, 0.5, 0.4, 0.4)])
    with sl.open_slide(fine.path) as s:
        level0 = sl.read_level(s, 0)
        write_image_slide(d / "half.tif", sl.read_level(s, 1), 0.5)
    write_image_slide(d / "flat.tif", level0, 0.25, every=4)
    write_image_slide(d / "halved.tif", cv2.resize(level0, (384, 320), interpolation=cv2.INTER_AREA), 0.5)
    write_image_slide(d / "odd.tif", cv2.resize(level0, (480, 400), interpolation=cv2.INTER_AREA), 0.4)
    half_truth = [np.round(v / 2) for v in fine.annotation.positive]  # whole pixels in both scans (JSON rounds)
    write_annotation(replace(fine.annotation, positive=[2 * v for v in half_truth]), d / "fine.json")
    write_annotation(replace(fine.annotation, positive=half_truth), d / "half.json")
    mask, meta = masks.make_mask(fine.path, "tissue", downsample=32)
    for name, (_, ds) in SCANS.items():
        own, m = masks.make_mask(d / f"{name}.tif", "tissue", downsample=ds)
        assert own.shape == mask.shape
        masks.save_mask(d / f"{name}_tissue.npy", mask, m)
    model = varied_model(d / "half.tif", CROP, 3, width=0.25, head_scale=20, crf_std=0.3)
    cfg = {"mode": "grid", "grid": 3, "crf_iters": 10, "width_mult": 0.25, "num_classes": 1,
           "image_size": 3 * PATCH, "patch_size": PATCH, "crop_size": CROP, "mpp": MPP}
    save_checkpoint(d / "m.ckpt", model, cfg)
    return d, mask


def test_read_scale_picks_the_level_that_fits(scans):
    d, _ = scans
    with sl.open_slide(d / "fine.tif") as s:
        assert read_scale(s, "fine", mpp=0.5) == ReadScale(2.0, 1, 2.0)  # a level fits: no resize
        assert read_scale(s, "fine", mpp=0.25).identity
        odd = read_scale(s, "fine", mpp=0.6)
        assert (odd.level, odd.scale) == (1, pytest.approx(2.4))  # level 1, shrunk by 1.2
        assert odd.read(s, (100, 60), (20, 10)).shape == (10, 20, 3)
        with sl.open_slide(d / "half.tif") as h:  # level 1 of fine, read through the level
            assert np.array_equal(read_scale(s, "fine", mpp=0.5).read(s, (200, 120), (40, 30)),
                                  sl.read_rgb(h, (100, 60), 0, (40, 30)))
        with pytest.raises(ScaleError, match="level 9 out of range"):
            read_scale(s, "fine", level=9)
    with sl.open_slide(d / "flat.tif") as s:
        assert read_scale(s, "flat", mpp=0.5) == ReadScale(2.0, 0, 1.0)  # no level at 2x: level 0, halved


def run_map(d, name, *extra):
    call("prob_map.py", d / f"{name}.tif", d / "m.ckpt", d / f"{name}_tissue.npy", d / f"{name}_prob.npy",
         "--workers", "0", "--quiet", *extra)
    return heatmap.load_probability_map(d / f"{name}_prob.npy")


def test_the_same_tissue_at_two_resolutions_gives_the_same_map(scans):
    """The checkpoint says 0.5 um. `fine` read through its level 1 is `half` read at level
    0; `flat` (no level at 0.5 um) read at level 0 and halved by area is `halved`: the same
    pixels, so the same map to float precision (a random test model follows every pixel,
    so only equal pixels make a fair test of the map)."""
    d, mask = scans
    half, side = run_map(d, "half")
    fine, side_fine = run_map(d, "fine")
    assert side["read_level"] == 0 and side_fine["read_level"] == 1 and side_fine["read_scale"] == 2.0
    assert side_fine["read_at"] == {"mpp": 0.5}
    assert half[mask].std() > 0.05
    assert np.abs(fine - half).max() < 1e-5
    halved, _ = run_map(d, "halved")
    flat, side_flat = run_map(d, "flat")
    assert (side_flat["read_level"], side_flat["read_scale"]) == (0, 2.0)
    assert halved[mask].std() > 0.05 and np.abs(flat - halved).max() < 1e-5


def test_a_scale_between_levels_reads_the_same_tissue(scans):
    """`odd` (0.4 um) read at 0.5 um is resized by 1.25. Its pixels come from fine's level 0
    through two area resamplings, `half`'s were rendered at level 1 with their own noise
    (sigma 4 grey levels): the crops must agree to within that noise (mean abs difference
    under 6 grey levels; a crop 2 pixels off the tissue's place differs by far more)."""
    d, mask = scans
    odd, side = run_map(d, "odd")
    assert side["read_scale"] == pytest.approx(1.25) and odd[mask].std() > 0.05
    with sl.open_slide(d / "odd.tif") as o, sl.open_slide(d / "half.tif") as h:
        a = read_scale(o, "odd", mpp=MPP).read(o, (50, 50), (300, 250)).astype(int)
        assert np.abs(a - sl.read_rgb(h, (40, 40), 0, (300, 250))).mean() < 6
        assert np.abs(a - sl.read_rgb(h, (42, 40), 0, (300, 250))).mean() > 10


def test_level_and_mpp_options(scans, tmp_path):
    d, mask = scans
    out = tmp_path / "fine_prob.npy"
    args = [d / "fine.tif", d / "m.ckpt", d / "fine_tissue.npy", out, "--workers", "0", "--quiet"]
    call("prob_map.py", *args, "--level", "1")
    half, _ = run_map(d, "half")
    assert np.abs(heatmap.load_probability_map(out)[0] - half).max() < 1e-5
    stale = call("prob_map.py", *args, "--level", "0", check=False)  # made at another resolution
    assert stale.returncode == 2 and "read_at" in stale.stderr
    off = call("prob_map.py", *args, "--level", "0", "--overwrite")  # allowed, with a note
    assert "read at 0.25 um per pixel, but the model was trained at 0.5" in off.stderr
    assert "trained at" not in call("prob_map.py", *args, "--level", "1", "--overwrite").stderr
    res = call("prob_map.py", d / "fine.tif", d / "m.ckpt", d / "fine_tissue.npy", tmp_path / "x.npy",
               "--level", "7", check=False)
    assert res.returncode == 2 and "level 7 out of range" in res.stderr


def test_patch_gen_at_a_resolution_cuts_the_same_patches(scans, tmp_path):
    d, _ = scans
    (tmp_path / "fine.txt").write_text("fine,384,320\nfine,300,260\n")
    (tmp_path / "half.txt").write_text("half,192,160\nhalf,150,130\n")
    for name, extra in (("fine", ["--mpp", "0.5"]), ("half", [])):
        call("Patch_gen.py", d / f"{name}.tif", "--mask", d / f"{name}_tissue.npy", "-o", tmp_path / "p",
             "--mode", "coords", "--coords", tmp_path / f"{name}.txt", "--image-size", "96", "--workers", "0",
             "--quiet", *extra)
    for i in range(2):
        (a,) = (tmp_path / "p" / "fine").glob(f"tile_{i}_*.png")
        (b,) = (tmp_path / "p" / "half").glob(f"tile_{i}_*.png")
        pa, pb = cv2.imread(str(a)), cv2.imread(str(b))
        assert pa.shape == (96, 96, 3) and np.array_equal(pa, pb)


def test_training_labels_of_patches_cut_at_a_resolution(scans, tmp_path):
    """The same tissue cut at 0.5 um from the 0.25-um scan (--mpp) and from the 0.5-um
    scan (level 0) gives the same label grids: a cell's label is read at its level-0
    centre, which sides.txt places (192 level-0 pixels per 96-pixel image here)."""
    d, _ = scans
    x0, y0, x1, y1 = load_annotation(d / "fine.json").bounds()
    y = 2 * round((y0 + y1) / 4)
    centres = [(x, y) for x in range(2 * round(x1 / 2) - 160, 2 * round(x1 / 2) + 40, 16)]
    sets = {}
    for name, k, extra in (("fine", 1, ["--mpp", "0.5"]), ("half", 2, [])):
        (tmp_path / f"{name}.txt").write_text("".join(f"{name},{x // k},{y // k}\n" for x, y in centres))
        call("Patch_gen.py", d / f"{name}.tif", "--mask", d / f"{name}_tissue.npy", "-o", tmp_path / f"p_{name}",
             "--mode", "coords", "--coords", tmp_path / f"{name}.txt", "--image-size", 3 * PATCH, "--workers", "0",
             "--quiet", *extra)
        call("coord_list_gen.py", tmp_path / f"p_{name}", "-o", tmp_path / name)
        sets[name] = GridDataset(tmp_path / name, d, 3 * PATCH, PATCH, CROP, mpp_set=name == "fine")
    assert (tmp_path / "fine" / "sides.txt").read_text() == "192,192\n" * len(centres)
    fine, half = sets["fine"].labels, sets["half"].labels
    assert np.array_equal(fine, half) and 0 < fine.mean() < 1
    # read at level-0 offsets of one image pixel (the old rule), the labels differ
    at_level0 = [load_annotation(d / "fine.json").contains(np.array(c) + sets["fine"].geom.cell_offsets())
                 for c in centres]
    assert not np.array_equal(np.array(at_level0, np.float32), fine)
    (tmp_path / "fine" / "sides.txt").unlink()
    with pytest.raises(DataError, match="no sides.txt"):
        GridDataset(tmp_path / "fine", d, 3 * PATCH, PATCH, CROP, mpp_set=True)


def test_lattice_equals_naive_at_another_scale(scans):
    """Read through level 1, the lattice method still equals NCRF's loop (the cells' crops
    are read on their own in both)."""
    d, mask = scans
    model = varied_model(d / "half.tif", CROP, 3, width=0.25, head_scale=20, crf_std=0.3)
    sub = np.zeros_like(mask)
    rows, cols = np.nonzero(mask)
    pick = np.random.default_rng(0).choice(len(rows), 15, replace=False)
    sub[rows[pick], cols[pick]] = True
    with sl.open_slide(d / "fine.tif") as s:
        read = read_scale(s, "fine", mpp=MPP)
    opts = inference.Options(workers=0, quiet=True)
    lat, m1 = inference.probability_map(model, d / "fine.tif", sub, (32, 32), PATCH, CROP, "lattice", opts, read)
    ref, m2 = inference.probability_map(model, d / "fine.tif", sub, (32, 32), PATCH, CROP, "naive", opts, read)
    assert (m1, m2) == ("lattice", "naive") and lat[sub].std() > 0.05
    assert np.abs(lat - ref).max() < 1e-4


def test_a_checkpoint_without_mpp_read_off_level_0_is_noted():
    """From a README walk-through: a model trained at level 0 (no mpp in its config) read
    with --mpp or --level gave no word; level 0 stays silent."""
    import warnings

    from conftest import load_script
    from crfcore.scale import ReadScale

    warn = load_script("prob_map.py").warn_off_resolution
    with pytest.warns(UserWarning, match="2 times level 0 .* records no training resolution"):
        warn(Path("s.tif"), (0.25, 0.25), ReadScale(2.0, 1, 2.0), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn(Path("s.tif"), (0.25, 0.25), ReadScale(), None)


def test_an_absurdly_fine_mpp_is_refused(scans):
    """From a hostile review: prob_map.py --mpp 0.0001 read crops of under one level-0
    pixel and died in a numpy reduction."""
    d, _ = scans
    with sl.open_slide(d / "fine.tif") as s:
        assert read_scale(s, "fine.tif", mpp=MPP / 8).scale == pytest.approx(1 / 4)  # upsampling a little is allowed
        with pytest.raises(ScaleError, match="times finer than the slide's level 0"):
            read_scale(s, "fine.tif", mpp=0.0001)


def test_an_mpp_at_which_one_patch_covers_the_slide_is_refused(scans, tmp_path):
    """From a hostile review: prob_map.py --mpp 1000 on a one-level slide read each crop
    as a 128k-pixel square and died allocating 47 GiB; --mpp 50 made a map of padding."""
    d, _ = scans
    res = call("prob_map.py", d / "fine.tif", d / "m.ckpt", d / "fine_tissue.npy", tmp_path / "x.npy",
               "--mpp", "8", check=False)  # 32 model pixels x 32 = 1024 level-0 pixels > 768
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "one 32-pixel patch covers 1024 level-0 pixels, more than the whole 768x640 slide" in res.stderr
    assert not (tmp_path / "x.npy").exists()
    call("prob_map.py", d / "fine.tif", d / "m.ckpt", d / "fine_tissue.npy", tmp_path / "y.npy", "--mpp", "4",
         "--workers", "0", "--quiet")  # 512 level-0 pixels: still a map
    with sl.open_slide(d / "fine.tif") as s:  # a review: a slide smaller than a patch blamed --mpp not given
        with pytest.raises(ScaleError, match="the whole slide .10x8 pixels. is smaller than one 32-pixel patch"):
            check_patch_fits(read_scale(s, "t.tif"), 32, (10, 8), "t.tif")
