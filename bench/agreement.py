#!/usr/bin/env python3
"""Dense and bf16 against lattice fp32, with one trained model: the demo's slides.

For each variant (METHOD:PRECISION, the first is the reference) it runs `prob_map.py`
over SLIDES with the same checkpoint, then the demo's evaluation (`evaluate.py`
lesions, FROC, slide AUC) and the pixel scores against the tumour masks, and prints one
row per variant: seconds, max abs difference and Pearson r over tissue against the
reference, pixel AUC and Dice, FROC, slide AUC.

  make demo    # writes example/out (slides, masks, trained model)
  python bench/agreement.py                       # the demo's 2 held-out slides
  python bench/agreement.py --with-training-slides  # and its 5 training/validation slides
  python bench/agreement.py --validation-slides     # its 2 validation slides only (to choose on)

Nothing here is tuned: the reference and the variants use the checkpoint as trained.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from crfcore import masks
from crfcore import slide as sl
from crfcore.annotations import load_annotation
from crfcore.evaluation import pixel_scores
from crfcore.heatmap import load_probability_map

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = ("normal_002", "tumor_003")  # the demo's validation slides (example/run_pipeline.sh)


def script(name: str):
    """A top-level script as a module (its `main(argv)` runs in this process), loaded once."""
    if name in _SCRIPTS:
        return _SCRIPTS[name]
    spec = importlib.util.spec_from_file_location(Path(name).stem, ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    _SCRIPTS[name] = module
    return module


_SCRIPTS: dict = {}


def call(name: str, *args) -> str:
    """Run a script's main in-process; return its standard output (raise on failure)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = script(name).main([str(a) for a in args])
    if status:
        raise SystemExit(f"{name} {' '.join(map(str, args))} failed")
    return out.getvalue()


def demo_slides(args) -> list[Path]:
    """The held-out slides, with the training/validation ones if asked; or the validation ones only."""
    if args.validation_slides:
        return [s for s in sl.find_slides(args.demo / "slides") if s.stem in VALIDATION]
    folders = [args.demo / "test"] + ([args.demo / "slides"] if args.with_training_slides else [])
    return [s for folder in folders for s in sl.find_slides(folder)]


def prepare(args, work: Path) -> Path:
    """A folder of the slides to map, with tissue and tumour masks at the map's lattice."""
    slides = work / "slides"
    slides.mkdir()
    m = work / "masks"
    for s in demo_slides(args):
        (slides / s.name).symlink_to(s.resolve())
    for kind in ("tissue", "tumor"):
        extra = ["--annotation", args.demo / "json"] if kind == "tumor" else []
        call("Mask_gen.py", slides, "-o", m, "--kind", kind, "--downsample", args.downsample, "--quiet", *extra)
    return m


def labels_csv(args, slides: list[Path], path: Path) -> None:
    rows = ["slide,label"] + [f"{s.stem},{'tumor' if load_annotation(args.demo / 'json' / f'{s.stem}.json').positive else 'normal'}"
                              for s in slides]
    path.write_text("\n".join(rows) + "\n")


def evaluate(args, maps: Path, mdir: Path, work: Path) -> dict:
    """FROC and slide AUC as the demo computes them, pixel AUC and Dice over all slides."""
    lesions = maps.parent / f"{maps.name}_lesions"
    for f in sorted(maps.glob("*_prob.npy")):
        call("evaluate.py", "lesions", f, "-o", lesions / f"{f.name[:-len('_prob.npy')]}.csv")
    froc = call("evaluate.py", "froc", lesions, args.demo / "json", "--slides", work / "slides")
    auc = call("evaluate.py", "slides", maps, work / "labels.csv")
    probs, truth, tissue = [], [], []
    for f in sorted(maps.glob("*_prob.npy")):
        prob, meta = load_probability_map(f)
        stem = Path(meta["slide"]).stem
        probs.append(prob.ravel())
        truth.append(masks.load_mask(mdir / f"{stem}_tumor.npy")[0].ravel())
        tissue.append(masks.load_mask(mdir / f"{stem}_tissue.npy")[0].ravel())
    px = pixel_scores(np.concatenate(probs), np.concatenate(truth), np.concatenate(tissue), 0.5)
    return {"froc": float(re.search(r"FROC=([\d.]+)", froc).group(1)),
            "slide_auc": float(re.search(r"AUC=([\d.]+)", auc).group(1)),
            "pixel_auc": px["auc"], "dice": px["dice"]}


def run_variant(args, variant: str, work: Path, mdir: Path) -> tuple[Path, float]:
    method, precision = variant.split(":")
    maps = work / variant.replace(":", "_")
    call("prob_map.py", work / "slides", args.ckpt, mdir, maps, "--method", method, "--precision", precision,
         "--device", "cpu", "--quiet", *(["--workers", args.workers] if args.workers is not None else []))
    seconds = sum(json.loads(p.read_text())["seconds"] for p in maps.glob("*_prob.json"))
    return maps, seconds


def agreement(ref: Path, other: Path, mdir: Path) -> tuple[float, float]:
    """Max abs difference (whole maps) and Pearson r over tissue, all slides together."""
    a, b, diff = [], [], 0.0
    for f in sorted(ref.glob("*_prob.npy")):
        p, meta = load_probability_map(f)
        q, _ = load_probability_map(other / f.name)
        t = masks.load_mask(mdir / f"{Path(meta['slide']).stem}_tissue.npy")[0]
        diff = max(diff, float(np.abs(p - q).max()))
        a.append(p[t])
        b.append(q[t])
    return diff, float(np.corrcoef(np.concatenate(a), np.concatenate(b))[0, 1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, default=ROOT / "example" / "out", help="the demo's output folder")
    p.add_argument("--ckpt", type=Path, help="checkpoint (default: DEMO/model/best.ckpt)")
    p.add_argument("--variants", default="lattice:fp32,lattice:bf16,dense:fp32,dense:bf16",
                   help="METHOD:PRECISION list; the first is the reference")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--with-training-slides", action="store_true", help="also map the 5 training/validation slides")
    which.add_argument("--validation-slides", action="store_true",
                       help="map only the demo's 2 validation slides (to choose settings on)")
    p.add_argument("--downsample", type=int, default=32, help="map lattice (the demo's)")
    p.add_argument("--workers", type=int, help="prob_map.py's --workers (default: its own)")
    args = p.parse_args()
    args.ckpt = args.ckpt or args.demo / "model" / "best.ckpt"
    if not args.ckpt.exists():
        print(f"error: {args.ckpt} not found: run `make demo` first", file=sys.stderr)
        return 2
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mdir = prepare(args, work)
        slides = sl.find_slides(work / "slides")
        labels_csv(args, slides, work / "labels.csv")
        print(f"{len(slides)} slides ({', '.join(s.stem for s in slides)}), checkpoint {args.ckpt}")
        print(f"{'variant':<14} {'seconds':>8} {'max_abs_diff':>12} {'pearson':>8} {'pixel_auc':>9} "
              f"{'dice':>6} {'froc':>6} {'slide_auc':>9}")
        ref = None
        for v in variants:
            maps, seconds = run_variant(args, v, work, mdir)
            ref = ref or maps
            diff, r = agreement(ref, maps, mdir)
            e = evaluate(args, maps, mdir, work)
            print(f"{v:<14} {seconds:8.1f} {diff:12.2e} {r:8.4f} {e['pixel_auc']:9.4f} {e['dice']:6.4f} "
                  f"{e['froc']:6.4f} {e['slide_auc']:9.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
