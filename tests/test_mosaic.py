"""crfcore.mosaic and bench/idc_slides.py: IDC patches back into whole-mount slides with
an exact cell-level IDC annotation."""
import importlib.util

import cv2
import numpy as np
import pytest

from conftest import ROOT, shared
from crfcore import mosaic
from crfcore.annotations import load_annotation, write_annotation
from crfcore.cli import UserError, run
from crfcore.errors import CrfError
from crfcore.slide import open_slide, read_level, slide_mpp

# Nested regions: '.' no patch, '0' non-IDC, '1' IDC. Ring A holds in its hole island B,
# whose hole holds island C (both holes must be keyholed, not written as negatives);
# the top-left cell touches A diagonally; the small ring at the bottom has a plain hole
# (a negative). The last column is 30 wide and the last row 20 high (edge patches).
NESTED = """
1..........
.111111111.
.100000001.
.101111101.
.101000101.
.101010101.
.101000101.
.101111101.
.100000001.
.111111111.
...........
.......1111
.......10.1
.......1111
"""
WIDTHS = [50] * 10 + [30]
HEIGHTS = [50] * 13 + [20]


def grid(text: str) -> np.ndarray:
    """Label grid: -1 no patch, 0, 1."""
    rows = [r for r in text.strip().splitlines()]
    return np.array([[-1 if ch == "." else int(ch) for ch in r] for r in rows])


def edges(sizes: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)])


def cells_of(labels: np.ndarray, widths: list[int], heights: list[int]) -> np.ndarray:
    xs, ys = edges(widths), edges(heights)
    return np.array([(xs[c], ys[r], xs[c + 1], ys[r + 1], labels[r, c])
                     for r in range(labels.shape[0]) for c in range(labels.shape[1]) if labels[r, c] >= 0],
                    np.int64).reshape(-1, 5)


def write_patches(folder, patient: str, labels: np.ndarray, widths, heights, class_dirs=True, seed=0):
    """One PNG of random colours per patch, named as the IDC data set does."""
    rng = np.random.default_rng(seed)
    out = {}
    for x0, y0, x1, y1, label in cells_of(labels, widths, heights):
        d = folder / str(label) if class_dirs else folder
        d.mkdir(parents=True, exist_ok=True)
        rgb = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
        cv2.imwrite(str(d / f"{patient}_idx5_x{x0 + 1}_y{y0 + 1}_class{label}.png"), rgb[..., ::-1])
        out[x0, y0] = rgb
    return out


def probe_points(cells: np.ndarray) -> np.ndarray:
    """Centre and off-centre points strictly inside every cell: `(N, 7, 2)`."""
    fx = np.array([0.5, 0.01, 0.99, 0.01, 0.99, 0.3, 0.8])
    fy = np.array([0.5, 0.01, 0.99, 0.99, 0.01, 0.7, 0.2])
    x0, y0, x1, y1 = (cells[:, i:i + 1].astype(float) for i in range(4))
    return np.stack([x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)], -1)


def assert_exact(xml, cells: np.ndarray, absent: np.ndarray | None = None) -> None:
    """contains == "the cell is class 1" at every probe point (False in absent cells)."""
    ann = load_annotation(xml)
    pts = probe_points(cells)
    got = ann.contains(pts.reshape(-1, 2)).reshape(pts.shape[:2])
    want = np.repeat((cells[:, 4] == 1)[:, None], pts.shape[1], 1)
    bad = np.argwhere(got != want)
    assert not len(bad), f"wrong at cells {cells[bad[:5, 0]].tolist()}"
    if absent is not None and len(absent):
        assert not ann.contains(probe_points(absent).reshape(-1, 2)).any()


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    d = tmp_path_factory.mktemp("idc")
    labels = grid(NESTED)
    pixels = write_patches(d / "in", "101", labels, WIDTHS, HEIGHTS)
    found = mosaic.scan(d / "in")
    m = mosaic.build("101", found.patients["101"])
    paths = mosaic.write_outputs(m, d / "out", 4.0)
    return m, paths, pixels, labels


def test_nested_islands_and_holes_are_exact(nested):
    m, paths, _, labels = nested
    absent = cells_of(np.where(labels < 0, 0, -1), WIDTHS, HEIGHTS)
    assert_exact(paths["xml"], m.cells, absent)
    ann = load_annotation(paths["xml"])
    # A and B keyholed (their holes hold islands), C, the diagonal cell, the small ring;
    # only the small ring's plain hole is a negative
    assert len(ann.positive) == 5 and len(ann.negative) == 1
    assert ann.positive_names[0].startswith("IDC") and ann.negative_names == ["Exclusion 0"]


