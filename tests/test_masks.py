import json

import numpy as np
import pytest

from crfcore import masks
from crfcore import slide as sl
from crfcore.io import load_array
from conftest import call, shared


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


@pytest.mark.parametrize("downsample", [4, 16, 64])
def test_tumour_mask_equals_planted_regions(syn_slide, downsample):
    mask, meta = masks.make_mask(syn_slide.path, "tumor", syn_slide.annotation, downsample=downsample)
    slide = sl.open_slide(syn_slide.path)
    lat = masks.Lattice.for_slide(slide, downsample=downsample)
    xs, ys = lat.centres()
    gx, gy = np.meshgrid(xs, ys)
    truth = syn_slide.annotation.contains(np.stack([gx.ravel(), gy.ravel()], 1)).reshape(mask.shape)
    assert mask.shape == truth.shape and iou(mask, truth) > 0.98
    assert meta["kind"] == "tumor" and meta["downsample"] == pytest.approx([downsample] * 2)
    assert meta["slide_path"] == str(syn_slide.path) and meta["mpp"] == pytest.approx(sl.slide_mpp(slide))


def test_tumour_mask_sits_on_the_planted_texture(syn_slide):
    """The mask, drawn from the XML, covers the slide's dark tumour texture."""
    s = sl.open_slide(syn_slide.path)
    mask, _ = masks.make_mask(syn_slide.path, "tumor", syn_slide.annotation, downsample=16)
    img = sl.thumbnail(s, 16).astype(float).mean(axis=2)
    tissue = syn_slide.tissue_contains(np.stack(np.meshgrid(*masks.Lattice.for_slide(
        s, downsample=16).centres()), -1).reshape(-1, 2)).reshape(mask.shape)
    dark = (img < (img[mask].mean() + img[tissue & ~mask].mean()) / 2) & tissue
    assert iou(dark, mask) > 0.8
    # and it is registered: shifting the mask by a pixel or two only makes it worse
    for dy, dx in [(0, 1), (1, 0), (0, -2), (-2, 0)]:
        assert iou(dark, np.roll(mask, (dy, dx), axis=(0, 1))) < iou(dark, mask)


def test_tissue_and_normal_masks(syn_slide, tmp_path):
    ann = tmp_path / "syn_tumor.json"
    call("xml2json.py", syn_slide.path.with_suffix(".xml"), "-o", ann)
    call("Mask_gen.py", syn_slide.path, "-o", tmp_path / "tissue.npy", "--kind", "tissue",
               "--downsample", "16")
    call("Mask_gen.py", syn_slide.path, "-o", tmp_path / "normal.npy", "--kind", "normal",
               "--annotation", ann, "--downsample", "16")
    call("Mask_gen.py", syn_slide.path, "-o", tmp_path / "tumor.npy", "--kind", "tumor",
               "--annotation", ann, "--downsample", "16")
    tissue, meta = load_array(tmp_path / "tissue.npy")
    normal, _ = load_array(tmp_path / "normal.npy")
    tumour, _ = load_array(tmp_path / "tumor.npy")
    assert tissue.dtype == bool and meta["slide"] == syn_slide.path.name and meta["level"] == 4
    lat = masks.Lattice.for_slide(sl.open_slide(syn_slide.path), downsample=16)
    truth = syn_slide.tissue_contains(np.stack(np.meshgrid(*lat.centres()), -1).reshape(-1, 2))
    assert iou(tissue, truth.reshape(tissue.shape)) > 0.95
    assert not (normal & tumour).any() and iou(normal | tumour, tissue) > 0.95
    assert (tmp_path / "tissue.png").exists() and (tmp_path / "tissue.json").exists()


