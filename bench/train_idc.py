#!/usr/bin/env python3
"""Patch-classification mode on the real IDC breast-histology patches, split by patient:
train MobileNetV2 from scratch on the CPU, report the held-out patients.

  python bench/train_idc.py --out DIR [--epochs N] [--holdout 0.25]

Leaves DIR/best.ckpt, DIR/report.txt and DIR/confusion_matrix.png and ends with one line
`balanced_accuracy=<x> auc=<y>` for the held-out patients. Published reference (Intel
AI DevJam IDC, 277k training patches): accuracy 0.91.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IDC = ROOT.parent / "shared" / "data" / "idc"


def split_by_patient(src: Path, dst: Path, holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """Symlink class folders into dst/train and dst/valid, no patient in both. Patients are
    held out class by class (random order) until each class has `holdout` of its patches
    held out, so every class is in the held-out set (in this subset, class 0 comes from
    four patients only)."""
    files = defaultdict(list)
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    for c in classes:
        for f in sorted((src / c).iterdir()):
            files[f.name.split("_")[0]].append((c, f))
    patients = sorted(files)
    order = np.random.default_rng(seed).permutation(patients).tolist()
    has = {p: {k for k, _ in files[p]} for p in patients}
    held: set[str] = set()
    done: set[str] = set()
    for c in sorted(classes, key=lambda c: sum(c in has[p] for p in patients)):  # rarest first
        total = sum(1 for p in patients for k, _ in files[p] if k == c)
        # prefer patients that bring no patches of classes already held out enough
        cands = [p for p in order if c in has[p] and not has[p] & done] or [p for p in order if c in has[p]]
        for p in cands:
            if sum(1 for q in held for k, _ in files[q] if k == c) >= holdout * total:
                break
            held.add(p)
        done.add(c)
    for p in patients:
        split = "valid" if p in held else "train"
        for c, f in files[p]:
            link = dst / split / c / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(f.resolve())
    return sorted(set(patients) - held), sorted(held)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, default=IDC)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--holdout", type=float, default=0.25, help="fraction of patients held out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.data.is_dir():
        print(f"error: IDC patches not found at {args.data}", file=sys.stderr)
        return 2
    train, held = split_by_patient(args.data, args.out / "data", args.holdout, args.seed)
    print(f"patients: {len(train)} train, {len(held)} held out ({', '.join(held)})")
    cfg = {"mode": "classify", "grid": 1, "data_path_train": str(args.out / "data" / "train"),
           "data_path_valid": str(args.out / "data" / "valid"), "patch_size": 48, "batch_size": 64,
           "optimizer": "adamw", "lr": 0.002, "weight_decay": 0.01, "schedule": "cosine",
           "epochs": args.epochs, "workers": 2, "seed": args.seed, "best_metric": "balanced_acc",
           "color_jitter": [0.1, 0.1, 0.1, 0.02]}
    (args.out / "config.json").write_text(json.dumps(cfg, indent=1))
    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), str(args.out / "config.json"), str(args.out / "run"),
                    "--quiet"], check=True)
    minutes = (time.perf_counter() - t) / 60
    for name in ("best.ckpt", "report.txt", "confusion_matrix.png", "curves.png", "log.csv"):
        (args.out / name).unlink(missing_ok=True)
        (args.out / name).symlink_to((args.out / "run" / name).resolve())
    print(f"training time {minutes:.1f} min on the CPU; published IDC result: accuracy 0.91 (277k patches)")
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--evaluate", str(args.out / "best.ckpt"),
                          str(args.out / "data" / "valid"), "--quiet"], check=True, capture_output=True, text=True)
    print(out.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
