import os
import shutil
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from crfcore import masks, tiling, trainset
from crfcore import slide as sl
from crfcore.annotations import write_annotation
from crfcore.datasets import GridDataset
from crfcore.errors import CrfError
from conftest import call, file_size_limit, shared


@pytest.fixture(scope="module")
def syn_masks(syn_slide, tmp_path_factory):
    d = tmp_path_factory.mktemp("masks")
    for kind in ("tumor", "tissue"):
        mask, meta = masks.make_mask(syn_slide.path, kind, syn_slide.annotation, downsample=32)
        masks.save_mask(d / f"syn_tumor_{kind}.npy", mask, meta)
    return d


def read_png(path):
    return cv2.imread(str(path))[..., ::-1]


def test_random_centres_lie_inside_the_mask(syn_slide, syn_masks, tmp_path):
    call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tumor.npy", "-o", tmp_path,
               "--mode", "random", "--num", "40", "--image-size", "128", "--workers", "0", "--quiet")
    mask, meta = masks.load_mask(syn_masks / "syn_tumor_tumor.npy")
    centres = np.array([l.split(",")[1:] for l in (tmp_path / "syn_tumor.txt").read_text().split()], int)
    assert len(centres) == 40
    dx, dy = meta["downsample"]
    assert mask[(centres[:, 1] // dy).astype(int), (centres[:, 0] // dx).astype(int)].all()
    assert syn_slide.annotation.contains(centres).mean() > 0.9
    assert (tmp_path / "syn_tumor_preview.png").exists()


@pytest.mark.parametrize("level", [0, 1])
def test_grid_squares_pass_the_fraction_rule_and_match_read_rgb(syn_slide, syn_masks, tmp_path, level):
    call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tissue.npy", "-o", tmp_path,
               "--image-size", "256", "--level", level, "--min-mask-fraction", "0.5", "--workers", "2",
               "--quiet")
    mask, meta = masks.load_mask(syn_masks / "syn_tumor_tissue.npy")
    tiles, bad = tiling.collect_tiles(tmp_path)
    assert not bad and len(tiles["syn_tumor"]) >= 4
    boxes = np.array([t.box for t in tiles["syn_tumor"]])
    side = 256 * 2 ** level
    assert ((boxes[:, 2] - boxes[:, 0]) == side).all()
    assert (np.diff(np.unique(boxes[:, 0])) % side == 0).all()  # a regular grid
    assert (tiling.mask_fraction(mask, tuple(meta["downsample"]), boxes) >= 0.5).all()
    s = sl.open_slide(syn_slide.path)
    for t in tiles["syn_tumor"][:6]:
        expect = sl.read_rgb(s, t.box[:2], level, (256, 256))
        got = read_png(t.path)
        assert got.shape == (256, 256, 3) and np.array_equal(got, expect)


def test_coords_mode_and_dataset_folder(syn_slide, syn_masks, tmp_path):
    coords = tmp_path / "hard.txt"
    coords.write_text("syn_tumor,1000,800\nother_slide,5,5\nsyn_tumor,1100,700\nsyn_tumor,10,10\n"
                      "syn_tumor,1000,800\n")  # listed twice: cut once, or the next step refuses the pair
    res = call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tissue.npy", "-o",
               tmp_path / "p", "--mode", "coords", "--coords", coords, "--workers", "0", "--quiet")
    assert "1 repeated centre(s) of syn_tumor cut once" in res.stderr
    proc = call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds")
    lines = (tmp_path / "ds" / "list.txt").read_text().split()
    assert lines == ["syn_tumor,1000,800", "syn_tumor,1100,700"]  # (10, 10) runs off the slide
    s = sl.open_slide(syn_slide.path)
    for i, line in enumerate(lines):
        _, x, y = line.split(",")
        expect = sl.read_rgb(s, (int(x) - 384, int(y) - 384), 0, (768, 768))
        assert np.array_equal(read_png(tmp_path / "ds" / f"{i}.png"), expect)
    assert "2 patches" in proc.stdout


def test_real_slide_grid_only_on_tissue(tmp_path):
    path = shared("slides", "CMU-1-Small-Region.svs")
    call("Mask_gen.py", path, "-o", tmp_path / "m.npy", "--kind", "tissue", "--downsample", "16")
    call("Patch_gen.py", path, "--mask", tmp_path / "m.npy", "-o", tmp_path / "p",
               "--image-size", "256", "--workers", "0", "--quiet")
    mask, meta = masks.load_mask(tmp_path / "m.npy")
    tiles, _ = tiling.collect_tiles(tmp_path / "p")
    boxes = np.array([t.box for t in tiles["CMU-1-Small-Region"]])
    # 2220 x 2967 is at most 8 x 11 = 88 squares; tissue covers about a third
    assert 20 <= len(boxes) <= 60
    assert (tiling.mask_fraction(mask, tuple(meta["downsample"]), boxes) >= 0.2).all()
    for t in tiles["CMU-1-Small-Region"]:
        img = read_png(t.path)
        assert (img.std(axis=2) > 15).mean() > 0.05  # some stained (coloured) pixels


def test_coord_list_gen_refusals_and_append(syn_slide, syn_masks, tmp_path):
    call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tumor.npy", "-o",
               tmp_path / "p", "--mode", "random", "--num", "5", "--image-size", "64", "--workers", "0",
               "--quiet")
    (tmp_path / "p" / "syn_tumor" / "notes.png").write_bytes(b"x")
    proc = call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds", "--copy")
    assert "notes.png" in proc.stderr and len((tmp_path / "ds" / "list.txt").read_text().split()) == 5
    proc = call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds", check=False)
    assert proc.returncode == 2 and "--append" in proc.stderr
    proc = call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds", "--append", check=False)
    assert proc.returncode == 2 and "duplicate" in proc.stderr
    call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["0.png", "1.png", "2.png", "3.png",
                                                                   "4.png", "list.txt", "sides.txt"]
    assert (tmp_path / "ds" / "sides.txt").read_text() == "64,64\n" * 5  # cut at level 0: their own size
    proc = call("coord_list_gen.py", tmp_path / "nope", "-o", tmp_path / "made", check=False)
    assert proc.returncode == 2 and "no such PATCH_DIR" in proc.stderr and not (tmp_path / "made").exists()
    for inside in (tmp_path / "p", tmp_path / "p" / "ds"):  # the set among the tiles it is made of
        proc = call("coord_list_gen.py", tmp_path / "p", "-o", inside, check=False)
        assert proc.returncode == 2 and "lies in PATCH_DIR" in proc.stderr and not (inside / "list.txt").exists()
    killed = tmp_path / "killed"  # a first run killed before its list.txt: says so, and --append mends it
    killed.mkdir()
    (killed / "0.png").write_bytes((tmp_path / "ds" / "0.png").read_bytes())
    proc = call("coord_list_gen.py", tmp_path / "p", "-o", killed, check=False)
    assert proc.returncode == 2 and "holds 1 numbered images but no list.txt" in proc.stderr
    call("coord_list_gen.py", tmp_path / "p", "-o", killed, "--append")
    assert len((killed / "list.txt").read_text().split()) == 5
    # a hostile test: 96-pixel mined patches appended to a 64-pixel set, which train.py then refused whole
    call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tumor.npy", "-o", tmp_path / "big",
         "--mode", "random", "--num", "2", "--image-size", "96", "--workers", "0", "--quiet", "--seed", "7")
    before = (tmp_path / "ds" / "list.txt").read_text()
    for out, more in ((tmp_path / "ds", ["--append"]), (tmp_path / "mixed", [tmp_path / "p2"])):
        if more != ["--append"]:
            shutil.copytree(tmp_path / "p", tmp_path / "p2")
            (tmp_path / "p2" / "syn_tumor").rename(tmp_path / "p2" / "other")  # another slide's 64-pixel tiles
            (tmp_path / "p2" / "syn_tumor.txt").write_text((tmp_path / "p2" / "syn_tumor.txt").read_text().replace(
                "syn_tumor,", "other,"))
            (tmp_path / "p2" / "syn_tumor.txt").rename(tmp_path / "p2" / "other.txt")
        proc = call("coord_list_gen.py", tmp_path / "big", *more, "-o", out, check=False)
        assert proc.returncode == 2 and "is 96x96 pixels, but" in proc.stderr and "is 64x64" in proc.stderr, proc.stderr
    assert (tmp_path / "ds" / "list.txt").read_text() == before and not (tmp_path / "ds" / "5.png").exists()
    assert not (tmp_path / "mixed").exists()  # a refused first run leaves no folder


