"""The lattice method's CNN step with the backbone's first blocks shared between crops: exact.

Neighbouring lattice crops overlap (by 71 % at NCRF's geometry: crop 224, stride 64),
and MobileNetV2's first blocks, at half and a quarter of the input's side, take 44 % of
its CPU time at crop 224. A crop's activations after those blocks (its *stem cells*)
equal those of the whole slide region at the same place, except in a band along the
crop's edges whose receptive field reaches past the crop, into the zero padding the
crop's own CNN sees (`StemPlan.top` cells along the top and left edges, `bottom` along
the bottom and right ones).

So the stem runs once over the region the crops were read from. Each crop takes its
window of the region's cells, and its edge bands come from the stem run over strips of
the crop itself (`StemPlan.strip` pixels wide: wide enough that the strip's own far
edge does not reach the band). Then the rest of the network runs per crop, as before.
These are the same convolutions over the same pixels, so the numbers are the same
(equal in the tests; at most float rounding where a library splits work by shape).

It is used where the region and the strips cost clearly less stem work than the crops
themselves, and the region is no larger than a batch of crops, so memory still follows
`--batch-size` (`worth_sharing`). At crop 224, stride 64, a full block of 8 x 16 crops
then runs the CNN 1.2x faster on this project's CPU (bench/prob_map.py). At crop 112 and
stride 32 it gains nothing, and at the demo's crop of 56 the strips alone cost more than
the crops. It is used on the CPU only: on CUDA it was never measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

STEM_BLOCKS = 4  # MobileNetV2 features[:4], to stride 4: cutting after 4 or 5 blocks was 1.2x, after 7 slower
SHARE_BELOW = 0.75  # share when region + strips are at most this share of the crops' pixels (measured: 0.84 gained nothing)


@dataclass(frozen=True)
class StemPlan:
    """Where the stem ends and how far a crop's edges reach into its cells."""

    blocks: int  # the stem is features[:blocks]
    crop: int    # input pixels across a crop
    stride: int  # input pixels per stem cell
    top: int     # cells along the top (and left) edge that differ from the region's
    bottom: int  # cells along the bottom (and right) edge that do

    @property
    def side(self) -> int:
        """Stem cells across a crop."""
        return self.crop // self.stride

    @property
    def strip(self) -> int:
        """Input pixels across an edge strip: its own far edge then stays out of the band."""
        return (self.top + self.bottom) * self.stride

    def worth_sharing(self, region: tuple[int, int], n: int, batch: int) -> bool:
        """Whether the stem over a `region` (h, w) and four strips per crop costs clearly
        less than over its `n` crops (strips are thin, so they run slower per pixel), and
        the region is no larger than a `batch` of crops: the memory then follows the batch size."""
        pixels = region[0] * region[1]
        shared = pixels + n * 4 * self.strip * self.crop
        return shared <= SHARE_BELOW * n * self.crop ** 2 and pixels <= batch * self.crop ** 2


def stem_plan(features: nn.Sequential, crop: int, blocks: int = STEM_BLOCKS) -> StemPlan | None:
    """The plan for `crop`-pixel crops, or None where it cannot apply: a crop that is not
    a whole number of cells, strips as wide as half the crop, or a convolution that is not
    square and undilated."""
    convs = [m for m in features[:blocks].modules() if isinstance(m, nn.Conv2d)]
    if not all(map(_square, convs)):
        return None
    stride, top, bottom, side = edge_bands(convs, crop)
    plan = StemPlan(blocks, crop, stride, top, bottom)
    if crop % stride or side != plan.side or 2 * plan.strip >= crop:
        return None
    if edge_bands(convs, plan.strip)[1:] != (top, bottom, top + bottom):
        return None  # a strip's own far edge would reach its band
    return plan


