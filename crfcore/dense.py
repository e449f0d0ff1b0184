"""`--method dense`: the backbone fully convolutionally over slide tiles, each pixel about
once (plus the tiles' margins: 1.8 times in the bench).

The lattice method runs every needed crop through the CNN on its own; at NCRF's geometry
(crop 224, stride 64) neighbouring crops overlap by 71 % and each pixel goes through the
backbone about 12 times. Here the backbone runs over large tiles instead, and each
lattice point takes the mean of the feature-map cells under its crop (the window the
crop's own feature map would have, `feature_side(crop)` cells from the crop's corner),
then the linear head; the CRF follows exactly as in `lattice` (same bands, same cache).

It is an approximation: a cell sees the real neighbouring pixels where the crop's CNN
saw zero padding. Its agreement with `lattice` is measured in `bench/prob_map.py`.

Alignment. The feature map has stride 32 (`feature_stride`), so a crop's window is a
whole block of cells only when the crop's corner sits on the tile's cell grid. Tiles are
placed so that it does: every crop corner of a tile has the same residue modulo 32 (its
*phase*). A lattice stride that is a multiple of 32 gives one phase; another stride `s`
gives `(32 / gcd(s, 32))^2` phases, each run as its own tiles (exact, never resampled:
an interpolated feature map is the feature of no window). When the phases would cost
more backbone work than the lattice (`phases * s^2 >= crop^2`), `lattice` is used.

Tiles get `MARGIN` cells of real pixels on every side, so the cells a window uses do
not see the tile's own edge: the tile size changes the map only by float rounding, and
batch size and workers not at all. Larger tiles repeat less of their margins, but
cover more glass around tissue fragments. A tile's height is the band's,
`Options.dense_tile` model pixels of lattice rows: it sets how many rows of logits and
features are held at once (all of them, 8 times over with TTA, across the tissue's
width). Its width is chosen per band: of the widths from half the height to `WIDEST`
times it, the one that runs the backbone over the fewest pixels. TTA transforms the
whole tile: its sides are chosen congruent to the crop modulo 32, so in every dihedral
frame the crop corners still fall on the cell grid.

Memory. MobileNetV2's largest activations are its first layers' (up to 96 channels at
half the input's side): a whole 2,720 x 8,864-pixel tile would hold 3-5 GiB of them.
`TileFeatures` runs those layers (to stride 8) over blocks of the tile, each with the few
pixels of context they see on every side, and the rest of the network over the joined
result: the same numbers, at about a quarter of the memory, so tiles can be wide.

Margins. A tile's margin is context for its first layers only: the later a block, the
less of the tile the blocks after it still need, so `TileFeatures` trims each later block's
output to the needed cells widened by the rest's reach (the same numbers again).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .datasets import Normaliser, SlideDataset, normalise_batch
from .device import autocast
from .inference import DIHEDRAL, Geometry, LatticeJob, Options, dihedral_boxes, dihedral_images, slide_loader
from .model import CRFNet
from .scale import ReadScale

MARGIN = 8  # cells of context around the used cells (8 x 32 = 256 px: MobileNetV2's receptive-field radius, 245)
STEM_LAYERS = 5  # MobileNetV2 layers run in blocks: to stride 8 (after them, 3 floats per input pixel at most, not 24)
STEM_BLOCK_PIXELS = 2_000_000  # input pixels per stem block: smaller blocks recompute more context
WIDEST = 4  # a tile is at most this many times as wide as high (see the module docstring)


def feature_stride(model: CRFNet) -> int:
    """Input pixels per feature-map cell: the product of the backbone's conv strides."""
    return conv_reach(model.features)[0]


