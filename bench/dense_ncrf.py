#!/usr/bin/env python3
"""`--method dense` against `lattice` at NCRF's geometry, with a trained model.

bench/prob_map.py times every method at NCRF's geometry (patch 256, crop 224, map stride
64, grid 3, MobileNetV2 width 1) with a random model, which is no judge of how well
`dense` agrees with `lattice`. This bench trains a model at that geometry on synthetic
slides of its own, fine-tunes it for `dense` with the demo's recipe
(example/config_dense.json: dense_consistency 1, lr 5e-4, cosine, best_metric
total_loss), and maps bench/prob_map.py's slide, which no training step sees, with both
methods and both checkpoints. Nothing is chosen on that slide.

  python bench/dense_ncrf.py --out DIR [--epochs 4] [--tune-epochs 6] [--grids 120]

1. slides (synthetic, 8192 px, 0.25 um/px, tissue and tumours as on the bench slide, seeds 11-15): tumor_a, tumor_b, normal_a for
   training, tumor_v, normal_v for validation, with their ASAP XML;
2. xml2json.py, Mask_gen.py (tumour and normal masks), Patch_gen.py (768-pixel grids of
   3 x 3 cells of 256 at random centres: `--grids` per tumour mask, half as many per
   normal mask), coord_list_gen.py;
3. train.py: the CNN+CRF from scratch -> DIR/trained.ckpt (bf16 autocast where the CPU
   has native bf16, else fp32);
4. train.py: that model fine-tuned with dense_consistency -> DIR/dense.ckpt;
5. the bench slide (bench/prob_map.py's, `--lattice-side` points across) with its tissue
   mask at stride 64 and its tumour mask; prob_map.py --method lattice and dense with
   each checkpoint (fp32);
6. per checkpoint: `dense` against `lattice` (Pearson r, max and mean abs difference over
   the tissue, and the share of tissue points on different sides of 0.5), and each map's
   pixel AUC and Dice at 0.5 against the tumour mask (evaluate.py pixels).

Ends with one line for the fine-tuned checkpoint:
  dense_ncrf: pearson=<r> max_abs_diff=<d> mean_abs_diff=<m> pearson_as_trained=<r0> auc_lattice=.. auc_dense=.. dice_lattice=.. dice_dense=..
Steps whose outputs exist in DIR are not redone.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from crfcore.cli import parser, run
from crfcore.device import cpu_has_native_bf16
from crfcore.io import atomic_write_json
from crfcore.synthetic import write_slide
from crfcore.testing import write_bench_slide

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings, when loaded from elsewhere (tests)
import idc_dense  # noqa: E402
import idc_wsi as wsi  # noqa: E402

SLIDES = {"tumor_a": (2, 11), "tumor_b": (2, 12), "normal_a": (0, 13),  # training
          "tumor_v": (2, 14), "normal_v": (0, 15)}                       # validation
SIDE, PATCH, CROP, STRIDE = 8192, 256, 224, 64
METHODS = ("lattice", "dense")


def prepare(out: Path, grids: int) -> None:
    """Slides, annotations, masks, grids and the four training sets under DIR/data."""
    for name, (tumours, seed) in SLIDES.items():
        if not (out / "slides" / f"{name}.tif").exists():
            write_slide(out / "slides" / f"{name}.tif", SIDE, SIDE, tumours=tumours, seed=seed, noise=0.1,
                        tissue=[(0.5, 0.5, 0.5, 0.5)], xml=out / "xml" / f"{name}.xml")
    wsi.sh("xml2json.py", out / "xml", "-o", out / "json")
    for kind in ("tumor", "normal"):
        wsi.sh("Mask_gen.py", out / "slides", "-o", out / "masks", "--kind", kind, "--annotation", out / "json",
               "--downsample", 32, "--quiet")
    for name in SLIDES:
        split = "valid" if name.endswith("_v") else "train"
        for kind, num, seed in (("tumor", grids, 1), ("normal", grids // 2, 2)):
            if kind == "tumor" and name.startswith("normal"):
                continue
            wsi.sh("Patch_gen.py", out / "slides" / f"{name}.tif", "--mask", out / "masks" / f"{name}_{kind}.npy",
                   "-o", out / "patches" / f"{kind}_{split}", "--mode", "random", "--num", num,
                   "--image-size", 3 * PATCH, "--seed", seed, "--quiet")
    for kind in ("tumor", "normal"):
        for split in ("train", "valid"):
            wsi.sh("coord_list_gen.py", out / "patches" / f"{kind}_{split}", "-o", out / "data" / f"{kind}_{split}")


def configs(out: Path, args) -> dict[str, dict]:
    """The two train.py configs: from scratch, and the dense fine-tune of its best.ckpt."""
    data = {f"data_path_{k}_{s}": str(out / "data" / f"{k}_{s}") for k in ("tumor", "normal") for s in ("train", "valid")}
    base = {"mode": "grid", **data, "json_path_train": str(out / "json"), "json_path_valid": str(out / "json"),
            "image_size": 3 * PATCH, "patch_size": PATCH, "crop_size": CROP, "grid": 3, "width_mult": 1.0,
            "optimizer": "adamw", "lr": 0.002, "weight_decay": 0.01, "schedule": "cosine", "epochs": args.epochs,
            "batch_size": 16, "workers": 2, "best_metric": "balanced_acc",
            "precision": "bf16" if cpu_has_native_bf16() else "fp32"}
    tune = {**base, "init_from": str(out / "trained.ckpt"), "dense_consistency": 1.0, "lr": 5e-4,
            "epochs": args.tune_epochs, "best_metric": "total_loss",
            "batch_size": 8}  # 16 was killed here by forked workers (fixed since: retain_freed_memory); kept
    return {"trained": base, "dense": tune}


def train(out: Path, args) -> None:
    for name, cfg in configs(out, args).items():
        if not (out / f"{name}.ckpt").exists():
            atomic_write_json(out / f"config_{name}.json", cfg)
            wsi.sh("train.py", out / f"config_{name}.json", out / "runs" / name, "--quiet")
            shutil.copyfile(out / "runs" / name / "best.ckpt", out / f"{name}.ckpt")


def bench_slide(out: Path, lattice_side: int) -> Path:
    """bench/prob_map.py's slide with its tissue mask (stride 64) and tumour mask."""
    bench = out / "bench"
    write_bench_slide(bench / "slide" / "bench.tif", lattice_side, STRIDE, PATCH, xml=bench / "xml" / "bench.xml")
    wsi.sh("xml2json.py", bench / "xml", "-o", bench / "json")
    wsi.sh("Mask_gen.py", bench / "slide", "-o", bench / "masks", "--kind", "tissue", "--downsample", STRIDE, "--quiet")
    wsi.sh("Mask_gen.py", bench / "slide", "-o", bench / "tumour", "--kind", "tumor", "--annotation", bench / "json",
           "--downsample", STRIDE, "--quiet")
    return bench


