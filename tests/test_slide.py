import cv2
import numpy as np
import pytest

from crfcore import slide as sl
from conftest import SHARED, shared

REAL = ["CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs", "boxes.tiff", "small.svs",
        "boxes_0.dcm", "boxes_1.dcm"]


@pytest.mark.parametrize("name", REAL)
def test_real_slides_open_and_read(name):
    s = sl.open_slide(shared("slides", name))
    w0, h0 = s.dimensions
    assert s.level_count >= 1 and w0 > 0 and h0 > 0
    ds = sl.level_downsamples(s)
    assert ds[0] == (1.0, 1.0)
    for (w, h), (dx, dy) in zip(s.level_dimensions, ds):
        assert dx == pytest.approx(w0 / w) and dy == pytest.approx(h0 / h)
    # a region at the coarsest level equals the same region read at level 0 and resized
    lvl = s.level_count - 1
    lw, lh = s.level_dimensions[lvl]
    small = sl.read_rgb(s, (0, 0), lvl, (lw, lh))
    assert small.shape == (lh, lw, 3) and small.dtype == np.uint8
    if lvl:
        full = cv2.resize(sl.read_rgb(s, (0, 0), 0, (w0, h0)), (lw, lh), interpolation=cv2.INTER_AREA)
        assert np.abs(full.astype(int) - small.astype(int)).mean() < 12


def test_tcga_downsample_is_not_two():
    s = sl.open_slide(shared("slides", "tcga-cr-7395-01a-01-ts1.svs"))
    dx, dy = sl.level_downsamples(s)[1]
    assert dx != 2.0 and dy != 2.0 and dx == pytest.approx(4443 / 2221)
    assert sl.level_for_downsample(s, 2) == 1
    assert sl.level_for_downsample(s, 1.5) == 0
    assert sl.slide_mpp(s) is None


@pytest.mark.parametrize("name", ["broken.svs", "kidney-48-5.tif", "unopenable.tiff", "unreadable.svs"])
def test_broken_slides_raise_slide_error(name):
    path = shared("bad-slides", name)
    with pytest.raises(sl.SlideError, match=name):
        sl.open_slide(path)


def test_missing_and_non_slide_files(tmp_path):
    with pytest.raises(sl.SlideError, match="no such file"):
        sl.open_slide(tmp_path / "nope.svs")
    text = tmp_path / "notes.txt"
    text.write_text("not a slide")
    with pytest.raises(sl.SlideError, match="notes.txt"):
        sl.open_slide(text)
    with pytest.raises(sl.SlideError, match="directory"):
        sl.open_slide(tmp_path)


def test_outside_pixels_are_white():
    s = sl.open_slide(shared("slides", "CMU-1-Small-Region.svs"))
    w0, h0 = s.dimensions
    region = sl.read_rgb(s, (w0 - 10, h0 - 10), 0, (20, 20))
    assert (region[10:, 10:] == 255).all()
    assert not (region[:10, :10] == 255).all()


def test_thumbnail_shapes():
    s = sl.open_slide(shared("slides", "CMU-1-Small-Region.svs"))
    thumb = sl.thumbnail(s, 16)
    assert thumb.shape == (int(np.ceil(2967 / 16)), int(np.ceil(2220 / 16)), 3)
    b = sl.open_slide(SHARED / "slides" / "boxes.tiff")
    assert sl.thumbnail(b, 4).shape == (62, 75, 3)  # an existing level is used as is


def test_synthetic_slide_round_trip(syn_slide):
    s = sl.open_slide(syn_slide.path)
    assert s.dimensions == (2048, 1536)
    assert sl.slide_mpp(s) == pytest.approx((0.25, 0.25))
    assert [round(d[0]) for d in sl.level_downsamples(s)][:7] == [1, 2, 4, 8, 16, 32, 64]
    assert len(syn_slide.annotation.positive) == 2
    # planted tumour is darker than normal tissue, glass is bright
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1, (4000, 2)) * (2048, 1536)
    tumour = syn_slide.annotation.contains(pts)
    tissue = syn_slide.tissue_contains(pts)
    img = sl.read_rgb(s, (0, 0), 0, s.dimensions).astype(float).mean(axis=2)
    blur = cv2.blur(img, (31, 31))
    val = blur[pts[:, 1].astype(int), pts[:, 0].astype(int)]
    assert val[tumour].mean() + 20 < val[tissue & ~tumour].mean() < val[~tissue].mean() - 20


