"""Held-out synthetic slides whose texture carries misleading spots, and how a model's
maps score on them: shared by bench/crf_vs_cnn.py and bench/hard_negatives.py, which
both build on the demo's outputs (`make demo`)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crfcore import masks, synthetic
from crfcore.annotations import write_annotation
from crfcore.evaluation import evaluation_mask, find_lesions, froc, froc_score, isolated_tumour_cells
from crfcore.evaluation import slide_hits, slide_roc
from crfcore.heatmap import load_probability_map

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "example" / "out"
DOWNSAMPLE = 32  # the lattice of these slides' masks and maps (mpp 1.0)


def sh(*args) -> None:
    """Run one of the project's scripts, printing the command first."""
    print("+ python " + " ".join(map(str, args)), flush=True)
    subprocess.run([sys.executable, *map(str, args)], check=True, cwd=ROOT)


def bench_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options both benches take: --out (default bench/out/NAME), --noise, --slides."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / name, help="output folder")
    p.add_argument("--noise", type=float, default=0.3, help="misleading spots on the held-out slides")
    p.add_argument("--slides", type=int, default=3, help="held-out tumour slides (and as many normal)")
    return p


def demo_missing(uses: str) -> bool:
    """True (after saying so) when `make demo` has not been run."""
    if (DEMO / "model" / "best.ckpt").exists():
        return False
    print(f"error: run `make demo` first (this bench reuses its {uses})", file=sys.stderr)
    return True


def noisy_slides(slides: Path, json_dir: Path, n: int, noise: float, seed: int) -> list[tuple[str, int]]:
    """`n` slides with a tumour and `n` without (2048 x 1536, 1 um per pixel), written
    once; returns (name, tumour count) pairs."""
    names = [(f"noisy_t{i}", 1) for i in range(n)] + [(f"noisy_n{i}", 0) for i in range(n)]
    for i, (name, tumours) in enumerate(names):
        path = slides / f"{name}.tif"
        if not path.exists():
            s = synthetic.write_slide(path, 2048, 1536, tumours=tumours, seed=seed + i, mpp=1.0,
                                      tumour_radius=0.13, noise=noise)
            write_annotation(s.annotation, json_dir / f"{name}.json")
    return names


def noisy_set(out: Path, n: int, noise: float, seed: int) -> list[tuple[str, int]]:
    """`noisy_slides` in OUT/slides (annotations in OUT/json) with their tissue and tumour
    masks in OUT/masks."""
    names = noisy_slides(out / "slides", out / "json", n, noise, seed)
    for name, _ in names:
        for kind in ("tissue", "tumor"):
            sh("Mask_gen.py", out / "slides" / f"{name}.tif", "-o", out / "masks" / f"{name}_{kind}.npy", "--kind",
               kind, "--annotation", out / "json" / f"{name}.json", "--downsample", DOWNSAMPLE, "--quiet")
    return names


def map_and_score(out: Path, ckpt: Path, label: str, names: list[tuple[str, int]]) -> "Scores":
    """Maps of the noisy set by `ckpt` in OUT/maps/LABEL (prob_map.py keeps a map made by
    this checkpoint and settings, and recomputes a stale one), scored."""
    scores = Scores()
    for name, tumours in names:
        prob_path = out / "maps" / label / f"{name}_prob.npy"
        sh("prob_map.py", out / "slides" / f"{name}.tif", ckpt, out / "masks" / f"{name}_tissue.npy",
           "-o", prob_path, "--quiet", "--overwrite")
        scores.add(prob_path, out / "masks" / f"{name}_tumor.npy", tumours)
    return scores


@dataclass
class Scores:
    """One model's maps of the held-out slides, added slide by slide."""
    fps: list = field(default_factory=list)
    tps: list = field(default_factory=list)
    maxima: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    ious: list = field(default_factory=list)
    pixels: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))  # hits, predicted, truth

    def add(self, prob_path: Path, tumour_mask: Path, tumours: int, threshold: float = 0.5) -> None:
        prob, meta = load_probability_map(prob_path)
        tumour, _ = masks.load_mask(tumour_mask)
        lab = evaluation_mask(tumour, float(DOWNSAMPLE), 1.0) if tumours else None
        itc = isolated_tumour_cells(lab, float(DOWNSAMPLE), 1.0) if tumours else set()
        fp, tp, _ = slide_hits(find_lesions(prob, tuple(meta["downsample"])), lab, itc, (DOWNSAMPLE,) * 2)
        self.fps.append(fp), self.tps.append(tp), self.maxima.append(float(prob.max()))
        self.labels.append(int(tumours > 0))
        pred = prob >= threshold
        self.pixels += [(pred & tumour).sum(), pred.sum(), tumour.sum()]
        if tumours:
            self.ious.append((pred & tumour).sum() / max((pred | tumour).sum(), 1))

    def froc(self) -> float:
        return froc_score(*froc(self.fps, self.tps))[0]

    def slide_auc(self) -> float:
        return slide_roc(np.array(self.labels), np.array(self.maxima), n_boot=200)["auc"]

    def precision(self) -> float:
        return self.pixels[0] / max(self.pixels[1], 1)

    def recall(self) -> float:
        return self.pixels[0] / max(self.pixels[2], 1)

    def mean_iou(self) -> float:
        return float(np.mean(self.ious))
