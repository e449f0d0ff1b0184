"""Map TIFFs for other tools: values, levels, compression and OME layout."""
import cv2
import numpy as np
import pytest
import tifffile

from crfcore import heatmap, io
from crfcore import slide as sl
from conftest import call


@pytest.fixture(scope="module")
def prob():
    p = np.zeros((48, 64), np.float32)
    p[10:20, 20:30] = 0.8
    p[30, 40] = 0.25
    return p


@pytest.mark.parametrize("values", heatmap.TIFF_VALUES)
def test_map_tiff_values_levels_and_compression(prob, tmp_path, values):
    levels = [(2048, 1536), (1024, 768), (512, 384)]  # a slide's own pyramid
    path = tmp_path / "m.tif"
    heatmap.write_map_tiff(path, prob, levels[0], 0.5, values, slide_levels=levels)
    with tifffile.TiffFile(path) as t:
        assert [p.shape[:2][::-1] for p in t.pages] == levels  # over slide level i lies map level i
        assert {p.compression for p in t.pages} == {32946}  # deflate: ASAP, OpenSlide, Bio-Formats
        level0 = t.pages[0].asarray()
        assert t.pages[0].tags["XResolution"].value == (20000, 1)  # 0.5 um/px in pixels per cm
    block = level0[15 * 32 + 5, 25 * 32 + 5]
    want = {"uint8": 204, "float32": np.float32(0.8), "colour": [255, 104, 0]}[values]
    assert np.array_equal(block, want)
    assert np.array_equal(level0[30 * 32 + 16, 40 * 32 + 16], {"uint8": 64, "float32": np.float32(0.25),
                                                              "colour": heatmap.colourise(np.float32([[0.25]]))[0, 0]}[values])
    assert np.array_equal(level0[0, 0], {"uint8": 0, "float32": 0.0, "colour": [255, 255, 255]}[values])
    if values != "float32":  # OpenSlide reads 8-bit samples only
        s = sl.open_slide(path)
        assert s.dimensions == (2048, 1536) and sl.slide_mpp(s) == pytest.approx((0.5, 0.5))


def test_ome_tiff_for_qupath_has_subifd_levels(prob, tmp_path):
    path = tmp_path / "m.ome.tif"
    heatmap.write_map_tiff(path, prob, (2048, 1536), 0.5, "uint8", slide_levels=[(2048, 1536), (1024, 768)])
    with tifffile.TiffFile(path) as t:
        assert t.is_ome and len(t.series[0].levels) == 3
        assert [lv.shape for lv in t.series[0].levels] == [(1536, 2048), (768, 1024), (384, 512)]
        assert 'PhysicalSizeX="0.5"' in t.ome_metadata


def test_prob_map_show_writes_the_slides_pyramid(syn_slide, prob, tmp_path):
    s = sl.open_slide(syn_slide.path)
    h, w = s.dimensions[1] // 32, s.dimensions[0] // 32
    heatmap.save_probability_map(tmp_path / "syn_tumor_prob.npy", np.pad(prob, ((0, h - 48), (0, w - 64))),
                                 {"slide": syn_slide.path.name, "downsample": [32.0, 32.0], "level": 5})
    call("prob_map_show.py", tmp_path / "syn_tumor_prob.npy", "-o", tmp_path / "o.png", "--slide", syn_slide.path,
         "--tiff", tmp_path / "o.tif", "--tiff-values", "float32")
    with tifffile.TiffFile(tmp_path / "o.tif") as t:
        sizes = [p.shape[::-1] for p in t.pages]
    assert sizes[:s.level_count] == list(s.level_dimensions) and t.pages is not None


def test_prob_map_show_never_writes_over_its_inputs(syn_slide, prob, tmp_path):
    """From a hostile review: --tiff SLIDE (or -o SLIDE.tif) replaced the slide with exit 0."""
    import shutil

    slide = tmp_path / syn_slide.path.name
    shutil.copy(syn_slide.path, slide)
    s = sl.open_slide(slide)
    h, w = s.dimensions[1] // 32, s.dimensions[0] // 32
    m = tmp_path / "syn_tumor_prob.npy"
    heatmap.save_probability_map(m, np.pad(prob, ((0, h - 48), (0, w - 64))),
                                 {"slide": slide.name, "downsample": [32.0, 32.0], "level": 5})
    before = slide.read_bytes()
    for outs in (["-o", tmp_path / "o.png", "--tiff", slide], ["-o", slide], ["-o", tmp_path / "syn_tumor_prob.json"],
                 ["-o", tmp_path / "o.tif", "--tiff", tmp_path / "o.tif"]):
        res = call("prob_map_show.py", m, *outs, "--slide", slide, check=False)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, (outs, res.stderr)
    assert slide.read_bytes() == before and not (tmp_path / "o.tif").exists()
    other = tmp_path / "other.tif"  # a slide that is not an input of the run
    shutil.copy(syn_slide.path, other)
    for outs, why in ((["-o", tmp_path / "o.png", "--tiff", other], "is not a heat-map TIFF this tool wrote"),
                      (["-o", other], "is a slide")):
        res = call("prob_map_show.py", m, *outs, "--slide", slide, check=False)
        assert res.returncode == 2 and why in res.stderr, res.stderr
    assert other.read_bytes() == before
    plain = tmp_path / "photo.tif"  # a review: a TIFF OpenSlide cannot open was replaced, exit 0
    tifffile.imwrite(plain, np.zeros((8, 8, 3), np.uint8))
    before_plain = plain.read_bytes()
    res = call("prob_map_show.py", m, "-o", tmp_path / "o.png", "--slide", slide, "--tiff", plain, check=False)
    assert res.returncode == 2 and "photo.tif: exists and is not a heat-map TIFF" in res.stderr
    assert plain.read_bytes() == before_plain
    for _ in range(2):  # its own map TIFF and a TIFF plot it wrote are replaced on a second run
        call("prob_map_show.py", m, "-o", tmp_path / "p.tif", "--slide", slide, "--tiff", tmp_path / "map.tif")


