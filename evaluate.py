#!/usr/bin/env python3
"""Evaluate probability maps and models.

  python evaluate.py lesions PROB.npy -o LESIONS.csv [--threshold 0.5] [--radius 12] [--sigma 0]
                     [--to csv|xml|geojson]
  python evaluate.py froc LESIONS_DIR TRUTH_DIR [--level 5] [--slides DIR] [--plot froc.png]
  python evaluate.py slides PROBS_DIR LABELS.csv [--plot roc.png]
  python evaluate.py pixels PROB.npy TUMOUR_MASK.npy [--threshold 0.5]
  python evaluate.py patches CKPT DATASET_DIR [--json JSON_DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from crfcore import evaluation as ev
from crfcore import slide as sl
from crfcore.annotations import load_annotation
from crfcore.cli import UserError, run
from crfcore.heatmap import load_probability_map
from crfcore.io import atomic_path, atomic_write_text


def cmd_lesions(args) -> None:
    prob, meta = load_probability_map(args.prob)
    found = ev.find_lesions(prob, tuple(meta["downsample"]), args.threshold, args.radius, args.sigma)
    out = args.output
    csv_path = out if out.suffix == ".csv" else out.with_suffix(".csv")
    atomic_write_text(csv_path, ev.lesions_csv(found))
    if args.to == "xml":
        atomic_write_text(out.with_suffix(".xml"), ev.lesions_asap_xml(found))
    elif args.to == "geojson":
        atomic_write_text(out.with_suffix(".geojson"), json.dumps(ev.lesions_geojson(found)))
    print(f"{meta['slide']}: {len(found)} lesions above {args.threshold} -> {csv_path}"
          + (f" and {out.with_suffix('.' + args.to)}" if args.to != "csv" else ""))


def truth_labels(stem: str, truth_dir: Path, level: int, mpp: float):
    """Labelled evaluation mask of a slide from `<stem>.json|.xml` or `<stem>*.tif` (a
    Camelyon16 mask), or None for a normal slide (no truth file, or no polygons)."""
    ds = 2.0 ** level
    for ext in (".json", ".xml"):
        path = truth_dir / f"{stem}{ext}"
        if path.exists():
            ann = load_annotation(path)
            if not ann.positive:
                return None
            x1, y1 = ann.bounds()[2:]
            shape = (int(y1 / ds) + 2, int(x1 / ds) + 2)
            tumour = ann.rasterise((np.arange(shape[1]) + 0.5) * ds, (np.arange(shape[0]) + 0.5) * ds)
            return ev.evaluation_mask(tumour, ds, mpp)
    masks = sorted(truth_dir.glob(f"{stem}*.tif"))
    if masks:
        with sl.open_slide(masks[0]) as m:
            lvl = min(level, m.level_count - 1)
            tumour = sl.read_level(m, lvl)[..., 0] > 0
            return ev.evaluation_mask(tumour, sl.level_downsamples(m)[lvl][0], mpp)
    return None


def cmd_froc(args) -> None:
    files = sorted(args.lesions_dir.glob("*.csv"))
    if not files:
        raise UserError(f"{args.lesions_dir}: no lesion CSV files (make them with `evaluate.py lesions`)")
    fps, tps, normal = [], [], []
    ds = 2.0 ** args.level
    for f in files:
        stem = f.stem.removesuffix("_prob").removesuffix("_lesions")
        mpp = args.mpp
        if args.slides is not None:
            found = [p for p in sl.find_slides(args.slides) if p.stem == stem]
            if found:
                with sl.open_slide(found[0]) as s:
                    mpp = (sl.slide_mpp(s) or (mpp,))[0]
        labels = truth_labels(stem, args.truth_dir, args.level, mpp)
        if labels is None:
            normal.append(stem)
        itc = ev.isolated_tumour_cells(labels, ds, mpp) if labels is not None else set()
        fp, tp, _ = ev.slide_hits(ev.read_lesions(f), labels, itc, ds)
        fps.append(fp)
        tps.append(tp)
    if normal:
        print(f"normal slides (no tumour in {args.truth_dir}): {', '.join(normal)}")
    avg_fp, sens = ev.froc(fps, tps)
    score, at = ev.froc_score(avg_fp, sens)
    print(f"{len(files)} slides, {sum(len(t) for t in tps)} tumours (ITCs excluded)")
    print("avg FPs/slide  " + "  ".join(f"{r:>5}" for r in ev.FROC_FP_RATES))
    print("sensitivity    " + "  ".join(f"{s:5.3f}" for s in at))
    print(f"FROC={score:.4f}")
    if args.plot:
        plot(args.plot, avg_fp, sens, "average false positives per slide", "sensitivity",
             f"FROC {score:.3f}", logx=True)


def read_labels(path: Path) -> dict[str, int]:
    out = {}
    with path.open() as fh:
        for row in csv.reader(fh):
            if not row or row[0].strip().lower() in ("slide", "image", "name"):
                continue
            if len(row) < 2:
                raise UserError(f"{path}: expected 'slide,label' lines, got {row}")
            lab = row[1].strip().lower()
            out[Path(row[0].strip()).stem] = 1 if lab in ("1", "tumor", "tumour", "true") else 0
    return out


def cmd_slides(args) -> None:
    labels = read_labels(args.labels)
    names, y, score = [], [], []
    for f in sorted(args.probs_dir.glob("*.npy")):
        prob, meta = load_probability_map(f)
        stem = Path(meta["slide"]).stem
        if stem not in labels:
            print(f"note: {f.name} ({stem}) has no label; left out")
            continue
        names.append(stem)
        y.append(labels[stem])
        score.append(float(prob.max()) if prob.size else 0.0)
    missing = sorted(set(labels) - set(names))
    if missing:
        print(f"note: no map for {', '.join(missing)}")
    r = ev.slide_roc(np.array(y), np.array(score))
    print(f"{len(y)} slides ({sum(y)} tumour): AUC={r['auc']:.4f} (95% CI {r['auc_low']:.4f}-{r['auc_high']:.4f})")
    print(f"specificity at {r['sensitivity']:.0%} sensitivity: {r['specificity']:.4f} "
          f"(score threshold {r['threshold']:.4f})")
    if args.plot:
        plot(args.plot, r["fpr"], r["tpr"], "1 - specificity", "sensitivity", f"ROC AUC {r['auc']:.3f}")


def cmd_pixels(args) -> None:
    from crfcore.masks import load_mask

    prob, meta = load_probability_map(args.prob)
    truth, _ = load_mask(args.mask, slide=meta["slide"])
    if truth.shape != prob.shape:
        raise UserError(f"{args.mask}: shape {truth.shape} differs from the map's {prob.shape}")
    pred = prob >= args.threshold
    inter, union = (pred & truth).sum(), (pred | truth).sum()
    dice = 2 * inter / max(pred.sum() + truth.sum(), 1)
    print(f"{meta['slide']}: IoU={inter / max(union, 1):.4f} Dice={dice:.4f} at threshold {args.threshold}")


def cmd_patches(args) -> None:
    from crfcore.training import evaluate_folder
    print(evaluate_folder(args.ckpt, args.data, json_dir=args.json, quiet=args.quiet))


def plot(path: Path, x, y, xlabel: str, ylabel: str, title: str, logx: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.step(x, y, where="post")
    if logx:
        ax.set_xscale("symlog", linthresh=0.25)
        for r in ev.FROC_FP_RATES:
            ax.axvline(r, color="0.85", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(0, 1.02))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("lesions", help="NMS lesion points from a probability map")
    q.add_argument("prob", type=Path)
    q.add_argument("-o", "--output", type=Path, required=True)
    q.add_argument("--threshold", type=float, default=0.5)
    q.add_argument("--radius", type=int, default=12, help="suppression half-side, map pixels")
    q.add_argument("--sigma", type=float, default=0.0, help="Gaussian smoothing of the map first")
    q.add_argument("--to", choices=("csv", "xml", "geojson"), default="csv",
                   help="also write ASAP XML points or GeoJSON points")
    q = sub.add_parser("froc", help="Camelyon16 FROC over a folder of lesion CSVs")
    q.add_argument("lesions_dir", type=Path)
    q.add_argument("truth_dir", type=Path, help="annotation JSON/XML or mask TIFF per tumour slide")
    q.add_argument("--level", type=int, default=5, help="evaluation level (downsample 2**level)")
    q.add_argument("--mpp", type=float, default=ev.CAMELYON_MPP, help="um/pixel when a slide has none")
    q.add_argument("--slides", type=Path, help="slide folder to read each slide's mpp from")
    q.add_argument("--plot", type=Path)
    q = sub.add_parser("slides", help="slide-level ROC from map maxima")
    q.add_argument("probs_dir", type=Path)
    q.add_argument("labels", type=Path, help="CSV: slide,label (tumor/normal or 1/0)")
    q.add_argument("--plot", type=Path)
    q = sub.add_parser("pixels", help="IoU and Dice of the thresholded map against a tumour mask")
    q.add_argument("prob", type=Path)
    q.add_argument("mask", type=Path, help="tumour mask .npy on the same lattice (Mask_gen.py)")
    q.add_argument("--threshold", type=float, default=0.5)
    q = sub.add_parser("patches", help="classification report of a checkpoint on a data folder")
    q.add_argument("ckpt", type=Path)
    q.add_argument("data", type=Path)
    q.add_argument("--json", type=Path, help="grid models: annotation JSON folder")
    q.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for name in ("lesions_dir", "truth_dir", "probs_dir"):
        if getattr(args, name, None) is not None and not getattr(args, name).is_dir():
            raise UserError(f"{getattr(args, name)}: not a directory")
    {"lesions": cmd_lesions, "froc": cmd_froc, "slides": cmd_slides, "pixels": cmd_pixels,
     "patches": cmd_patches}[args.cmd](args)
    return 0


if __name__ == "__main__":
    run(main)
