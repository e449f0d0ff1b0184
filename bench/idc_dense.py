#!/usr/bin/env python3
"""`--method dense` against `lattice` on real tissue: the IDC whole-mount slides of
bench/idc_wsi.py, the same model for both methods.

At idc_wsi.py's geometry `dense` cannot run: a cell is 50 pixels and the map lattice 25,
neither a multiple of MobileNetV2's feature stride 32, so prob_map.py falls back to
`lattice`. Here the CNN reads the slides at 3.125 um per pixel instead of their 4.0
(config `mpp`, Patch_gen.py --mpp): a cell is 64 pixels (patch = crop = 64), the lattice
stride 32 pixels, and `dense` runs with one tile phase. Split, lattice (D = 25), training
recipe, thresholds and cell scoring are idc_wsi.py's.

  python bench/idc_dense.py --out DIR [--weight 1] [--tune-epochs 24] [--validation-only]

1. idc_wsi.py's slides, masks and grids, cut at 3.125 um (192-pixel images of 3 x 3 cells);
2. train.py: the CNN+CRF (grid 3) as idc_wsi.py trains it -> DIR/trained.ckpt;
3. train.py: that model fine-tuned for dense (config dense_consistency `--weight`,
   init_from DIR/trained.ckpt, lr 5e-4, `--tune-epochs`) -> DIR/dense_w<W>_e<E>.ckpt;
4. prob_map.py --method lattice and --method dense, each checkpoint, on the validation
   slide 8865 and the held-out 8864;
5. each checkpoint and method: the threshold of the validation cells (Youden's J); on the
   held-out slide pixel AUC and Dice (evaluate.py pixels), cell-level F1, and FROC
   (evaluate.py lesions, froc at level 0). Dense against lattice, same checkpoint: max abs
   difference and Pearson r over tissue, on each slide. No slide AUC: every slide holds IDC.
6. the picture DIR/idc_8864_dense.png: the held-out slide, the model as trained mapped by
   lattice and by dense, and the fine-tuned model mapped by dense.

`--validation-only` maps the validation slide alone, to choose the weight and epochs
there (see docs/speed.md for the choice). Otherwise the last line is the fine-tuned
checkpoint on the held-out slide:
  idc_dense: pearson=<r> max_abs_diff=<d> auc_lattice=<a> auc_dense=<b> dice_lattice=.. dice_dense=..
             f1_lattice=.. f1_dense=.. froc_lattice=.. froc_dense=..
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from crfcore.cli import UserError, parser, run
from crfcore.heatmap import load_probability_map
from crfcore.io import atomic_write_json
from crfcore.masks import load_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, when loaded from elsewhere (tests)
import idc_wsi as wsi  # noqa: E402

CUT = wsi.Cut(patch=64, mpp=4.0 * wsi.PATCH / 64)  # idc_slides.py writes 4.0 um: a 50-pixel cell read as 64
METHODS = ("lattice", "dense")
SPLITS = {"valid": wsi.FOLDS[0].valid, "test": wsi.FOLDS[0].test}
TUNE_LR = 5e-4  # the demo's dense fine-tune (example/config_dense.json)


def tune_name(args) -> str:
    return f"dense_w{args.weight:g}_e{args.tune_epochs}"


def train(out: Path, args) -> list[str]:
    """Grids, the model (DIR/trained.ckpt) and its dense fine-tune (DIR/<tune_name>.ckpt);
    the two checkpoint names."""
    if not (out / "data" / "normal_valid" / "list.txt").exists():
        wsi.prepare(out, args.data, CUT)
    cfg = wsi.config(out, args.epochs, "none", cut=CUT)
    tune = {**cfg, "init_from": str(out / "trained.ckpt"), "dense_consistency": args.weight, "lr": TUNE_LR,
            "epochs": args.tune_epochs}
    names = ["trained", tune_name(args)]
    for name, c in zip(names, (cfg, tune)):
        if not (out / f"{name}.ckpt").exists():
            atomic_write_json(out / f"config_{name}.json", c)
            wsi.sh("train.py", out / f"config_{name}.json", out / "runs" / name, "--quiet")
            shutil.copyfile(out / "runs" / name / "best.ckpt", out / f"{name}.ckpt")
    return names


def map_path(out: Path, ckpt: str, method: str, split: str) -> Path:
    return out / "maps" / f"{ckpt}_{method}" / f"{SPLITS[split]}_prob.npy"


def make_maps(out: Path, ckpts: list[str], splits: list[str]) -> None:
    for ckpt in ckpts:
        for method in METHODS:
            for split in splits:
                wsi.sh("prob_map.py", out / "slides" / split, out / f"{ckpt}.ckpt", out / "masks" / split,
                       map_path(out, ckpt, method, split).parent, "--method", method, "--overwrite", "--quiet")


def read_pair(a: Path, b: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two probability maps of one slide, and the tissue mask that `a` names."""
    p, meta = load_probability_map(a)
    q, _ = load_probability_map(b)
    return p, q, load_mask(meta["mask"], slide=meta["slide"])[0]


def compare(p: np.ndarray, q: np.ndarray, tissue: np.ndarray) -> dict:
    """Max abs difference (whole maps) and Pearson r over the tissue."""
    return {"max_abs_diff": float(np.abs(p - q).max()), "pearson": float(np.corrcoef(p[tissue], q[tissue])[0, 1])}


def agreement(a: Path, b: Path) -> dict:
    """`compare` of the maps `a` and `b`, over the tissue of `a`'s mask."""
    return compare(*read_pair(a, b))


