"""Whole-slide tumour probability maps on a mask's lattice.

`naive` is NCRF's computation, kept as the reference: for every tissue pixel, the full
`grid x grid` patch grid centred on it through the CNN and the CRF, keeping the centre
node. `lattice` gives the same numbers with each needed patch through the CNN once: the
grid neighbours of lattice point `(r, c)` are the lattice points `(r + i*k, c + j*k)`
(`k = patch_size / stride`), so the CNN runs on tissue points and their neighbours, and the
CRF for all tissue points runs on the cached logits and features. Rows are processed in
bands with a rolling cache, so memory stays bounded on any slide size. On the CPU,
crops read together from one region share the CNN's first blocks (crfcore.shared_stem:
the same numbers, about 1.2x faster at NCRF's geometry). `dense`
(crfcore.dense) replaces the per-patch CNN step by whole-tile passes of the backbone.
Crops are read at level 0, or at the model's resolution (`crfcore.scale`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import slide as sl
from .crf import mean_field
from .datasets import Normaliser, SlideDataset, cut_grid, normalise_batch, to_tensor
from .device import autocast, fork_safe_opencv, reader_workers
from .model import CRFNet, inference_copy
from .scale import ReadScale
from .shared_stem import StemPlan, stem_cells, stem_plan

# The 8 dihedral transforms of a square image `(H, W, ...)`: (quarter turns, flip first).
DIHEDRAL = [(k, f) for f in (False, True) for k in range(4)]
REGION_BLOCK = (8, 16)  # lattice rows x columns of crops read as one slide region
CRF_CHUNK = 1024  # tissue points x transforms per CRF step (9 x 1024 x 1280 floats: 47 MB, a few copies)


def dihedral(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    return np.rot90(a[:, ::-1] if flip else a, k, axes=(0, 1))


def dihedral_images(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """`dihedral` on the last two axes (H, W) of an image tensor; the identity is `x` itself
    (torch.rot90 by 0 copies it to NCHW, and the CNN's input would then be copied back)."""
    x = torch.flip(x, dims=[-1]) if flip else x
    return torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x


def dihedral_boxes(x0: np.ndarray, y0: np.ndarray, size: int, h: int, w: int, k: int,
                   flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of `size` squares at `(x0, y0)` in an `(h, w)` image, after the
    transform `dihedral` (flip left-right, then k quarter turns as np.rot90)."""
    if flip:
        x0 = w - x0 - size
    for _ in range(k):
        x0, y0, h, w = y0, w - x0 - size, w, h
    return x0, y0


@dataclass(frozen=True)
class Geometry:
    """Patch geometry of a model (in model pixels), the mask lattice it runs on (level 0)
    and how model pixels are read from the slide (`read`: level 0 as it is by default)."""

    grid: int
    patch: int
    crop: int
    stride: tuple[float, float]   # level-0 pixels between lattice points (x, y)
    read: ReadScale = ReadScale()

    @property
    def half(self) -> int:
        return self.grid // 2

    def integer_stride(self) -> int | None:
        """The stride as one integer when both axes are within the pyramid tolerance of it
        (63.47 x 63.70 is 64, though 63.47 alone rounds to 63), else None."""
        s = round(sum(self.stride) / 2)
        return s if s > 0 and all(sl.same_downsample(v, s) for v in self.stride) else None

    def lattice_step(self) -> int | None:
        """`k = patch / stride` (both in level-0 pixels) when the lattice method applies,
        else None. At level 0 it must be exact; a patch read at another scale may be up to
        1 % off a whole number of strides (the grid then takes the nearest lattice points)."""
        s = self.integer_stride()
        if not s:
            return None
        if self.read.scale == 1:
            return self.patch // s if self.patch % s == 0 else None
        q = self.patch * self.read.scale / s
        return round(q) if round(q) >= 1 and sl.same_downsample(q, round(q)) else None

    def centres(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Level-0 centres `(n, 2)` of lattice points: pixel centres, rounded down."""
        s = self.integer_stride()
        sx, sy = (s, s) if s else self.stride
        return np.stack([np.floor((cols + 0.5) * sx), np.floor((rows + 0.5) * sy)], 1).astype(np.int64)

    def node_offsets(self) -> np.ndarray | None:
        """`(grid*grid, 2)` lattice offsets (row, col) of a point's grid nodes, row-major;
        None when the lattice method does not apply."""
        k = self.lattice_step()
        if k is None:
            return None
        span = range(-self.half, self.half + 1)
        return np.array([(i * k, j * k) for i in span for j in span])

    def crop_origin(self, centres: np.ndarray) -> np.ndarray:
        """Level-0 top-left of the centre node's crop in a grid image centred on `centres`
        (the same pixels whether cut from a grid image or read alone)."""
        off = (self.grid * self.patch) // 2 - self.half * self.patch - (self.patch - self.crop) // 2  # model px
        return centres - round(off * self.read.scale)


# ----------------------------------------------------------------------------- reading


class LatticePatches(SlideDataset):
    """Items: one region of the slide, read once, and its lattice points' crops, as
    `(indices [n], uint8 crops [n, crop, crop, 3], None)`; with `regions` (for the shared
    stem), the region itself instead: `(indices [n], uint8 region [H, W, 3], crop corners
    [n, 2] (x, y) in the region)`. Stain-normalised crop by crop, or read at another scale
    than level 0 (then each crop on its own, as `naive` reads them), always the crops.
    Slides open once per worker."""

    def __init__(self, slide_path: Path, origins: np.ndarray, crop: int, groups: list[np.ndarray],
                 normalise: Normaliser | None = None, read: ReadScale = ReadScale(), regions: bool = False) -> None:
        self.slide_path, self.origins, self.crop, self.groups = slide_path, origins, crop, groups
        self.normalise, self.read, self.regions = normalise, read, regions

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int):
        idx = self.groups[i]
        o = self.origins[idx]
        if not self.read.identity:
            crops = [self._crop(self.read.read(self.slide, tuple(p), (self.crop, self.crop))) for p in o]
            return torch.from_numpy(idx), torch.from_numpy(np.stack(crops)), None
        x0, y0 = o.min(0)
        x1, y1 = o.max(0) + self.crop
        region = torch.from_numpy(sl.read_rgb(self.slide, (int(x0), int(y0)), 0, (int(x1 - x0), int(y1 - y0))))
        corners = torch.from_numpy(o - (x0, y0))
        if self.regions and self.normalise is None:
            return torch.from_numpy(idx), region, corners
        crops = cut_crops(region, corners, self.crop)
        if self.normalise is not None:
            crops = torch.from_numpy(np.stack([self._crop(c.numpy()) for c in crops]))
        return torch.from_numpy(idx), crops, None

    def _crop(self, crop: np.ndarray) -> np.ndarray:
        return crop if self.normalise is None else self.normalise(crop)


def cut_crops(region: torch.Tensor, corners: torch.Tensor, crop: int) -> torch.Tensor:
    """The `crop`-pixel squares at `corners` (x, y) of a uint8 region `[H, W, 3]`."""
    return torch.stack([region[y:y + crop, x:x + crop] for x, y in corners.tolist()])


class NaiveGrids(SlideDataset):
    """Items: NCRF's grid image around one tissue point, cut into cells and cropped:
    `(index, patches [g*g, 3, crop, crop])`."""

    def __init__(self, slide_path: Path, centres: np.ndarray, geom: Geometry,
                 normalise: Normaliser | None = None) -> None:
        self.slide_path, self.centres, self.geom, self.normalise = slide_path, centres, geom, normalise

    def __len__(self) -> int:
        return len(self.centres)

    def __getitem__(self, i: int):
        g = self.geom
        if g.read.identity:
            size = g.grid * g.patch
            x, y = self.centres[i] - size // 2
            crops = cut_grid(sl.read_rgb(self.slide, (int(x), int(y)), 0, (size, size)), g.patch, g.crop)
        else:  # each cell's crop read on its own at the model's scale, as the lattice reads them
            corner = g.crop_origin(self.centres[i])
            span = range(-g.half, g.half + 1)
            crops = [g.read.read(self.slide, tuple(corner + np.round(np.array([j, r]) * g.patch * g.read.scale)),
                                 (g.crop, g.crop)) for r in span for j in span]
        if self.normalise is not None:
            crops = [self.normalise(c) for c in crops]
        return i, torch.stack([to_tensor(c) for c in crops])


def region_groups(rows: np.ndarray, cols: np.ndarray, block: tuple[int, int] = REGION_BLOCK) -> list[np.ndarray]:
    """Indices of lattice points (sorted row-major) grouped into blocks of `block` (rows,
    cols), block row by block row: one region read serves a block, and blocks are small
    enough that a few in flight stay cheap (8 x 16 crops of 224 px are 19 MB of uint8)."""
    rb = (rows - rows.min()) // block[0]
    cb = (cols - cols.min()) // block[1]  # lattice columns may be negative (off the slide)
    key = rb * (int(cb.max()) + 1) + cb
    order = np.argsort(key, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(key[order])) + 1)