def test_real_slide_tissue_mask_and_resize_fallback(tmp_path):
    path = shared("slides", "CMU-1-Small-Region.svs")
    call("Mask_gen.py", path, "-o", tmp_path / "m.npy", "--kind", "tissue")
    mask, meta = load_array(tmp_path / "m.npy")
    # one level only: read level 0 and resize to 1/64
    assert mask.shape == (47, 35) and meta["level"] is None
    assert meta["downsample"] == pytest.approx([2220 / 35, 2967 / 47])
    assert 0.15 < mask.mean() < 0.6


def test_real_annotation_mask_on_tumor_001_geometry():
    """Tumor_001's polygons filled on the Camelyon16 level-6 lattice (no slide needed)."""
    from crfcore.annotations import load_annotation
    ann = load_annotation(shared("annotations", "tumor_001.json"))
    lat = masks.Lattice((3456, 1536), (64.0, 64.0), 6)  # Tumor_001 is 97792 x 221184
    mask = masks.annotation_mask(ann, lat)
    rows, cols = np.nonzero(mask)
    x0, y0, x1, y1 = ann.bounds()
    assert mask.sum() > 10
    assert x0 / 64 - 1 <= cols.min() and cols.max() <= x1 / 64
    assert y0 / 64 - 1 <= rows.min() and rows.max() <= y1 / 64
    xs, ys = (cols + 0.5) * 64, (rows + 0.5) * 64
    assert ann.contains(np.stack([xs, ys], 1)).mean() > 0.97


def test_mask_errors(syn_slide, tmp_path):
    proc = call("Mask_gen.py", syn_slide.path, "-o", tmp_path / "t.npy", "--kind", "tumor",
                      check=False)
    assert proc.returncode == 2 and "--annotation" in proc.stderr
    proc = call("Mask_gen.py", shared("bad-slides", "broken.svs"), "-o", tmp_path / "t.npy",
                      "--kind", "tissue", check=False)
    assert proc.returncode == 2 and "broken.svs" in proc.stderr and "Traceback" not in proc.stderr
    far = tmp_path / "far.json"
    far.write_text(json.dumps({"positive": [{"name": "x", "vertices": [[0, 0], [99999, 0], [0, 500]]}],
                               "negative": []}))
    proc = call("Mask_gen.py", syn_slide.path, "-o", tmp_path / "far_tumor.npy", "--kind", "tumor",
                      "--annotation", far)
    assert "outside the slide" in proc.stderr and "far.json" in proc.stderr
    far.write_text(json.dumps({"positive": [{"name": "x", "vertices": [[90000, 0], [99999, 0], [90000, 500]]}],
                               "negative": []}))  # wholly off the slide: another slide's
    proc = call("Mask_gen.py", syn_slide.path, "-o", tmp_path / "n.npy", "--kind", "normal", "--annotation", far,
                check=False)
    assert proc.returncode == 2 and "lies wholly outside the slide" in proc.stderr
    w, h = sl.open_slide(syn_slide.path).dimensions
    far.write_text(json.dumps({"positive": [{"name": "all", "vertices": [[-20, -20], [w + 20, -20], [w + 20, h + 20],
                                                                        [-20, h + 20]]}], "negative": []}))
    call("Mask_gen.py", syn_slide.path, "-o", tmp_path / "all.npy", "--kind", "tumor", "--annotation", far)
    assert load_array(tmp_path / "all.npy")[0].all()  # around the whole slide: all tumour, as before


def test_sidecar_check_refuses_other_slides(syn_slide, tmp_path):
    mask, meta = masks.make_mask(syn_slide.path, "tissue", downsample=64)
    masks.save_mask(tmp_path / "m.npy", mask, meta)
    masks.load_mask(tmp_path / "m.npy", slide=syn_slide.path)
    with pytest.raises(Exception, match="belongs to slide"):
        masks.load_mask(tmp_path / "m.npy", slide="other.tif")


