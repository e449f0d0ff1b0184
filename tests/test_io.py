"""crfcore.io: atomic writes, sidecar checks and the slide-pairing rule."""
import json
import os
import stat
import warnings

import numpy as np
import pytest

from crfcore import io
from crfcore.errors import OutputError
from conftest import file_size_limit


def test_atomic_writes_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        io.atomic_write_text(tmp_path / "a.txt", "x")
        io.save_array(tmp_path / "m.npy", np.zeros((2, 2), bool), {"slide": "s.tif", "downsample": [1, 1]})
    finally:
        os.umask(old)
    for name in ("a.txt", "m.npy", "m.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_special_files_are_refused_not_replaced(tmp_path):
    fifo = tmp_path / "out.npy"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="special file"):
        io.save_array(fifo, np.zeros((2, 2)), {"slide": "s.tif", "downsample": [1, 1]})
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    with pytest.raises(OutputError, match="special file"):
        io.check_output_path("/dev/null")
    with pytest.raises(OutputError, match="directory"):
        io.atomic_write_text(tmp_path, "x")


def test_temp_files_of_killed_writers_are_cleaned(tmp_path):
    dead = tmp_path / ".map.npy.999999999.abc.npy"  # no such process
    live = tmp_path / f".map.npy.{os.getpid()}.def.npy"
    dead.write_text("half"), live.write_text("half")
    with pytest.warns(UserWarning, match="removed 1 temporary"):
        io.atomic_write_text(tmp_path / "map.npy", "done")
    assert not dead.exists() and live.exists() and (tmp_path / "map.npy").read_text() == "done"


def test_a_failed_write_names_the_output_and_leaves_no_file(tmp_path):
    with file_size_limit(1000), pytest.raises(OutputError, match=r"big\.txt: cannot write"):
        io.atomic_write_text(tmp_path / "big.txt", "x" * 5000)
    assert list(tmp_path.iterdir()) == []
    with file_size_limit(2000), pytest.raises(OutputError, match=r"pic\.png: cannot write"):
        io.write_image(tmp_path / "pic.png", np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_atomic_copy_never_leaves_a_truncated_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(20000))
    with file_size_limit(10000), pytest.raises(OutputError):
        io.atomic_copy(src, tmp_path / "dst.bin")
    assert not (tmp_path / "dst.bin").exists()


def test_the_pairing_rule_takes_the_exact_stem_only(tmp_path):
    for name in ("s10_tissue.npy", "s1_tissue.npy", "c10.csv", ".c1.csv.123.x.csv", "C2.CSV"):
        (tmp_path / name).write_text("")
    assert io.companion(tmp_path, "s1", "tissue").name == "s1_tissue.npy"
    assert io.companion(tmp_path, "s10", "tissue").name == "s10_tissue.npy"
    assert io.companion(tmp_path, "s", "tissue") is None
    assert io.companion(tmp_path, "c1", "lesions") is None  # never c10.csv, never a hidden temp file
    assert io.companion(tmp_path, "c2", "lesions").name == "C2.CSV"  # case-insensitive when unique
    assert [p.name for p in io.visible_files(tmp_path, (".csv",))] == ["C2.CSV", "c10.csv"]
    assert io.companion_stem("t1_prob.csv", "lesions") == "t1" and io.companion_stem("t1.csv", "lesions") == "t1"


def sidecar(path, **meta):
    base = {"slide": "s.tif", "kind": "probability", "downsample": [16, 16], "shape": [4, 5]}
    path.with_suffix(".json").write_text(json.dumps({**base, **meta}))


