"""Probability-map files, colour rendering, overlays on the slide and pyramidal TIFFs.

A map is float32 `[row, col]` on a mask lattice; pixel `[r, c]` covers level-0
`((c + 0.5) * dx, (r + 0.5) * dy)`, so a picture of it lines up with a slide thumbnail
of the same downsample pixel for pixel (no offsets, no gaps between blocks).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import tifffile

from . import slide as sl
from .errors import CrfError, OutputError
from .io import PICTURE_MARKS, ArrayFileError, atomic_path, is_own_picture, load_array, save_array, save_figure
from .io import sidecar_json, sidecar_path
from .masks import KINDS as MASK_KINDS
from .slide import MAP_SOFTWARE

TILE = 256


def save_probability_map(path: str | Path, prob: np.ndarray, meta: dict) -> None:
    save_array(path, prob.astype(np.float32), {**meta, "kind": "probability"})


def load_probability_map(path: str | Path, slide: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """A map of prob_map.py and its sidecar (`load_array`), refused unless it holds
    probabilities: floats from 0 to 1."""
    prob, meta = load_array(path, kind="probability", slide=slide)
    if prob.dtype.kind != "f" or prob.min() < 0 or prob.max() > 1:
        raise ArrayFileError(f"{path}: holds {prob.dtype} values from {prob.min():g} to {prob.max():g}; "
                             "a probability map holds floats from 0 to 1")
    return prob, meta


def check_picture_output(path: Path) -> None:
    """Refuse, before any work, a picture name in a format this tool does not write (and
    mark), or one that would replace a file other than a picture this tool wrote: a slide,
    a heat-map TIFF (`--tiff`), a mask's preview (Mask_gen.py's `<mask>.png` beside
    `<mask>.npy`), a training image, a patch, your own file."""
    if path.suffix[1:].lower() not in PICTURE_MARKS:
        what = f"a {path.suffix} picture" if path.suffix else "a picture without a suffix"
        raise OutputError(f"{path}: cannot write {what} (end its name with one of .{', .'.join(PICTURE_MARKS)})")
    if not path.is_file() or is_own_picture(path):
        return
    if sl.is_map_tiff(path):
        raise OutputError(f"{path}: is a heat-map TIFF (prob_map_show.py --tiff); the picture would replace it: "
                          "choose another name")
    mask = path.with_suffix(".npy")
    kind = (sidecar_json(sidecar_path(mask)) or {}).get("kind") if mask.is_file() else None  # the array is not read
    if kind in MASK_KINDS:
        raise OutputError(f"{path}: is the preview of the {kind} mask {mask.name}; the picture would replace it: "
                          "choose another name")
    if path.suffix.lower() in sl.SLIDE_EXTENSIONS and is_slide(path):
        raise OutputError(f"{path}: is a slide; the picture would replace it: choose another name")
    raise OutputError(f"{path}: exists and is not a picture this tool wrote (an image of a training set or a patch "
                      "folder, your own file?); not replaced: choose another name or remove it")


def is_slide(path: Path) -> bool:
    """Whether OpenSlide opens `path`."""
    try:
        sl.open_slide(path).close()
    except CrfError:
        return False
    return True


def check_tiff_output(path: Path) -> None:
    """Refuse, before any work, a map TIFF output that would replace a file other than an
    earlier map TIFF of this tool (a plain TIFF image, a slide OpenSlide cannot open)."""
    if path.exists() and not sl.is_map_tiff(path):
        raise OutputError(f"{path}: exists and is not a heat-map TIFF this tool wrote (a slide, another image?); "
                          "not replaced: choose another name")


def colourise(prob: np.ndarray, cmap: str = "jet", vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """`(H, W)` values -> `(H, W, 3)` uint8 colours of a matplotlib colour map."""
    import matplotlib

    norm = np.clip((prob - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return (matplotlib.colormaps[cmap](norm)[..., :3] * 255 + 0.5).astype(np.uint8)


def overlay(thumb: np.ndarray, prob: np.ndarray, alpha: float = 0.5, cmap: str = "jet",
            vmin: float = 0.0, vmax: float = 1.0, tissue: np.ndarray | None = None) -> np.ndarray:
    """Blend the coloured map (scaled up to `thumb`'s size, nearest) over `thumb` on the
    tissue (default: where the map is non-zero); elsewhere the slide shows through."""
    import cv2

    colours = colourise(prob, cmap, vmin, vmax)
    on = prob > 0 if tissue is None else tissue
    big = lambda a: cv2.resize(a, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_NEAREST)  # noqa: E731
    col, on_big = big(colours), big(on.astype(np.uint8)).astype(bool)
    out = thumb.astype(np.float32)
    out[on_big] = (1 - alpha) * out[on_big] + alpha * col[on_big]
    return out.astype(np.uint8)


def figure(image: np.ndarray, out_png: str | Path, cmap: str, vmin: float, vmax: float,
           title: str, extent: tuple[float, float, float, float]) -> None:
    """Save `image` with a colour bar for `cmap` and level-0 pixel axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[:2]
    shape = min(max(h / w, 1 / 8), 4)  # a map of a long thin strip stays a page, not a 48,000-inch figure
    fig, ax = plt.subplots(figsize=(8, 8 * shape + 0.8))
    shown = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
    if image.ndim == 3:  # an RGB overlay: a scalar mappable just for the colour bar
        shown = plt.cm.ScalarMappable(norm=plt.Normalize(vmin, vmax), cmap=cmap)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="tumour probability")
    ax.set(title=title, xlabel="x (level-0 pixels)", ylabel="y (level-0 pixels)")
    save_figure(fig, out_png)


