#!/usr/bin/env python3
"""CNN (grid 1) against CNN+CRF (grid 3) on real whole-mount H&E slides: the IDC
patches rebuilt into slides (bench/idc_slides.py), then the pipeline a user runs, each
stage a subprocess with its command printed: xml2json.py, Mask_gen.py (tissue, tumour,
normal), Patch_gen.py, coord_list_gen.py, train.py, prob_map.py, evaluate.py.

  python bench/idc_wsi.py --out DIR [--stain none|hed|macenko] [--epochs 6] [--seed 0] [--fold 0]
  python bench/idc_wsi.py --score PROB.npy CELLS.csv --threshold T   # cell-level F1 of any map

Split, by patient (only 8863, 8864 and 8865 are complete): 8864 (1,133 cells, 328 IDC,
the most IDC cells: the steadiest F1) is held out and never trained on; 8865 (712 cells,
55 IDC) is the validation slide (best epoch, threshold); 8863 (979 cells, 207 IDC: IDC
and normal tissue side by side) trains with the partial slides. On a partial slide a
missing cell is unknown tissue shown as glass, so it trains only where every cell a
training image touches is present (crfcore.mosaic.lattice_centres). `--fold 1` and
`--fold 2` rotate the complete patients' roles (held out, validation, training) to 8865,
8863, 8864 and to 8863, 8864, 8865, so that each patient is held out once.

Geometry: the cells are 50 pixels (about 200 um), the data set's own unit, so the CNN
sees one cell's worth of tissue (patch 50, crop 50: MobileNetV2's stride 32 leaves a
2 x 2 feature map whose units each see the whole patch; upsampling the patch to MobileNetV2's
usual 224 would cost 20x the CPU time) and the CRF links it to its 8 neighbours
50 pixels away (grid 3, image 150): the context the CNN does not see. The masks and maps use
downsample D = 25: patch / D = 2 is whole, as the lattice method needs; a cell holds
2 x 2 lattice points (a finer tissue mask keeps the pale cells of a tumour's rim that
Otsu at D = 50 drops: 69 % of 8863's cells have tissue at D = 50, 83 % at D = 25), and the
training grids are centred on exactly those lattice points, so the CNN learns on the
patch positions the map later asks about. A cell's score is the map's mean over its
tissue points (0 without any).

Stain: the default `none` was chosen on the validation slide alone (the CRF's cell AUC on
8865 on the earlier machine: 0.9793 with `none`, 0.9748 with `macenko`, 0.9678 with `hed`
0.02; one run each; on the current one 0.9737, 0.9757 and 0.9735: see the README).

Leaves DIR/cnn.ckpt, DIR/crf.ckpt, DIR/lattice.json ({"downsample": 25, "threshold": t}
for crf.ckpt, "threshold_cnn" for cnn.ckpt; each t maximises Youden's J on the validation
slide's cells) and DIR/idc_<held-out patient>_maps.png, and ends with one line for the held-out slide:
`auc_cnn=<x> auc_crf=<y> dice_cnn=<x> dice_crf=<y> f1_cnn=<x> f1_crf=<y>`
(pixel AUC over tissue and Dice at t from evaluate.py pixels; cell-level F1 at t against
<patient>_cells.csv).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score, roc_curve

from crfcore import mosaic
from crfcore.cli import UserError, parser, run
from crfcore.annotations import load_annotation
from crfcore.heatmap import load_probability_map, overlay
from crfcore.masks import load_mask
from crfcore.io import atomic_path, atomic_write_json, atomic_write_text, write_image
from crfcore.slide import open_slide, read_level
from crfcore.tiling import format_coords

ROOT = Path(__file__).resolve().parents[1]
IDC = ROOT.parent / "shared" / "data" / "idc"

TRAIN_PARTIAL = ["8913", "8917", "8918", "8950", "8951", "8955", "8956", "8957", "8959", "8975", "8980",
                 "8984", "9022"]
D = 25             # mask / map downsample: 2 x 2 lattice points per 50-pixel cell
PATCH = CROP = 50  # the CNN sees one cell's worth of tissue
GRID = 3
PICTURE_SIDE = 900  # long side of each panel of the picture, pixels
STEPS = 30  # batches of 32 grids per epoch: 6 epochs are 180 steps, 52k crops (see the README text)
MODELS = {"cnn": ["--set", "grid=1"], "crf": []}  # the CNN is the CRF's config without the CRF
STAINS = ("none", "hed", "macenko")
# HED jitter strength: in scikit-image's HED units the haematoxylin of these slides is
# about 0.04 (median), so Tellez's "light" 0.05 shifts it by more than itself (27 grey
# levels on average); 0.02 moves colours by about 11, as much as the patients differ
HED = 0.02


@dataclass(frozen=True)
class Split:
    """The complete patients' roles: `test` is held out and never trained on, `valid`
    picks the epoch and the threshold, `train` trains with the partial slides."""

    test: str = "8864"
    valid: str = "8865"
    train: str = "8863"


FOLDS = (Split(), Split(test="8865", valid="8863", train="8864"), Split(test="8863", valid="8864", train="8865"))


def sh(*args) -> str:
    """Run a project script as a user would, printing the command; return its stdout."""
    cmd = [sys.executable, *map(str, args)]
    print("$ python " + " ".join(map(str, args)), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode:
        raise UserError(f"{args[0]} failed with exit status {done.returncode} (its message is above)")
    return done.stdout


@dataclass(frozen=True)
class Cut:
    """How the CNN sees a cell: as `patch` pixels (patch = crop), read at `mpp` microns per
    pixel (None: level 0, 50 pixels). bench/idc_dense.py enlarges a cell to 64 pixels."""

    patch: int = PATCH
    mpp: float | None = None


def config(out: Path, epochs: int, stain: str, hed: float = HED, cut: Cut = Cut(), seed: int = 0) -> dict:
    """The training config (grid 3; the CNN is the same with --set grid=1); `seed`: config seed
    (initialisation, data order, augmentation) of both models."""
    data = out / "data"
    cfg = {"mode": "grid", "grid": GRID, "image_size": GRID * cut.patch, "patch_size": cut.patch,
           "crop_size": cut.patch, **({"mpp": cut.mpp} if cut.mpp else {}),
           "data_path_tumor_train": str(data / "tumor_train"), "data_path_normal_train": str(data / "normal_train"),
           "data_path_tumor_valid": str(data / "tumor_valid"), "data_path_normal_valid": str(data / "normal_valid"),
           "json_path_train": str(out / "json"), "json_path_valid": str(out / "json"),
           "width_mult": 0.5, "optimizer": "adamw", "lr": 0.002, "weight_decay": 0.01, "schedule": "cosine",
           "epochs": epochs, "max_steps": STEPS, "batch_size": 32, "color_jitter": [0.1, 0.1, 0.1, 0.02], "workers": 2, "seed": seed,
           "best_metric": "auc"}
    if stain == "hed":
        cfg["hed_jitter"] = hed
    elif stain == "macenko":  # the complete training slide's stains (8863 in fold 0), whole
        cfg["stain_norm"] = str(out / "stain_reference.png")
    return cfg


def prepare(out: Path, patches: Path, cut: Cut = Cut(), split: Split = FOLDS[0]) -> None:
    """Slides, annotations, masks, training and validation grids (images of 3 x 3 cells,
    `GRID * PATCH` level-0 pixels, cut as `cut` says)."""
    slides, masks = out / "slides", out / "masks"
    for role, who in (("train", [split.train, *TRAIN_PARTIAL]), ("valid", [split.valid]), ("test", [split.test])):
        sh("bench/idc_slides.py", patches, "-o", slides / role, "--patients", *who, "--quiet")
        sh("xml2json.py", slides / role, "-o", out / "json")
        kinds = ("tissue", "tumor", "normal") if role == "train" else ("tissue", "tumor")
        for kind in kinds:
            sh("Mask_gen.py", slides / role, "-o", masks / role, "--kind", kind, "--annotation", out / "json",
               "--downsample", D, "--quiet")
    for role in ("train", "valid"):
        tumour, normal = [], []
        for csv in sorted((slides / role).glob("*_cells.csv")):
            sid = csv.name[:-len("_cells.csv")]
            t, n = mosaic.lattice_centres(mosaic.read_cells(csv), D, GRID * PATCH, sid not in TRAIN_PARTIAL,
                                          per_cell=None if role == "train" else 1)
            if role == "valid":  # to pick an epoch, grids on every other cell (a checkerboard) do
                t, n = (c[(c[:, 0] // mosaic.CELL + c[:, 1] // mosaic.CELL) % 2 == 0] for c in (t, n))
            tumour.append(format_coords(sid, t))
            normal.append(format_coords(sid, n))
        for kind, lines in (("tumor", tumour), ("normal", normal)):
            coords = out / "coords" / f"{kind}_{role}.txt"
            atomic_write_text(coords, "".join(lines))
            mask_kind = kind if role == "train" else "tissue"
            sh("Patch_gen.py", slides / role, "--mask", masks / role, "--mask-kind", mask_kind, "--mode", "coords",
               "--coords", coords, "--image-size", GRID * cut.patch, "-o", out / "patches" / f"{kind}_{role}",
               *(["--mpp", cut.mpp] if cut.mpp else []), "--quiet")
            sh("coord_list_gen.py", out / "patches" / f"{kind}_{role}", "-o", out / "data" / f"{kind}_{role}",
               "--overwrite")
    with open_slide(slides / "train" / f"{split.train}.tif") as s:
        write_image(out / "stain_reference.png", read_level(s, 0))


def cell_scores(prob_path: Path, cells_csv: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's score (the map's mean over the cell's tissue points: the tissue mask
    prob_map.py used, named in the map's sidecar) and its label from the cells CSV."""
    prob, meta = load_probability_map(prob_path)
    tissue, _ = load_mask(meta["mask"], slide=meta["slide"])
    cells = mosaic.read_cells(cells_csv)
    return mosaic.cell_scores(prob, tuple(meta["downsample"]), cells, tissue), cells[:, 4]