@pytest.mark.parametrize("meta, array, message", [
    ({"downsample": "abc"}, np.zeros((4, 5), np.float32), "'downsample' must be two positive numbers"),
    ({"downsample": [0, 16]}, np.zeros((4, 5), np.float32), "'downsample' must be two positive numbers"),
    ({"downsample": [True, 16]}, np.zeros((4, 5), np.float32), "'downsample' must be two positive numbers"),
    ({"shape": [4, 5, 3]}, np.zeros((4, 5, 3), np.float32), "3-D array"),
    ({}, np.full((4, 5), np.nan, np.float32), "20 cell\\(s\\) are NaN or infinite"),
    ({}, np.array([[np.inf] * 5] * 4, np.float32), "NaN or infinite; refusing a non-finite map"),
    ({"kind": "tissue"}, np.full((4, 5), np.nan, np.float32), "refusing a non-finite mask"),  # was called a map
    ({"shape": [5, 4]}, np.zeros((4, 5), np.float32), "does not match its sidecar"),
    ({"shape": [4, 5]}, np.full((4, 5), "a"), "holds <U1 values; masks and maps hold numbers"),
    ({"shape": [0, 0]}, np.zeros((0, 0), np.float32), "empty 0x0 array"),
    ({"slide": None}, np.zeros((4, 5), np.float32), "not a sidecar \\(expected a JSON object naming its slide"),
    ({"mpp": 0.25}, np.zeros((4, 5), np.float32), "'mpp' must be null or two positive numbers"),
    ({"mpp": [0, 0]}, np.zeros((4, 5), np.float32), "'mpp' must be null or two positive numbers"),
    ({"level": "five"}, np.zeros((4, 5), np.float32), "'level' must be null or a pyramid level"),
    ({"level": -1}, np.zeros((4, 5), np.float32), "'level' must be null or a pyramid level"),
])
def test_bad_arrays_and_sidecars_are_refused(tmp_path, meta, array, message):
    np.save(tmp_path / "p.npy", array)
    sidecar(tmp_path / "p.npy", **meta)
    with pytest.raises(io.ArrayFileError, match=message):
        io.load_array(tmp_path / "p.npy", kind=meta.get("kind", "probability"))


def test_a_sidecar_without_level_reads_as_no_pyramid_level(tmp_path):
    """From a review: a mask sidecar without "level" ran prob_map.py's whole computation and
    then died with a KeyError traceback."""
    np.save(tmp_path / "p.npy", np.zeros((4, 5), np.float32))
    sidecar(tmp_path / "p.npy")
    assert io.load_array(tmp_path / "p.npy")[1]["level"] is None


def test_missing_sidecar_names_the_right_script(tmp_path):
    np.save(tmp_path / "p.npy", np.zeros((4, 5), np.float32))
    with pytest.raises(io.ArrayFileError, match="prob_map.py"):
        io.load_array(tmp_path / "p.npy", kind="probability")
    with pytest.raises(io.ArrayFileError, match="Mask_gen.py"):
        io.load_array(tmp_path / "p.npy", kind="tissue")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    sidecar(tmp_path / "obj.npy", shape=[1])
    with pytest.raises(io.ArrayFileError, match="cannot read"):
        io.load_array(tmp_path / "obj.npy")


def test_a_lattice_that_does_not_cover_the_slide_is_refused():
    io.check_fits_slide("m.npy", (96, 128), (16.0, 16.0), (2048, 1536))
    io.check_fits_slide("m.npy", (96, 128), (16.0, 16.0), (2040, 1530))  # rounded up by a pyramid
    with pytest.raises(io.ArrayFileError, match="the slide is 4096x1536"):
        io.check_fits_slide("m.npy", (96, 128), (16.0, 16.0), (4096, 1536))


@pytest.mark.parametrize("content, message", [
    (b"", "cannot read the array \\(empty or truncated file\\)"),
    ("npz", "is an .npz archive, not one .npy array"),
])
def test_unreadable_array_files_are_refused_by_name(tmp_path, content, message):
    path = tmp_path / "p.npy"
    if content == "npz":
        with path.open("wb") as fh:
            np.savez(fh, a=np.zeros((4, 5)))
    else:
        path.write_bytes(content)
    sidecar(path)
    with pytest.raises(io.ArrayFileError, match=message):
        io.load_array(path)


@pytest.mark.parametrize("text, message", [
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ("1" * 5000, "malformed JSON \\(Exceeds the limit"),
    ("{", "malformed JSON at line 1"),
    (b"\xff\xfe\x00", "not a text file"),
])
def test_every_unreadable_json_is_one_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "x.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(io.CrfError, match=message) as err:
        io.read_json(path, "sidecar")
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    assert io.read_json(path.with_name("bom.json").write_text("\ufeff[1]") and path.with_name("bom.json"), "x") == [1]
    if isinstance(text, bytes):  # a review: "expected a annotation"
        with pytest.raises(io.CrfError, match=r"\(expected an annotation\)$"):
            io.read_json(path, "annotation")


