"""Models for tests and benchmarks: random, yet with outputs that vary with the input.

A freshly initialised MobileNetV2 gives almost the same logit for every patch (its
batch-norm statistics are the defaults, its CRF `W` is zero), so comparing two methods
on it proves little. `varied_model` takes its batch-norm statistics from real crops of
the slide at hand and gives the head and the CRF some weight.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import slide as sl
from .datasets import to_tensor
from .synthetic import write_slide
from .model import CRFNet, ModelConfig


def varied_model(slide_path: str | Path, crop: int, grid: int = 3, width: float = 1.0, head_scale: float = 1.0,
                 crf_std: float = 0.1, n: int = 64, seed: int = 0) -> CRFNet:
    """A random MobileNetV2-CRF (eval mode): batch-norm statistics averaged over `n` crops
    of side `crop` from the central 60 % of the slide, head weights times `head_scale`
    (a wider spread of logits), CRF `W` drawn from N(0, crf_std)."""
    torch.manual_seed(seed)
    model = CRFNet(ModelConfig(grid=grid, width_mult=width))
    with sl.open_slide(slide_path) as s:
        w, h = s.dimensions
        xy = np.random.default_rng(seed).uniform(0.2, 0.8, (n, 2)) * (w - crop, h - crop)
        x = torch.stack([to_tensor(sl.read_rgb(s, tuple(p.astype(int)), 0, (crop, crop))) for p in xy])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model.embed(x)
        model.fc.weight.mul_(head_scale)
        if model.crf is not None:
            model.crf.W.normal_(0, crf_std)
    return model.eval()


def write_bench_slide(path: Path, lattice_side: int, stride: int = 64, patch: int = 256,
                      xml: Path | None = None) -> int:
    """The speed benches' synthetic slide (bench/prob_map.py, cpu_settings.py,
    dense_tile.py, dense_ncrf.py), written unless `path` exists: tissue over its middle half
    with two tumours, `lattice_side` lattice points of `stride` across plus a patch each
    side, and its ASAP XML at `xml` if given. Returns its side in pixels."""
    side = lattice_side * stride + 2 * patch
    if not Path(path).exists() or (xml is not None and not Path(xml).exists()):
        write_slide(path, side, side, tumours=2, seed=0, tissue=[(0.5, 0.5, 0.5, 0.5)], xml=xml)
    return side


def bench_varied_model(slide_path: str | Path, crop: int = 224) -> CRFNet:
    """The speed benches' model: MobileNetV2 width 1, grid 3, `varied_model` on the slide."""
    return varied_model(slide_path, crop, 3, width=1.0, crf_std=0.1, n=128)