def test_coord_list_gen_reads_list_txt_as_train_py_does_and_leaves_no_empty_set(syn_slide, syn_masks, tmp_path):
    """A hostile test: a blank line in list.txt (which train.py reads past) made --append
    call 40.png missing; a run refused for an empty PATCH_DIR left its new DATASET_DIR."""
    (tmp_path / "empty").mkdir()
    proc = call("coord_list_gen.py", tmp_path / "empty", "-o", tmp_path / "newds", check=False)
    assert proc.returncode == 2 and "no tiles found" in proc.stderr and not (tmp_path / "newds").exists()
    proc = call("coord_list_gen.py", tmp_path / "empty", "-o", tmp_path / "x" / ".." / "newds", check=False)
    assert proc.returncode == 2 and not (tmp_path / "x").exists() and not (tmp_path / "newds").exists()
    proc = call("coord_list_gen.py", tmp_path / "empty", "-o", tmp_path / "a" / "b" / "ds", check=False)
    assert proc.returncode == 2 and not (tmp_path / "a").exists()  # the parents it made go too
    for kind, out, seed in (("tumor", "a", "1"), ("tissue", "b", "2")):
        call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / f"syn_tumor_{kind}.npy", "-o", tmp_path / out,
             "--mode", "random", "--num", "3", "--image-size", "64", "--workers", "0", "--quiet", "--seed", seed)
    call("coord_list_gen.py", tmp_path / "a", "-o", tmp_path / "ds")
    listing = tmp_path / "ds" / "list.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join([lines[0], "", *lines[1:], ""]), encoding="utf-8-sig")
    call("coord_list_gen.py", tmp_path / "b", "-o", tmp_path / "ds", "--append", "--copy")
    assert len(listing.read_text().split()) == 6 and (tmp_path / "ds" / "5.png").is_file()


def test_sides_txt_is_checked_and_kept_by_append(syn_slide, syn_masks, tmp_path):
    """sides.txt: lines beyond list.txt (a run killed between the two) are ignored, a short
    or malformed one is refused, an append keeps the old lines' sides, and a folder
    without one (an older coord_list_gen) cannot be appended to."""
    for name, seed in (("a", "0"), ("b", "1")):
        call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tumor.npy", "-o", tmp_path / name,
             "--mode", "random", "--num", "3", "--image-size", "64", "--seed", seed, "--workers", "0", "--quiet",
             *(["--level", "1"] if name == "b" else []))
    call("coord_list_gen.py", tmp_path / "a", "-o", tmp_path / "ds")
    sides = tmp_path / "ds" / "sides.txt"
    sides.write_text(sides.read_text() + "9,9\n")  # beyond list.txt: ignored
    assert trainset.read_sides(tmp_path / "ds", 3).tolist() == [[64, 64]] * 3
    call("coord_list_gen.py", tmp_path / "b", "-o", tmp_path / "ds", "--append")
    assert sides.read_text() == "64,64\n" * 3 + "128,128\n" * 3  # level 1: twice the level-0 side
    write_annotation(syn_slide.annotation, tmp_path / "json" / "syn_tumor.json")
    with pytest.raises(CrfError, match="slide syn_tumor cover 64x64 and 128x128 level-0 pixels"):
        GridDataset(tmp_path / "ds", tmp_path / "json", 64, 32, 32)  # level 0 and level 1 of one slide
    sides.write_text("64,64\n64,x\n")
    with pytest.raises(trainset.TrainSetError, match="2 lines for the 6 images"):
        trainset.read_sides(tmp_path / "ds", 6)
    with pytest.raises(trainset.TrainSetError, match="line 2: '64,x'"):
        trainset.read_sides(tmp_path / "ds", 2)
    call("coord_list_gen.py", tmp_path / "a", "-o", tmp_path / "old")
    (tmp_path / "old" / "sides.txt").unlink()
    proc = call("coord_list_gen.py", tmp_path / "b", "-o", tmp_path / "old", "--append", check=False)
    assert proc.returncode == 2 and "has no sides.txt" in proc.stderr and "--overwrite" in proc.stderr
    call("coord_list_gen.py", tmp_path / "b", "-o", tmp_path / "ds1")
    with pytest.warns(UserWarning, match="cover 128x128 level-0 pixels"):  # the level-1 images, config mpp null
        GridDataset(tmp_path / "ds1", tmp_path / "json", 64, 32, 32)


def test_odd_patch_sides_give_the_centres_patch_gen_wrote(syn_slide, syn_masks, tmp_path):
    """An odd side (--image-size 97, or --mpp at most scales) puts the coords point one
    pixel past the box's lower middle; coord_list_gen must still match Patch_gen's marker."""
    (tmp_path / "c.txt").write_text("syn_tumor,1147,864\nsyn_tumor,1000,801\n")
    call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tissue.npy", "-o", tmp_path / "p",
         "--mode", "coords", "--coords", tmp_path / "c.txt", "--image-size", "97", "--workers", "0", "--quiet")
    call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds")
    assert sorted((tmp_path / "ds" / "list.txt").read_text().split()) == ["syn_tumor,1000,801", "syn_tumor,1147,864"]
    assert (tmp_path / "ds" / "sides.txt").read_text() == "97,97\n" * 2