def test_an_output_never_replaces_a_file_that_is_not_its_own_sidecar(tmp_path):
    out = tmp_path / "s1.npy"
    annotation = out.with_suffix(".json")
    annotation.write_text('{"positive": [], "negative": []}')
    with pytest.raises(OutputError, match="not a sidecar of crfcore \\(an annotation\\?\\)"):
        io.save_array(out, np.zeros((2, 2), bool), {"slide": "s1.tif"})
    assert annotation.read_text() == '{"positive": [], "negative": []}' and not out.exists()
    annotation.unlink()
    io.save_array(out, np.zeros((2, 2), bool), {"slide": "s1.tif"})
    io.save_array(out, np.ones((2, 3), bool), {"slide": "s1.tif"})  # its own sidecar is replaced
    assert io.own_sidecar(annotation)["shape"] == [2, 3] and json.loads(annotation.read_text())["shape"] == [2, 3]


@pytest.mark.parametrize("killed", ["before the array's rename", "before the sidecar's rename"])
def test_a_save_killed_between_its_renames_reads_as_the_old_pair_or_the_new_one(tmp_path, monkeypatch, killed):
    """From a hostile test: a kill while --overwrite replaced a map left the old array
    without a sidecar. Now the new sidecar waits beside the old one until the new array is
    in place; the next reader finishes or undoes the save, quietly."""
    out = tmp_path / "m.npy"
    io.save_array(out, np.zeros((2, 2), np.float32), {"slide": "s.tif", "downsample": [1, 1], "checkpoint": "old"})
    real_replace = os.replace

    def replace(src, dst):  # the kill comes as the rename onto `dst` would
        if str(dst).endswith("m.npy" if killed == "before the array's rename" else "m.json"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        io.save_array(out, np.ones((2, 2), np.float32), {"slide": "s.tif", "downsample": [1, 1], "checkpoint": "new"})
    monkeypatch.undo()
    assert io.pending_sidecar_path(out).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        array, meta = io.load_array(out)
    want = "old" if killed == "before the array's rename" else "new"
    assert meta["checkpoint"] == want and array.sum() == (0 if want == "old" else 4)
    assert not io.pending_sidecar_path(out).exists()


def test_an_array_whose_values_its_sidecar_does_not_record_is_read_with_a_warning(tmp_path):
    """From a hostile test: two runs writing one mask at once left one's array under the
    other's sidecar, read silently. Such an array, or one edited on purpose, is read with
    a warning naming both files; an older sidecar without the hash reads quietly."""
    out = tmp_path / "s_tumor.npy"
    io.save_array(out, np.zeros((3, 4), bool), {"slide": "s.tif", "kind": "tumor", "downsample": [8, 8]})
    np.save(out, np.ones((3, 4), bool))
    with pytest.warns(UserWarning, match=r"s_tumor.npy: its values are not those its sidecar s_tumor.json records"):
        array, _ = io.load_array(out)
    assert array.all()
    meta = json.loads(out.with_suffix(".json").read_text())
    del meta["array_sha256"]
    out.with_suffix(".json").write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        io.load_array(out)


def test_text_outputs_are_utf8_whatever_the_locale(tmp_path):
    """From a hostile test: under a non-UTF-8 locale, an annotation named `Läsion` was a
    UnicodeEncodeError traceback (an ASCII locale), or undeclared Latin-1 XML."""
    import subprocess
    import sys

    from conftest import ROOT
    src = tmp_path / "in.xml"
    src.write_text('<?xml version="1.0" encoding="utf-8"?><ASAP_Annotations><Annotations>'
                   '<Annotation Name="Läsion 0" Type="Polygon" PartOfGroup="_0"><Coordinates>'
                   + "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in
                             enumerate([(0, 0), (50, 0), (50, 50)]))
                   + "</Coordinates></Annotation></Annotations></ASAP_Annotations>", encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    for to in ("xml", "json", "geojson"):
        out = tmp_path / f"out.{to}"
        done = subprocess.run([sys.executable, str(ROOT / "xml2json.py"), str(src), "-o", str(out), "--to", to],
                              env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        text = out.read_bytes().decode("utf-8")
        assert "Läsion 0" in (text if to == "xml" else json.dumps(json.loads(text), ensure_ascii=False))