def cell_f1(prob_path: Path, cells_csv: Path, t: float) -> dict:
    """Cell-level F1: a cell is IDC when its score is >= t."""
    scores, labels = cell_scores(prob_path, cells_csv)
    pred = scores >= t
    return {"f1": float(f1_score(labels, pred, zero_division=0)),
            "precision": float(precision_score(labels, pred, zero_division=0)),
            "recall": float(recall_score(labels, pred, zero_division=0)), "cells": len(labels)}


def choose_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Youden's J on the validation cells: the threshold of highest sensitivity +
    specificity, which (unlike F1) does not depend on the slide's IDC fraction."""
    fpr, tpr, thr = roc_curve(labels, scores)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thr[best], 0.0, 1.0))


def pixels(prob: Path, tumour: Path, t: float) -> dict:
    """evaluate.py pixels, as a user runs it: IoU, Dice at t, AUC over tissue."""
    line = sh("evaluate.py", "pixels", prob, tumour, "--threshold", t)
    m = re.search(r"IoU=([\d.]+|nan) Dice=([\d.]+|nan) .*AUC=([\d.]+|nan)", line)  # nan: no tumour, none called
    return {"iou": float(m[1]), "dice": float(m[2]), "auc": float(m[3])}


def train(out: Path, args) -> None:
    """Slides to the two checkpoints DIR/cnn.ckpt and DIR/crf.ckpt. A DIR is reused only
    by a run with its split and config: its slides and models are kept."""
    split, cfg = FOLDS[args.fold], config(out, args.epochs, args.stain, args.hed, seed=args.seed)
    check_reuse(out, split, cfg)
    if not (out / "data" / "normal_valid" / "list.txt").exists():
        prepare(out, args.data, split=split)
    atomic_write_json(out / "config.json", cfg)
    for name, extra in MODELS.items():
        if not (out / f"{name}.ckpt").exists():
            sh("train.py", out / "config.json", out / "runs" / name, *extra, "--quiet")
            shutil.copyfile(out / "runs" / name / "best.ckpt", out / f"{name}.ckpt")


