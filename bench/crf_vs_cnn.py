#!/usr/bin/env python3
"""CNN (grid 1) against CNN+CRF (grid 3) on held-out synthetic slides with noisy texture.

Uses the example's training sets (run `make demo` first): trains the grid-1 baseline on
them (the grid-3 model is example/out/model), writes held-out slides with misleading
spots (`noise`), maps them with both models and prints FROC, slide AUC and pixel IoU
(threshold 0.5) for each.

  python bench/crf_vs_cnn.py [--out bench/out/crf_vs_cnn] [--noise 0.3]
"""
from __future__ import annotations

import sys

from noisy import DEMO, ROOT, bench_parser, demo_missing, map_and_score, noisy_set, sh


def main() -> int:
    args = bench_parser(__doc__, "crf_vs_cnn").parse_args()
    if demo_missing("training sets and CRF model"):
        return 2
    out = args.out
    models = {"CNN (grid 1)": out / "cnn", "CNN+CRF (grid 3)": DEMO / "model"}
    if not (out / "cnn" / "best.ckpt").exists():
        sh("train.py", ROOT / "example" / "config.json", out / "cnn", "--set", "grid=1", "--quiet")
    names = noisy_set(out, args.slides, args.noise, seed=100)
    rows = []
    for label, model in models.items():
        scores = map_and_score(out, model / "best.ckpt", model.name, names)
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
