"""Tissue, tumour and normal masks on a slide's pyramid lattice, and mask files.

A mask is a bool array `[row, col]`; pixel `[r, c]` covers the level-0 point
`((c + 0.5) * dx, (r + 0.5) * dy)` where `(dx, dy)` is the per-axis downsample.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from . import slide as sl
from .annotations import Annotation
from .errors import CrfError
from .io import load_array, save_array

KINDS = ("tissue", "tumor", "normal")
DEFAULT_DOWNSAMPLE = 64.0  # NCRF's level 6


class MaskWarning(UserWarning):
    """An empty mask, or annotation vertices outside the slide."""


class MaskError(CrfError):
    """A mask that cannot be made as asked (unknown kind, missing annotation, bad level)."""


@dataclass(frozen=True)
class Lattice:
    """Where a mask's pixels sit on the slide: shape `(H, W)` and per-axis downsample."""

    shape: tuple[int, int]
    downsample: tuple[float, float]
    level: int | None  # the pyramid level the pixels come from, None when resized

    @classmethod
    def for_slide(cls, slide: openslide.OpenSlide, level: int | None = None,
                  downsample: float | None = None) -> "Lattice":
        """The lattice of `level`, or of `downsample` (default 64): a level within 1 % of
        it when there is one, else the level-0 size divided by it, rounded up."""
        w0, h0 = slide.dimensions
        if level is not None:
            if not 0 <= level < slide.level_count:
                raise MaskError(f"level {level} out of range: the slide has {slide.level_count} levels")
            w, h = slide.level_dimensions[level]
            return cls((h, w), (w0 / w, h0 / h), level)
        d = DEFAULT_DOWNSAMPLE if downsample is None else float(downsample)
        if d > max(w0, h0):  # thumbnail_shape would round the lattice up to one pixel
            raise MaskError(f"downsample {d:g} is more than the slide's {w0}x{h0} level-0 pixels: the mask "
                            "would be one pixel")
        h, w = sl.thumbnail_shape(slide, d)
        lvl = slide.level_dimensions.index((w, h)) if (w, h) in slide.level_dimensions else None
        return cls((h, w), (w0 / w, h0 / h), lvl)

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 x of every column and y of every row (pixel centres)."""
        h, w = self.shape
        return (np.arange(w) + 0.5) * self.downsample[0], (np.arange(h) + 0.5) * self.downsample[1]

    def image(self, slide: openslide.OpenSlide) -> np.ndarray:
        """The slide's RGB pixels on this lattice."""
        if self.level is not None:
            return sl.read_level(slide, self.level)
        return sl.read_resized(slide, sl.level_for_downsample(slide, min(self.downsample)), self.shape)


def tissue_mask_otsu(rgb: np.ndarray, rgb_min: int = 50) -> np.ndarray:
    """NCRF's rule: not background in all of R, G, B (each above its Otsu threshold is
    background), saturation above its Otsu threshold, and R, G, B all above `rgb_min`."""
    background = np.ones(rgb.shape[:2], bool)
    for ch in range(3):
        background &= rgb[..., ch] > _otsu(rgb[..., ch])
    sat = rgb2hsv(rgb)[..., 1]
    return ~background & (sat > _otsu(sat)) & np.all(rgb > rgb_min, axis=-1)


def _otsu(channel: np.ndarray) -> float:
    # A constant image has no threshold; treat everything as one class.
    return threshold_otsu(channel) if channel.min() != channel.max() else channel.max()


def tissue_mask_histolab(rgb: np.ndarray) -> np.ndarray:
    """histolab's `TissueMask` filter chain (optional dependency)."""
    try:
        from histolab.filters.compositions import FiltersComposition
        from histolab.slide import Slide
    except ImportError:
        raise MaskError("--method histolab needs histolab (install it with Install/install.sh)") from None
    from PIL import Image

    filters = FiltersComposition(Slide).tissue_mask_filters
    with warnings.catch_warnings():  # histolab 0.7 passes scikit-image options deprecated since 0.26
        warnings.filterwarnings("ignore", message="Parameter `(area_threshold|min_size)` is deprecated")
        return np.asarray(filters(Image.fromarray(rgb)), bool)


def annotation_mask(ann: Annotation, lattice: Lattice) -> np.ndarray:
    """Pixels whose centre is tumour by `ann` (positive minus negative): exactly `contains`."""
    return ann.rasterise(*lattice.centres())


def count_outside(ann: Annotation, slide: openslide.OpenSlide) -> int:
    """How many vertices lie outside the slide's level-0 area."""
    w0, h0 = slide.dimensions
    allv = ann.positive + ann.negative
    if not allv:
        return 0
    v = np.concatenate(allv)
    return int(np.sum((v[:, 0] < 0) | (v[:, 1] < 0) | (v[:, 0] > w0) | (v[:, 1] > h0)))


