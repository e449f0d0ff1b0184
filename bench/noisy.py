"""Held-out synthetic slides whose texture carries misleading spots, and how a model's
maps score on them: shared by bench/crf_vs_cnn.py and bench/hard_negatives.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crfcore import masks, synthetic
from crfcore.annotations import write_annotation
from crfcore.evaluation import evaluation_mask, find_lesions, froc, froc_score, isolated_tumour_cells
from crfcore.evaluation import slide_hits, slide_roc
from crfcore.heatmap import load_probability_map

DOWNSAMPLE = 32  # the lattice of these slides' masks and maps (mpp 1.0)


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