def test_a_map_as_thin_as_a_line_is_drawn(tmp_path):
    """A 6000 x 1 map asked for a 48,000-inch figure, and matplotlib crashed the process."""
    heatmap.save_probability_map(tmp_path / "t_prob.npy", np.full((6000, 1), 0.5, np.float32),
                                 {"slide": "t.tif", "downsample": [16.0, 16.0]})
    call("prob_map_show.py", tmp_path / "t_prob.npy", "-o", tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0


@pytest.mark.parametrize("values", heatmap.TIFF_VALUES)
def test_a_one_pixel_lesion_survives_every_level(tmp_path, values):
    """From a hostile review: levels coarser than the map took every other map pixel, so a
    one-pixel hot spot vanished from the overview; they keep the largest value under a pixel."""
    p = np.zeros((720, 1200), np.float32)
    p[602, 1100] = 0.9  # a pixel that sampling every 1.2th map pixel skips, far from the corner
    p[3, 3] = 0.2  # lower values elsewhere do not hide it
    path = tmp_path / "m.tif"
    heatmap.write_map_tiff(path, p, (8000, 4800), None, values)
    hot = {"uint8": 230, "float32": np.float32(0.9), "colour": heatmap.colourise(np.float32([[0.9]]))[0, 0]}[values]
    with tifffile.TiffFile(path) as t:
        levels = [page.asarray() for page in t.pages]
    assert levels[-1].shape[1] < 1200  # some levels are coarser than the map
    for level in levels:
        found = (level == hot).all(-1) if values == "colour" else level == hot
        (r, c), h, w = np.argwhere(found).mean(0), *level.shape[:2]
        assert found.sum() >= 1 and abs(r / h - 602.5 / 720) < 2 / h and abs(c / w - 1100.5 / 1200) < 2 / w, level.shape


def test_max_pooled_partitions_the_map():
    p = np.arange(35, dtype=np.float32).reshape(5, 7)
    assert heatmap.max_pooled(p, 3, 2).tolist() == [[8, 10, 13], [29, 31, 34]]  # columns 0-1, 2-3, 4-6
    assert heatmap.max_pooled(p, 7, 5) is p


def test_a_picture_replaces_only_a_picture_this_tool_wrote(prob, tmp_path):
    """From a hostile review: `prob_map_show.py -o DATASET/0.png` replaced a training image,
    `evaluate.py --plot` a patch or a text file named .pdf, all with exit 0. Every picture
    now carries a mark of its writer, in each format written."""
    m = tmp_path / "s_prob.npy"
    heatmap.save_probability_map(m, prob, {"slide": "s.tif", "downsample": [32.0, 32.0]})
    for fmt in io.PICTURE_MARKS:  # written, marked, and replaced on a second run
        out = tmp_path / f"p.{fmt}"
        for _ in range(2):
            call("prob_map_show.py", m, "-o", out)
        assert io.is_own_picture(out), fmt
    cv2.imwrite(str(tmp_path / "0.png"), np.zeros((96, 96, 3), np.uint8))  # a training image
    (tmp_path / "notes.pdf").write_text("my notes")
    tifffile.imwrite(tmp_path / "photo.tif", np.zeros((8, 8, 3), np.uint8))
    for name in ("0.png", "notes.pdf", "photo.tif"):
        before = (tmp_path / name).read_bytes()
        res = call("prob_map_show.py", m, "-o", tmp_path / name, check=False)
        assert res.returncode == 2 and "exists and is not a picture this tool wrote" in res.stderr, res.stderr
        assert (tmp_path / name).read_bytes() == before
    res = call("prob_map_show.py", m, "-o", tmp_path / "p.webp", check=False)  # a format it cannot mark
    assert res.returncode == 2 and "cannot write a .webp picture" in res.stderr
    big = tmp_path / "big.tif"  # a review: a slide-sized image was a PIL DecompressionBombError traceback
    tifffile.imwrite(big, np.zeros((16384, 16384, 3), np.uint8), tile=(256, 256), compression="zlib")
    res = call("prob_map_show.py", m, "-o", big, check=False)
    assert res.returncode == 2 and "is a slide" in res.stderr and res.stderr.count("\n") == 1, res.stderr