# ----------------------------------------------------------------------------- CNN


@torch.no_grad()
def embed_patches(model: CRFNet, x: torch.Tensor, tta: int, device: torch.device,
                  precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `[n, T]` and features `[n, T, D]` (on the CPU, float32) of normalised patches
    `[n, 3, c, c]` under the first T dihedral transforms."""
    logits, feats = [], []
    for k, flip in DIHEDRAL[:tta]:
        xt = dihedral_images(x, k, flip)
        with autocast(device, precision):
            lo, fe = model.embed(xt.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
        logits.append(lo.float().cpu())
        feats.append(fe.float().cpu())
    return torch.stack(logits, 1), torch.stack(feats, 1)


def node_layout(grid: int, k: int, flip: bool) -> np.ndarray:
    """After transforming a grid image, position q holds original node `layout[q]`."""
    return dihedral(np.arange(grid * grid).reshape(grid, grid), k, flip).reshape(-1).copy()


def crf_centre(model: CRFNet, logits: torch.Tensor, feats: torch.Tensor, tta: int) -> torch.Tensor:
    """Centre-node probability averaged over transforms. `logits [n, N, T]`, `feats [n, N, T, D]`
    hold each original node's values under transform t."""
    g = model.cfg.grid
    probs = []
    for t, (k, flip) in enumerate(DIHEDRAL[:tta]):
        lay = torch.from_numpy(node_layout(g, k, flip))
        lo, fe = logits[:, lay, t], feats[:, lay, t]
        if model.crf is not None:
            lo = mean_field(lo, fe, model.crf.W.detach().float().cpu(), model.crf.iters)
        probs.append(torch.sigmoid(lo[:, (g * g) // 2]))
    return torch.stack(probs).mean(0)


# ----------------------------------------------------------------------------- methods


@dataclass
class Options:
    batch_size: int = 64
    workers: int | None = None  # None: crfcore.device.reader_workers's default for the device
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    tta: int = 1
    quiet: bool = False
    band_rows: int = 16  # a multiple of REGION_BLOCK[0] (dense: the tile height); the cache holds ~band_rows + 2k rows
    dense_tile: int = 2048  # dense: model pixels of new lattice rows per tile (and per band)
    normaliser: Normaliser | None = None  # stain normalisation of every crop (the model's, if it has one)
    share_stem: bool = True  # lattice: first blocks shared between crops where it pays (exact; crfcore.shared_stem)


def slide_loader(ds: Dataset, opts: Options, batch: int | None) -> DataLoader:
    """A DataLoader over slide reads with the run's workers (batch None: the dataset batches)."""
    workers = fork_safe_opencv(reader_workers(opts.workers, opts.device))
    return DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=opts.device.type == "cuda",
                      prefetch_factor=4 if workers else None)


def naive_map(model: CRFNet, slide_path: Path, mask: np.ndarray, geom: Geometry, opts: Options,
              points: np.ndarray | None = None) -> np.ndarray:
    """NCRF's reference computation; `points` (rows, cols) limits it to a subset."""
    rows, cols = points if points is not None else np.nonzero(mask)
    out = np.zeros(mask.shape, np.float32)
    ds = NaiveGrids(slide_path, geom.centres(rows, cols), geom, opts.normaliser)
    n = geom.grid ** 2
    with tqdm(total=len(ds), desc=f"naive {slide_path.name}", disable=opts.quiet) as bar:
        for idx, x in slide_loader(ds, opts, max(1, opts.batch_size // n)):
            out[rows[idx.numpy()], cols[idx.numpy()]] = _naive_centre(model, x, opts).numpy()
            bar.update(len(idx))
    return out


def _naive_centre(model: CRFNet, x: torch.Tensor, opts: Options) -> torch.Tensor:
    """Centre-node probability of whole grids `x [b, N, 3, c, c]`, the NCRF way: for each
    of the `tta` transforms (the first is the identity), transform the grid image, CNN,
    CRF, centre node; then the mean."""
    b, n = x.shape[:2]
    g = model.cfg.grid
    probs = []
    for k, flip in DIHEDRAL[:opts.tta]:
        lay = torch.from_numpy(node_layout(g, k, flip))
        xt = dihedral_images(x[:, lay], k, flip)
        lo, fe = embed_patches(model, xt.flatten(0, 1), 1, opts.device, opts.precision)
        lo, fe = lo.reshape(b, n), fe.reshape(b, n, -1)
        if model.crf is not None:
            lo = mean_field(lo, fe, model.crf.W.detach().float().cpu(), model.crf.iters)
        probs.append(torch.sigmoid(lo[:, n // 2]))
    return torch.stack(probs).mean(0)


def needed_points(mask: np.ndarray, offs: np.ndarray) -> np.ndarray:
    """`(n, 2)` lattice points (row, col), row-major, that some tissue point has as a grid
    node (`offs`: `Geometry.node_offsets`); they may lie outside the mask. A dilation, so
    no per-point copies on big slides."""
    reach = int(np.abs(offs).max())
    h, w = mask.shape
    need = np.zeros((h + 2 * reach, w + 2 * reach), bool)
    for dr, dc in offs:
        need[reach + dr:reach + dr + h, reach + dc:reach + dc + w] |= mask
    return np.stack(np.nonzero(need), 1) - reach


class BandCache:
    """Logits and features of computed lattice points, kept sorted by a row-major key.
    Points may lie up to `reach` rows or columns outside a `(H, W)` lattice."""

    def __init__(self, shape: tuple[int, int], reach: int, tta: int, dim: int) -> None:
        self.reach, self.span = reach, shape[1] + 2 * reach + 1
        self.keys = np.zeros(0, np.int64)
        self.lo, self.fe = torch.zeros(0, tta), torch.zeros(0, tta, dim)

    def key(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Row-major keys, so sorted points have sorted keys."""
        return (rows + self.reach) * self.span + (cols + self.reach)

    def add(self, points: np.ndarray, lo: torch.Tensor, fe: torch.Tensor) -> None:
        """Append points `(n, 2)` (row, col) that sort after every cached one."""
        self.keys = np.concatenate([self.keys, self.key(points[:, 0], points[:, 1])])
        self.lo, self.fe = torch.cat([self.lo, lo]), torch.cat([self.fe, fe])

    def get(self, rows: np.ndarray, cols: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.from_numpy(np.searchsorted(self.keys, self.key(rows, cols)))
        return self.lo[i], self.fe[i]

    def drop_rows_below(self, row: int) -> None:
        cut = int(np.searchsorted(self.keys, self.key(np.int64(row), np.int64(-self.reach))))
        # copies: a slice would keep the whole old buffer alive until the next add
        self.keys, self.lo, self.fe = self.keys[cut:].copy(), self.lo[cut:].clone(), self.fe[cut:].clone()


class Band:
    """The CNN outputs of one band of needed points, filled region by region."""

    def __init__(self, index: int, start: int, n: int, tta: int, dim: int) -> None:
        self.index, self.start = index, start
        self.lo, self.fe = torch.zeros(n, tta), torch.zeros(n, tta, dim)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def store(self, idx: torch.Tensor, lo: torch.Tensor, fe: torch.Tensor) -> None:
        self.lo[idx - self.start], self.fe[idx - self.start] = lo, fe

    def queue(self, idx: torch.Tensor, patches: torch.Tensor) -> int:
        """Queue a region's patches; return how many are queued now."""
        self.pending.append((idx, patches))
        return sum(len(i) for i, _ in self.pending)

    def compute(self, model: CRFNet, opts: Options) -> int:
        """Run the CNN over the queued patches into the band's buffers; return how many."""
        if not self.pending:
            return 0
        idx = torch.cat([i for i, _ in self.pending])
        x = torch.cat([x for _, x in self.pending])
        self.pending = []
        for s in range(0, len(idx), opts.batch_size):
            batch = normalise_batch(x[s:s + opts.batch_size].to(opts.device, non_blocking=True))
            self.store(idx[s:s + opts.batch_size], *embed_patches(model, batch, opts.tta, opts.device, opts.precision))
        return len(idx)


@torch.no_grad()
def embed_region(model: CRFNet, plan: StemPlan, region: torch.Tensor, corners: np.ndarray,
                 opts: Options) -> tuple[torch.Tensor, torch.Tensor]:
    """`embed_patches` of the crops at `corners` (n, 2) x, y of a uint8 region `[H, W, 3]`,
    its stem shared between them (crfcore.shared_stem): logits `[n, T]`, features `[n, T, D]`."""
    x = normalise_batch(region[None].to(opts.device, non_blocking=True))  # [1, 3, H, W]
    h, w = x.shape[2:]
    logits, feats = [], []
    for k, flip in DIHEDRAL[:opts.tta]:
        xt = dihedral_images(x, k, flip).contiguous(memory_format=torch.channels_last)
        bx, by = dihedral_boxes(corners[:, 0], corners[:, 1], plan.crop, h, w, k, flip)
        with autocast(opts.device, opts.precision):
            cells = stem_cells(model.features, plan, xt, np.stack([bx, by], 1), opts.batch_size)
            out = [model.embed(cells[s:s + opts.batch_size], plan.blocks)
                   for s in range(0, len(cells), opts.batch_size)]
        logits.append(torch.cat([lo for lo, _ in out]).float().cpu())
        feats.append(torch.cat([fe for _, fe in out]).float().cpu())
    return torch.stack(logits, 1), torch.stack(feats, 1)


def lattice_stem(model: CRFNet, geom: Geometry, opts: Options) -> StemPlan | None:
    """The shared stem's plan where it applies: asked for, on the CPU (never measured on
    CUDA), crops read at level 0 with no stain normalisation of their own, and the lattice
    on the stem's cell grid."""
    s = geom.integer_stride()
    if not (opts.share_stem and opts.device.type == "cpu" and geom.read.identity and opts.normaliser is None and s):
        return None
    plan = stem_plan(model.features, geom.crop)
    return plan if plan is not None and s % plan.stride == 0 else None


class LatticeJob:
    """One slide's lattice map. The needed points (tissue points and their grid
    neighbours) are split into bands of `band_rows` rows and read by one DataLoader; a
    finished band joins the rolling cache, and every tissue row whose grid neighbours are
    all cached gets its CRF, in chunks."""

    def __init__(self, model: CRFNet, slide_path: Path, mask: np.ndarray, geom: Geometry, opts: Options) -> None:
        self.model, self.slide_path, self.geom, self.opts = model, slide_path, geom, opts
        self.offs = geom.node_offsets()
        self.reach = int(self.offs.max())  # half * k: how far a grid node lies from its centre
        self.trows, self.tcols = np.nonzero(mask)
        self.out = np.zeros(mask.shape, np.float32)
        self.need = needed_points(mask, self.offs)
        self.band_of = (self.need[:, 0] - self.need[0, 0]) // opts.band_rows
        self.starts = np.searchsorted(self.band_of, np.arange(self.band_of[-1] + 2))  # band b: need[starts[b]:starts[b+1]]
        self.cache = BandCache(mask.shape, self.reach, opts.tta, model.feature_dim)
        self.done_row = self.trows.min() - self.reach - 1  # tissue rows up to here have their CRF

    @cached_property
    def stem(self) -> StemPlan | None:
        """The shared-stem plan of `run` (None: each crop runs the whole CNN); made on first
        use, so `DenseJob`, which replaces `run`, never makes it."""
        return lattice_stem(self.model, self.geom, self.opts)

    def run(self) -> np.ndarray:
        if self.opts.band_rows % REGION_BLOCK[0]:
            raise ValueError(f"band_rows must be a multiple of {REGION_BLOCK[0]} (region blocks must not "
                             f"straddle bands), got {self.opts.band_rows}")
        origins = self.geom.crop_origin(self.geom.centres(self.need[:, 0], self.need[:, 1]))
        groups = region_groups(self.need[:, 0], self.need[:, 1])
        patches = LatticePatches(self.slide_path, origins, self.geom.crop, groups, self.opts.normaliser,
                                 self.geom.read, regions=self.stem is not None)
        loader = slide_loader(patches, self.opts, None)
        band = None
        with tqdm(total=len(self.need), desc=f"lattice {self.slide_path.name}", disable=self.opts.quiet) as bar:
            for idx, pixels, corners in loader:
                b = int(self.band_of[idx[0]])
                if band is None or b != band.index:
                    if band is not None:
                        bar.update(band.compute(self.model, self.opts))
                        self.finish(band)
                    band = self.new_band(b)
                bar.update(self.take(band, idx, pixels, corners))
            bar.update(band.compute(self.model, self.opts))
            self.finish(band)
        return self.out

    def take(self, band: Band, idx: torch.Tensor, pixels: torch.Tensor, corners: torch.Tensor | None) -> int:
        """Run or queue one `LatticePatches` item; return how many points got their CNN outputs."""
        share = self.stem is not None and corners is not None
        if share and self.stem.worth_sharing(pixels.shape[:2], len(idx), self.opts.batch_size):
            band.store(idx, *embed_region(self.model, self.stem, pixels, corners.numpy(), self.opts))
            return len(idx)
        patches = pixels if corners is None else cut_crops(pixels, corners, self.geom.crop)
        return band.compute(self.model, self.opts) if band.queue(idx, patches) >= self.opts.batch_size else 0

    def new_band(self, b: int) -> Band:
        start = int(self.starts[b])
        return Band(b, start, int(self.starts[b + 1]) - start, self.opts.tta, self.model.feature_dim)

    def finish(self, band: Band) -> None:
        """Cache a computed band, then run the CRF of every tissue row now complete."""
        b = band.index
        self.cache.add(self.need[self.starts[b]:self.starts[b + 1]], band.lo, band.fe)
        last_band = b == self.band_of[-1]
        ready = self.trows.max() if last_band else min(self.need[self.starts[b + 1] - 1, 0] - self.reach,
                                                       self.trows.max())
        lo_i, hi_i = np.searchsorted(self.trows, [self.done_row + 1, ready + 1])  # trows is sorted
        step = max(1, CRF_CHUNK // self.opts.tta)  # in chunks: the neighbours' features are 9x a band
        for s in range(lo_i, hi_i, step):
            r, c = self.trows[s:min(hi_i, s + step)], self.tcols[s:min(hi_i, s + step)]
            lo_n, fe_n = self.cache.get(r[:, None] + self.offs[:, 0], c[:, None] + self.offs[:, 1])
            self.out[r, c] = crf_centre(self.model, lo_n, fe_n, self.opts.tta).numpy()
        self.done_row = max(self.done_row, ready)
        self.cache.drop_rows_below(self.done_row + 1 - self.reach)


def lattice_map(model: CRFNet, slide_path: Path, mask: np.ndarray, geom: Geometry, opts: Options) -> np.ndarray:
    """The lattice method: each needed lattice patch through the CNN once (see LatticeJob)."""
    if geom.node_offsets() is None:
        raise ValueError("the lattice method needs a patch size that is a multiple of the lattice stride")
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    return LatticeJob(model, slide_path, mask, geom, opts).run()


def probability_map(model: CRFNet, slide_path: str | Path, mask: np.ndarray, downsample: tuple[float, float],
                    patch: int, crop: int, method: str = "lattice", opts: Options | None = None,
                    read: ReadScale = ReadScale()) -> tuple[np.ndarray, str]:
    """The map and the method actually used: `lattice` and `dense` fall back to `naive`,
    with a warning, when the patch size is not a multiple of the lattice stride, and
    `dense` to `lattice` when the stride does not suit it (`crfcore.dense.dense_applies`).
    `read`: the resolution crops are read at (`crfcore.scale`)."""
    from . import dense  # dense builds on this module's lattice job

    opts = opts or Options()
    model = inference_copy(model).to(opts.device, memory_format=torch.channels_last)
    geom = Geometry(model.cfg.grid, patch, crop, tuple(downsample), read)
    if method in ("lattice", "dense") and geom.lattice_step() is None:
        warnings.warn(f"patch size {patch} (x {read.scale:.3f} level-0 pixels) is not a multiple of the lattice "
                      f"stride {downsample[0]:.2f}; "
                      "using the naive method (about 9x slower)")
        method = "naive"
    if method == "dense" and (why := dense.dense_applies(geom, dense.feature_stride(model))):
        warnings.warn(f"{why}; using the lattice method")
        method = "lattice"
    fn = {"naive": naive_map, "lattice": lattice_map, "dense": dense.dense_map}[method]
    return fn(model, Path(slide_path), mask, geom, opts), method
