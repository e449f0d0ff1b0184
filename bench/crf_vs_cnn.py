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

import numpy as np

from crfcore import masks, synthetic
from crfcore.annotations import write_annotation
from crfcore.evaluation import find_lesions, froc, froc_score, isolated_tumour_cells
from crfcore.evaluation import evaluation_mask, slide_hits, slide_roc
from crfcore.heatmap import load_probability_map

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
    names = [(f"noisy_t{i}", 1) for i in range(args.slides)] + [(f"noisy_n{i}", 0) for i in range(args.slides)]
    truth = {}
    for i, (name, tumours) in enumerate(names):
        path = out / "slides" / f"{name}.tif"
        if not path.exists():
            s = synthetic.write_slide(path, 2048, 1536, tumours=tumours, seed=100 + i, mpp=1.0,
                                      tumour_radius=0.13, noise=args.noise)
            write_annotation(s.annotation, out / "json" / f"{name}.json")
        truth[name] = tumours
        for kind in ("tissue", "tumor"):
            m = out / "masks" / f"{name}_{kind}.npy"
            if not m.exists():
                sh("Mask_gen.py", path, "-o", m, "--kind", kind, "--annotation", out / "json" / f"{name}.json",
                   "--downsample", "32")
    rows = []
    for label, model in models.items():
        fps, tps, scores, ious = [], [], [], []
        for name, tumours in names:
            prob_path = out / "maps" / model.name / f"{name}_prob.npy"
            if not prob_path.exists():
                sh("prob_map.py", out / "slides" / f"{name}.tif", model / "best.ckpt",
                   out / "masks" / f"{name}_tissue.npy", prob_path, "--quiet")
            prob, meta = load_probability_map(prob_path)
            tumour, _ = masks.load_mask(out / "masks" / f"{name}_tumor.npy")
            lab = evaluation_mask(tumour, 32.0, 1.0) if tumours else None
            itc = isolated_tumour_cells(lab, 32.0, 1.0) if tumours else set()
            fp, tp, _ = slide_hits(find_lesions(prob, tuple(meta["downsample"])), lab, itc, (32.0, 32.0))
            fps.append(fp), tps.append(tp), scores.append(float(prob.max()))
            if tumours:
                pred = prob >= 0.5
                ious.append((pred & tumour).sum() / max((pred | tumour).sum(), 1))
        score, _ = froc_score(*froc(fps, tps))
        auc = slide_roc(np.array([t for _, t in names]), np.array(scores), n_boot=200)["auc"]
        rows.append((label, score, auc, float(np.mean(ious))))
    print(f"\n{len(names)} held-out slides ({args.slides} with tumours), noise {args.noise}")
    print(f"{'model':<18} {'FROC':>6} {'slide AUC':>9} {'pixel IoU':>9}")
    for label, score, auc, iou in rows:
        print(f"{label:<18} {score:6.3f} {auc:9.3f} {iou:9.3f}")
    (cnn, crf) = rows
    print(f"crf_minus_cnn: froc={crf[1] - cnn[1]:+.3f} auc={crf[2] - cnn[2]:+.3f} iou={crf[3] - cnn[3]:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