def test_cells_csv_and_size(nested):
    m, paths, _, labels = nested
    assert m.size == (550, 700) and m.complete  # 530 x 670 of patches, padded to whole 50-pixel cells
    lines = paths["csv"].read_text().splitlines()
    assert lines[0] == "x0,y0,x1,y1,label" and len(lines) == 1 + (labels >= 0).sum()
    rows = np.array([list(map(int, ln.split(","))) for ln in lines[1:]])
    np.testing.assert_array_equal(rows, cells_of(labels, WIDTHS, HEIGHTS))
    assert rows[-1].tolist() == [500, 650, 530, 670, 1]  # the small corner patch, IDC


def test_tiff_opens_with_size_mpp_and_pixels(nested):
    m, paths, pixels, labels = nested
    slide = open_slide(paths["tif"])
    assert slide.dimensions == (550, 700)
    assert slide_mpp(slide) == pytest.approx((4.0, 4.0))
    img = read_level(slide, 0)
    for (x0, y0), rgb in pixels.items():
        h, w = rgb.shape[:2]
        np.testing.assert_array_equal(img[y0:y0 + h, x0:x0 + w], rgb)
    assert (img[600:650, 0:50] == mosaic.BACKGROUND).all()  # no patch there: glass
    assert (img[:, 530:] == mosaic.BACKGROUND).all() and (img[670:] == mosaic.BACKGROUND).all()  # the padding
    slide.close()


@pytest.mark.parametrize("seed", range(40))
def test_random_grids_are_exact(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 14))
    labels = rng.choice([-1, 0, 1], size=(n, n), p=[0.05, 0.35, 0.6])
    widths = [50] * (n - 1) + [int(rng.integers(5, 50))]
    cells = cells_of(labels, widths, widths[::-1])
    write_annotation(mosaic.idc_annotation(cells), tmp_path / "a.xml", to="xml")
    assert_exact(tmp_path / "a.xml", cells, cells_of(np.where(labels < 0, 0, -1), widths, widths[::-1]))


def test_keyhole_ring_has_the_polygon_inside():
    # a 5x5 square with a 3x3 hole: one ring, and its even-odd inside is the frame only
    cells = cells_of(grid("11111\n10001\n10101\n10001\n11111"), [50] * 5, [50] * 5)
    ann = mosaic.idc_annotation(cells)
    assert len(ann.positive) == 2 and not ann.negative
    ring = ann.positive[0]
    assert {tuple(v) for v in ring} >= {(0, 0), (250, 250), (50, 50), (200, 200)}  # outer and hole corners


def test_unparsable_names_are_counted(tmp_path):
    write_patches(tmp_path, "7", grid("01"), [50, 50], [50], class_dirs=False)
    for name in ("notes.txt", "7_idx5_x1_y1_class2.png", "7_idx5_x0_y1_class1.png"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".7_idx5_x101_y1_class1.png").write_text("hidden")
    found = mosaic.scan(tmp_path)
    assert sorted(p.name for p in found.unparsable) == ["7_idx5_x0_y1_class1.png", "7_idx5_x1_y1_class2.png",
                                                         "notes.txt"]
    assert [(p.x, p.y, p.label) for p in found.patients["7"]] == [(0, 0, 0), (50, 0, 1)]


def test_linked_class_folders_are_followed_once(tmp_path):
    write_patches(tmp_path / "data", "7", grid("01"), [50, 50], [50])
    (tmp_path / "split").mkdir()
    for c in "01":
        (tmp_path / "split" / c).symlink_to(tmp_path / "data" / c)
    (tmp_path / "split" / "loop").symlink_to(tmp_path / "split")
    found = mosaic.scan(tmp_path / "split")
    assert [(p.x, p.label) for p in found.patients["7"]] == [(0, 0), (50, 1)] and not found.unparsable


def test_duplicate_coordinates_are_refused(tmp_path):
    write_patches(tmp_path, "5", grid("0"), [50], [50])
    write_patches(tmp_path, "5", grid("1"), [50], [50])
    found = mosaic.scan(tmp_path)
    with pytest.raises(mosaic.PatchConflict, match=r"5_idx5_x1_y1_class0.png and .*5_idx5_x1_y1_class1.png"):
        mosaic.build("5", found.patients["5"])