def overlaps(ann: Annotation, size: tuple[int, int]) -> bool:
    """Whether the annotation's bounding box meets a `size` (w, h) level-0 area (a polygon
    around the whole slide does; another slide's annotation, off to the side, does not)."""
    bounds = ann.bounds()
    return bounds is not None and bounds[0] < size[0] and bounds[1] < size[1] and bounds[2] > 0 and bounds[3] > 0


def any_on_lattice(binary: np.ndarray, per_cell: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """`binary` (a level's pixels) on a lattice of `shape` whose cells, from the origin, each
    cover `per_cell` (x, y) of its pixels: a cell is set when any pixel it overlaps is set
    (a pixel across a cell border counts for both), so a thin or faint tumour is never
    averaged away and never given to the wrong cell."""
    def any_rows(a: np.ndarray, n: int, per: float) -> np.ndarray:
        i = np.arange(n)  # a pixel overlapping a cell by under 1 % of itself (downsample rounding) is not counted
        lo = np.clip(np.floor(i * per + 0.01).astype(int), 0, len(a))
        hi = np.clip(np.ceil((i + 1) * per - 0.01).astype(int), 0, len(a))
        sums = np.zeros((len(a) + 1, *a.shape[1:]), np.int32)
        np.cumsum(a, 0, out=sums[1:])
        return (sums[hi] - sums[lo]) > 0  # any pixel in rows [lo, hi)

    rows = any_rows(binary, shape[0], per_cell[1])
    return any_rows(rows.T, shape[1], per_cell[0]).T


def make_mask(slide_path: str | Path, kind: str, annotation: Annotation | None = None,
              level: int | None = None, downsample: float | None = None,
              method: str = "otsu") -> tuple[np.ndarray, dict]:
    """Compute a `tissue`, `tumor` or `normal` mask and its sidecar metadata."""
    if kind not in KINDS:
        raise MaskError(f"unknown mask kind {kind!r} (expected one of {', '.join(KINDS)})")
    if kind != "tissue" and annotation is None:
        raise MaskError(f"a {kind} mask needs --annotation")
    if downsample is not None and not (math.isfinite(downsample) and downsample >= 1):
        raise MaskError(f"--downsample {downsample}: expected a number >= 1")
    with sl.open_slide(slide_path) as slide:
        try:
            lattice = Lattice.for_slide(slide, level, downsample)
        except MaskError as err:
            raise MaskError(f"{slide_path}: {err}") from None
        if annotation is not None and (n := count_outside(annotation, slide)):
            if not overlaps(annotation, slide.dimensions):  # a mask of nothing, or all tissue called normal
                raise MaskError(f"{slide_path}: the annotation lies wholly outside the slide {slide.dimensions}: "
                                "an annotation of another slide?")
            warnings.warn(f"{slide_path}: {n} annotation vertices lie outside the slide "
                          f"{slide.dimensions}; clipped", MaskWarning, stacklevel=2)
        if kind == "tumor":
            mask = annotation_mask(annotation, lattice)
        else:
            rgb = lattice.image(slide)
            mask = tissue_mask_histolab(rgb) if method == "histolab" else tissue_mask_otsu(rgb)
            if kind == "normal":
                mask &= ~annotation_mask(annotation, lattice)
        dimensions, mpp = list(slide.dimensions), sl.slide_mpp(slide)
    if not mask.any():
        warnings.warn(f"{slide_path}: the {kind} mask is empty", MaskWarning, stacklevel=2)
    meta = {"slide": Path(slide_path).name, "slide_path": str(slide_path), "level": lattice.level,
            "downsample": list(lattice.downsample), "kind": kind,
            "method": "polygons" if kind == "tumor" else method, "slide_dimensions": dimensions,
            "mpp": list(mpp) if mpp else None,
            "slide_bytes": Path(slide_path).stat().st_size if Path(slide_path).is_file() else None}
    return mask, meta


def save_mask(path: str | Path, mask: np.ndarray, meta: dict) -> None:
    save_array(path, mask.astype(bool), meta)


def load_mask(path: str | Path, slide: str | Path | None = None,
              kind: str | tuple | None = None) -> tuple[np.ndarray, dict]:
    """Read a mask; refuse one made for another slide than `slide` (file name check)."""
    mask, meta = load_array(path, kind=kind or KINDS, slide=slide)
    return mask.astype(bool), meta


def preview(slide: openslide.OpenSlide, mask: np.ndarray, downsample: tuple[float, float],
            colour: tuple[int, int, int] = (0, 200, 0), min_side: int = 512) -> np.ndarray:
    """The slide thumbnail with the mask's outline drawn on it, at least `min_side` wide."""
    h, w = mask.shape
    img, f = sl.lattice_picture(slide, mask.shape, downsample, min_side)
    big = cv2.resize(mask.astype(np.uint8), (w * f, h * f), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(img, contours, -1, colour, max(1, f // 2 + 1))
    return img
