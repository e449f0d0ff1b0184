"""Reading a slide at a chosen resolution: the pyramid level that fits, resized only by
the remainder.

A model trained on 20x patches (about 0.5 um per pixel) sees a 40x slide through its
level 1, and a 0.243-um slide through level 1 (0.486 um) shrunk by 3 %. Coordinates
stay level 0 everywhere: a `ReadScale` turns a level-0 corner and a size in model pixels
into pixels at the model's resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide

from . import slide as sl
from .errors import CrfError


class ScaleError(CrfError):
    """A resolution that a slide cannot give (no mpp recorded, no such level)."""


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`img` at `size` (w, h): area averaging when shrinking, bilinear when enlarging
    (unchanged when it already has that size)."""
    w, h = size
    if img.shape[:2] == (h, w):
        return img
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if img.shape[1] > w else cv2.INTER_LINEAR)


@dataclass(frozen=True)
class ReadScale:
    """Model pixels at `scale` level-0 pixels each, read from pyramid `level` (whose
    downsample is `downsample`) and resized by `scale / downsample` when that is not 1."""

    scale: float = 1.0
    level: int = 0
    downsample: float = 1.0

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.level == 0

    def read(self, slide: openslide.OpenSlide, xy: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
        """`(h, w, 3)` uint8 model pixels whose top-left corner is level-0 point `xy`.
        The level box is rounded to whole level pixels (at most half a level pixel off)."""
        w, h = size
        if self.identity:
            return sl.read_rgb(slide, xy, 0, size)
        d = self.downsample
        x0, y0 = (round(v / d) for v in xy)
        x1, y1 = round((xy[0] + w * self.scale) / d), round((xy[1] + h * self.scale) / d)
        img = sl.read_rgb(slide, (x0 * d, y0 * d), self.level, (x1 - x0, y1 - y0))
        return resize(img, (w, h))

    def describe(self) -> dict:
        return {"read_scale": self.scale, "read_level": self.level}


MIN_SCALE = 1 / 16  # the finest read: level-0 pixels enlarged 16 times


def read_scale(slide: openslide.OpenSlide, path: str | Path, mpp: float | None = None,
               level: int | None = None) -> ReadScale:
    """How to read `slide` at `mpp` microns per pixel, or at pyramid `level` (neither: its
    level 0). A level within 1 % of the wanted scale is read as it is."""
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise ScaleError(f"{path}: level {level} out of range: the slide has {slide.level_count} levels")
        d = sl.level_downsamples(slide)[level][0]
        return ReadScale(d, level, d)
    if mpp is None:
        return ReadScale()
    if not (math.isfinite(mpp) and mpp > 0):
        raise ScaleError(f"{path}: --mpp {mpp}: expected a positive number of microns per pixel")
    own = sl.slide_mpp(slide)
    if own is None:
        raise ScaleError(f"{path}: the slide does not record a usable microns per pixel, so it cannot be read at {mpp:g} um "
                         "(--mpp, or the checkpoint's mpp): give --level")
    scale = mpp / own[0]
    if scale < MIN_SCALE:  # the crops would be a few level-0 pixels enlarged (under one, a crash)
        raise ScaleError(f"{path}: reading at {mpp:g} um per pixel is {1 / scale:.3g} times finer than the slide's level 0 "
                         f"({own[0]:g} um per pixel); at most {1 / MIN_SCALE:g} times finer is read")
    lvl = sl.level_for_downsample(slide, scale)
    d = sl.level_downsamples(slide)[lvl][0]
    if sl.same_downsample(scale, d):
        return ReadScale() if lvl == 0 else ReadScale(d, lvl, d)
    return ReadScale(scale, lvl, d)


def check_patch_fits(read: ReadScale, patch: int, dimensions: tuple[int, int], path: str | Path) -> None:
    """Refuse a resolution at which one `patch`-pixel patch covers more than the whole
    slide: its map would be padding, and the read of one crop can need gigabytes."""
    side = patch * read.scale
    if side <= max(dimensions):
        return
    if read.identity:
        raise ScaleError(f"{path}: the whole slide ({dimensions[0]}x{dimensions[1]} pixels) is smaller than one "
                         f"{patch}-pixel patch: no map to make")
    raise ScaleError(f"{path}: at {read.scale:.4g} level-0 pixels per model pixel, one {patch}-pixel patch covers "
                     f"{side:.0f} level-0 pixels, more than the whole {dimensions[0]}x{dimensions[1]} slide "
                     "(the wrong --mpp or --level, or the checkpoint's mpp?)")