def pyramid_sizes(width: int, height: int, min_size: int = 512) -> list[tuple[int, int]]:
    """Power-of-two pyramid, rounded up, down to `min_size` on the long side."""
    sizes, d = [], 1
    while not sizes or max(width, height) / d >= min_size:
        sizes.append((math.ceil(width / d), math.ceil(height / d)))
        d *= 2
    return sizes


def write_pyramid(path: str | Path, sizes: list[tuple[int, int]],
                  tiles: Callable[[int, int, int], Iterator[np.ndarray]], mpp: float | None,
                  compression: str = "jpeg", quality: int = 90, channels: int = 3,
                  dtype: type = np.uint8, description: str | None = None, software: str | None = None) -> None:
    """A tiled pyramidal TIFF, one page per level (OpenSlide's generic tiled TIFF), or an
    OME-TIFF with the levels as SubIFDs when `path` ends in `.ome.tif(f)` (the pyramid
    Bio-Formats, and so QuPath, recognises). `tiles(level, w, h)` yields the level's
    `TILE x TILE` tiles row by row, each `(TILE, TILE, channels)` (or `(TILE, TILE)` for
    one channel). `mpp` sets the resolution (microns per level-0 pixel)."""
    w0, h0 = sizes[0]
    ome = str(path).lower().endswith((".ome.tif", ".ome.tiff"))
    shape = (channels,) if channels > 1 else ()
    big = w0 * h0 * channels * np.dtype(dtype).itemsize > 2**31
    comp: dict = dict(compression=compression)
    if compression == "jpeg":
        comp["compressionargs"] = {"level": quality}
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=big, ome=ome) as tw:
            for k, (lw, lh) in enumerate(sizes):
                kw: dict = dict(metadata=None)
                if mpp:
                    kw.update(resolution=(1e4 / (mpp * w0 / lw), 1e4 / (mpp * h0 / lh)), resolutionunit="CENTIMETER")
                if ome and k == 0:
                    kw.update(subifds=len(sizes) - 1, metadata={"axes": "YXS" if shape else "YX", **(
                        {"PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
                         "PhysicalSizeYUnit": "µm"} if mpp else {})})
                elif k == 0 and description:
                    kw["description"] = description
                if k == 0 and software:
                    kw["software"] = software
                tw.write(tiles(k, lw, lh), shape=(lh, lw, *shape), dtype=dtype, tile=(TILE, TILE),
                         photometric="rgb" if channels == 3 else "minisblack", subfiletype=0 if k == 0 else 1,
                         **comp, **kw)


