"""Synthetic H&E-like whole-slide images: the test and example fixture generator.

`write_slide` renders a pyramidal, tiled, JPEG-compressed TIFF (OpenSlide opens it as a
generic tiled TIFF, with mpp set) showing pink stroma with purple nuclei on white glass,
and planted tumour regions whose nuclei are denser, larger and darker. The tumour
polygons are returned (and written as ASAP XML), so masks and labels can be checked
against the truth. Texture is procedural (a hash per nucleus cell), so any region at any
level is rendered on its own: large slides never need to fit in memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .annotations import Annotation, write_annotation
from .heatmap import TILE, pyramid_sizes, write_pyramid

GLASS = np.array([243, 241, 246], float)
STROMA = np.array([232, 162, 200], float)
TUMOUR_STROMA = np.array([214, 140, 196], float)
NUCLEUS = np.array([125, 75, 165], float)
TUMOUR_NUCLEUS = np.array([70, 30, 115], float)
# (cell size, radius range, presence probability) of nuclei in level-0 pixels.
NORMAL_CELLS = (22.0, (2.5, 4.0), 0.55)
TUMOUR_CELLS = (13.0, (4.0, 6.0), 0.95)
NOISE_BLOCK = 48  # level-0 side of the mimic spots that `noise` plants


@dataclass
class SyntheticSlide:
    """A synthetic slide on disk and the truth it was rendered from."""

    path: Path
    width: int
    height: int
    mpp: float
    annotation: Annotation
    tissue: list[tuple[float, float, float, float]] = field(default_factory=list)

    def tissue_contains(self, points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points, float).reshape(-1, 2)
        return _in_tissue(pts[:, 0], pts[:, 1], self.tissue)


def blob_polygon(cx: float, cy: float, radius: float, rng: np.random.Generator,
                 n: int = 64) -> np.ndarray:
    """An irregular star-shaped polygon (an island of tumour) around `(cx, cy)`."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in (2, 3, 5):
        r += rng.uniform(0.04, 0.12) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return np.round(np.stack([cx + radius * r * np.cos(theta), cy + radius * r * np.sin(theta)], 1), 1)