def froc(out: Path, prob: Path) -> float:
    """evaluate.py lesions (its defaults) and froc at level 0 against the slide's IDC outline."""
    lesions = prob.parent / "lesions"
    wsi.sh("evaluate.py", "lesions", prob, "-o", lesions / f"{prob.name[:-len('_prob.npy')]}.csv")
    line = wsi.sh("evaluate.py", "froc", lesions, out / "json", "--slides", out / "slides" / "test", "--level", "0")
    return float(re.search(r"FROC=([\d.]+)", line)[1])


def validation(out: Path, ckpt: str, method: str) -> dict:
    """The validation slide: cell AUC, the threshold (Youden's J on its cells) and dense's
    agreement with lattice."""
    prob = map_path(out, ckpt, method, "valid")
    scores, labels = wsi.cell_scores(prob, out / "slides" / "valid" / f"{SPLITS['valid']}_cells.csv")
    return {"valid_cell_auc": float(roc_auc_score(labels, scores)), "t": round(wsi.choose_threshold(scores, labels), 4),
            "valid_pearson": agreement(map_path(out, ckpt, "lattice", "valid"), prob)["pearson"]}


def held_out(out: Path, ckpt: str, method: str, t: float) -> dict:
    """The held-out slide at threshold t: pixel scores, cell F1, FROC, agreement, seconds."""
    prob, test = map_path(out, ckpt, method, "test"), SPLITS["test"]
    return {**wsi.pixels(prob, out / "masks" / "test" / f"{test}_tumor.npy", t),
            **wsi.cell_f1(prob, out / "slides" / "test" / f"{test}_cells.csv", t), "froc": froc(out, prob),
            **agreement(map_path(out, ckpt, "lattice", "test"), prob),
            "seconds": load_probability_map(prob)[1]["seconds"]}


def report(out: Path, ckpts: list[str], with_test: bool) -> dict:
    """Scores of each checkpoint and method (the validation slide's only unless
    `with_test`), then one table of them, after the scripts' own output."""
    rows = {}
    for ckpt in ckpts:
        for method in METHODS:
            r = rows[f"{ckpt}:{method}"] = validation(out, ckpt, method)
            if with_test:
                r.update(held_out(out, ckpt, method, r["t"]))
    print(f"{'checkpoint':<16} {'method':<8} {'val r':>7} {'val AUC':>7} {'t':>7}" + (
        f" {'test r':>7} {'max diff':>8} {'px AUC':>7} {'Dice':>7} {'F1':>7} {'FROC':>7} {'s':>6}" if with_test else ""))
    for key, r in rows.items():
        ckpt, method = key.split(":")
        line = f"{ckpt:<16} {method:<8} {r['valid_pearson']:7.4f} {r['valid_cell_auc']:7.4f} {r['t']:7.4f}"
        if with_test:
            line += (f" {r['pearson']:7.4f} {r['max_abs_diff']:8.3f} {r['auc']:7.4f} {r['dice']:7.4f} "
                     f"{r['f1']:7.4f} {r['froc']:7.4f} {r['seconds']:6.1f}")
        print(line)
    atomic_write_json(out / ("dense.json" if with_test else "dense_validation.json"), rows)
    return rows


def picture(out: Path, ckpts: list[str], rows: dict) -> Path:
    """The held-out slide, then the model as trained by lattice and by dense, and the
    fine-tuned model by dense: DIR/idc_<patient>_dense.png."""
    panels = [(ckpts[0], "lattice", "as trained, lattice"), (ckpts[0], "dense", "as trained, dense"),
              (ckpts[1], "dense", "fine-tuned for dense, dense")]
    return wsi.maps_picture(out, [(map_path(out, c, m, "test"),
                                   f"{title}: F1 {rows[f'{c}:{m}']['f1']:.3f}, r {rows[f'{c}:{m}']['pearson']:.3f}")
                                  for c, m, title in panels], out / f"idc_{SPLITS['test']}_dense.png")


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, required=True, help="working folder")
    p.add_argument("--data", type=Path, default=wsi.IDC, help="folder of IDC patches")
    p.add_argument("--epochs", type=int, default=6, help="training epochs of the model (idc_wsi.py's)")
    p.add_argument("--weight", type=float, default=1.0, help="dense_consistency weight of the fine-tune")
    p.add_argument("--tune-epochs", type=int, default=24, help="epochs of the fine-tune")
    p.add_argument("--validation-only", action="store_true",
                   help="map and score the validation slide only (to choose --weight and --tune-epochs)")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        raise UserError(f"{args.data}: IDC patches not found (give --data PATCH_DIR)")
    start, cpu = time.perf_counter(), os.times()
    ckpts = train(args.out, args)
    make_maps(args.out, ckpts, ["valid"] if args.validation_only else list(SPLITS))
    rows = report(args.out, ckpts, not args.validation_only)
    used = sum(os.times()[:4]) - sum(cpu[:4])
    print(f"{(time.perf_counter() - start) / 60:.1f} min wall-clock, {used / 60:.1f} min of CPU time")
    if not args.validation_only:
        print(f"picture: {picture(args.out, ckpts, rows)}")
        r = {m: rows[f"{ckpts[1]}:{m}"] for m in METHODS}
        print(f"idc_dense: pearson={r['dense']['pearson']:.4f} max_abs_diff={r['dense']['max_abs_diff']:.4f} "
              + " ".join(f"{k}_{m}={r[m][k]:.4f}" for k in ("auc", "dice", "f1", "froc") for m in METHODS))
    return 0


if __name__ == "__main__":
    run(main)
