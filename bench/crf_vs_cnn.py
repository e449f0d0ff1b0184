#!/usr/bin/env python3
"""CNN (grid 1) against CNN+CRF (grid 3) on held-out synthetic slides with noisy texture.

Uses the example's training sets (run `make demo` first): trains the grid-1 baseline on
them (the grid-3 model is example/out/model), writes held-out slides with misleading
spots (`noise`), maps them with both models and prints FROC, slide AUC and pixel IoU
(threshold 0.5) for each.

  python bench/crf_vs_cnn.py [--out bench/out/crf_vs_cnn] [--noise 0.3]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from noisy import DOWNSAMPLE, Scores, noisy_slides

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "example" / "out"


def sh(*args) -> None:
    subprocess.run([sys.executable, *map(str, args)], check=True, cwd=ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "crf_vs_cnn")
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--slides", type=int, default=3, help="held-out tumour slides (and as many normal)")
    args = p.parse_args()
    if not (EX / "model" / "best.ckpt").exists():
        print("error: run `make demo` first (this bench reuses its training sets and CRF model)", file=sys.stderr)
        return 2
    out = args.out
    models = {"CNN (grid 1)": out / "cnn", "CNN+CRF (grid 3)": EX / "model"}
    if not (out / "cnn" / "best.ckpt").exists():
        sh("train.py", ROOT / "example" / "config.json", out / "cnn", "--set", "grid=1", "--quiet")
    names = noisy_slides(out / "slides", out / "json", args.slides, args.noise, seed=100)
    for name, _ in names:
        for kind in ("tissue", "tumor"):
            m = out / "masks" / f"{name}_{kind}.npy"
            if not m.exists():
                sh("Mask_gen.py", out / "slides" / f"{name}.tif", "-o", m, "--kind", kind,
                   "--annotation", out / "json" / f"{name}.json", "--downsample", DOWNSAMPLE)
    rows = []
    for label, model in models.items():
        scores = Scores()
        for name, tumours in names:
            prob_path = out / "maps" / model.name / f"{name}_prob.npy"
            if not prob_path.exists():
                sh("prob_map.py", out / "slides" / f"{name}.tif", model / "best.ckpt",
                   out / "masks" / f"{name}_tissue.npy", prob_path, "--quiet")
            scores.add(prob_path, out / "masks" / f"{name}_tumor.npy", tumours)
        rows.append((label, scores.froc(), scores.slide_auc(), scores.mean_iou()))
    print(f"\n{len(names)} held-out slides ({args.slides} with tumours), noise {args.noise}")
    print(f"{'model':<18} {'FROC':>6} {'slide AUC':>9} {'pixel IoU':>9}")
    for label, score, auc, iou in rows:
        print(f"{label:<18} {score:6.3f} {auc:9.3f} {iou:9.3f}")
    (cnn, crf) = rows
    print(f"crf_minus_cnn: froc={crf[1] - cnn[1]:+.3f} auc={crf[2] - cnn[2]:+.3f} iou={crf[3] - cnn[3]:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