def check_reuse(out: Path, split: Split, cfg: dict) -> None:
    """Refuse a DIR prepared for another split (DIR/split.json; a DIR without one was
    prepared before --fold, for fold 0) or holding models trained with another config."""
    made = out / "slides"
    stored = (Split(**json.loads((out / "split.json").read_text())) if (out / "split.json").exists()
              else FOLDS[0] if made.exists() else split)
    if stored != split:
        raise UserError(f"{out}: prepared with patient {stored.test} held out, not {split.test}; "
                        f"give another --out for --fold {FOLDS.index(split)}")
    trained = [out / f"{name}.ckpt" for name in MODELS if (out / f"{name}.ckpt").exists()]
    old = json.loads((out / "config.json").read_text()) if trained and (out / "config.json").exists() else cfg
    was, now = _settings(old), _settings(cfg)
    differ = sorted(k for k in {*was, *now} if was.get(k) != now.get(k))
    if differ:
        raise UserError(f"{out}: {trained[0].name} was trained with another config (DIR/config.json differs in "
                        f"{', '.join(differ)}: another --seed, --stain, --hed or --epochs); give another --out")
    atomic_write_json(out / "split.json", asdict(split))


def _settings(cfg: dict) -> dict:
    """What of a config trains the models: its folder paths left out (the same folder may
    be named another way), the stain reference kept as given or not."""
    return {k: ("given" if k == "stain_norm" else v) for k, v in cfg.items()
            if not k.startswith(("data_path", "json_path"))}


