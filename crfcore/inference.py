"""Whole-slide tumour probability maps on a mask's lattice.

`naive` is NCRF's computation, kept as the reference: for every tissue pixel, the full
`grid x grid` patch grid centred on it through the CNN and the CRF, keeping the centre
node. `lattice` gives the same numbers with each needed patch through the CNN once: the
grid neighbours of lattice point `(r, c)` are the lattice points `(r + i*k, c + j*k)`
(`k = patch_size / stride`), so the CNN runs on tissue points and their neighbours, and the
CRF for all tissue points runs on the cached logits and features. Rows are processed in
bands with a rolling cache, so memory stays bounded on any slide size.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import slide as sl
from .crf import mean_field
from .datasets import SlideDataset, cut_grid, normalise_batch, to_tensor
from .model import CRFNet

# The 8 dihedral transforms of a square image `(H, W, ...)`: (quarter turns, flip first).
DIHEDRAL = [(k, f) for f in (False, True) for k in range(4)]
CRF_CHUNK = 1024  # tissue points x transforms per CRF step (9 x 1024 x 1280 floats: 47 MB, a few copies)


def dihedral(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    return np.rot90(a[:, ::-1] if flip else a, k, axes=(0, 1))


@dataclass(frozen=True)
class Geometry:
    """Patch geometry of a model and the mask lattice it runs on."""

    grid: int
    patch: int
    crop: int
    stride: tuple[float, float]   # level-0 pixels between lattice points (x, y)

    @property
    def half(self) -> int:
        return self.grid // 2

    def integer_stride(self) -> int | None:
        """The stride as an integer (within 1 %, equal on both axes), else None."""
        sx, sy = (round(v) for v in self.stride)
        ok = sx == sy and sx > 0 and all(abs(v - round(v)) <= 0.01 * v for v in self.stride)
        return sx if ok else None

    def lattice_step(self) -> int | None:
        """`k = patch / stride` when the lattice method applies, else None."""
        s = self.integer_stride()
        return self.patch // s if s and self.patch % s == 0 else None

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
        """Top-left of the centre node's crop in a grid image centred on `centres` (the
        same pixels whether cut from a grid image or read alone)."""
        return centres - (self.grid * self.patch) // 2 + self.half * self.patch + (self.patch - self.crop) // 2


# ----------------------------------------------------------------------------- reading


class LatticePatches(SlideDataset):
    """Items: one region of the slide, read once, sliced into the crops of its lattice
    points: `(indices [n], uint8 patches [n, crop, crop, 3])`. Slides open once per worker."""

    def __init__(self, slide_path: Path, origins: np.ndarray, crop: int, groups: list[np.ndarray]) -> None:
        self.slide_path, self.origins, self.crop, self.groups = slide_path, origins, crop, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int):
        idx = self.groups[i]
        o = self.origins[idx]
        x0, y0 = o.min(0)
        x1, y1 = o.max(0) + self.crop
        region = sl.read_rgb(self.slide, (int(x0), int(y0)), 0, (int(x1 - x0), int(y1 - y0)))
        c = self.crop
        patches = np.stack([region[y - y0:y - y0 + c, x - x0:x - x0 + c] for x, y in o])
        return torch.from_numpy(idx), torch.from_numpy(patches)


class NaiveGrids(SlideDataset):
    """Items: NCRF's grid image around one tissue point, cut into cells and cropped:
    `(index, patches [g*g, 3, crop, crop])`."""

    def __init__(self, slide_path: Path, centres: np.ndarray, geom: Geometry) -> None:
        self.slide_path, self.centres, self.geom = slide_path, centres, geom

    def __len__(self) -> int:
        return len(self.centres)

    def __getitem__(self, i: int):
        g = self.geom
        size = g.grid * g.patch
        x, y = self.centres[i] - size // 2
        img = sl.read_rgb(self.slide, (int(x), int(y)), 0, (size, size))
        return i, torch.stack([to_tensor(c) for c in cut_grid(img, g.patch, g.crop)])


def region_groups(rows: np.ndarray, cols: np.ndarray, block: tuple[int, int] = (8, 16)) -> list[np.ndarray]:
    """Indices of lattice points (sorted row-major) grouped into blocks of `block` (rows,
    cols), block row by block row: one region read serves a block, and blocks are small
    enough that a few in flight stay cheap (8 x 16 crops of 224 px are 19 MB of uint8)."""
    rb = (rows - rows.min()) // block[0]
    cb = (cols - cols.min()) // block[1]  # lattice columns may be negative (off the slide)
    key = rb * (int(cb.max()) + 1) + cb
    order = np.argsort(key, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(key[order])) + 1)


# ----------------------------------------------------------------------------- CNN


def _autocast(device: torch.device, precision: str):
    from .training import autocast_for
    return autocast_for(device, precision)[0]


@torch.no_grad()
def _embed(model: CRFNet, x: torch.Tensor, tta: int, device, precision) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `[n, T]` and features `[n, T, D]` of patches `[n, 3, c, c]` under T transforms."""
    logits, feats = [], []
    for k, flip in DIHEDRAL[:tta]:
        xt = torch.flip(x, dims=[3]) if flip else x
        xt = torch.rot90(xt, k, dims=(2, 3))
        with _autocast(device, precision):
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
    workers: int = 2
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    tta: int = 1
    quiet: bool = False
    band_rows: int = 16  # a multiple of 8 (the region block height); the cache holds ~band_rows + 2k rows