def test_odd_sides_at_the_slide_edge_and_other_review_findings(syn_slide, syn_masks, tmp_path):
    """From a hostile review of Patch_gen: with an odd side and tissue at the slide's edge
    the first box was truncated toward zero (one pixel off the grid), so coord_list_gen
    refused the set; a coords list's BOM lost its first line; centres all off the slide
    wrote an empty set with exit 0; --level 0 --mpp and --coords without --mode coords
    were taken silently; random centres depended on the run's other slides."""
    mask, meta = masks.load_mask(syn_masks / "syn_tumor_tissue.npy")
    full = tmp_path / "syn_tumor_tissue.npy"
    masks.save_mask(full, np.ones_like(mask), meta)  # tissue touches the top-left corner
    base = [syn_slide.path, "--mask", full, "--workers", "0", "--quiet"]
    call("Patch_gen.py", *base, "-o", tmp_path / "p", "--image-size", "255")
    call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds")
    boxes = sorted(tiling.parse_tile_name(t).box for t in (tmp_path / "p" / "syn_tumor").iterdir())
    assert boxes[0][:2] == (0, 0) and (255, 0, 510, 255) in boxes  # on the grid: no overlap
    coords = tmp_path / "c.txt"
    coords.write_bytes("\ufeffsyn_tumor,500,500\nsyn_tumor,900,900\n".encode())  # Excel's CSV UTF-8
    call("Patch_gen.py", *base, "-o", tmp_path / "bom", "--mode", "coords", "--coords", coords, "--image-size", "64")
    assert (tmp_path / "bom" / "syn_tumor.txt").read_text() == "syn_tumor,500,500\nsyn_tumor,900,900\n"
    coords.write_text("syn_tumor,-5000,100\n")
    res = call("Patch_gen.py", *base, "-o", tmp_path / "off", "--mode", "coords", "--coords", coords, check=False)
    assert res.returncode == 2 and "no patch to cut (none of the 1 centre(s)" in res.stderr and "-5000, 100" in res.stderr
    assert not (tmp_path / "off" / "syn_tumor.txt").exists()
    for extra, why in ((["--level", "0", "--mpp", "2"], "not allowed with argument"),
                       (["--coords", coords], "--coords is for --mode coords")):
        res = call("Patch_gen.py", *base, "-o", tmp_path / "x", *extra, check=False)
        assert res.returncode == 2 and why in res.stderr, res.stderr
    slides, mdir = tmp_path / "slides", tmp_path / "masks"
    slides.mkdir(), mdir.mkdir()
    for name in ("a", "syn_tumor"):
        (slides / f"{name}.tif").symlink_to(syn_slide.path)
        masks.save_mask(mdir / f"{name}_tumor.npy", *masks.load_mask(syn_masks / "syn_tumor_tumor.npy")[:1],
                        {**meta, "kind": "tumor", "slide": f"{name}.tif"})
    rand = ["--mode", "random", "--num", "5", "--seed", "3", "--image-size", "64", "--workers", "0", "--quiet"]
    call("Patch_gen.py", slides, "--mask", mdir, "-o", tmp_path / "both", *rand)
    call("Patch_gen.py", slides / "syn_tumor.tif", "--mask", mdir / "syn_tumor_tumor.npy", "-o", tmp_path / "one", *rand)
    assert (tmp_path / "both" / "syn_tumor.txt").read_text() == (tmp_path / "one" / "syn_tumor.txt").read_text()


def test_two_patch_gen_runs_into_one_folder_are_one_at_a_time(syn_slide, syn_masks, tmp_path):
    """From a hostile review: two runs at once into one PATCH_DIR failed with raw errors
    (`.partial: File exists`); the second is now refused in one line."""
    import fcntl

    from crfcore.io import lock_folder
    out = tmp_path / "p"
    out.mkdir()
    held = lock_folder(out, fcntl.LOCK_EX, "a test holds")
    try:
        res = call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tissue.npy", "-o", out,
                   "--workers", "0", "--quiet", check=False)
    finally:
        os.close(held)
    assert res.returncode == 2 and "another Patch_gen.py is cutting into this folder; wait for it" in res.stderr
    assert not any(out.iterdir())
    res = call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tissue.npy", "-o", tmp_path / "n" / "a",
               "--image-size", "100000", "--workers", "0", "--quiet", check=False)  # refused: no folder left behind
    assert res.returncode == 2 and not (tmp_path / "n").exists()


def test_patches_at_a_level_are_read_as_prob_map_reads_crops(syn_slide, syn_masks, tmp_path):
    """From a hostile review: random and coords boxes at --level 1 started between level
    pixels, so OpenSlide resampled the training patches, where prob_map.py reads crops
    from whole level pixels (`ReadScale.read`). Each tile is now what that reader gives
    for its box: here (downsample 2) an exact crop of the level's pixels. Centres that
    meet once moved are cut once, with a warning."""
    from crfcore.scale import read_scale
    (tmp_path / "c.txt").write_text("syn_tumor,1001,777\nsyn_tumor,1000,776\n")  # one box once moved
    s = sl.open_slide(syn_slide.path)
    level1, reader = sl.read_level(s, 1), read_scale(s, syn_slide.path, level=1)
    for mode in (["--mode", "random", "--num", "6", "--seed", "2"], ["--mode", "coords", "--coords", tmp_path / "c.txt"]):
        out = tmp_path / mode[1]
        res = call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tissue.npy", "-o", out, "--level",
                   "1", "--image-size", "64", "--workers", "0", "--quiet", *mode)
        call("coord_list_gen.py", out, "-o", tmp_path / f"ds_{mode[1]}")
        tiles = tiling.collect_tiles(out)[0]["syn_tumor"]
        assert len(tiles) == (6 if mode[1] == "random" else 1)
        assert ("1 centre(s) met another once moved onto level 1's pixels" in res.stderr) == (mode[1] == "coords")
        for t in tiles:
            x0, y0 = t.box[0] // 2, t.box[1] // 2
            tile = read_png(t.path)
            assert np.array_equal(tile, level1[y0:y0 + 64, x0:x0 + 64]) and t.box[0] % 2 == 0 and t.box[1] % 2 == 0
            assert np.array_equal(tile, reader.read(s, t.box[:2], (64, 64)))


@pytest.mark.parametrize("name, level, size", [("tcga-cr-7395-01a-01-ts1.svs", 1, 64), ("boxes.tiff", 2, 8)])
def test_real_slide_patches_at_a_level_are_prob_map_crops(tmp_path, name, level, size):
    """From a regression review: at a level whose downsample is not a whole number (TCGA
    2.0005; boxes.tiff's level 2, 4 x 4.032), grid tiles sliced from one shared region
    differed from the crop prob_map.py's reader takes at their box (615 of 616 tiles)."""
    from crfcore.scale import read_scale
    path = shared("slides", name)
    mask, meta = masks.make_mask(path, "tissue", downsample=16)
    masks.save_mask(tmp_path / "m.npy", np.ones_like(mask), meta)
    call("Patch_gen.py", path, "--mask", tmp_path / "m.npy", "-o", tmp_path / "p", "--level", level, "--image-size",
         size, "--min-mask-fraction", "0", "--workers", "0", "--quiet")
    call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds")
    s = sl.open_slide(path)
    reader = read_scale(s, path, level=level)
    tiles = tiling.collect_tiles(tmp_path / "p")[0][path.stem]
    assert len(tiles) > 20
    for t in tiles[:40]:
        assert np.array_equal(read_png(t.path), reader.read(s, t.box[:2], (size, size))), t.path.name


def test_grid_boxes_of_unequal_sides_start_where_they_are_laid():
    """From a regression review: on the TCGA slide at --level 1 (downsample 2.00045 x
    2.00056) a 1024-pixel patch is 2048 x 2049 level-0 pixels; the grid laid square rows of
    2048 and the cut box started a pixel above, off the slide: the slide was refused."""
    centres = tiling.grid_centres(np.ones((10, 10), bool), (500.0, 500.0), (2048, 2049))
    boxes = centres - (np.array([2048, 2049]) + 1) // 2
    assert boxes.min(0).tolist() == [0, 0] and sorted(set(boxes[:, 1]))[:2] == [0, 2049]


