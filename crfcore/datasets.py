"""Torch datasets: patch cutting from slides (Patch_gen.py), patch-grid images with
label grids (train.py grid mode) and plain image folders (classify mode)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import Dataset

from . import slide as sl
from .io import atomic_path
from .tiling import group_boxes


class PatchCutter(Dataset):
    """Reads the regions of `group_boxes(boxes)` (one item each), slices the patches out at
    `level` and writes them as PNGs `out_dir/names[i]`; returns how many it wrote.
    Meant for a DataLoader with workers: each worker opens the slide once."""

    def __init__(self, slide_path: str | Path, boxes: np.ndarray, level: int, size: int,
                 out_dir: str | Path, names: list[str], batched: bool = True) -> None:
        self.slide_path, self.level, self.size = Path(slide_path), level, size
        self.boxes, self.out_dir, self.names = boxes, Path(out_dir), names
        self.groups = group_boxes(boxes, max_waste=3.0 if batched else 0.0)
        self._slide = None

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> int:
        if self._slide is None:
            self._slide = sl.open_slide(self.slide_path)
        (rx0, ry0, rx1, ry1), idx = self.groups[i]
        dx, dy = sl.level_downsamples(self._slide)[self.level]
        w = int(round((rx1 - rx0) / dx)) + self.size
        h = int(round((ry1 - ry0) / dy)) + self.size
        region = sl.read_rgb(self._slide, (rx0, ry0), self.level, (w, h))
        for j in idx:
            ox, oy = int(round((self.boxes[j, 0] - rx0) / dx)), int(round((self.boxes[j, 1] - ry0) / dy))
            patch = region[oy:oy + self.size, ox:ox + self.size]
            with atomic_path(self.out_dir / self.names[j]) as tmp:
                cv2.imwrite(str(tmp), np.ascontiguousarray(patch[..., ::-1]))
        return len(idx)


def collate_sum(counts: list[int]) -> int:
    return int(sum(counts))


def extract_patches(slide_path: str | Path, boxes: np.ndarray, level: int, size: int,
                    out_dir: str | Path, names: list[str], workers: int = 0,
                    quiet: bool = False, batched: bool = True) -> int:
    """Cut and write every patch; regions are read in `workers` DataLoader processes
    (`batched=False` reads each patch on its own, for benchmarks)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    cutter = PatchCutter(slide_path, boxes, level, size, out_dir, names, batched)
    loader = DataLoader(cutter, batch_size=None, num_workers=workers)
    done = 0
    with tqdm(total=len(boxes), desc=f"patches {Path(slide_path).name}", disable=quiet) as bar:
        for n in loader:
            done += int(n)
            bar.update(int(n))
    return done
