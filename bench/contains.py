#!/usr/bin/env python3
"""Speed of Annotation.contains: a million points against the Camelyon16 Tumor_001
polygons (annotations/tumor_001.xml of the real test data: ../shared/data, or
$CRF_SHARED_DATA; any other with --annotation), points drawn in the polygons' bounding
box (the hard case: the bounding-box shortcut does not help)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from crfcore.annotations import load_annotation
from crfcore.cli import run

SHARED = Path(os.environ.get("CRF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT = SHARED / "annotations" / "tumor_001.xml"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--annotation", type=Path, default=DEFAULT)
    p.add_argument("--points", type=int, default=1_000_000)
    args = p.parse_args(argv)
    ann = load_annotation(args.annotation)
    x0, y0, x1, y1 = ann.bounds()
    pts = np.random.default_rng(0).uniform((x0, y0), (x1, y1), (args.points, 2))
    ann.contains(pts[:1000])  # warm-up
    t = time.perf_counter()
    inside = ann.contains(pts)
    dt = time.perf_counter() - t
    print(f"{args.points} points, {sum(map(len, ann.positive + ann.negative))} vertices: "
          f"{dt:.3f} s ({args.points / dt / 1e6:.2f} M points/s), {inside.mean():.1%} inside")


if __name__ == "__main__":
    run(main)