def test_random_centres_stay_in_their_mask_cell_at_a_fractional_downsample():
    """From a review: floor((col + u) * d) stepped into the next cell for 1-2 % of centres."""
    mask = np.zeros((40, 40), bool)
    mask[::3, ::2] = True  # cells whose neighbours are not set
    for d in (31.71, 2.0005, 1.0, 7.5):
        c = tiling.random_centres(mask, (d, d * 1.01), 5000, np.random.default_rng(0))
        assert mask[(c[:, 1] // (d * 1.01)).astype(int), (c[:, 0] // d).astype(int)].all(), d


def grid_folder(folder, sides: str):
    """A one-image training set (96 px, 3 x 3 cells of 32) centred on (1000, 1000), its
    sides.txt and an annotation holding only the level-0 box x 1050-1080, y 990-1010."""
    folder.mkdir()
    cv2.imwrite(str(folder / "0.png"), np.zeros((96, 96, 3), np.uint8))
    (folder / "list.txt").write_text("s,1000,1000\n")
    (folder / "sides.txt").write_bytes(sides.encode("latin-1"))
    (folder / "s.json").write_text('{"positive": [{"name": "t", "vertices": [[1050, 990], [1080, 990], '
                                   '[1080, 1010], [1050, 1010]]}], "negative": []}')


def test_sides_scale_each_axis_and_wild_ones_are_refused(tmp_path):
    """192 x 96 level-0 pixels for a 96-pixel image: the right cell's centre is 64 pixels
    right of the image centre (x scale 2) and the middle row's is level (y scale 1), so
    only cell 5 (row 1, col 2) lies in the box; swapped axes would find none."""
    grid_folder(tmp_path / "ok", "192,96\n")
    assert np.flatnonzero(GridDataset(tmp_path / "ok", tmp_path / "ok", 96, 32, 32, mpp_set=True).labels[0]).tolist() == [5]
    for name, text, why in (("wild", "999999999,96\n", "not a resolution"), ("long", "99999999999999999999,96\n",
                            "not `width,height`"), ("bytes", "\xff96,96\n", "not a text file")):
        grid_folder(tmp_path / name, text)
        with pytest.raises(CrfError, match=why):
            GridDataset(tmp_path / name, tmp_path / name, 96, 32, 32, mpp_set=True)


def test_patch_gen_refuses_mask_of_another_slide(syn_slide, syn_masks, tmp_path):
    other = tmp_path / "other.npy"
    mask, meta = masks.load_mask(syn_masks / "syn_tumor_tissue.npy")
    masks.save_mask(other, mask, {**meta, "slide": "someone_else.tif"})
    proc = call("Patch_gen.py", syn_slide.path, "--mask", other, "-o", tmp_path / "p", check=False)
    assert proc.returncode == 2 and "someone_else.tif" in proc.stderr
    proc = call("Patch_gen.py", syn_slide.path, "--mask", other, "-o", tmp_path / "a" / ".." / "p", check=False)
    assert proc.returncode == 2 and not (tmp_path / "a").exists() and not (tmp_path / "p").exists()  # no trace


def test_group_boxes_covers_every_box_once():
    rng = np.random.default_rng(0)
    xy = rng.integers(0, 20000, (500, 2))
    boxes = np.concatenate([xy, xy + 256], 1)
    groups = tiling.group_boxes(boxes, block=2048)
    idx = np.concatenate([g[1] for g in groups])
    assert sorted(idx.tolist()) == list(range(500))
    for (x0, y0, x1, y1), members in groups:
        b = boxes[members]
        assert (b[:, 0] >= x0).all() and (b[:, 3] <= y1).all()


def random_cut(syn_slide, syn_masks, out):
    """Patch_gen.py arguments for random 64-px patches of the synthetic tumour slide into `out`."""
    return [syn_slide.path, "--mask", syn_masks / "syn_tumor_tumor.npy", "-o", out, "--mode", "random",
            "--image-size", "64", "--workers", "0", "--quiet"]


def tiles_of(folder):
    return sorted(p.name for p in (folder / "syn_tumor").glob("tile_*.png"))


def test_an_unfinished_patch_folder_is_refused_and_its_tiles_cleared(syn_slide, syn_masks, tmp_path):
    args = random_cut(syn_slide, syn_masks, tmp_path / "p")
    call("Patch_gen.py", *args, "--num", "20")
    (tmp_path / "p" / "syn_tumor.txt").unlink()  # what a kill before the marker leaves
    res = call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds", check=False)
    assert res.returncode == 2 and "did not finish" in res.stderr and not (tmp_path / "ds" / "list.txt").exists()
    res = call("Patch_gen.py", *args, "--num", "5", "--seed", "3")
    assert "removing 20 tiles of an unfinished" in res.stderr and len(tiles_of(tmp_path / "p")) == 5
    res = call("Patch_gen.py", *args, "--num", "7", check=False)  # a finished slide is not mixed into
    assert res.returncode == 2 and "--overwrite" in res.stderr and len(tiles_of(tmp_path / "p")) == 5
    call("Patch_gen.py", *args, "--num", "7", "--overwrite")
    assert len(tiles_of(tmp_path / "p")) == 7
    call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds")
    assert len((tmp_path / "ds" / "list.txt").read_text().split()) == 7


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_overwrite_keeps_the_complete_set(syn_slide, syn_masks, tmp_path, monkeypatch, failure):
    from crfcore import datasets
    args = random_cut(syn_slide, syn_masks, tmp_path / "p")
    call("Patch_gen.py", *args, "--num", "6")
    folder, marker = tmp_path / "p" / "syn_tumor", tmp_path / "p" / "syn_tumor.txt"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}, marker.read_text()
    real, written = datasets.write_image, []

    def fails_after_three(path, img):
        if len(written) == 3:
            raise failure
        real(path, img)
        written.append(path)
    monkeypatch.setattr(datasets, "write_image", fails_after_three)
    res = call("Patch_gen.py", *args, "--num", "9", "--seed", "5", "--overwrite", check=False)
    monkeypatch.undo()
    assert res.returncode == (130 if isinstance(failure, KeyboardInterrupt) else 2) and len(written) == 3
    assert ({p.name: p.read_bytes() for p in folder.iterdir()}, marker.read_text()) == before
    assert not list((tmp_path / "p" / ".syn_tumor.partial").glob("*.png"))  # the new tiles cleared
    call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds")
    assert len((tmp_path / "ds" / "list.txt").read_text().split()) == 6
    call("Patch_gen.py", *args, "--num", "9", "--seed", "5", "--overwrite")  # and a run that succeeds replaces it
    assert len(tiles_of(tmp_path / "p")) == 9 and not (tmp_path / "p" / ".syn_tumor.partial").exists()


def test_what_a_killed_run_left_in_staging_never_blocks_a_later_run(syn_slide, syn_masks, tmp_path):
    """A kill -9 while cutting leaves the staging folder with new tiles and a writer's
    temporary file; the next run, with other settings, clears it and replaces the set."""
    args = random_cut(syn_slide, syn_masks, tmp_path / "p")
    call("Patch_gen.py", *args, "--num", "6")
    staging = tmp_path / "p" / ".syn_tumor.partial"
    staging.mkdir()
    (staging / "tile_3_level0_0-0-64-64.png").write_bytes(b"half")
    (staging / ".tile_4_level0_0-0-64-64.png.999999999.x1y2.png").write_bytes(b"half")
    res = call("Patch_gen.py", *args, "--num", "9", check=False)  # refused, but the leftovers are cleared
    assert res.returncode == 2 and "--overwrite" in res.stderr and not staging.exists()
    staging.mkdir()
    (staging / ".tile_4_level0_0-0-64-64.png.999999999.x1y2.png").write_bytes(b"half")
    call("Patch_gen.py", *args, "--num", "9", "--seed", "2", "--overwrite")
    assert len(tiles_of(tmp_path / "p")) == 9 and not staging.exists()
    call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds")
    assert len((tmp_path / "ds" / "list.txt").read_text().split()) == 9


def test_a_slide_folder_whose_tiles_cannot_be_replaced_is_refused_before_cutting(syn_slide, syn_masks, tmp_path,
                                                                                   monkeypatch):
    """As root a read-only folder is still writable, so the refusal is simulated where the
    probe file is made; what is tested is that nothing is cut or cleared before it."""
    args = random_cut(syn_slide, syn_masks, tmp_path / "p")
    call("Patch_gen.py", *args, "--num", "6")
    before = sorted(p.name for p in (tmp_path / "p").rglob("*"))

    def refuses(*_, **__):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuses)
    res = call("Patch_gen.py", *args, "--num", "9", "--overwrite", check=False)
    assert res.returncode == 2 and "syn_tumor: cannot replace its tiles (Operation not permitted)" in res.stderr
    assert sorted(p.name for p in (tmp_path / "p").rglob("*")) == before


