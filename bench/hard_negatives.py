#!/usr/bin/env python3
"""One round of hard-negative mining on the demo, measured on held-out noisy slides.

Uses the example's slides, training sets and CNN+CRF model (run `make demo` first):
1. maps the training slides with the demo model (`prob_map.py`),
2. mines their false positives (`evaluate.py negatives`, with a margin around tumours),
3. cuts those patches (`Patch_gen.py --mode coords`) and appends them to a copy of the
   normal training set (`coord_list_gen.py --append`),
4. trains the same config on the enlarged set (`train.py`),
5. maps held-out slides whose texture carries misleading spots (`noise`) with both
   models and prints FROC, slide AUC and pixel precision / recall at 0.5 for each.

  python bench/hard_negatives.py [--out bench/out/hard_negatives] [--noise 0.3] [--per-slide 100]

Every command is printed; nothing of example/out is changed.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from noisy import DEMO, ROOT, bench_parser, demo_missing, map_and_score, noisy_set, sh

TRAIN_SLIDES = ("tumor_001", "tumor_002", "normal_001")  # the demo's training slides (not validation)


def mine(out: Path, per_slide: int, margin_um: float) -> Path:
    """Hard negatives of the demo model on its training slides; the enlarged normal set."""
    for s in TRAIN_SLIDES:
        sh("Mask_gen.py", DEMO / "slides" / f"{s}.tif", "-o", out / "train_masks" / f"{s}_tissue.npy",
           "--kind", "tissue", "--downsample", "16", "--quiet")
        sh("prob_map.py", DEMO / "slides" / f"{s}.tif", DEMO / "model" / "best.ckpt",
           out / "train_masks" / f"{s}_tissue.npy", "-o", out / "train_maps" / f"{s}_prob.npy", "--quiet")
    sh("evaluate.py", "negatives", out / "train_maps", DEMO / "json", "-o", out / "negatives.txt",
       "--per-slide", per_slide, "--margin-um", margin_um, "--threshold", "0.5")
    normal = out / "dataset" / "normal_train"
    shutil.rmtree(normal, ignore_errors=True)
    shutil.copytree(DEMO / "dataset" / "normal_train", normal)
    for s in TRAIN_SLIDES:
        sh("Patch_gen.py", DEMO / "slides" / f"{s}.tif", "--mask", out / "train_masks" / f"{s}_tissue.npy",
           "-o", out / "patches", "--mode", "coords", "--coords", out / "negatives.txt", "--image-size", "192",
           "--overwrite", "--quiet")
    sh("coord_list_gen.py", out / "patches", "-o", normal, "--append", "--copy")
    return normal


def score(out: Path, model: Path, label: str, names: list[tuple[str, int]]) -> tuple:
    s = map_and_score(out, model, label, names)
    return label, s.froc(), s.slide_auc(), s.precision(), s.recall()


def main() -> int:
    p = bench_parser(__doc__, "hard_negatives")
    p.add_argument("--per-slide", type=int, default=100, help="hard negatives mined per training slide")
    p.add_argument("--margin-um", type=float, default=100.0, help="mined points stay this far from tumour")
    args = p.parse_args()
    if demo_missing("slides, training sets and model"):
        return 2
    out = args.out
    normal = mine(out, args.per_slide, args.margin_um)
    shutil.rmtree(out / "mined_model", ignore_errors=True)
    sh("train.py", ROOT / "example" / "config.json", out / "mined_model", "--quiet",
       "--set", f'data_path_normal_train="{normal}"')
    names = noisy_set(out, args.slides, args.noise, seed=200)
    rows = [score(out, DEMO / "model" / "best.ckpt", "before", names),
            score(out, out / "mined_model" / "best.ckpt", "after", names)]
    mined = len((out / "negatives.txt").read_text().split())
    print(f"\n{mined} hard negatives mined from {len(TRAIN_SLIDES)} training slides; {len(names)} held-out "
          f"slides ({args.slides} with tumours), noise {args.noise}")
    print(f"{'model':<8} {'FROC':>6} {'slide AUC':>9} {'pixel precision':>15} {'pixel recall':>12}")
    for label, froc_, auc, prec, rec in rows:
        print(f"{label:<8} {froc_:6.3f} {auc:9.3f} {prec:15.3f} {rec:12.3f}")
    (b, a) = rows
    print(f"mined_minus_before: froc={a[1] - b[1]:+.3f} auc={a[2] - b[2]:+.3f} precision={a[3] - b[3]:+.3f} "
          f"recall={a[4] - b[4]:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