def _square(m: nn.Conv2d) -> bool:
    """Square kernel, stride and zero padding, undilated: what `edge_bands` counts."""
    return (m.kernel_size[0] == m.kernel_size[1] and m.stride[0] == m.stride[1] and m.dilation == (1, 1)
            and not isinstance(m.padding, str) and m.padding[0] == m.padding[1] and m.padding_mode == "zeros")


def edge_bands(convs: list[nn.Conv2d], n: int) -> tuple[int, int, int, int]:
    """(stride, top, bottom, cells) of a chain of square convolutions over an `n`-pixel
    side: input pixels per cell, how many cells along the near and the far edge read the
    zero padding (directly or through an earlier such cell), and the cells across.
    Residual additions need no count: MobileNetV2 adds a block's input only in stride-1
    blocks, whose convolutions never narrow a band (the tests compare every cell)."""
    stride, top, bottom = 1, 0, 0
    for conv in convs:
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        out = (n + 2 * p - k) // s + 1
        # Output cell i reads input rows s*i - p to s*i - p + k - 1. It differs from the
        # region's where it reads padding or a differing row: near the top, a row below
        # `top` (s*i - p < top); near the bottom, a row from n - bottom on.
        top = math.ceil((top + p) / s)
        bottom = out - math.ceil((n - bottom + p - k + 1) / s)
        n, stride = out, stride * s
    return stride, top, bottom, n


def stem_cells(features: nn.Sequential, plan: StemPlan, region: torch.Tensor, corners: np.ndarray,
               batch: int) -> torch.Tensor:
    """The stem cells `[n, C, side, side]` of the crops with top-left `corners` (n, 2) x, y
    in a normalised `region [1, 3, H, W]`, as each crop's own stem would give them; edge
    strips go through the stem `batch` crops at a time. Corners must be multiples of
    `plan.stride`."""
    stem, s, f = features[:plan.blocks], plan.side, plan.stride
    whole = stem(region)[0]
    cells = torch.stack([whole[:, y // f:y // f + s, x // f:x // f + s] for x, y in corners.tolist()])
    for i in range(0, len(corners), batch):
        _mend_edges(stem, plan, region, cells[i:i + batch], corners[i:i + batch])
    return cells.contiguous(memory_format=torch.channels_last)


def _mend_edges(stem: nn.Sequential, plan: StemPlan, region: torch.Tensor, cells: torch.Tensor,
                corners: np.ndarray) -> None:
    """Overwrite the edge bands of these crops' `cells` (in place) with the stem of strips
    cut from the crops themselves: a strip shares the crop's near edge (or far edge), so its
    cells there are the crop's own."""
    n, s, strip_cells = len(corners), plan.side, plan.strip // plan.stride
    near = slice(0, plan.top)  # the band along the near edge, in a crop's cells and in a near strip's
    far, far_in_strip = slice(s - plan.bottom, s), slice(strip_cells - plan.bottom, strip_cells)
    # the near and the far strips of every crop in one pass: first along the rows, then the columns
    out = stem(_strips(region, corners, plan.crop, plan.strip, along_rows=True))
    cells[:, :, near], cells[:, :, far] = out[:n, :, near], out[n:, :, far_in_strip]
    out = stem(_strips(region, corners, plan.crop, plan.strip, along_rows=False))
    cells[:, :, :, near], cells[:, :, :, far] = out[:n, :, :, near], out[n:, :, :, far_in_strip]


def _strips(region: torch.Tensor, corners: np.ndarray, crop: int, width: int, along_rows: bool) -> torch.Tensor:
    """`[2n, 3, ...]`: each crop's first `width` rows (`along_rows`; else columns), then each
    one's last `width`."""
    x = region[0]
    if along_rows:
        parts = [x[:, y + o:y + o + width, cx:cx + crop] for o in (0, crop - width) for cx, y in corners.tolist()]
    else:
        parts = [x[:, y:y + crop, cx + o:cx + o + width] for o in (0, crop - width) for cx, y in corners.tolist()]
    return torch.stack(parts).contiguous(memory_format=torch.channels_last)