def test_hard_links_fall_back_to_copies_across_file_systems(syn_slide, syn_masks, tmp_path):
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary folder")
    with tempfile.TemporaryDirectory(dir=other) as shm:
        call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tumor.npy", "-o", Path(shm) / "p",
             "--mode", "random", "--num", "4", "--image-size", "64", "--workers", "0", "--quiet")
        call("coord_list_gen.py", Path(shm) / "p", "-o", tmp_path / "ds")  # links by default
    assert len((tmp_path / "ds" / "list.txt").read_text().split()) == 4 and len(list((tmp_path / "ds").glob("*.png"))) == 4


def test_old_tiles_that_cannot_be_moved_aside_stay_with_their_marker(syn_slide, syn_masks, tmp_path, monkeypatch):
    """An old tile that cannot be moved (immutable, another user's) stops the replacement
    before the .txt goes: the old set stays complete, and the moved ones are put back."""
    args = random_cut(syn_slide, syn_masks, tmp_path / "p")
    call("Patch_gen.py", *args, "--num", "6")
    folder = tmp_path / "p" / "syn_tumor"
    before = sorted(p.name for p in (tmp_path / "p").rglob("*"))
    real, moved_old = os.replace, []

    def third_old_tile_refuses(src, dst):
        if Path(src).parent == folder:
            if len(moved_old) == 2:
                raise PermissionError(1, "Operation not permitted", str(src))
            moved_old.append(src)
        real(src, dst)
    monkeypatch.setattr(os, "replace", third_old_tile_refuses)
    res = call("Patch_gen.py", *args, "--num", "9", "--overwrite", check=False)
    monkeypatch.undo()
    assert res.returncode == 2 and "Operation not permitted" in res.stderr and len(moved_old) == 2
    assert sorted(p.name for p in (tmp_path / "p").rglob("*")) == before


def test_a_kill_while_old_tiles_are_moved_aside_is_undone_by_the_next_run(syn_slide, syn_masks, tmp_path):
    args = random_cut(syn_slide, syn_masks, tmp_path / "p")
    call("Patch_gen.py", *args, "--num", "6")
    held = tmp_path / "p" / ".syn_tumor.old"
    held.mkdir()
    for p in sorted((tmp_path / "p" / "syn_tumor").glob("tile_*.png"))[:3]:  # what a kill -9 there leaves
        os.replace(p, held / p.name)
    res = call("Patch_gen.py", *args, "--num", "9", check=False)  # refused: the set is complete again
    assert res.returncode == 2 and "--overwrite" in res.stderr and not held.exists()
    call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds")
    assert len((tmp_path / "ds" / "list.txt").read_text().split()) == 6


def test_a_replacement_that_fails_or_is_killed_after_the_old_txt_went_aside_is_undone(syn_slide, syn_masks, tmp_path,
                                                                                       monkeypatch):
    args = random_cut(syn_slide, syn_masks, tmp_path / "p")
    call("Patch_gen.py", *args, "--num", "6")
    out, folder = tmp_path / "p", tmp_path / "p" / "syn_tumor"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real, moved_in = os.replace, []

    def second_new_tile_fails(src, dst):  # a full disk or Ctrl-C while the new tiles move in
        if Path(src).parent.name == ".syn_tumor.partial" and Path(dst).parent == folder:
            if len(moved_in) == 2:
                raise KeyboardInterrupt
            moved_in.append(dst)
        real(src, dst)
    monkeypatch.setattr(os, "replace", second_new_tile_fails)
    assert call("Patch_gen.py", *args, "--num", "9", "--seed", "4", "--overwrite", check=False).returncode == 130
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    aside = out / ".syn_tumor.old"  # what a kill -9 at that moment leaves: the old set aside, new tiles in
    aside.mkdir()
    for p in folder.glob("tile_*.png"):
        os.replace(p, aside / p.name)
    os.replace(out / "syn_tumor.txt", aside / "syn_tumor.txt")
    (folder / "tile_7_level0_0-0-64-64.png").write_bytes(b"new")
    res = call("coord_list_gen.py", out, "-o", tmp_path / "ds", check=False)
    assert res.returncode == 2 and "stopped while replacing the tiles of syn_tumor" in res.stderr
    res = call("Patch_gen.py", *args, "--num", "9", check=False)  # the next run puts the old set back
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_full_disk_at_the_new_txt_and_a_killed_undo_keep_the_old_set(syn_slide, syn_masks, tmp_path, monkeypatch):
    from crfcore import tilefolder
    args = random_cut(syn_slide, syn_masks, tmp_path / "p")
    call("Patch_gen.py", *args, "--num", "6")
    out, folder = tmp_path / "p", tmp_path / "p" / "syn_tumor"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def disk_full(path, text):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(tilefolder, "atomic_write_text", disk_full)
    res = call("Patch_gen.py", *args, "--num", "9", "--seed", "4", "--overwrite", check=False)
    monkeypatch.undo()
    assert res.returncode == 2 and "No space left" in res.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    aside = out / ".syn_tumor.old"  # an undo killed half-way: new tiles gone, half the old ones back
    aside.mkdir()
    for p in sorted(folder.glob("tile_*.png"))[:3]:
        os.replace(p, aside / p.name)
    os.replace(out / "syn_tumor.txt", aside / tilefolder.RESTORING)
    assert call("Patch_gen.py", *args, "--num", "9", check=False).returncode == 2  # refused: complete again
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_txt_whose_folder_lost_its_tiles_is_refused_not_skipped(syn_slide, syn_masks, tmp_path):
    call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tumor.npy", "-o", tmp_path / "p",
         "--mode", "random", "--num", "4", "--image-size", "64", "--workers", "0", "--quiet")
    (tmp_path / "p" / "other").mkdir()  # a second slide of the folder, whose tiles are all gone
    (tmp_path / "p" / "other.txt").write_text("other,100,100\n")
    res = call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds", check=False)
    assert res.returncode == 2 and "other: no tiles, but other.txt lists centres" in res.stderr


def test_tiles_that_do_not_match_the_marker_are_refused(syn_slide, syn_masks, tmp_path):
    call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tumor.npy", "-o", tmp_path / "p",
         "--mode", "random", "--num", "4", "--image-size", "64", "--workers", "0", "--quiet")
    extra = tmp_path / "p" / "syn_tumor" / "tile_9_level0_0-0-64-64.png"
    extra.write_bytes((tmp_path / "p" / "syn_tumor").glob("tile_0_*.png").__next__().read_bytes())
    res = call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds", check=False)
    assert res.returncode == 2 and "5 tiles do not match the 4 centres" in res.stderr