def test_rgba_to_rgb_composites_over_white_and_keeps_opaque_pixels():
    from crfcore.slide import rgba_to_rgb

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    assert np.array_equal(rgba_to_rgb(rgba), rgba[..., :3])  # the opaque fast path
    rgba[0, 0] = (10, 20, 30, 0)  # transparent: white
    rgba[0, 1] = (0, 100, 200, 128)  # half: halfway to white
    out = rgba_to_rgb(rgba)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (127, 177, 227)
    assert np.array_equal(out[1:], rgba[1:, :, :3])


@pytest.mark.parametrize("name", REAL)
def test_direct_reads_equal_openslide_python_images(name, monkeypatch):
    """read_rgb reads OpenSlide's buffer into numpy itself (DIRECT_READ); it gives what
    openslide-python's PIL image gives, over white and over black, across the slide's edge."""
    assert sl.DIRECT_READ  # on this little-endian machine with openslide-python 1.x
    s = sl.open_slide(shared("slides", name))
    w0, h0 = s.dimensions
    boxes = [((0, 0), (min(w0, 300), min(h0, 200))), ((w0 - 40, h0 - 30), (90, 70)), ((-5, -7), (30, 20))]
    reads = [(xy, 0, size, bg) for xy, size in boxes for bg in (255, 0)]
    top = s.level_count - 1  # off its pixel grid: partly transparent seams and edges
    reads += [((3, 5), top, s.level_dimensions[top], bg) for bg in (255, 128, 0)]
    if name.startswith("tcga"):  # level 1 (downsample 2.0005): tile-corner seams, the last row and column
        reads += [((2049, 2049), 1, (600, 600), 255), ((1488, 3551), 1, (455, 363), 235)]
    direct = [sl.read_rgb(s, *r) for r in reads]
    monkeypatch.setattr(sl, "DIRECT_READ", False)
    via_pil = [sl.read_rgb(s, *r) for r in reads]
    for a, b in zip(direct, via_pil):
        assert a.shape == b.shape and np.array_equal(a, b)
    assert (direct[2][-1, -1] == 255).all() and (direct[5][0, 0] == 0).all()  # outside: the background


@pytest.mark.parametrize("name", REAL)
def test_level_0_reads_in_parallel_bands_equal_one_read(name, monkeypatch):
    """A large level-0 region read as row bands by several threads at once gives the
    pixels of one read and of openslide-python's image, for 2, 3 and 4 bands, also across
    the slide's edge; other levels are read in one call."""
    s = sl.open_slide(shared("slides", name))
    w0, h0 = s.dimensions
    boxes = [((0, 0), (min(w0, 1500), min(h0, 1100))), ((w0 - 700, h0 - 500), (900, 703))]
    monkeypatch.setattr(sl, "PARALLEL_READ_PIXELS", 2**40)
    one = [sl.read_rgb(s, xy, 0, size) for xy, size in boxes]
    monkeypatch.setattr(sl, "PARALLEL_READ_PIXELS", 2**16)
    for threads in (2, 3, 4):
        monkeypatch.setattr(sl, "READ_THREADS", threads)
        for (xy, size), want in zip(boxes, one):
            assert np.array_equal(sl.read_rgb(s, xy, 0, size), want)
    monkeypatch.setattr(sl, "DIRECT_READ", False)
    assert all(np.array_equal(sl.read_rgb(s, xy, 0, size), want) for (xy, size), want in zip(boxes, one))