def test_overlapping_boxes_are_refused(tmp_path):
    write_patches(tmp_path, "5", grid("1"), [50], [50])
    cv2.imwrite(str(tmp_path / "1" / "5_idx5_x26_y11_class1.png"), np.zeros((50, 50, 3), np.uint8))
    with pytest.raises(mosaic.PatchConflict, match=r"5_idx5_x1_y1_class1.png and .*5_idx5_x26_y11_class1.png"):
        mosaic.build("5", mosaic.scan(tmp_path).patients["5"])


def test_class_folder_disagreeing_with_name_is_refused(tmp_path):
    (tmp_path / "0").mkdir()
    cv2.imwrite(str(tmp_path / "0" / "5_idx5_x1_y1_class1.png"), np.zeros((50, 50, 3), np.uint8))
    with pytest.raises(mosaic.MosaicError, match="class 1 in the name but in class folder 0"):
        mosaic.scan(tmp_path)


def test_unreadable_patch_is_named(tmp_path):
    (tmp_path / "5_idx5_x1_y1_class1.png").write_text("not a png")
    with pytest.raises(mosaic.MosaicError, match="5_idx5_x1_y1_class1.png: not a readable image"):
        mosaic.build("5", mosaic.scan(tmp_path).patients["5"])


def test_partial_and_complete(tmp_path):
    write_patches(tmp_path, "1", grid("01"), [50, 50], [50])
    write_patches(tmp_path, "2", grid("11"), [50, 50], [50])
    found = mosaic.scan(tmp_path)
    assert mosaic.build("1", found.patients["1"]).complete
    assert not mosaic.build("2", found.patients["2"]).complete


# ----------------------------------------------------------------------------- the script