def test_an_interrupted_move_is_undone_and_nothing_is_lost(syn_slide, syn_masks, tmp_path, monkeypatch):
    from crfcore import trainset
    call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tumor.npy", "-o", tmp_path / "p",
         "--mode", "random", "--num", "6", "--image-size", "64", "--workers", "0", "--quiet")
    before = {p.name: p.read_bytes() for p in (tmp_path / "p" / "syn_tumor").iterdir()}
    real, moved = trainset.place, []

    def dies_after_three(src, dst, how):
        if len(moved) == 3:
            raise KeyboardInterrupt  # killed in the middle of the moves
        real(src, dst, how)
        moved.append(dst)
    monkeypatch.setattr(trainset, "place", dies_after_three)
    assert call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds", "--move", check=False).returncode == 130
    monkeypatch.undo()
    assert len(list((tmp_path / "p" / "syn_tumor").iterdir())) == 3  # three are in the data set folder now
    res = call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds", "--overwrite", "--copy")
    assert "moved 3 images back" in res.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "p" / "syn_tumor").iterdir()} == before
    assert len((tmp_path / "ds" / "list.txt").read_text().split()) == 6
    call("coord_list_gen.py", tmp_path / "p", "-o", tmp_path / "ds2", "--move")
    assert not list((tmp_path / "p" / "syn_tumor").iterdir())
    assert sorted(p.name for p in (tmp_path / "ds2").iterdir()) == [f"{i}.png" for i in range(6)] + ["list.txt", "sides.txt"]


def test_directory_mode_pairs_masks_by_exact_stem(syn_slide, syn_masks, tmp_path):
    slides, mdir = tmp_path / "slides", tmp_path / "masks"
    slides.mkdir(), mdir.mkdir()
    (slides / "syn_tumor.tif").symlink_to(syn_slide.path)
    mask, meta = masks.load_mask(syn_masks / "syn_tumor_tumor.npy")
    masks.save_mask(mdir / "syn_tumor2_tumor.npy", mask, {**meta, "slide": "syn_tumor2.tif"})
    res = call("Patch_gen.py", slides, "--mask", mdir, "-o", tmp_path / "p", "--workers", "0", check=False)
    assert res.returncode == 2 and "no mask syn_tumor_<kind>.npy" in res.stderr  # never syn_tumor2's
    masks.save_mask(mdir / "syn_tumor_tumor.npy", mask, meta)
    masks.save_mask(mdir / "syn_tumor_tissue.npy", mask, {**meta, "kind": "tissue"})
    res = call("Patch_gen.py", slides, "--mask", mdir, "-o", tmp_path / "p", "--workers", "0", check=False)
    assert res.returncode == 2 and "--mask-kind" in res.stderr
    call("Patch_gen.py", slides, "--mask", mdir, "--mask-kind", "tumor", "-o", tmp_path / "p", "--image-size",
         "64", "--workers", "0", "--quiet")
    assert (tmp_path / "p" / "syn_tumor.txt").exists()


KILL_AFTER = """
import os, runpy, signal, sys
steps = [0]
def counted(real):
    def step(*a, **k):
        out = real(*a, **k)
        steps[0] += 1
        if steps[0] == int(os.environ["KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)  # as a kill -9 landing right after this rename or link
        return out
    return step
os.rename, os.replace, os.link = counted(os.rename), counted(os.replace), counted(os.link)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def two_tile_folders(syn_slide, syn_masks, tmp_path):
    for name, seed, num in (("a", "0", "5"), ("b", "1", "4")):
        call("Patch_gen.py", syn_slide.path, "--mask", syn_masks / "syn_tumor_tumor.npy", "-o", tmp_path / name,
             "--mode", "random", "--num", num, "--image-size", "64", "--seed", seed, "--workers", "0", "--quiet")


def dataset(folder):
    """list.txt and every image's bytes, in order."""
    lines = (folder / "list.txt").read_text().split()
    return lines, [(folder / f"{i}.png").read_bytes() for i in range(len(lines))]