def _loader(ds: Dataset, opts: Options, batch: int | None) -> DataLoader:
    return DataLoader(ds, batch_size=batch, num_workers=opts.workers, pin_memory=opts.device.type == "cuda",
                      prefetch_factor=4 if opts.workers else None)


def naive_map(model: CRFNet, slide_path: Path, mask: np.ndarray, geom: Geometry, opts: Options,
              points: np.ndarray | None = None) -> np.ndarray:
    """NCRF's reference computation; `points` (rows, cols) limits it to a subset."""
    rows, cols = points if points is not None else np.nonzero(mask)
    out = np.zeros(mask.shape, np.float32)
    ds = NaiveGrids(slide_path, geom.centres(rows, cols), geom)
    n = geom.grid ** 2
    with tqdm(total=len(ds), desc=f"naive {slide_path.name}", disable=opts.quiet) as bar:
        for idx, x in _loader(ds, opts, max(1, opts.batch_size // n)):
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
        xt = x[:, lay]
        xt = torch.flip(xt, dims=[4]) if flip else xt
        xt = torch.rot90(xt, k, dims=(3, 4))
        lo, fe = _embed(model, xt.flatten(0, 1), 1, opts.device, opts.precision)
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


def lattice_map(model: CRFNet, slide_path: Path, mask: np.ndarray, geom: Geometry, opts: Options) -> np.ndarray:
    """The lattice method: each needed lattice patch through the CNN once. Needed points
    are read in row bands by one DataLoader; a band's logits and features join a rolling
    cache, and tissue rows whose grid neighbours are all cached get their CRF."""
    offs = geom.node_offsets()
    assert offs is not None
    trows, tcols = np.nonzero(mask)
    out = np.zeros(mask.shape, np.float32)
    if not trows.size:
        return out
    reach = int(offs.max())  # half * k: how far a grid node lies from its centre
    need = needed_points(mask, offs)
    span = mask.shape[1] + 2 * reach + 1

    def key(r, c):  # row-major, so keys of `need` (and of the cache) are sorted
        return (r + reach) * span + (c + reach)

    band = (need[:, 0] - need[0, 0]) // opts.band_rows
    starts = np.searchsorted(band, np.arange(band[-1] + 2))  # band b is need[starts[b]:starts[b+1]]
    assert opts.band_rows % 8 == 0  # region blocks must not straddle bands
    groups = region_groups(need[:, 0], need[:, 1])
    origins = geom.crop_origin(geom.centres(need[:, 0], need[:, 1]))
    loader = _loader(LatticePatches(slide_path, origins, geom.crop, groups), opts, None)
    cache = _Cache(opts.tta, model.feature_dim)
    state = {"done": trows.min() - reach - 1}

    def finish(b: int, lo: torch.Tensor, fe: torch.Tensor) -> None:
        cache.add(key(*need[starts[b]:starts[b + 1]].T), lo, fe)
        ready = min(need[starts[b + 1] - 1, 0] - reach, trows.max()) if b < band[-1] else trows.max()
        lo_i, hi_i = np.searchsorted(trows, [state["done"] + 1, ready + 1])  # trows is sorted
        step = max(1, CRF_CHUNK // opts.tta)  # in chunks: the neighbours' features are 9x a band
        for s in range(lo_i, hi_i, step):
            r, c = trows[s:min(hi_i, s + step)], tcols[s:min(hi_i, s + step)]
            lo_n, fe_n = cache.get(key(r[:, None] + offs[:, 0], c[:, None] + offs[:, 1]))
            out[r, c] = crf_centre(model, lo_n, fe_n, opts.tta).numpy()
        state["done"] = max(state["done"], ready)
        cache.drop_below(key(state["done"] + 1 - reach, -reach))

    current, lo_b, fe_b = 0, None, None
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    with tqdm(total=len(need), desc=f"lattice {slide_path.name}", disable=opts.quiet) as bar:
        for idx, x in loader:
            b = int(band[idx[0]])
            if b != current or lo_b is None:
                if lo_b is not None:
                    _run(model, pending, lo_b, fe_b, starts[current], opts, bar)
                    pending = []
                    finish(current, lo_b, fe_b)
                current, n = b, starts[b + 1] - starts[b]
                lo_b, fe_b = torch.zeros(n, opts.tta), torch.zeros(n, opts.tta, model.feature_dim)
            pending.append((idx, x))
            if sum(len(i) for i, _ in pending) >= opts.batch_size:
                _run(model, pending, lo_b, fe_b, starts[current], opts, bar)
                pending = []
        _run(model, pending, lo_b, fe_b, starts[current], opts, bar)
        finish(current, lo_b, fe_b)
    return out


class _Cache:
    """Logits and features of computed lattice points, kept sorted by key."""

    def __init__(self, tta: int, dim: int) -> None:
        self.keys = np.zeros(0, np.int64)
        self.lo, self.fe = torch.zeros(0, tta), torch.zeros(0, tta, dim)

    def add(self, keys: np.ndarray, lo: torch.Tensor, fe: torch.Tensor) -> None:
        self.keys = np.concatenate([self.keys, keys])
        self.lo, self.fe = torch.cat([self.lo, lo]), torch.cat([self.fe, fe])

    def get(self, keys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.from_numpy(np.searchsorted(self.keys, keys))
        return self.lo[i], self.fe[i]

    def drop_below(self, key: int) -> None:
        cut = int(np.searchsorted(self.keys, key))
        # copies: a slice would keep the whole old buffer alive until the next add
        self.keys, self.lo, self.fe = self.keys[cut:].copy(), self.lo[cut:].clone(), self.fe[cut:].clone()


def _run(model, pending, lo_b, fe_b, offset: int, opts: Options, bar) -> None:
    """CNN over the pending regions' patches; results into the band buffers."""
    if not pending:
        return
    idx = torch.cat([i for i, _ in pending]) - int(offset)
    x = torch.cat([x for _, x in pending])
    for s in range(0, len(idx), opts.batch_size):
        batch = normalise_batch(x[s:s + opts.batch_size].to(opts.device, non_blocking=True))
        lo, fe = _embed(model, batch, opts.tta, opts.device, opts.precision)
        lo_b[idx[s:s + opts.batch_size]] = lo
        fe_b[idx[s:s + opts.batch_size]] = fe
    bar.update(len(idx))


def probability_map(model: CRFNet, slide_path: str | Path, mask: np.ndarray, downsample: tuple[float, float],
                    patch: int, crop: int, method: str = "lattice", opts: Options | None = None) -> tuple[np.ndarray, str]:
    """The map and the method actually used (lattice falls back to naive, with a warning,
    when the patch size is not a multiple of the lattice stride)."""
    opts = opts or Options()
    model = model.eval().to(opts.device, memory_format=torch.channels_last)
    geom = Geometry(model.cfg.grid, patch, crop, tuple(downsample))
    if method == "lattice" and geom.lattice_step() is None:
        warnings.warn(f"patch size {patch} is not a multiple of the lattice stride {downsample[0]:.2f}; "
                      "using the naive method (about 9x slower)")
        method = "naive"
    fn = lattice_map if method == "lattice" else naive_map
    return fn(model, Path(slide_path), mask, geom, opts), method


