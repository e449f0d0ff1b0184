"""Opening whole-slide images with OpenSlide and reading RGB pixels from them.

Level downsamples are computed per axis from the real level dimensions: pyramids
round level sizes, so a "level 1" is often not exactly 2x smaller (NCRF assumed
powers of two and mis-registered such slides).
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import openslide
import tifffile
from openslide import lowlevel

from .errors import CrfError


# Pyramids round level sizes, so a "64" level often measures 63.99 or 64.02: two
# downsamples this close (relative) are the same, everywhere in crfcore.
DOWNSAMPLE_TOLERANCE = 0.01


def same_downsample(a: float, b: float) -> bool:
    return abs(a / b - 1) <= DOWNSAMPLE_TOLERANCE


class SlideError(CrfError):
    """A slide that does not exist, is not a slide, or that OpenSlide cannot read."""


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open `path` with OpenSlide; raise `SlideError` naming the file and the reason."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a directory, not a slide file")
    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{path}: not a slide format OpenSlide supports") from None
    except openslide.OpenSlideError as err:
        raise SlideError(f"{path}: OpenSlide cannot read it ({err})") from None
    try:  # some broken files open but fail on the first read
        slide.read_region((0, 0), slide.level_count - 1, (1, 1))
    except openslide.OpenSlideError as err:
        slide.close()
        raise SlideError(f"{path}: OpenSlide cannot read its pixels ({err})") from None
    return slide


def slide_id(path: str | Path) -> str:
    """The slide's id as used in coords lists and output names: its file stem."""
    return Path(path).stem


def level_downsamples(slide: openslide.OpenSlide) -> list[tuple[float, float]]:
    """Per-axis `(dx, dy)` level-0 pixels per level pixel, from the level dimensions."""
    w0, h0 = slide.dimensions
    return [(w0 / w, h0 / h) for w, h in slide.level_dimensions]


def level_for_downsample(slide: openslide.OpenSlide, downsample: float) -> int:
    """The coarsest level whose downsample is at or below `downsample` (1 % slack)."""
    best = 0
    for level, (dx, dy) in enumerate(level_downsamples(slide)):
        if max(dx, dy) <= downsample * (1 + DOWNSAMPLE_TOLERANCE):
            best = level
    return best


PLAUSIBLE_MPP = (1e-3, 1e3)  # microns per pixel; a value outside is a broken header, not a scanner's


def slide_mpp(slide: openslide.OpenSlide) -> tuple[float, float] | None:
    """Level-0 microns per pixel `(x, y)`, or None when the slide does not say or says
    something no scanner writes (0, negative, infinite, 1e-300)."""
    props = slide.properties
    try:
        mpp = float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y])
    except (KeyError, ValueError):
        return None
    low, high = PLAUSIBLE_MPP
    return mpp if all(low <= v <= high for v in mpp) else None


def rgba_to_rgb(rgba: np.ndarray, background: int = 255) -> np.ndarray:
    """Composite an RGBA array over white (transparent and outside pixels become white), or
    over grey level `background`."""
    if rgba[..., 3].min() == 255:  # opaque, as most regions inside a slide: nothing to composite
        if rgba.ndim == 3 and rgba.dtype == np.uint8:  # an image: OpenCV drops alpha ~20x faster than numpy
            return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8)


def read_rgb(slide: openslide.OpenSlide, xy: tuple[int, int], level: int,
             size: tuple[int, int], background: int = 255) -> np.ndarray:
    """Read a `(h, w, 3)` uint8 region whose top-left is level-0 point `xy`, at `level`.

    Pixels outside the slide or transparent in it are white (grey level `background`).
    """
    x, y = (int(round(v)) for v in xy)
    w, h = (int(v) for v in size)
    try:
        if w > 0 and h > 0 and DIRECT_READ and isinstance(slide, openslide.OpenSlide):
            return premultiplied_to_rgb(read_bgra(slide, x, y, level, w, h), background)
        region = slide.read_region((x, y), level, (w, h))
    except openslide.OpenSlideError as err:  # a corrupt tile: name the file and the place
        name = getattr(slide, "_filename", "slide")  # OpenSlide keeps the path only privately
        raise SlideError(f"{name}: cannot read the {w}x{h} region at ({x}, {y}), level {level} ({err})") from None
    return rgba_to_rgb(np.asarray(region), background)


# OpenSlide's C call fills a buffer with premultiplied ARGB words; openslide-python then
# un-premultiplies them into a PIL image, which numpy copies again (a third of a large
# region's read time). Where the calls are there (openslide-python 1.x keeps them as
# lowlevel._read_region and _convert.argb2rgba) and words are little-endian (bytes B, G,
# R, A), crfcore reads into numpy directly, with the same pixels as a result.
try:
    from openslide import _convert