def test_a_failed_overwrite_of_a_training_set_keeps_the_old_set(syn_slide, syn_masks, tmp_path):
    """--overwrite builds the new set beside the old one: a full disk while copying leaves
    the old set whole and no staging folder; a run that succeeds then replaces it."""
    two_tile_folders(syn_slide, syn_masks, tmp_path)
    call("coord_list_gen.py", tmp_path / "a", "-o", tmp_path / "ds", "--copy")
    old = dataset(tmp_path / "ds")
    with file_size_limit(100):  # a real failing file system: every image is larger
        res = call("coord_list_gen.py", tmp_path / "b", "-o", tmp_path / "ds", "--overwrite", "--copy", check=False)
    assert res.returncode == 2 and "cannot write" in res.stderr and "Traceback" not in res.stderr
    assert dataset(tmp_path / "ds") == old and not (tmp_path / "ds" / trainset.BUILD).exists()
    (tmp_path / "ds" / "notes.txt").write_text("mine")  # the rest of the folder is the user's
    call("coord_list_gen.py", tmp_path / "b", "-o", tmp_path / "ds", "--overwrite", "--copy")
    assert len(dataset(tmp_path / "ds")[0]) == 4 and (tmp_path / "ds" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [f"{i}.png" for i in range(4)] + [
        "list.txt", "notes.txt", "sides.txt"]  # the old set's surplus images are gone


@pytest.mark.parametrize("across", [False, True])
def test_a_killed_overwrite_leaves_the_old_set_or_the_new_one(syn_slide, syn_masks, tmp_path, across):
    """SIGKILL after each rename, replace or link of `--overwrite --move`: the next run's
    recovery leaves the folder holding exactly the old set or exactly the new one, and
    every moved image is whole, either back in its patch folder or in the new set; also
    with the patch folder on another file system (moves are copies there)."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT
    if across:
        shm = Path("/dev/shm")
        if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("needs /dev/shm on a file system of its own")
        patches = Path(tempfile.mkdtemp(dir=shm))
        tmp_path = tmp_path / "x"
        tmp_path.mkdir()
        (tmp_path / "b").symlink_to(patches)  # b's tiles live on the other file system
    two_tile_folders(syn_slide, syn_masks, tmp_path)
    call("coord_list_gen.py", tmp_path / "a", "-o", tmp_path / "ds", "--copy")
    old = dataset(tmp_path / "ds")
    tiles = {p.name: p.read_bytes() for p in (tmp_path / "b" / "syn_tumor").iterdir()}
    seen = set()
    for k in range(1, 20):
        run = tmp_path / f"k{k}"
        shutil.copytree(tmp_path / "ds", run / "ds")
        if across:
            (run / "b").symlink_to(shutil.copytree(tmp_path / "b", patches.with_name(f"{patches.name}{k}")))
        else:
            shutil.copytree(tmp_path / "b", run / "b")
        args = [str(ROOT / "coord_list_gen.py"), str(run / "b"), "-o", str(run / "ds"), "--overwrite", "--move"]
        proc = subprocess.run([sys.executable, "-c", KILL_AFTER, *args], env={**os.environ, "KILL_AFTER": str(k)},
                              capture_output=True, text=True, cwd=ROOT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "an earlier --overwrite was interrupted"
            trainset.recover_replacement(run / "ds")  # what the next run does first
            trainset.recover_moves(run / "ds")
        state = dataset(run / "ds")
        left = {p.name: p.read_bytes() for p in (run / "b" / "syn_tumor").iterdir()}
        if state == old:
            seen.add("old")
            assert left == tiles, k  # every moved image went back
        else:
            seen.add("new" if proc.returncode else "finished")
            assert len(state[0]) == 4 and sorted(state[1]) == sorted(tiles.values()) and not left, k
        assert not (run / "ds" / trainset.BUILD).exists(), k
        assert sorted(p.name for p in (run / "ds").glob("*.png")) == sorted(f"{i}.png" for i in range(len(state[0])))
    assert seen == {"old", "new", "finished"}
    if across:
        for folder in patches.parent.glob(f"{patches.name}*"):
            shutil.rmtree(folder)


def test_rerunning_a_killed_overwrite_move_finishes_it(syn_slide, syn_masks, tmp_path):
    """From a kill -9 sweep: killed while or after swapping the new set in, the rerun of
    the same `--overwrite --move` exited 2 ('no tiles, but ... lists centres': they had
    been moved into the set). Every rerun now ends with the new set and exit 0."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT
    two_tile_folders(syn_slide, syn_masks, tmp_path)
    call("coord_list_gen.py", tmp_path / "a", "-o", tmp_path / "ds", "--copy")
    new = sorted(p.read_bytes() for p in (tmp_path / "b" / "syn_tumor").iterdir())
    finished = swapping = 0
    for k in range(1, 20):
        run = tmp_path / f"k{k}"
        shutil.copytree(tmp_path / "ds", run / "ds")
        shutil.copytree(tmp_path / "b", run / "b")
        args = [str(run / "b"), "-o", str(run / "ds"), "--overwrite", "--move"]
        subprocess.run([sys.executable, "-c", KILL_AFTER, str(ROOT / "coord_list_gen.py"), *args],
                       env={**os.environ, "KILL_AFTER": str(k)}, capture_output=True, cwd=ROOT)
        if not (run / "ds" / "list.txt").exists():  # killed in the swap: train.py's reader says what to do
            with pytest.raises(CrfError, match="an interrupted coord_list_gen.py --overwrite: run it again"):
                GridDataset(run / "ds", tmp_path, 64, 32, 32)
            swapping += 1
        res = call("coord_list_gen.py", *args, check=False)
        assert res.returncode == 0, (k, res.stderr)
        lines, images = dataset(run / "ds")
        assert len(lines) == 4 and sorted(images) == new, k
        finished += "moved there by an earlier run" in res.stdout
    assert finished and swapping  # some kills landed after the last move, some in the swap
    res = call("coord_list_gen.py", tmp_path / "a", "-o", tmp_path / "k1" / "ds", "--overwrite", "--move", check=False)
    assert res.returncode == 0  # tiles present: an ordinary run


@pytest.mark.parametrize("where", ["dot", "symlink"])
def test_overwrite_works_in_place_for_dot_and_a_linked_folder(syn_slide, syn_masks, tmp_path, where):
    """The new set is moved over the old one inside DATASET_DIR, so `-o .` and a symlink
    (the target is replaced, the link stays a link) work as a plain folder does."""
    import subprocess
    import sys

    from conftest import ROOT
    two_tile_folders(syn_slide, syn_masks, tmp_path)
    real = tmp_path / "store" / "real"
    call("coord_list_gen.py", tmp_path / "a", "-o", real, "--copy")
    target = real if where == "dot" else tmp_path / "ds"
    if where == "symlink":
        target.symlink_to(real)
    args = [str(ROOT / "coord_list_gen.py"), str(tmp_path / "b"), "-o", "." if where == "dot" else str(target),
            "--overwrite", "--move"]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=real if where == "dot" else ROOT)
    assert proc.returncode == 0, proc.stderr
    assert len(dataset(real)[0]) == 4 and (where == "dot" or target.is_symlink())
    assert sorted(p.name for p in real.iterdir()) == [f"{i}.png" for i in range(4)] + ["list.txt", "sides.txt"]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["real"]


def test_a_slide_whose_name_has_a_comma_is_refused_before_cutting(syn_slide, syn_masks, tmp_path):
    (tmp_path / "a,b.tif").symlink_to(syn_slide.path)  # its coords lines would not parse
    res = call("Patch_gen.py", tmp_path / "a,b.tif", "--mask", syn_masks / "syn_tumor_tissue.npy", "-o",
               tmp_path / "p", "--workers", "0", check=False)
    assert res.returncode == 2 and "a comma, line break or space at either end of the slide's name" in res.stderr and not (tmp_path / "p").exists()


def test_random_centres_are_distinct_and_odd_tile_names_are_not_tiles():
    """A one-pixel mask at downsample 1 draws its pixel again and again: one centre, not
    five equal tiles that coord_list_gen would refuse; a name with an empty or reversed
    box is not a tile (it would put a side of 0 or less in sides.txt)."""
    mask = np.zeros((4, 4), bool)
    mask[1, 2] = True
    assert tiling.random_centres(mask, (1.0, 1.0), 5, np.random.default_rng(0)).tolist() == [[2, 1]]
    many = tiling.random_centres(np.ones((64, 64), bool), (16.0, 16.0), 50, np.random.default_rng(1))
    assert len(many) == 50 and len(np.unique(many, axis=0)) == 50
    for name in ("tile_0_level0_100-100-0-0.png", "tile_0_level0_5-5-5-9.png", "tile_0_level0_0-0-9999999999-9.png"):
        assert tiling.parse_tile_name(Path(name)) is None, name
    assert tiling.parse_tile_name(Path("tile_3_level1_0-0-128-128.png")).side == (128, 128)


def test_overwrite_leaves_what_is_not_its_own_and_runs_one_at_a_time(syn_slide, syn_masks, tmp_path):
    """Files that only look numbered (007.png), a folder at a name the new set needs, a
    .overwrite.new the user made (or linked) and a second concurrent run: each is left
    alone or refused before the old set is touched."""
    two_tile_folders(syn_slide, syn_masks, tmp_path)
    ds = tmp_path / "ds"
    call("coord_list_gen.py", tmp_path / "a", "-o", ds, "--copy")
    old = dataset(ds)
    (ds / "007.png").write_bytes(b"mine")
    (ds / "2.png").unlink()
    (ds / "2.png").mkdir()  # the new set's 2.png goes there
    res = call("coord_list_gen.py", tmp_path / "b", "-o", ds, "--overwrite", "--copy", check=False)
    assert res.returncode == 2 and "2.png: is not a file" in res.stderr and (ds / "list.txt").exists()
    (ds / "2.png").rmdir()
    (ds / "2.png").write_bytes(old[1][2])
    for made in ("folder", "link"):
        build = ds / trainset.BUILD
        if made == "folder":
            build.mkdir()
        else:
            build.rmdir()
            build.symlink_to(tmp_path / "a")
        res = call("coord_list_gen.py", tmp_path / "b", "-o", ds, "--overwrite", "--copy", check=False)
        assert res.returncode == 2 and "not a folder coord_list_gen.py made" in res.stderr, made
        assert dataset(ds) == old and (tmp_path / "a" / "syn_tumor").is_dir()
    (ds / trainset.BUILD).unlink()
    with trainset.locked(ds):
        res = call("coord_list_gen.py", tmp_path / "b", "-o", ds, "--overwrite", "--copy", check=False)
        with pytest.raises(trainset.TrainSetError, match="coord_list_gen.py is writing this folder"):
            trainset.read_lock(ds)  # what a training run takes first
    assert res.returncode == 2 and "another coord_list_gen.py, or a train.py run, is using" in res.stderr
    reading = trainset.read_lock(ds)  # a training run reads the set
    res = call("coord_list_gen.py", tmp_path / "b", "-o", ds, "--overwrite", "--copy", check=False)
    os.close(reading)
    assert res.returncode == 2 and "or a train.py run, is using this folder" in res.stderr
    call("coord_list_gen.py", tmp_path / "b", "-o", ds, "--overwrite", "--copy")
    assert len(dataset(ds)[0]) == 4 and (ds / "007.png").read_bytes() == b"mine"