def map_path(bench: Path, ckpt: str, method: str) -> Path:
    return bench / "maps" / f"{ckpt}_{method}" / "bench_prob.npy"


def agreement(lattice: Path, other: Path) -> dict:
    """idc_dense.py's (max abs difference, Pearson r over the tissue), plus the mean abs
    difference over the tissue and the share of tissue points the two maps put on
    different sides of 0.5: on a slide this easy most points are near 0 or 1, and Pearson r
    alone says little about the points in between."""
    p, q, tissue = idc_dense.read_pair(lattice, other)
    return {**idc_dense.compare(p, q, tissue), "mean_abs_diff": float(np.abs(p - q)[tissue].mean()),
            "sides": float(((p[tissue] >= 0.5) != (q[tissue] >= 0.5)).mean())}


def score(out: Path, bench: Path) -> dict:
    """Each checkpoint's maps: pixel scores, and dense against lattice."""
    rows = {}
    for ckpt in ("trained", "dense"):
        for method in METHODS:
            prob = map_path(bench, ckpt, method)
            if not prob.exists():
                wsi.sh("prob_map.py", bench / "slide", out / f"{ckpt}.ckpt", bench / "masks", prob.parent,
                       "--method", method, "--precision", "fp32", "--quiet")
            rows[f"{ckpt}:{method}"] = {**wsi.pixels(prob, bench / "tumour" / "bench_tumor.npy", 0.5),
                                        **agreement(map_path(bench, ckpt, "lattice"), prob)}
    print(f"{'checkpoint':<10} {'method':<8} {'pearson':>8} {'max diff':>8} {'mean diff':>9} {'sides':>7} "
          f"{'px AUC':>7} {'Dice':>7}")
    for key, r in rows.items():
        print(f"{key.split(':')[0]:<10} {key.split(':')[1]:<8} {r['pearson']:8.5f} {r['max_abs_diff']:8.3f} "
              f"{r['mean_abs_diff']:9.5f} {r['sides']:7.5f} {r['auc']:7.4f} {r['dice']:7.4f}")
    atomic_write_json(out / "dense_ncrf.json", rows)
    return rows


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, required=True, help="working folder")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the training from scratch")
    p.add_argument("--tune-epochs", type=int, default=6, help="epochs of the dense fine-tune")
    p.add_argument("--grids", type=int, default=120, help="grids per tumour mask (half as many per normal mask)")
    p.add_argument("--lattice-side", type=int, default=220, help="the bench slide's tissue span (bench/prob_map.py's)")
    args = p.parse_args(argv)
    start, cpu = time.perf_counter(), os.times()
    if not (args.out / "data" / "normal_valid" / "list.txt").exists():
        prepare(args.out, args.grids)
    train(args.out, args)
    rows = score(args.out, bench_slide(args.out, args.lattice_side))
    used = sum(os.times()[:4]) - sum(cpu[:4])
    print(f"{(time.perf_counter() - start) / 60:.1f} min wall-clock, {used / 60:.1f} min of CPU time")
    r, r0 = rows["dense:dense"], rows["trained:dense"]
    print(f"dense_ncrf: pearson={r['pearson']:.5f} max_abs_diff={r['max_abs_diff']:.4f} "
          f"mean_abs_diff={r['mean_abs_diff']:.5f} "
          f"pearson_as_trained={r0['pearson']:.5f} "
          + " ".join(f"{k}_{m}={rows[f'dense:{m}'][k]:.4f}" for k in ("auc", "dice") for m in METHODS))
    return 0


if __name__ == "__main__":
    run(main)