def test_directory_mode(syn_slide, tmp_path):
    slides, anns = tmp_path / "slides", tmp_path / "anns"
    slides.mkdir(), anns.mkdir()
    (slides / syn_slide.path.name).symlink_to(syn_slide.path)
    proc = call("Mask_gen.py", slides, "-o", tmp_path / "out", "--kind", "tumor",
                      "--annotation", anns, check=False)
    assert proc.returncode == 2 and syn_slide.path.name in proc.stderr
    call("xml2json.py", syn_slide.path.with_suffix(".xml"), "-o", anns / "syn_tumor.json")
    call("Mask_gen.py", slides, "-o", tmp_path / "out", "--kind", "tumor", "--annotation", anns)
    assert (tmp_path / "out" / "syn_tumor_tumor.npy").exists()


def test_mask_gen_never_writes_over_its_slide(syn_slide, tmp_path):
    """The preview is `-o` with .png: a slide named so would be replaced."""
    import shutil

    slide = tmp_path / "s.png"
    shutil.copy(syn_slide.path, slide)
    res = call("Mask_gen.py", slide, "-o", tmp_path / "s.npy", "--kind", "tissue", check=False)
    assert res.returncode == 2 and "is also an input of this run" in res.stderr
    assert slide.read_bytes() == syn_slide.path.read_bytes()


def test_two_slides_of_one_stem_are_refused_in_a_folder(syn_slide, tmp_path):
    import shutil

    d = tmp_path / "slides"
    d.mkdir()
    shutil.copy(syn_slide.path, d / "a.tif")
    shutil.copy(syn_slide.path, d / "a.tiff")
    res = call("Mask_gen.py", d, "-o", tmp_path / "m", "--kind", "tissue", check=False)
    assert res.returncode == 2 and "a.tif and a.tiff would write the same mask" in res.stderr


def test_mask_gen_refuses_another_kind_and_dropped_tumour_before_the_work(syn_slide, tmp_path):
    """From a hostile review: -o a tissue mask with --kind tumor was refused only after the
    tumour preview had replaced the tissue one; a file whose only tumour polygon has fewer
    than 3 distinct vertices gave an empty tumour mask (a normal slide), exit 0."""
    out = tmp_path / "kk.npy"
    call("Mask_gen.py", syn_slide.path, "-o", out, "--kind", "tissue", "--downsample", "32")
    preview = out.with_suffix(".png").read_bytes()
    call("xml2json.py", syn_slide.path.with_suffix(".xml"), "-o", tmp_path / "a.json")
    res = call("Mask_gen.py", syn_slide.path, "-o", out, "--kind", "tumor", "--annotation", tmp_path / "a.json",
               "--downsample", "32", check=False)
    assert res.returncode == 2 and "holds a tissue array" in res.stderr and out.with_suffix(".png").read_bytes() == preview
    (tmp_path / "two.json").write_text(json.dumps({"positive": [{"name": "t", "vertices": [[5, 5], [90, 90]]}],
                                                   "negative": []}))
    res = call("Mask_gen.py", syn_slide.path, "-o", tmp_path / "t.npy", "--kind", "tumor", "--annotation",
               tmp_path / "two.json", check=False)
    assert res.returncode == 2 and "no region (fewer than 3 distinct vertices, points, lines): ['t']" in res.stderr
    assert not (tmp_path / "t.npy").exists()


def test_a_lesion_export_is_named_when_it_is_all_a_folder_holds(syn_slide, tmp_path):
    """From a regression review: with only `evaluate.py lesions --to xml` output in the
    folder, Mask_gen said "no annotation ... in A" beside the very file."""
    from crfcore import evaluation as ev
    d = tmp_path / "A"
    d.mkdir()
    (d / f"{syn_slide.path.stem}.xml").write_text(ev.lesions_asap_xml(np.array([[0.9, 5.0, 5.0]])))
    res = call("Mask_gen.py", syn_slide.path, "-o", tmp_path / "t.npy", "--kind", "tumor", "--annotation", d, check=False)
    assert res.returncode == 2 and "syn_tumor.xml: predicted lesions of evaluate.py, never truth" in res.stderr