except ImportError:  # an openslide-python without its C helper: the PIL path
    _convert = None
DIRECT_READ = sys.byteorder == "little" and hasattr(lowlevel, "_read_region") and hasattr(_convert, "argb2rgba")


# OpenSlide (3.3.1 on) reads one slide from several threads in parallel, and the C call
# releases the GIL: a large level-0 region is read as row bands, one per thread, about
# 1.8x faster on 2 cores. Level 0 only: there a band is exactly those rows of the region,
# where at other levels OpenSlide scales the level-0 origin of each band on its own.
READ_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
PARALLEL_READ_PIXELS = 2**18  # below this, starting threads costs more than they save


def read_bgra(slide: openslide.OpenSlide, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    """OpenSlide's region as `(h, w, 4)` uint8, B, G, R, A, colours premultiplied by alpha."""
    words = np.empty((h, w), np.uint32)

    def read(rows: tuple[int, int]) -> None:
        top, bottom = rows
        out = words[top:bottom].ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
        lowlevel._read_region(slide._osr, out, x, y + top, level, w, bottom - top)

    bands = min(READ_THREADS, h) if level == 0 and w * h >= PARALLEL_READ_PIXELS else 1
    if bands == 1:
        read((0, h))
    else:
        edges = [h * i // bands for i in range(bands + 1)]
        # threads of this call only: none left running when a DataLoader forks its workers
        with ThreadPoolExecutor(bands, thread_name_prefix="slide-read") as pool:
            list(pool.map(read, zip(edges, edges[1:])))  # list: a band's error raises here
    return words.view(np.uint8).reshape(h, w, 4)


def premultiplied_to_rgb(bgra: np.ndarray, background: int = 255) -> np.ndarray:
    """A premultiplied BGRA region as RGB over grey level `background`, pixel for pixel
    what `rgba_to_rgb` makes of openslide-python's image of it: opaque pixels as they are,
    transparent ones the background, and the few partly transparent ones (level seams,
    slide edges) through `composite_table`."""
    rgb = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
    alpha = cv2.extractChannel(bgra, 3)
    if cv2.minMaxLoc(alpha)[0] == 255:  # opaque, as most regions inside a slide
        return rgb
    # colour + background * transparency: exact where a pixel is opaque or all 0 (absent)
    rgb = cv2.add(rgb, cv2.cvtColor(cv2.LUT(alpha, composite_table(background)[:, 0]), cv2.COLOR_GRAY2RGB))
    # the others (partly transparent, or a colour without alpha) from the table, one by one
    neither = cv2.bitwise_not(cv2.bitwise_or(cv2.inRange(alpha, 255, 255), cv2.inRange(bgra, (0,) * 4, (0,) * 4)))
    odd = cv2.findNonZero(neither)
    if odd is not None:
        x, y = odd.reshape(-1, 2).T
        px = bgra[y, x]  # [n, 4]: B, G, R, A
        rgb[y, x] = composite_table(background)[px[:, 3:], px[:, 2::-1]]
    return rgb


@functools.lru_cache(maxsize=256)
def composite_table(background: int) -> np.ndarray:
    """`[alpha, premultiplied colour]` -> the composite over `background` that
    `rgba_to_rgb` gives after openslide-python's own un-premultiplying (its rounding,
    and its wrap-around for invalid words, included: the table is made by it)."""
    a, c = np.divmod(np.arange(256 * 256, dtype=np.uint32), 256)
    words = (a << 24) | (c << 16) | (c << 8) | c
    _convert.argb2rgba(words)
    rgba = words.view(np.uint8).reshape(256, 256, 4)
    return rgba_to_rgb(rgba, background)[..., 0]


def read_level(slide: openslide.OpenSlide, level: int, background: int = 255) -> np.ndarray:
    """The whole of `level` as an `(H, W, 3)` uint8 array (transparent pixels: `background`)."""
    return read_rgb(slide, (0, 0), level, slide.level_dimensions[level], background)


WHOLE_LEVEL_PIXELS = 2**27  # 512 MiB as RGBA: a larger level is read block by block
BLOCK = 4096  # level pixels on a side of one block


def read_resized(slide: openslide.OpenSlide, level: int, shape: tuple[int, int]) -> np.ndarray:
    """`level` area-averaged (cv2 INTER_AREA) to `shape` `(H, W)`. A level larger than
    WHOLE_LEVEL_PIXELS (a single-level 100k x 100k TIFF is 40 GB) is read in blocks of
    about BLOCK pixels, each averaged over k x k cells, `k` the integer part of the scale
    (blocks are multiples of `k`, so they meet exactly), and that picture, `k` times
    smaller, resized to `shape`: memory stays bounded and the result does not depend on
    the blocks. It differs from one resize of the whole level where the scale is not a
    whole number (two averagings instead of one)."""
    (lw, lh), (h, w) = slide.level_dimensions[level], shape
    if lw * lh <= WHOLE_LEVEL_PIXELS:
        img = read_level(slide, level)
        return img if img.shape[:2] == (h, w) else cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    k = max(1, int(min(lw / w, lh / h)))
    step = max(k, BLOCK // k * k)  # level pixels on a side of a block
    dx, dy = level_downsamples(slide)[level]
    small = np.empty((math.ceil(lh / k), math.ceil(lw / k), 3), np.uint8)
    for y0 in range(0, lh, step):
        for x0 in range(0, lw, step):
            bw, bh = min(step, lw - x0), min(step, lh - y0)
            block = read_rgb(slide, (x0 * dx, y0 * dy), level, (bw, bh))
            pw, ph = math.ceil(bw / k), math.ceil(bh / k)
            # the level's last cells are partial: edge pixels repeated, so every cell is k x k
            block = cv2.copyMakeBorder(block, 0, ph * k - bh, 0, pw * k - bw, cv2.BORDER_REPLICATE)
            small[y0 // k:y0 // k + ph, x0 // k:x0 // k + pw] = cv2.resize(block, (pw, ph),
                                                                           interpolation=cv2.INTER_AREA)
    return small if small.shape[:2] == (h, w) else cv2.resize(small, (w, h), interpolation=cv2.INTER_AREA)


def thumbnail_shape(slide: openslide.OpenSlide, downsample: float) -> tuple[int, int]:
    """`(H, W)` of a picture of the slide at `downsample`: the level's own size when a
    level is within 1 % of it, else the level-0 size divided and rounded up."""
    for (w, h), (dx, dy) in zip(slide.level_dimensions, level_downsamples(slide)):
        if same_downsample(dx, downsample) and same_downsample(dy, downsample):
            return h, w
    w0, h0 = slide.dimensions
    return math.ceil(h0 / downsample), math.ceil(w0 / downsample)


def thumbnail(slide: openslide.OpenSlide, downsample: float) -> np.ndarray:
    """The slide as an RGB array of `thumbnail_shape(slide, downsample)`.

    Reads the best level at or below `downsample` and resizes by area averaging.
    """
    return read_resized(slide, level_for_downsample(slide, downsample), thumbnail_shape(slide, downsample))


def lattice_picture(slide: openslide.OpenSlide, shape: tuple[int, int], downsample: tuple[float, float],
                    min_side: int = 512) -> tuple[np.ndarray, int]:
    """The slide pictured on an `(H, W)` array lattice of `downsample`, scaled up by an
    integer factor `f` until its long side is at least `min_side`: `(f*H, f*W, 3)`, `f`."""
    h, w = shape
    f = max(1, math.ceil(min_side / max(h, w)))
    img = cv2.resize(thumbnail(slide, min(downsample) / f), (w * f, h * f), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img), f


SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn",
                    ".bif", ".svslide", ".dcm")


def find_slides(folder: str | Path) -> list[Path]:
    """Slide files directly inside `folder`, sorted by name (DICOM: one file per series);
    hidden files (a writer's temporary file, say) and this tool's heat-map TIFFs are not
    slides."""
    found = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS
                   and not p.name.startswith(".") and not is_map_tiff(p))
    series: set[str] = set()
    slides = []
    for path in found:  # the files of one DICOM series are one slide: its first file stands for it
        uid = dicom_series(path)
        if uid not in series:
            slides.append(path)
        if uid is not None:
            series.add(uid)
    return slides


MAP_SOFTWARE = "crfcore probability map"  # the TIFF Software tag of heat-map TIFFs (prob_map_show.py --tiff)


def is_map_tiff(path: Path) -> bool:
    """Whether `path` is a heat-map TIFF this tool wrote: it lies over a slide, it is not
    one. (Maps written before the Software tag carry the name in their description.)"""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        with tifffile.TiffFile(path) as t:
            page = t.pages[0]
            return MAP_SOFTWARE in (page.software, (page.description or "")[:len(MAP_SOFTWARE)])
    except Exception:  # not a TIFF tifffile reads (a broken file, say): not one of ours
        return False


def dicom_series(path: Path) -> str | None:
    """The SeriesInstanceUID of a DICOM slide file (None for other files, or unreadable)."""
    if path.suffix.lower() != ".dcm":
        return None
    try:
        with openslide.OpenSlide(str(path)) as slide:
            return slide.properties.get("dicom.SeriesInstanceUID")
    except (openslide.OpenSlideError, OSError):
        return None