@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("idc_slides", ROOT / "bench" / "idc_slides.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_reports_each_patient(tmp_path, script, capsys):
    write_patches(tmp_path / "in", "1", grid("01\n10"), [50, 40], [50, 50])
    write_patches(tmp_path / "in", "2", grid("11"), [50, 50], [50])
    assert script.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1: 100 x 100 px, 4 cells, 2 IDC, complete" in out  # 90 wide, padded to whole cells
    assert "2: 100 x 50 px, 2 cells, 2 IDC, partial (class 1 only)" in out
    assert "(1 complete, 1 partial)" in out and "approximate" in out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {f"{p}{s}" for p in "12"
                                                               for s in (".tif", ".xml", "_cells.csv")}


def test_script_warns_when_no_patient_is_complete(tmp_path, script, capsys):
    write_patches(tmp_path / "in", "2", grid("11"), [50, 50], [50], class_dirs=False)
    (tmp_path / "in" / "readme.txt").write_text("x")
    with pytest.warns(UserWarning) as record:
        assert script.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--quiet", "--preview"]) == 0
    text = " ".join(str(w.message) for w in record)
    assert "no complete patient" in text and "1 file(s) without an IDC patch name" in text
    assert (tmp_path / "out" / "2_outline.png").is_file()


def test_script_patients_option(tmp_path, script, capsys):
    write_patches(tmp_path / "in", "1", grid("01"), [50, 50], [50])
    write_patches(tmp_path / "in", "2", grid("11"), [50, 50], [50])
    with pytest.warns(UserWarning, match="no complete patient among those built"):
        script.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--patients", "2", "--quiet"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["2.tif", "2.xml", "2_cells.csv"]
    with pytest.raises(UserError, match="no patches of patient.s. 3; found 1, 2"):
        script.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--patients", "3"])


def test_script_goes_on_past_a_conflicting_patient(tmp_path, script, capsys):
    write_patches(tmp_path / "in", "1", grid("01"), [50, 50], [50])
    write_patches(tmp_path / "in", "2", grid("1"), [50], [50])
    write_patches(tmp_path / "in", "2", grid("0"), [50], [50])
    with pytest.raises(UserError, match="1 of 2 patient.s. failed: 2"):
        script.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--quiet"])
    captured = capsys.readouterr()
    assert "1: 100 x 50 px" in captured.out and "two patches at x=1, y=1" in captured.err


@pytest.mark.parametrize("args, message", [
    (["missing"], "missing: not a folder of IDC patches"),
    (["empty"], "empty: no IDC patch files"),
    (["empty", "--mpp", "nan"], "--mpp must be a positive number"),
])
def test_script_bad_input_is_one_line_exit_2(tmp_path, script, capsys, args, message):
    (tmp_path / "empty").mkdir()
    argv = [str(tmp_path / args[0]), *args[1:], "-o", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        run(script.main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- real data

def test_real_patient_8863_is_exact(tmp_path):
    found = mosaic.scan(shared("idc"))
    m = mosaic.build("8863", found.patients["8863"])
    assert m.size == (2800, 2350) and m.complete  # 2791 x 2335 of patches, padded to whole cells
    assert (len(m.cells), m.idc_cells) == (979, 207)
    write_annotation(mosaic.idc_annotation(m.cells), tmp_path / "8863.xml", to="xml")
    assert_exact(tmp_path / "8863.xml", m.cells)


def test_mosaic_errors_are_crf_errors():
    assert issubclass(mosaic.PatchConflict, mosaic.MosaicError) and issubclass(mosaic.MosaicError, CrfError)


# ----------------------------------------------------------------------------- cells as truth

def test_read_cells_round_trip_and_errors(nested, tmp_path):
    m, paths, _, _ = nested
    np.testing.assert_array_equal(mosaic.read_cells(paths["csv"]), m.cells)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(mosaic.MosaicError, match="bad.csv: not a cells CSV"):
        mosaic.read_cells(tmp_path / "bad.csv")
    (tmp_path / "label.csv").write_text("x0,y0,x1,y1,label\n0,0,50,50,2\n")
    with pytest.raises(mosaic.MosaicError, match="label 0 or 1"):
        mosaic.read_cells(tmp_path / "label.csv")


@pytest.mark.parametrize("stride", [10, 25, 50])
def test_lattice_centres_are_the_maps_own_points(stride):
    from crfcore.inference import Geometry

    cells = cells_of(grid("01\n10"), [50, 50], [50, 50])
    idc, other = mosaic.lattice_centres(cells, stride, 150, complete=True)
    per_cell = (50 // stride) ** 2
    assert len(idc) == len(other) == 2 * per_cell
    n = 100 // stride  # the lattice prob_map.py lays over these 2 x 2 cells
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    points = Geometry(3, 50, 50, (stride, stride)).centres(rows, cols)
    assert {tuple(p) for p in np.concatenate([idc, other])} == {tuple(p) for p in points}
    # each point is labelled by the cell it lies in
    assert all((x // 50 + y // 50) % 2 == 1 for x, y in idc) and all((x // 50 + y // 50) % 2 == 0 for x, y in other)
    assert len(mosaic.lattice_centres(cells, stride, 150, True, per_cell=1)[0]) == 2


def test_lattice_centres_on_a_partial_slide_need_every_touched_cell():
    # 4 x 4 cells all present except the top-right one; IDC everywhere (a partial slide)
    labels = grid("1110\n1111\n1111\n1111")
    labels[0, 3] = -1
    cells = cells_of(labels, [50] * 4, [50] * 4)
    idc, other = mosaic.lattice_centres(cells, 50, 150, complete=False)
    # 150-pixel images centred on a cell need its 3 x 3 neighbours: only cells (1, 1) and (1, 2)
    # are inner, and (2, 1) [col 2, row 1] touches the missing (3, 0)
    assert {(x // 50, y // 50) for x, y in idc} == {(1, 1), (1, 2), (2, 2)} and not len(other)
    assert len(mosaic.lattice_centres(cells, 50, 150, complete=True)[0]) == 15


def test_cell_scores_weigh_overlaps_and_skip_non_tissue():
    cells = np.array([[0, 0, 50, 50, 1], [50, 0, 100, 50, 0], [0, 50, 30, 100, 0]])
    prob = np.arange(16, dtype=float).reshape(4, 4)  # downsample 25: 2 x 2 pixels per cell
    # the 30-pixel wide cell covers 25 pixels of column 0 and 5 of column 1
    third = (prob[2:, 0].sum() * 25 + prob[2:, 1].sum() * 5) / 60
    np.testing.assert_allclose(mosaic.cell_scores(prob, (25.0, 25.0), cells),
                               [prob[:2, :2].mean(), prob[:2, 2:].mean(), third])
    tissue = np.zeros((4, 4), bool)
    tissue[0, 0] = tissue[1, 3] = True
    np.testing.assert_allclose(mosaic.cell_scores(prob, (25.0, 25.0), cells, tissue), [prob[0, 0], prob[1, 3], 0])
    # downsample 50: a cell is one map pixel
    p50 = np.array([[0.2, 0.9], [0.4, 0.0]])
    np.testing.assert_allclose(mosaic.cell_scores(p50, (50.0, 50.0), cells), [0.2, 0.9, 0.4])