def test_forked_readers_read_in_bands_too(syn_slide):
    """DataLoader workers forked after the parent read in bands read in bands as well."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Regions(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            with sl.open_slide(syn_slide.path) as s:
                return torch.from_numpy(sl.read_rgb(s, (0, 0), 0, (2048, 1536 - i)))

    with sl.open_slide(syn_slide.path) as s:
        want = sl.read_rgb(s, (0, 0), 0, (2048, 1536))
    got = list(DataLoader(Regions(), batch_size=None, num_workers=2, multiprocessing_context="fork"))
    assert np.array_equal(got[0].numpy(), want) and np.array_equal(got[1].numpy(), want[:-1])


def test_premultiplied_pixels_composite_over_the_background():
    bgra = np.full((2, 3, 4), 255, np.uint8)
    bgra[0, 0] = (0, 0, 0, 0)  # transparent
    bgra[0, 1] = (100, 50, 0, 128)  # RGB (0, 100, 200) at alpha 128, premultiplied
    bgra[1, 0] = (200, 200, 200, 0)  # an invalid word (colour without alpha): still the background
    out = sl.premultiplied_to_rgb(bgra)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (127, 177, 227)
    assert tuple(out[1, 2]) == (255, 255, 255)
    over_black = sl.premultiplied_to_rgb(bgra, 0)
    assert tuple(over_black[0, 1]) == (0, 50, 100) and tuple(over_black[1, 0]) == (0, 0, 0)
    # every (alpha, colour) pair as openslide-python's image of it composites (its rounding)
    a, c = np.divmod(np.arange(256 * 256), 256)
    pairs = np.stack([c, c, c, a], 1).astype(np.uint8).reshape(256, 256, 4)
    words = pairs.copy().view(np.uint32)[..., 0]
    from openslide import _convert
    _convert.argb2rgba(words)
    for bg in (255, 97, 0):
        want = sl.rgba_to_rgb(words.view(np.uint8).reshape(256, 256, 4), bg)
        assert np.array_equal(sl.premultiplied_to_rgb(pairs, bg), want)


def test_a_corrupt_tile_is_an_error_naming_the_slide_and_the_region(syn_slide, tmp_path):
    path = tmp_path / "corrupt.tif"
    data = bytearray(syn_slide.path.read_bytes())
    data[len(data) // 3:len(data) // 3 + 20000] = b"\x26\x04" * 10000  # tile bytes that are not a JPEG
    path.write_bytes(bytes(data))
    with pytest.raises(sl.SlideError, match=r"corrupt.tif: (cannot read the 2048x1536 region at \(0, 0\), level 0|"
                                            r"OpenSlide cannot read its pixels)"):
        with sl.open_slide(path) as s:
            sl.read_rgb(s, (0, 0), 0, s.dimensions)


def test_hidden_files_are_not_slides(syn_slide, tmp_path):
    """A writer's temporary file left in a slide folder (`.x.tif.PID.tmp.tif`) is skipped."""
    (tmp_path / "a.tif").symlink_to(syn_slide.path)
    (tmp_path / ".a.tif.4242.x.tif").write_bytes(b"half a slide")
    (tmp_path / "notes.txt").write_text("x")
    assert sl.find_slides(tmp_path) == [tmp_path / "a.tif"]


def test_a_level_too_large_to_hold_is_pictured_block_by_block(syn_slide, monkeypatch):
    """Above WHOLE_LEVEL_PIXELS a level is read in blocks (a single-level 100k x 100k TIFF
    would need 40 GB at once). The picture does not depend on the block size; at a whole
    downsample it is the whole-level resize exactly, at a fractional one close to it (two
    averagings instead of one)."""
    with sl.open_slide(syn_slide.path) as s:
        assert s.dimensions == (2048, 1536)
        for shape, exact in (((48, 64), True), ((41, 55), False)):
            whole = sl.read_resized(s, 0, shape)
            monkeypatch.setattr(sl, "WHOLE_LEVEL_PIXELS", 1000)
            blocks = []
            for side in (300, 451):
                monkeypatch.setattr(sl, "BLOCK", side)
                blocks.append(sl.read_resized(s, 0, shape))
            monkeypatch.undo()
            assert blocks[0].shape == whole.shape == (*shape, 3) and np.array_equal(blocks[0], blocks[1]), shape
            diff = np.abs(whole.astype(int) - blocks[0].astype(int))
            assert diff.max() == 0 if exact else diff.mean() < 3, (shape, diff.mean())


def test_the_files_of_one_dicom_series_are_one_slide(tmp_path):
    """OpenSlide opens a DICOM series from any of its files: a folder with two is one slide."""
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        (tmp_path / name).symlink_to(shared("slides", name))
    assert sl.find_slides(tmp_path) == [tmp_path / "boxes_0.dcm"]