def feature_side(model: CRFNet, crop: int) -> int:
    """Cells of the feature map the backbone gives a `crop` image (each stride-2 conv with
    kernel 3 and padding 1 maps n to ceil(n / 2)): the window a crop's features pool."""
    n = crop
    for m in model.features.modules():
        if isinstance(m, nn.Conv2d) and m.stride[0] == 2:
            n = -(-n // 2)
    return n


ELEMENTWISE = (nn.BatchNorm2d, nn.Hardtanh, nn.ReLU, nn.Identity, nn.Dropout)  # layers that see one pixel


def conv_reach(layers: nn.Module) -> tuple[int, int]:
    """(stride, radius) of a chain of convolutions (with element-wise layers and residual
    additions between them, as in MobileNetV2): input pixels per output cell, and how many
    input pixels an output cell sees beyond its own position on either side."""
    stride, radius = 1, 0
    for m in layers.modules():
        if not isinstance(m, (nn.Conv2d, *ELEMENTWISE)) and not any(m.children()):
            raise ValueError(f"conv_reach counts convolutions and element-wise layers, not {type(m).__name__}")
        if isinstance(m, nn.Conv2d):
            reach = (m.kernel_size[0] - 1) * m.dilation[0]
            radius += max(m.padding[0], reach - m.padding[0]) * stride
            stride *= m.stride[0]
    return stride, radius


class TileFeatures:
    """`features(normalise(u8))` for one `[1, 3, H, W]` uint8 image, the first `layers`
    run over blocks of about `pixels` (see the module docstring). A block starts on a
    multiple of the stem's stride and carries `halo` pixels of context on each side, which
    covers the stem's reach, so its kept cells are exactly the whole image's.

    With `need`, the pixel box whose feature cells are wanted, each later block's output
    is trimmed to the cells that the blocks after it still need for those (the box
    widened by their reach): a tile's margins are context for its first layers only."""

    def __init__(self, features: nn.Sequential, layers: int, pixels: int) -> None:
        self.stem, self.rest, self.pixels = features[:layers], features[layers:], pixels
        self.dtype = next(features.parameters()).dtype  # the input is cast to it (a float64 model gets float64)
        self.stride, radius = conv_reach(self.stem)
        self.halo = -(-radius // self.stride) * self.stride
        self.cell = conv_reach(features)[0]
        # per later block: its output's stride, and the reach (input pixels) of the blocks after it
        strides = [conv_reach(features[:i + 1])[0] for i in range(len(features))]
        self.trims = [(strides[i], conv_reach(features[i + 1:])[1] * strides[i] if i + 1 < len(features) else 0)
                      for i in range(layers, len(features))]

    def __call__(self, u8: torch.Tensor, need: tuple[int, int, int, int] | None = None
                 ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The feature map and the input pixel `(y, x)` of its first cell (0, 0 untrimmed).
        `need`: `(y0, y1, x0, x1)`, input pixels."""
        h, w = u8.shape[2:]
        # blocks as square as the image allows: the halo is recomputed on every side of
        # each (strips of a wide tile, 225 rows high, recomputed 14 %)
        bw = min(w, max(1, math.isqrt(self.pixels) // self.stride) * self.stride)
        bh = max(1, self.pixels // (bw * self.stride)) * self.stride
        rows = []
        for y in range(0, h, bh):
            row = [self.block(u8, (y, min(h, y + bh)), (x, min(w, x + bw))) for x in range(0, w, bw)]
            rows.append(row[0] if len(row) == 1 else torch.cat(row, 3))
        x = torch.cat(rows, 2).contiguous(memory_format=torch.channels_last)
        origin = [0, 0]
        for layer, (stride, reach) in zip(self.rest, self.trims):
            x = layer(x)
            if need is not None:
                x = self.trimmed(x, need, stride, reach, origin)
        return x, tuple(origin)

    def block(self, u8: torch.Tensor, ys: tuple[int, int], xs: tuple[int, int]) -> torch.Tensor:
        """The stem's output cells of input pixels `ys` x `xs` (each starting on a multiple
        of the stride), run over them with `halo` pixels of context on every side."""
        h, w = u8.shape[2:]
        y0, y1 = max(0, ys[0] - self.halo), min(h, ys[1] + self.halo)
        x0, x1 = max(0, xs[0] - self.halo), min(w, xs[1] + self.halo)
        # normalise_batch takes [n, H, W, 3]: the permuted view (no copy) of the block
        x = normalise_batch(u8[:, :, y0:y1, x0:x1].permute(0, 2, 3, 1)).to(self.dtype)
        out = self.stem(x.contiguous(memory_format=torch.channels_last))
        s = self.stride  # the cells of the block's own pixels:
        return out[:, :, (ys[0] - y0) // s:-(-(ys[1] - y0) // s), (xs[0] - x0) // s:-(-(xs[1] - x0) // s)]

    def trimmed(self, x: torch.Tensor, need: tuple[int, int, int, int], stride: int, reach: int,
                origin: list[int]) -> torch.Tensor:
        """`x` (cells of `stride` from input pixel `origin`) cut to the box `need` widened by
        `reach`; the cut starts on whole last-layer cells, so the later strided layers
        sample where they did on the whole tile. Updates `origin`."""
        cuts, c = [], self.cell
        for axis, (a, b) in enumerate((need[:2], need[2:])):
            a, b = a // c * c, -(-b // c) * c  # the needed cells' pixels
            start = max(origin[axis], (a - reach) // c * c)
            first = (start - origin[axis]) // stride
            end = min(x.shape[2 + axis], -(-(b + reach - origin[axis]) // stride))
            cuts.append(slice(first, end))
            origin[axis] += first * stride
        if cuts[0] == slice(0, x.shape[2]) and cuts[1] == slice(0, x.shape[3]):
            return x
        return x[:, :, cuts[0], cuts[1]].contiguous(memory_format=torch.channels_last)


def model_stride(geom: Geometry) -> int | None:
    """The lattice stride in model pixels, when it is a whole number."""
    q = geom.integer_stride() / geom.read.scale
    return round(q) if abs(q - round(q)) < 1e-6 and round(q) >= 1 else None


def phases(geom: Geometry, stride: int) -> int:
    """How many tile phases (grid offsets modulo the feature stride) a lattice needs."""
    return (stride // math.gcd(model_stride(geom), stride)) ** 2


def dense_applies(geom: Geometry, stride: int) -> str | None:
    """None when the dense method applies to a lattice geometry, else why not (one line)."""
    s = model_stride(geom)
    if s is None:
        return (f"the lattice stride {geom.integer_stride()} is not a whole number of model pixels "
                f"({geom.read.scale:.4f} level-0 pixels each)")
    n = phases(geom, stride)
    if n == 1 and s >= geom.crop:
        return (f"the lattice stride ({s} model pixels) is at least the crop ({geom.crop}): crops do not overlap, "
                "so dense would do no less backbone work than the lattice")
    if n * s * s >= geom.crop ** 2:
        return (f"the lattice stride ({s} model pixels) is not a multiple of the feature stride {stride}: dense "
                f"would need {n} shifted passes over the slide, more backbone work than the lattice")
    return None


@dataclass(frozen=True)
class Tile:
    """A slide region (in model pixels: level 0 divided by the read scale) and the
    needed points whose windows it serves."""

    idx: np.ndarray      # indices into the job's needed points (one band, one phase)
    origin: tuple[int, int]
    size: tuple[int, int]  # (w, h)


class DenseTiles(SlideDataset):
    """Items: `(tile index, uint8 region [h, w, 3])`, stain-normalised as a whole."""

    def __init__(self, slide_path: Path, tiles: list[Tile], read: ReadScale,
                 normalise: Normaliser | None = None) -> None:
        self.slide_path, self.tiles, self.read, self.normalise = slide_path, tiles, read, normalise

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int):
        t = self.tiles[i]
        region = self.read.read(self.slide, tuple(v * self.read.scale for v in t.origin), t.size)
        return i, torch.from_numpy(region if self.normalise is None else self.normalise(region))


def tile_widths(rows: int) -> list[int]:
    """Tile widths (lattice columns) to try for tiles of `rows` rows: half to `WIDEST` times."""
    return sorted({max(1, round(rows * f)) for f in (0.5, 0.75, 1, 1.5, 2, 3, WIDEST)})


def tile_pixels(tiles: list[Tile]) -> int:
    """Model pixels the backbone runs over for these tiles, margins included."""
    return sum(t.size[0] * t.size[1] for t in tiles)


class DenseJob(LatticeJob):
    """The lattice job with the CNN step replaced: bands of needed points are covered by
    tiles (one per phase and column block), and each tile's feature map gives its points'
    pooled features and logits."""

    def __init__(self, model: CRFNet, slide_path: Path, mask: np.ndarray, geom: Geometry, opts: Options) -> None:
        self.tile_rows = max(1, opts.dense_tile // model_stride(geom))  # lattice rows per tile and per band
        super().__init__(model, slide_path, mask, geom, replace(opts, band_rows=self.tile_rows))
        self.stride = feature_stride(model)
        self.features = TileFeatures(model.features, STEM_LAYERS, STEM_BLOCK_PIXELS)
        self.window = feature_side(model, geom.crop)
        corners = geom.crop_origin(geom.centres(self.need[:, 0], self.need[:, 1]))
        self.origins = np.round(corners / geom.read.scale).astype(np.int64)  # model pixels
        over = self.window * self.stride - geom.crop  # a window reaches past its crop by this much
        self.ext = self.stride * (-(-over // self.stride) + MARGIN)
        self.tiles = self.plan()

    def plan(self) -> list[Tile]:
        """Tiles in band order: within a band, one per phase and block of columns, the
        blocks of the width in `tile_widths` that gives the band the fewest pixels."""
        xy = self.origins % self.stride
        phase = xy[:, 1] * self.stride + xy[:, 0]
        tiles, widths = [], tile_widths(self.tile_rows)
        for lo, hi in pairwise(self.starts):
            if lo < hi:
                tiles += min((self.band_tiles(lo, hi, phase[lo:hi], w) for w in widths), key=tile_pixels)
        return tiles

    def band_tiles(self, lo: int, hi: int, phase: np.ndarray, width: int) -> list[Tile]:
        """The tiles of band `need[lo:hi]` with blocks of `width` columns."""
        cols = self.need[lo:hi, 1] - self.need[lo:hi, 1].min()
        key = phase * (cols.max() // width + 1) + cols // width  # one per phase and block
        order = np.argsort(key, kind="stable")  # stable: points stay in row-major order
        return [self.tile(lo + g) for g in np.split(order, np.flatnonzero(np.diff(key[order])) + 1)]

    def backbone_pixels(self) -> int:
        """Model pixels the backbone runs over: every tile, margins included."""
        return tile_pixels(self.tiles)

    def tile(self, idx: np.ndarray) -> Tile:
        """The region around these points' crops, `ext` wider on every side; its sides are
        congruent to the crop modulo the stride (so every dihedral frame stays aligned)."""
        o = self.origins[idx]
        x0, y0 = o.min(0) - self.ext
        x1, y1 = o.max(0) + self.geom.crop + self.ext
        return Tile(idx, (int(x0), int(y0)), (int(x1 - x0), int(y1 - y0)))

    def run(self) -> np.ndarray:
        tiles = DenseTiles(self.slide_path, self.tiles, self.geom.read, self.opts.normaliser)
        loader = slide_loader(tiles, self.opts, None)
        band = None
        with tqdm(total=len(self.need), desc=f"dense {self.slide_path.name}", disable=self.opts.quiet) as bar:
            for i, region in loader:
                tile = self.tiles[int(i)]
                b = int(self.band_of[tile.idx[0]])
                if band is None or b != band.index:
                    if band is not None:
                        self.finish(band)
                    band = self.new_band(b)
                lo, fe = self.embed_tile(tile, region)
                band.lo[tile.idx - band.start], band.fe[tile.idx - band.start] = lo, fe
                bar.update(len(tile.idx))
            self.finish(band)
        return self.out

    @torch.no_grad()
    def embed_tile(self, tile: Tile, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `[n, T]` and pooled features `[n, T, D]` of a tile's points, one backbone
        pass per transform."""
        opts, model = self.opts, self.model
        u8 = region[None].to(opts.device, non_blocking=True).permute(0, 3, 1, 2)  # [1, 3, h, w]: dihedral's axes
        rel = self.origins[tile.idx] - tile.origin
        h, w = u8.shape[2:]
        logits, feats = [], []
        for k, flip in DIHEDRAL[:opts.tta]:
            bx, by = dihedral_boxes(rel[:, 0], rel[:, 1], self.geom.crop, h, w, k, flip)
            assert not (bx % self.stride).any() and not (by % self.stride).any(), "tile off the cell grid"
            span = self.window * self.stride  # the pixels of a window's cells
            need = (int(by.min()), int(by.max()) + span, int(bx.min()), int(bx.max()) + span)
            with autocast(opts.device, opts.precision):
                fmap, (oy, ox) = self.features(dihedral_images(u8, k, flip), need)
            pooled = F.avg_pool2d(fmap.float(), self.window, stride=1)[0]  # [D, rows, cols]: every window
            rows, cols = (torch.from_numpy((v - o) // self.stride).to(pooled.device) for v, o in ((by, oy), (bx, ox)))
            fe = pooled[:, rows, cols].T
            lo = model.fc(fe)
            logits.append(lo.squeeze(1).cpu())
            feats.append(fe.cpu())
        return torch.stack(logits, 1), torch.stack(feats, 1)


def dense_map(model: CRFNet, slide_path: Path, mask: np.ndarray, geom: Geometry, opts: Options) -> np.ndarray:
    """The dense method (see the module docstring); `dense_applies` must hold."""
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    return DenseJob(model, slide_path, mask, geom, opts).run()