def evaluate(out: Path, split: Split = FOLDS[0]) -> dict:
    """Maps of the validation and held-out slides; thresholds from the validation slide;
    scores on the held-out slide."""
    thresholds, result = {}, {}
    val, test = split.valid, split.test
    for name in MODELS:
        for split in ("valid", "test"):
            sh("prob_map.py", out / "slides" / split, out / f"{name}.ckpt", out / "masks" / split,
               out / "maps" / name, "--quiet")
        scores, labels = cell_scores(out / "maps" / name / f"{val}_prob.npy", out / "slides" / "valid" / f"{val}_cells.csv")
        t = thresholds[name] = round(choose_threshold(scores, labels), 4)
        print(f"{name}: validation slide {val}: cell AUC {roc_auc_score(labels, scores):.4f}, threshold {t} "
              f"(Youden's J on its cells), cell F1 {f1_score(labels, scores >= t):.4f} at it")
    atomic_write_json(out / "lattice.json", {"downsample": D, "threshold": thresholds["crf"],
                                              "threshold_cnn": thresholds["cnn"]})
    for name, t in thresholds.items():
        prob = out / "maps" / name / f"{test}_prob.npy"
        result[name] = {**pixels(prob, out / "masks" / "test" / f"{test}_tumor.npy", t),
                        **cell_f1(prob, out / "slides" / "test" / f"{test}_cells.csv", t)}
        print(f"{name}: held-out {test}: " + ", ".join(f"{k} {v:.4f}" for k, v in result[name].items()
                                                       if k != "cells"))
    return result


def picture(out: Path, result: dict, split: Split = FOLDS[0]) -> Path:
    """The held-out slide with its IDC outline, and each model's map over it (outline on
    top): DIR/idc_<patient>_maps.png."""
    test = split.test
    return maps_picture(out, [(out / "maps" / name / f"{test}_prob.npy",
                               f"{label}: F1 {result[name]['f1']:.3f}, AUC {result[name]['auc']:.3f}")
                              for name, label in (("cnn", "CNN (grid 1)"), ("crf", "CNN+CRF (grid 3)"))],
                        out / f"idc_{test}_maps.png", test)


def maps_picture(out: Path, maps: list[tuple[Path, str]], path: Path, test: str = FOLDS[0].test) -> Path:
    """The held-out slide `test` with its IDC outline, then each (map, title) over it, in a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ann = load_annotation(out / "json" / f"{test}.json")
    with open_slide(out / "slides" / "test" / f"{test}.tif") as s:
        img = read_level(s, 0)
    scale = PICTURE_SIDE / max(img.shape[:2])
    panels = [("slide, IDC outline (green)", mosaic.outline(img, ann, scale))]
    for prob_path, title in maps:
        prob, meta = load_probability_map(prob_path)
        tissue, _ = load_mask(meta["mask"], slide=meta["slide"])
        panels.append((title, mosaic.outline(overlay(img, prob, 0.5, tissue=tissue), ann, scale)))
    h, w = panels[0][1].shape[:2]
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 5 * h / w + 0.7))
    for ax, (title, panel) in zip(axes, panels):
        ax.imshow(panel)
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    fig.colorbar(plt.cm.ScalarMappable(cmap="jet"), ax=axes, fraction=0.015, pad=0.01, label="IDC probability")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, help="working folder (required unless --score)")
    p.add_argument("--data", type=Path, default=IDC, help="folder of IDC patches")
    p.add_argument("--stain", choices=STAINS, default="none",
                   help="hed: HED jitter (config hed_jitter); macenko: Macenko normalisation to the complete "
                        "training slide, 8863 in fold 0 (stain_norm)")
    p.add_argument("--hed", type=float, default=HED, help="with --stain hed: the jitter strength")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0, help="training seed of both models (another DIR per seed)")
    p.add_argument("--fold", type=int, choices=range(len(FOLDS)), default=0,
                   help="which complete patient is held out: 0 8864, 1 8865, 2 8863 (another DIR per fold)")
    p.add_argument("--score", nargs=2, type=Path, metavar=("PROB", "CELLS"),
                   help="only print the cell-level F1 of a map against a <patient>_cells.csv")
    p.add_argument("--threshold", type=float, default=0.5, help="with --score: decision threshold")
    args = p.parse_args(argv)
    if args.score:
        r = cell_f1(*args.score, args.threshold)
        print(f"{args.score[0].name}: cell-level F1={r['f1']:.4f} (precision {r['precision']:.4f}, "
              f"recall {r['recall']:.4f}, {r['cells']} cells) at threshold {args.threshold}")
        return 0
    if args.out is None:
        p.error("give --out DIR (or --score PROB CELLS)")
    if not args.data.is_dir():
        raise UserError(f"{args.data}: IDC patches not found (give --data PATCH_DIR)")
    start, cpu = time.perf_counter(), os.times()
    train(args.out, args)
    split = FOLDS[args.fold]
    result = evaluate(args.out, split)
    print(f"picture: {picture(args.out, result, split)}")
    now = os.times()
    used = sum(now[:4]) - sum(cpu[:4])  # user + system, this process and the scripts it ran
    print(f"held-out slide {split.test}; {(time.perf_counter() - start) / 60:.1f} min wall-clock in all, "
          f"{used / 60:.1f} min of CPU time")
    print(" ".join(f"{k}_{m}={result[m][k]:.4f}" for k in ("auc", "dice", "f1") for m in MODELS))
    return 0


if __name__ == "__main__":
    run(main)