def overlay_sizes(slide_levels: Sequence[tuple[int, int]], min_size: int = 512) -> list[tuple[int, int]]:
    """Level sizes of a map TIFF meant to lie over a slide: the slide's own levels (ASAP
    draws overlay level i over slide level i), then halvings down to `min_size`."""
    sizes = [tuple(s) for s in slide_levels]
    w, h = sizes[-1]
    while max(w, h) / 2 >= min_size:
        w, h = math.ceil(w / 2), math.ceil(h / 2)
        sizes.append((w, h))
    return sizes


TIFF_VALUES = ("uint8", "float32", "colour")


def map_values(prob: np.ndarray, values: str, cmap: str = "jet", vmin: float = 0.0,
               vmax: float = 1.0) -> np.ndarray:
    """What a map TIFF stores per map pixel: `uint8` probability x 255 (0 outside the
    map's tissue too), `float32` the probability itself, `colour` the colour map as RGB
    (white outside tissue)."""
    if values == "uint8":
        return np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)
    if values == "float32":
        return prob.astype(np.float32)
    colours = colourise(prob, cmap, vmin, vmax)
    colours[prob <= 0] = 255
    return colours


def max_pooled(prob: np.ndarray, lw: int, lh: int) -> np.ndarray:
    """The map on an `lw x lh` level coarser than it (on an axis), each level pixel the
    largest map value under it: a one-pixel lesion stays visible in an overview."""
    h, w = prob.shape
    if h > lh:
        prob = np.maximum.reduceat(prob, (np.arange(lh) * h / lh).astype(int), axis=0)
    if w > lw:
        prob = np.maximum.reduceat(prob, (np.arange(lw) * w / lw).astype(int), axis=1)
    return prob


def write_map_tiff(path: str | Path, prob: np.ndarray, slide_size: tuple[int, int], mpp: float | None,
                   values: str = "uint8", cmap: str = "jet", vmin: float = 0.0, vmax: float = 1.0,
                   slide_levels: Sequence[tuple[int, int]] | None = None) -> None:
    """The map as a pyramidal TIFF at the slide's level-0 size (each map pixel a block:
    nearest neighbour; on levels coarser than the map, the largest value under each
    pixel), so it overlays the slide exactly: single-channel probabilities
    (`uint8` 0-255 or `float32` 0-1) for tools to threshold and colour, or `colour` RGB.
    With `slide_levels` its levels are the slide's (what ASAP's overlay needs); deflate
    compression (TIFF code 32946), which ASAP, OpenSlide and Bio-Formats all read."""
    data = map_values(prob, values, cmap, vmin, vmax)
    w0, h0 = slide_size

    def tiles(level: int, lw: int, lh: int):
        coarse = prob.shape[0] > lh or prob.shape[1] > lw  # a level coarser than the map
        src = map_values(max_pooled(prob, lw, lh), values, cmap, vmin, vmax) if coarse else data
        h, w = src.shape[:2]
        fx, fy = w / lw, h / lh  # source pixels per level pixel
        for y in range(0, lh, TILE):
            rows = np.minimum(((np.arange(y, y + TILE) + 0.5) * fy).astype(int), h - 1)
            band = src[rows]
            for x in range(0, lw, TILE):
                cols = np.minimum(((np.arange(x, x + TILE) + 0.5) * fx).astype(int), w - 1)
                yield band[:, cols]

    note = {"uint8": "tumour probability x 255", "float32": "tumour probability", "colour": f"{cmap} colours"}
    sizes = overlay_sizes(slide_levels) if slide_levels else pyramid_sizes(w0, h0)
    write_pyramid(path, sizes, tiles, mpp, compression="deflate", channels=3 if values == "colour" else 1,
                  dtype=np.float32 if values == "float32" else np.uint8,
                  description=f"{MAP_SOFTWARE}: {note[values]}", software=MAP_SOFTWARE)
