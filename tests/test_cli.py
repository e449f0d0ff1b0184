"""Every script's command line: help for every option, and one clear line with exit
status 2 (never a traceback, never a half-written output) for bad input and full disks."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

from crfcore import masks
from crfcore.heatmap import save_probability_map
from crfcore.model import CRFNet, ModelConfig, save_checkpoint
from crfcore.errors import CrfError
from conftest import call, file_size_limit, load_script

SCRIPTS = ["xml2json.py", "Mask_gen.py", "Patch_gen.py", "coord_list_gen.py", "train.py", "prob_map.py",
           "prob_map_show.py", "evaluate.py", "viewer.py"]


def parsers(module) -> list[argparse.ArgumentParser]:
    p = module.build_parser()
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return [p] + [sp for s in subs for sp in s.choices.values()]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_option_has_help_and_shows_its_default_once(name):
    module = load_script(name)
    if not hasattr(module, "build_parser"):
        pytest.fail(f"{name} has no build_parser()")
    for p in parsers(module):
        formatter = p._get_formatter()
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            what = f"{name} {p.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{what} has no help text"
            shown = formatter._get_help_string(action).replace("%(default)s", "")  # with argparse's "(default: )"
            assert shown.lower().count("default") <= 1, f"{what}: the default is given twice: {shown!r}"
        p.format_help()  # every help text formats (a stray % would raise)


def test_workers_has_one_default_and_meaning():
    def workers(p):
        (a,) = [a for a in p._actions if "--workers" in a.option_strings]
        return a.default, a.help

    (patches,) = [p for p in parsers(load_script("evaluate.py")) if p.prog.endswith("patches")]
    beside_cnn = {workers(load_script("prob_map.py").build_parser()), workers(patches)}
    assert len(beside_cnn) == 1 and next(iter(beside_cnn))[0] is None, beside_cnn  # auto: 0 on the CPU
    assert workers(load_script("Patch_gen.py").build_parser())[0] == 2  # reading only: workers help
    train = {a.dest for a in load_script("train.py").build_parser()._actions}
    assert {"device", "workers"} <= train


# ----------------------------------------------------------------------------- a small world


@pytest.fixture(scope="module")
def world(syn_slide, tmp_path_factory):
    """A slide with its annotation, masks, a tiny checkpoint, a map, patches and a data set."""
    d = tmp_path_factory.mktemp("world")
    call("xml2json.py", syn_slide.path.with_suffix(".xml"), "-o", d / "syn_tumor.json")
    for kind in ("tissue", "tumor"):
        call("Mask_gen.py", syn_slide.path, "-o", d / f"syn_tumor_{kind}.npy", "--kind", kind,
             "--annotation", d / "syn_tumor.json", "--downsample", "32")
    torch.manual_seed(0)
    cfg = {"mode": "grid", "grid": 3, "crf_iters": 10, "width_mult": 0.25, "num_classes": 1,
           "image_size": 96, "patch_size": 32, "crop_size": 32}
    save_checkpoint(d / "m.ckpt", CRFNet(ModelConfig(grid=3, width_mult=0.25)), cfg)
    tissue, meta = masks.load_mask(d / "syn_tumor_tissue.npy")
    save_probability_map(d / "syn_tumor_prob.npy", np.where(tissue, 0.7, 0).astype(np.float32), meta)
    call("Patch_gen.py", syn_slide.path, "--mask", d / "syn_tumor_tumor.npy", "-o", d / "patches",
         "--mode", "random", "--num", "4", "--image-size", "96", "--workers", "0", "--quiet")
    call("coord_list_gen.py", d / "patches", "-o", d / "dataset")
    (d / "cfg.json").write_text(json.dumps({"mode": "grid", "data_path_train": str(d / "dataset"),
                                            "json_path_train": str(d), "image_size": 96, "patch_size": 32,
                                            "crop_size": 32, "width_mult": 0.25, "batch_size": 4,
                                            "workers": 0, "epochs": 1}))
    return d, syn_slide.path


def bad(world, name: str, make):
    """Write a bad file named `name` in a fresh folder; `make(path)` fills it."""
    path = world / "bad" / name
    path.parent.mkdir(exist_ok=True)
    make(path)
    return path


def nan_map(p):
    save_probability_map(p, np.full((4, 4), np.nan, np.float32), {"slide": "syn_tumor.tif", "downsample": [1, 1]})


def sidecar_abc(p):
    np.save(p, np.zeros((48, 64), bool))
    p.with_suffix(".json").write_text(json.dumps({"slide": "syn_tumor.tif", "kind": "tissue", "shape": [48, 64],
                                                  "downsample": "abc"}))


# (script, arguments with {w} = world folder, {s} = slide, {bad:NAME:maker}); the words the line must name
CASES = {
    "xml2json: no such input": ("xml2json.py", ["{w}/none.xml", "-o", "{w}/x.json"], "none.xml"),
    "xml2json: malformed XML": ("xml2json.py", ["{bad:a.xml:xml}", "-o", "{w}/x.json"], "line"),
    "xml2json: NaN vertex": ("xml2json.py", ["{bad:n.xml:nanxml}", "-o", "{w}/x.json"], "vertex"),
    "xml2json: entities refused": ("xml2json.py", ["{bad:e.xml:xxe}", "-o", "{w}/x.json"], "e.xml"),
    "Mask_gen: broken slide": ("Mask_gen.py", ["{bad:b.svs:text}", "-o", "{w}/m.npy", "--kind", "tissue"], "b.svs"),
    "Mask_gen: tumour without annotation": ("Mask_gen.py", ["{s}", "-o", "{w}/m.npy", "--kind", "tumor"],
                                            "--annotation"),
    "Mask_gen: level out of range": ("Mask_gen.py", ["{s}", "-o", "{w}/m.npy", "--kind", "tissue", "--level", "40"],
                                     "level 40"),
    "Mask_gen: downsample beyond the slide": ("Mask_gen.py", ["{s}", "-o", "{w}/m.npy", "--kind", "tissue",
                                                              "--downsample", "100000"], "is more than the slide's"),
    "Mask_gen: annotation is not one": ("Mask_gen.py", ["{s}", "-o", "{w}/m.npy", "--kind", "tumor",
                                                        "--annotation", "{bad:x.csv:text}"], "x.csv"),
    "Patch_gen: mask is a map": ("Patch_gen.py", ["{s}", "--mask", "{w}/syn_tumor_prob.npy", "-o", "{w}/p2"],
                                 "probability"),
    "Patch_gen: random without --num": ("Patch_gen.py", ["{s}", "--mask", "{w}/syn_tumor_tissue.npy", "-o",
                                                         "{w}/p2", "--mode", "random"], "--num"),
    "Patch_gen: inf in coords": ("Patch_gen.py", ["{s}", "--mask", "{w}/syn_tumor_tissue.npy", "-o", "{w}/p2",
                                                  "--mode", "coords", "--coords", "{bad:c.txt:infcoords}"], "c.txt:1"),
    "Patch_gen: 3-D mask": ("Patch_gen.py", ["{s}", "--mask", "{bad:syn_tumor_tissue.npy:mask3d}", "-o", "{w}/p2"],
                            "3-D"),
    "coord_list_gen: not a folder": ("coord_list_gen.py", ["{w}/nothing", "-o", "{w}/ds2"], "nothing"),
    "coord_list_gen: unfinished Patch_gen": ("coord_list_gen.py", ["{bad:pd:unfinished}", "-o", "{w}/ds2"],
                                             "did not finish"),
    "train: config is a folder": ("train.py", ["{w}", "{w}/run"], "is a directory"),
    "train: unknown key": ("train.py", ["{w}/cfg.json", "{w}/run", "--set", "lernrate=1"], "lernrate"),
    "train: a key given twice": ("train.py", ["{bad:c.json:twicekey}", "{w}/run"], "key 'lr' is given twice"),
    "train: wrong type": ("train.py", ["{w}/cfg.json", "{w}/run", "--set", "lr=fast"], "lr='fast'"),
    "train: bad pretrained file": ("train.py", ["{w}/cfg.json", "{w}/run", "--set",
                                                "pretrained=\"{w}/syn_tumor_prob.npy\""], "pretrained weights"),
    "train: image size mismatch": ("train.py", ["{w}/cfg.json", "{w}/run", "--set", "image_size=192",
                                                "--set", "patch_size=64", "--set", "crop_size=64"], "0.png: is 96x96"),
    "prob_map: checkpoint is a mask": ("prob_map.py", ["{s}", "{w}/syn_tumor_tissue.npy", "{w}/syn_tumor_tissue.npy",
                                                       "-o", "{w}/o.npy"], "not a checkpoint"),
    "prob_map: truncated checkpoint": ("prob_map.py", ["{s}", "{bad:t.ckpt:truncated}", "{w}/syn_tumor_tissue.npy",
                                                       "-o", "{w}/o.npy"], "truncated"),
    "prob_map: checkpoint without grid": ("prob_map.py", ["{s}", "{bad:g.ckpt:nogrid}", "{w}/syn_tumor_tissue.npy",
                                                          "-o", "{w}/o.npy"], "config has no grid"),
    "Mask_gen: -o names a picture": ("Mask_gen.py", ["{s}", "-o", "{w}/new.png", "--kind", "tissue"],
                                     "a mask is a .npy file"),
    "prob_map: sidecar downsample abc": ("prob_map.py", ["{s}", "{w}/m.ckpt", "{bad:syn_tumor_q.npy:abc}", "-o",
                                                         "{w}/o.npy"], "'downsample'"),
    "prob_map_show: NaN map": ("prob_map_show.py", ["{bad:syn_tumor_prob.npy:nan}", "-o", "{w}/o.png"], "NaN"),
    "prob_map_show: unknown colour map": ("prob_map_show.py", ["{w}/syn_tumor_prob.npy", "-o", "{w}/o.png",
                                                               "--cmap", "nope"], "nope"),
    "evaluate lesions: NaN map": ("evaluate.py", ["lesions", "{bad:syn_tumor_prob.npy:nan}", "-o", "{w}/l.csv"],
                                  "NaN"),
    "evaluate lesions: a mask, not a map": ("evaluate.py", ["lesions", "{w}/syn_tumor_tissue.npy", "-o",
                                                            "{w}/l.csv"], "expected 'probability'"),
    "evaluate patches: bad checkpoint": ("evaluate.py", ["patches", "{bad:x.ckpt:text}", "{w}/dataset"],
                                         "not a checkpoint"),
    "evaluate patches: bad data folder": ("evaluate.py", ["patches", "{w}/m.ckpt", "{w}/nothing", "--json", "{w}"],
                                          "no list.txt"),
    "evaluate froc: malformed lesions": ("evaluate.py", ["froc", "{bad:les:badcsv}", "{w}"], "prob,x,y"),
    "evaluate slides: one class only": ("evaluate.py", ["slides", "{w}", "{bad:l.csv:onelabel}"], "both"),
    "evaluate slides: unknown label": ("evaluate.py", ["slides", "{w}", "{bad:t.csv:typolabel}"],
                                       "t.csv:2: label 'tumr'"),
    "viewer: not a folder": ("viewer.py", ["{w}/nothing"], "nothing"),
}

MAKERS = {
    "text": lambda p: p.write_text("not what it should be"),
    "xml": lambda p: p.write_text("<ASAP_Annotations><Annotations>\n<oops"),
    "nanxml": lambda p: p.write_text('<ASAP_Annotations><Annotations><Annotation Name="a" PartOfGroup="Tumor">'
                                     '<Coordinates><Coordinate Order="0" X="nan" Y="1"/><Coordinate Order="1" X="5" '
                                     'Y="1"/><Coordinate Order="2" X="5" Y="9"/></Coordinates></Annotation>'
                                     '</Annotations></ASAP_Annotations>'),
    "xxe": lambda p: p.write_text('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                                  '<ASAP_Annotations>&e;</ASAP_Annotations>'),
    "infcoords": lambda p: p.write_text("syn_tumor,inf,5\n"),
    "mask3d": lambda p: (np.save(p, np.zeros((48, 64, 3), bool)),
                         p.with_suffix(".json").write_text(json.dumps({"slide": "syn_tumor.tif", "kind": "tissue",
                                                                       "downsample": [32, 32], "shape": [48, 64, 3]}))),
    "unfinished": lambda p: ((p / "syn_tumor").mkdir(parents=True),
                             (p / "syn_tumor" / "tile_0_level0_0-0-96-96.png").write_bytes(b"")),
    "truncated": lambda p: p.write_bytes(b"PK\x03\x04" + os.urandom(300)),
    "abc": sidecar_abc,
    "twicekey": lambda p: p.write_text('{"mode": "grid", "lr": 0.1, "epochs": 1, "lr": 0.001}'),
    "nogrid": lambda p: save_checkpoint(p, CRFNet(ModelConfig(grid=3, width_mult=0.25)),
                                        {"mode": "grid", "crf_iters": 10, "width_mult": 0.25, "num_classes": 1,
                                         "image_size": 96, "patch_size": 32, "crop_size": 32}),
    "nan": nan_map,
    "badcsv": lambda p: (p.mkdir(), (p / "syn_tumor.csv").write_text("0.9,100\n")),
    "onelabel": lambda p: p.write_text("slide,label\nsyn_tumor,tumor\n"),
    "typolabel": lambda p: p.write_text("slide,label\nsyn_tumor,tumr\n"),
}


def expand(arg: str, w, slide) -> str:
    if arg.startswith("{bad:"):
        name, maker = arg[5:-1].split(":")
        return str(bad(w, name, MAKERS[maker]))
    return arg.replace("{w}", str(w)).replace("{s}", str(slide))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line_and_exit_2(world, case):
    w, slide = world
    script, args, words = CASES[case]
    res = call(script, *[expand(a, w, slide) for a in args], check=False)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2, f"{case}: exit {res.returncode}\n{res.stderr}"
    assert "Traceback" not in res.stderr and len(errors) == 1, res.stderr
    assert words in errors[0], f"{case}: {errors[0]!r} does not name {words!r}"


# (script, arguments, the option named): out-of-range values refused by argparse, before any work
BAD_OPTIONS = {
    "Patch_gen: negative --num": ("Patch_gen.py", ["{s}", "--mask", "{w}/syn_tumor_tumor.npy", "-o", "{w}/p2",
                                                   "--mode", "random", "--num", "-5"], "--num"),
    "Patch_gen: fraction above 1": ("Patch_gen.py", ["{s}", "--mask", "{w}/syn_tumor_tumor.npy", "-o", "{w}/p2",
                                                     "--min-mask-fraction", "3"], "--min-mask-fraction"),
    "prob_map: negative --workers": ("prob_map.py", ["{s}", "{w}/m.ckpt", "{w}/syn_tumor_tissue.npy", "-o",
                                                     "{w}/o.npy", "--workers", "-1"], "--workers"),
    "prob_map_show: --alpha 2": ("prob_map_show.py", ["{w}/syn_tumor_prob.npy", "-o", "{w}/o.png", "--alpha", "2"],
                                 "--alpha"),
    "prob_map_show: --vmin nan": ("prob_map_show.py", ["{w}/syn_tumor_prob.npy", "-o", "{w}/o.png", "--vmin", "nan"],
                                  "--vmin"),
    "evaluate lesions: negative --radius": ("evaluate.py", ["lesions", "{w}/syn_tumor_prob.npy", "-o", "{w}/l.csv",
                                                            "--radius", "-3"], "--radius"),
    "evaluate negatives: --per-slide -1": ("evaluate.py", ["negatives", "{w}", "{w}", "-o", "{w}/n.txt",
                                                           "--per-slide", "-1"], "--per-slide"),
    "viewer: port 99999": ("viewer.py", ["{w}", "--port", "99999"], "--port"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_an_out_of_range_option_is_refused_before_any_work(world, case):
    w, slide = world
    script, args, option = BAD_OPTIONS[case]
    res = call(script, *[expand(a, w, slide) for a in args], check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"error: argument {option}: expected" in res.stderr.splitlines()[-1], res.stderr
    assert not (w / "p2").exists() and not (w / "o.png").exists()


UNBOUNDED = {"--vmin", "--vmax"}  # numeric options that take any finite value


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_numeric_option_is_checked_at_parsing(name):
    """A bare int or float type lets -1, nan or 1e9 through to the work, where it fails
    late (a traceback, or after old output was cleared) or silently does something else."""
    for p in parsers(load_script(name)):
        for action in p._actions:
            option = "/".join(action.option_strings) or action.dest
            if action.type in (int, float) and not action.choices:
                pytest.fail(f"{name} {p.prog} {option}: a bare {action.type.__name__}; use crfcore.cli.number")
            if getattr(action.type, "__qualname__", "") == "number.<locals>.parse" and option not in UNBOUNDED:
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type("-1e9" if "--port" not in option else "99999")


# options whose value is text, not a path (every other option with a value is a path or a number)
TEXT_OPTIONS = {"--cmap", "--host", "--set", "--positive-groups", "--negative-groups", "--rename-groups"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_path_argument_refuses_an_empty_path(name):
    """An empty path (an unset shell variable) was taken as '.': prob_map.py "" ... mapped
    every slide of the working folder, Patch_gen.py -o "" cut into it. Only train.py refused it."""
    for p in parsers(load_script(name)):
        for action in p._actions:
            option = "/".join(action.option_strings) or action.dest
            if action.nargs == 0 or action.choices or option in TEXT_OPTIONS or isinstance(
                    action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if getattr(action.type, "__qualname__", "") == "number.<locals>.parse":
                continue
            assert getattr(action.type, "__name__", "") == "given_path", f"{name} {p.prog} {option}: {action.type}"
            with pytest.raises(argparse.ArgumentTypeError, match="an empty path"):
                action.type(" ")


EMPTY_PATHS = [("prob_map.py", ["", "{w}/m.ckpt", "{w}/syn_tumor_tissue.npy", "-o", "{w}/o.npy"]),
               ("Mask_gen.py", ["{s}", "-o", "", "--kind", "tissue"]),
               ("Patch_gen.py", ["{s}", "--mask", "{w}/syn_tumor_tumor.npy", "-o", ""]),
               ("xml2json.py", ["", "-o", "{w}/o.json"]),
               ("evaluate.py", ["lesions", "{w}/syn_tumor_prob.npy", "-o", ""])]


@pytest.mark.parametrize("script,args", EMPTY_PATHS, ids=[s for s, _ in EMPTY_PATHS])
def test_an_empty_path_is_refused_before_any_work(world, script, args, tmp_path, monkeypatch):
    w, slide = world
    monkeypatch.chdir(tmp_path)  # where '' used to point
    res = call(script, *[expand(a, w, slide) for a in args], check=False)
    assert res.returncode == 2 and "an empty path" in res.stderr.splitlines()[-1], res.stderr
    assert not list(tmp_path.iterdir()) and not (w / "o.npy").exists()


def test_a_picture_or_output_that_cannot_be_written_is_refused_before_the_work(world, tmp_path):
    w, slide = world
    res = call("prob_map_show.py", w / "syn_tumor_prob.npy", "-o", tmp_path / "o.txt", check=False)
    assert res.returncode == 2 and "cannot write a .txt picture" in res.stderr
    (tmp_path / "afile").write_text("")
    res = call("prob_map.py", slide, w / "m.ckpt", w / "syn_tumor_tissue.npy", "-o", tmp_path / "afile" / "o.npy",
               "--workers", "0", check=False)
    assert res.returncode == 2 and "is a file, not a folder" in res.stderr
    assert "lattice" not in res.stderr  # refused before the map was computed (no progress bar)


def test_a_file_that_is_not_a_slide_is_named_before_its_mask_is_checked(world):
    w, slide = world
    text = bad(w, "notaslide.svs", MAKERS["text"])
    for script, args in [("prob_map.py", [text, w / "m.ckpt", w / "syn_tumor_tissue.npy", "-o", w / "o.npy"]),
                         ("prob_map_show.py", [w / "syn_tumor_prob.npy", "-o", w / "o.png", "--slide", text]),
                         ("Patch_gen.py", [text, "--mask", w / "syn_tumor_tumor.npy", "-o", w / "p2"])]:
        res = call(script, *args, check=False)
        assert res.returncode == 2 and "notaslide.svs: not a slide format" in res.stderr, (script, res.stderr)


def test_label_files_as_spreadsheets_write_them(tmp_path):
    read_labels = load_script("evaluate.py").read_labels
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffslide_id,class\r\nA.tif, TUMOR \r\nB,negative\r\n\r\nC,1\r\n".encode())
    assert read_labels(path) == {"A": 1, "B": 0, "C": 1}  # byte-order mark, any header, CRLF, case, spaces
    path.write_text("A,tumor\nB,tumr\n")
    with pytest.raises(CrfError, match="labels.csv:2: label 'tumr'"):
        read_labels(path)
    path.write_text("\nA,tumr\nB,normal\n")  # a typo in the first row is not taken for a header
    with pytest.raises(CrfError, match="labels.csv:2: label 'tumr'"):
        read_labels(path)
    path.write_text("A,tumor\nA,normal\n")
    with pytest.raises(CrfError, match="labels.csv:2: slide A is listed again with another label"):
        read_labels(path)


def test_an_output_that_cannot_be_written_is_refused_before_the_work(world, tmp_path):
    w, slide = world
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "o.json").mkdir()  # where the map's sidecar goes
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    for out, why in [(tmp_path / "d" / "o.npy", "o.json: is a directory"),
                     (tmp_path / "gone" / "o.npy", "gone is a link to nothing")]:
        res = call("prob_map.py", slide, w / "m.ckpt", w / "syn_tumor_tissue.npy", "-o", out, "--workers", "0",
                   check=False)
        assert res.returncode == 2 and why in res.stderr and "lattice" not in res.stderr, res.stderr
        assert not out.exists()
    for args, why in [(["-o", tmp_path / "noext"], "without a suffix"),
                      (["-o", tmp_path / "o.png", "--slide", slide, "--tiff", tmp_path / "o.png"], "end its name")]:
        res = call("prob_map_show.py", w / "syn_tumor_prob.npy", *args, check=False)
        assert res.returncode == 2 and why in res.stderr, res.stderr


def test_an_error_in_a_reading_worker_is_one_line():
    from crfcore.cli import one_line
    text = ("Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            "  File \"x.py\", line 1, in f\nOSError: [Errno 28] No space left on device: 'p/t.png'\n")
    assert one_line(OSError(text)) == "[Errno 28] No space left on device: 'p/t.png'"


def test_a_huge_integer_is_refused_cleanly():
    res = call("viewer.py", ".", "--port", "9" * 400, check=False)
    assert res.returncode == 2 and "expected an integer from 1 to 65535" in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- full disks

FULL_DISK = {  # script and arguments whose output cannot be written; the output path to check
    "xml2json.py": (["{x}", "-o", "{o}/a.json"], "a.json"),
    "Mask_gen.py": (["{s}", "-o", "{o}/syn_tumor_tissue.npy", "--kind", "tissue", "--downsample", "8"],
                    "syn_tumor_tissue.npy"),
    "Patch_gen.py": (["{s}", "--mask", "{w}/syn_tumor_tumor.npy", "-o", "{o}", "--mode", "random", "--num", "3",
                      "--image-size", "96", "--workers", "0", "--quiet"], "syn_tumor.txt"),
    "coord_list_gen.py": (["{w}/patches", "-o", "{o}", "--copy"], "list.txt"),
    "train.py": (["{w}/cfg.json", "{o}", "--quiet"], "train.ckpt"),
    "prob_map.py": (["{s}", "{w}/m.ckpt", "{w}/syn_tumor_tissue.npy", "-o", "{o}/syn_tumor_prob.npy",
                     "--workers", "0", "--quiet"], "syn_tumor_prob.npy"),
    "prob_map_show.py": (["{w}/syn_tumor_prob.npy", "-o", "{o}/o.png"], "o.png"),
    "evaluate.py": (["lesions", "{w}/syn_tumor_prob.npy", "-o", "{o}/l.csv", "--threshold", "0.5",
                     "--radius", "0"], "l.csv"),
}


@pytest.mark.parametrize("script", sorted(FULL_DISK))
def test_a_full_disk_is_an_error_and_leaves_no_partial_output(world, tmp_path, script):
    w, slide = world
    args, product = FULL_DISK[script]
    argv = [a.replace("{w}", str(w)).replace("{s}", str(slide)).replace("{o}", str(tmp_path / "out"))
            .replace("{x}", str(slide.with_suffix(".xml"))) for a in args]
    with file_size_limit(600):  # every output of these runs is larger than 600 bytes
        res = call(script, *argv, check=False)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert errors and "cannot write" in errors[-1], res.stderr
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").rglob("*")), "temporary files left"
    done = [p for p in (tmp_path / "out").rglob(product)]
    assert not done or all(p.stat().st_size > 0 for p in done)


def test_directory_mode_goes_on_past_a_bad_file_and_names_it(world, tmp_path):
    w, slide = world
    anns, slides = tmp_path / "anns", tmp_path / "slides"
    anns.mkdir(), slides.mkdir()
    (anns / "a_bad.xml").write_text("<ASAP_Annotations><oops")
    (anns / "b_good.xml").write_text(slide.with_suffix(".xml").read_text())
    res = call("xml2json.py", anns, "-o", tmp_path / "json", check=False)
    assert res.returncode == 2 and (tmp_path / "json" / "b_good.json").exists()
    assert "a_bad.xml: malformed XML" in res.stderr and res.stderr.strip().endswith("1 of 2 failed: a_bad.xml")
    (slides / "a_broken.svs").write_text("not a slide")
    (slides / "syn_tumor.tif").symlink_to(slide)
    res = call("Mask_gen.py", slides, "-o", tmp_path / "masks", "--kind", "tissue", "--downsample", "32",
               "--quiet", check=False)
    assert res.returncode == 2 and (tmp_path / "masks" / "syn_tumor_tissue.npy").exists()
    assert "1 of 2 failed: a_broken.svs" in res.stderr and "Traceback" not in res.stderr


def test_ctrl_c_while_the_libraries_load_is_one_line():
    """Every script calls quiet_ctrl_c first: a Ctrl-C before `run` (torch takes seconds to
    import) is `interrupted` and status 130, not a traceback from inside an import; `run`
    gives Ctrl-C back to Python, so the work's own clean-up still runs."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    code = ("from crfcore.startup import quiet_ctrl_c; quiet_ctrl_c(); import os, signal, time; "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(30)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 130 and proc.stderr == "interrupted\n"
    for script in ROOT.glob("*.py"):
        assert "\nquiet_ctrl_c()" in script.read_text(), script.name
    from crfcore.cli import run
    from crfcore.startup import quiet_ctrl_c
    quiet_ctrl_c()
    with pytest.raises(SystemExit):
        run(lambda argv: 0, [])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