def test_an_interrupted_move_is_undone_from_any_folder(syn_slide, syn_masks, tmp_path):
    """The move journal holds absolute paths: a run killed mid-move with relative paths is
    undone by a next run started elsewhere, every image back in its patch folder."""
    import subprocess
    import sys

    from conftest import ROOT
    two_tile_folders(syn_slide, syn_masks, tmp_path)
    tiles = {p.name: p.read_bytes() for p in (tmp_path / "b" / "syn_tumor").iterdir()}
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER, str(ROOT / "coord_list_gen.py"), "b", "-o", "ds",
                           "--overwrite", "--move"], env={**os.environ, "KILL_AFTER": "3"}, cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == -9 and len(list((tmp_path / "b" / "syn_tumor").iterdir())) < len(tiles)
    call("coord_list_gen.py", tmp_path / "a", "-o", tmp_path / "ds", "--overwrite", "--copy")  # cwd: elsewhere
    assert {p.name: p.read_bytes() for p in (tmp_path / "b" / "syn_tumor").iterdir()} == tiles


def test_an_empty_set_never_replaces_a_good_one_and_a_foreign_txt_is_kept(syn_slide, syn_masks, tmp_path):
    """From a hostile review: these replaced 65 tiles with none, exit 0, or deleted an annotation."""
    base = [syn_slide.path, "--mask", syn_masks / "syn_tumor_tissue.npy", "-o", tmp_path / "p", "--workers", "0",
            "--quiet", "--image-size", "256"]
    call("Patch_gen.py", *base)
    marker, before = tmp_path / "p" / "syn_tumor.txt", sorted((tmp_path / "p" / "syn_tumor").iterdir())
    coords = tmp_path / "c.txt"
    coords.write_text("syn_tumor.tif,100,100\n")  # the id carries the extension: names no slide
    for extra in (["--mode", "coords", "--coords", coords], ["--image-size", "100000"]):
        res = call("Patch_gen.py", *base, "--overwrite", *extra, check=False)
        assert res.returncode == 2 and "no patch to cut" in res.stderr and "patches in" in res.stderr
        assert sorted((tmp_path / "p" / "syn_tumor").iterdir()) == before and marker.stat().st_size
    # with no set to protect, a slide no line names gets none, as before (a normal slide of a hard-negative list)
    res = call("Patch_gen.py", *base[:4], tmp_path / "fresh", *base[5:], "--mode", "coords", "--coords", coords)
    assert "no line names slide 'syn_tumor'" in res.stderr and "0 patches" in res.stdout
    res = call("Patch_gen.py", *base[:-2], "--mpp", "0.001", "--image-size", "16", check=False)
    assert res.returncode == 2 and "250 times finer than the slide's level 0" in res.stderr
    res = call("Patch_gen.py", *base[:-2], "--mpp", "0.02", "--image-size", "8", check=False)
    assert res.returncode == 2 and "under one pixel" in res.stderr
    annotation = "0,0\n10,0\n10,10\n"  # a vertex list named like the marker
    other = tmp_path / "q"
    other.mkdir()
    (other / "syn_tumor.txt").write_text(annotation)
    res = call("Patch_gen.py", *base[:4], other, *base[5:], "--overwrite", check=False)
    assert res.returncode == 2 and "is not Patch_gen's list" in res.stderr
    assert (other / "syn_tumor.txt").read_text() == annotation


def test_a_coords_list_never_takes_an_id_it_cannot_hold():
    """From a code review: the slide-id rule lived in Patch_gen only, so `evaluate.py
    negatives` could write a coords list that reading refuses."""
    from crfcore import tiling

    assert tiling.format_coords("a b", np.array([[1, 2]])) == "a b,1,2\n"
    for bad in ("a,b", "a\nb", " a", "a\udcffb"):  # the last: a file name that is not UTF-8
        with pytest.raises(tiling.TilingError, match="coords list"):
            tiling.format_coords(bad, np.array([[1, 2]]))
    assert tiling.format_coords("a,b", np.zeros((0, 2))) == ""  # no line to write: nothing to refuse


def test_a_coords_list_may_start_with_a_header_line(tmp_path):
    """A spreadsheet's header (`slide_id,x,y`) is skipped; anywhere else, or with numbers
    in it, a line that does not parse is an error that says what a line must hold."""
    path = tmp_path / "c.txt"
    path.write_text("slide_id,x,y\nsyn_tumor,100,200\n\nsyn_tumor,7.6,8\n")
    assert tiling.read_coords(path) == [("syn_tumor", 100, 200), ("syn_tumor", 8, 8)]
    for text, line in (("syn_tumor,1,2\nslide_id,x,y\n", 2), ("slide_id,x,5\n", 1), ("slide_id,x\n", 1)):
        path.write_text(text)
        with pytest.raises(tiling.TilingError, match=rf"c.txt:{line}: expected 'slide_id,x,y' with numbers x and y"):
            tiling.read_coords(path)


def test_a_preview_a_kill_left_unwritten_is_drawn_on_the_next_run(syn_slide, syn_masks, tmp_path):
    """From a hostile review: a kill after `<slide>.txt` (the set's commit) and before the
    preview left a set without one, and every later run refused the slide ("already has
    its patches") without drawing it. It is drawn from the tiles' names, as the first run
    drew it."""
    args = [syn_slide.path, "--mask", syn_masks / "syn_tumor_tumor.npy", "-o", tmp_path,
            "--mode", "random", "--num", "12", "--image-size", "128", "--workers", "0", "--quiet"]
    call("Patch_gen.py", *args)
    preview = tmp_path / "syn_tumor_preview.png"
    first = read_png(preview)
    preview.unlink()  # as the kill left it
    res = call("Patch_gen.py", *args, check=False)
    assert res.returncode == 2 and "already has its patches" in res.stderr and "drawn from their names" in res.stderr
    assert np.array_equal(read_png(preview), first)
    preview.unlink()  # a review: with the tiles gone too, an empty preview was drawn "from their names"
    shutil.rmtree(tmp_path / "syn_tumor")
    res = call("Patch_gen.py", *args, check=False)
    assert res.returncode == 2 and "drawn from" not in res.stderr and not preview.exists()


def test_opencv_runs_single_threaded_where_readers_fork():
    """A kill -9 sweep saw a Patch_gen.py worker hang for ever in a lock of OpenCV's thread
    pool, inherited locked by the fork; with workers, OpenCV runs without its pool."""
    import subprocess
    import sys

    from conftest import ROOT
    code = ("import cv2; from crfcore.device import fork_safe_opencv; n = cv2.getNumThreads(); "
            "fork_safe_opencv(0); kept = cv2.getNumThreads(); fork_safe_opencv(2); print(n, kept, cv2.getNumThreads())")
    n, kept, after = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout.split()
    assert kept == n and after == "1"