def _in_tissue(x: np.ndarray, y: np.ndarray, ellipses: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Union of wobbly ellipses `(cx, cy, rx, ry)` in level-0 pixels."""
    out = np.zeros(np.broadcast(x, y).shape, bool)
    for cx, cy, rx, ry in ellipses:
        u, v = (x - cx) / rx, (y - cy) / ry
        theta = np.arctan2(v, u)
        edge = 1 + 0.06 * np.sin(3 * theta + cx) + 0.04 * np.sin(7 * theta + cy)
        out |= u * u + v * v <= edge * edge
    return out


def _hash(ix: np.ndarray, iy: np.ndarray, seed: int, k: int) -> np.ndarray:
    """Uniform [0, 1) numbers from integer cell indices (a murmur-style finaliser)."""
    m = np.uint64(0xFFFFFFFF)
    h = (ix.astype(np.uint64) * np.uint64(0x9E3779B1) + iy.astype(np.uint64) * np.uint64(0x85EBCA77)
         + np.uint64((seed * 0xC2B2AE3D + k * 0x27D4EB2F) & 0xFFFFFFFF)) & m
    for shift, mult in ((15, 0x2C1B3C6D), (12, 0x297A2D39), (15, 0x1B873593)):
        h ^= h >> np.uint64(shift)
        h = (h * np.uint64(mult)) & m
    return (h >> np.uint64(8)).astype(np.float64) / float(1 << 24)


def _nuclei(x: np.ndarray, y: np.ndarray, cells: tuple, seed: int) -> np.ndarray:
    """Bool: the level-0 points `(x, y)` fall inside a nucleus of this cell lattice."""
    size, (rmin, rmax), presence = cells
    ix, iy = np.floor(x / size), np.floor(y / size)
    jx, jy = _hash(ix, iy, seed, 1) - 0.5, _hash(ix, iy, seed, 2) - 0.5
    r = rmin + (rmax - rmin) * _hash(ix, iy, seed, 3)
    dx, dy = x - (ix + 0.5 + 0.5 * jx) * size, y - (iy + 0.5 + 0.5 * jy) * size
    return (dx * dx + dy * dy <= r * r) & (_hash(ix, iy, seed, 4) < presence)


@dataclass
class _Scene:
    width: int
    height: int
    tissue: list[tuple[float, float, float, float]]
    annotation: Annotation
    seed: int
    noise: float

    def render(self, x0: float, y0: float, w: int, h: int, d: tuple[float, float],
               ss: int, rng: np.random.Generator) -> np.ndarray:
        """RGB float array of a `(h, w)` window at downsample `d`, `ss x ss` supersampled."""
        acc = np.zeros((h, w, 3))
        for s in range(ss):
            for t in range(ss):
                ox, oy = (t + 0.5) / ss, (s + 0.5) / ss
                x = x0 + (np.arange(w) + ox)[None, :] * d[0]
                y = y0 + (np.arange(h) + oy)[:, None] * d[1]
                acc += self._sample(x, y)
        img = acc / (ss * ss) + rng.normal(0, 4, (h, w, 3))
        return img

    def near(self, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float, float, float]]:
        """The tissue ellipses that may reach into the level-0 box (room for the wobble)."""
        m = 1.12  # the edge wobble is at most 1 + 0.06 + 0.04
        return [e for e in self.tissue if abs(e[0] - (x0 + x1) / 2) < m * e[2] + (x1 - x0) / 2
                and abs(e[1] - (y0 + y1) / 2) < m * e[3] + (y1 - y0) / 2]

    def _sample(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        tumour = self.annotation.rasterise(x[0], y[:, 0])
        x, y = np.broadcast_arrays(x, y)
        tissue = _in_tissue(x, y, self.near(x.min(), y.min(), x.max(), y.max()))
        tumour &= tissue
        if self.noise > 0:  # mimic spots smaller than a patch: single patches mislead, context does not
            bx, by = np.floor(x / NOISE_BLOCK), np.floor(y / NOISE_BLOCK)
            flip = _hash(bx, by, self.seed, 9) < self.noise / 2
            look = tumour ^ flip
        else:
            look = tumour
        shade = 8 * np.sin(x / 310 + self.seed) * np.cos(y / 270)
        img = np.where(look[..., None], TUMOUR_STROMA, STROMA) + shade[..., None]
        nuc = np.where(look, _nuclei(x, y, TUMOUR_CELLS, self.seed), _nuclei(x, y, NORMAL_CELLS, self.seed))
        img = np.where((nuc & tissue)[..., None], np.where(look[..., None], TUMOUR_NUCLEUS, NUCLEUS), img)
        return np.where(tissue[..., None], img, GLASS)


def _tiles(scene: _Scene, lw: int, lh: int, seed: int):
    """Yield the JPEG tiles of one level, row by row. Only tiles that may hold tissue are
    rendered; the others share one glass tile (so a 40k x 40k slide with little tissue
    is written in minutes, not hours)."""
    d = (scene.width / lw, scene.height / lh)
    ss = min(2, max(1, int(round(min(d)))))
    glass = GLASS + np.random.default_rng([seed, lw]).normal(0, 4, (TILE, TILE, 3))
    glass = np.clip(glass, 0, 255).astype(np.uint8)
    tw, th = TILE * d[0], TILE * d[1]
    for row in range(math.ceil(lh / TILE)):
        rng = np.random.default_rng([seed, lw, row])
        for col in range(math.ceil(lw / TILE)):
            x0, y0 = col * tw, row * th
            if scene.near(x0, y0, x0 + tw, y0 + th):
                yield np.clip(scene.render(x0, y0, TILE, TILE, d, ss, rng), 0, 255).astype(np.uint8)
            else:
                yield glass


def write_slide(path: str | Path, width: int = 4096, height: int = 3072, tumours: int = 1,
                seed: int = 0, mpp: float = 0.25, noise: float = 0.0,
                tissue: list[tuple[float, float, float, float]] | None = None,
                tumour_radius: float = 0.12, xml: str | Path | None = None,
                quality: int = 90) -> SyntheticSlide:
    """Render a synthetic slide to `path` (.tif) and, if `xml` is given, its ASAP XML.

    `tissue`: ellipses `(cx, cy, rx, ry)` as fractions of the slide size (default: one
    large central ellipse); `tumours`: how many tumour islands to plant inside the tissue,
    of radius `tumour_radius` x the short side; `noise` in [0, 1]: twice the fraction of
    48-pixel spots whose look is swapped between tumour and normal (hard cases).
    """
    rng = np.random.default_rng(seed)
    frac = tissue or [(0.5, 0.5, 0.38, 0.36)]
    ellipses = [(cx * width, cy * height, rx * width, ry * height) for cx, cy, rx, ry in frac]
    ann = Annotation()
    radius = tumour_radius * min(width, height)
    centres: list[tuple[float, float]] = []
    for i in range(tumours):
        for _ in range(1000):  # a centre well inside the tissue, apart from the others
            cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
            ring = blob_polygon(cx, cy, radius * 1.3, np.random.default_rng(0))
            apart = all(math.hypot(cx - a, cy - b) > 2.8 * radius for a, b in centres)
            if apart and _in_tissue(ring[:, 0], ring[:, 1], ellipses).all():
                break
        else:
            raise ValueError(f"no room for {tumours} tumours of radius {radius:.0f} in the tissue")
        centres.append((cx, cy))
        ann.add("positive", f"Tumor {i}", blob_polygon(cx, cy, radius, rng))
    scene = _Scene(width, height, ellipses, ann, seed, noise)
    sizes = pyramid_sizes(width, height, min_size=32)
    write_pyramid(path, sizes, lambda k, lw, lh: _tiles(scene, lw, lh, seed), mpp, "jpeg", quality)
    if xml is not None:
        write_annotation(ann, xml, to="xml")
    return SyntheticSlide(Path(path), width, height, mpp, ann, ellipses)
