#!/usr/bin/env python3
"""DeepZoom web viewer of the slides under SLIDE_DIR, for reviewing probability maps.

Slides use the URL scheme of OpenSlide's multi-slide DeepZoom server: `/` index,
`/<path>` viewer, `/<path>.dzi`, `/<path>_files/<level>/<col>_<row>.jpeg`. Beside them:
thumbnails, probability maps (`MAPS_DIR/<stem>_prob.npy` and `MAPS_DIR/<name>/<stem>_prob.npy`)
as switchable, thresholded overlays with the value under the cursor, lesion points of
`evaluate.py lesions` (`<stem>.csv` in the same folders) and the truth outlines
(`<stem>.json/.xml/.geojson/.txt` in the slide's folder, MAPS_DIR or its sub-folders).
Binds to 127.0.0.1 unless told otherwise; paths outside SLIDE_DIR are refused.
"""
from __future__ import annotations

from crfcore.startup import quiet_ctrl_c

quiet_ctrl_c()  # first: Ctrl-C while the libraries below load is one line

import argparse
import errno
import math
import os
import socket
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Callable, Hashable, TypeVar

import numpy as np
import openslide
from flask import Flask, abort, jsonify, render_template, request, send_from_directory, url_for
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from crfcore import slide as sl
from crfcore.annotations import find_annotation, is_lesion_export, load_annotation
from crfcore.cli import UserError, given_path, number, one_line, parser, run
from crfcore.errors import CrfError
from crfcore.evaluation import read_lesions
from crfcore.heatmap import colourise, load_probability_map
from crfcore.io import all_companions, check_fits_slide, companion, companion_stem, visible_names
from crfcore.masks import overlaps

ROOT = Path(__file__).resolve().parent
OSD = ROOT / "node_modules" / "openseadragon" / "build" / "openseadragon"
TILE, OVERLAP = 254, 1
ROUTES = frozenset({"_static", "_osd", "_thumb", "_map", "_value", "_lesions", "_truth"})  # the URLs' own prefixes
TOP = "_"  # URL name of the map directly in MAPS_DIR (sub-folder maps go by the folder's name)
CMAP = "jet"
V = TypeVar("V")


class ViewerError(CrfError):
    """A slide tile OpenSlide cannot read; one line naming the slide."""


class LRUCache:
    """A bounded least-recently-used cache, safe under Flask's threaded server. Values are
    made outside the lock (a slow map load does not stall other slides' tiles); when two
    threads make the same key at once, both get the first value stored. Evicted slides
    are not closed: a thread may still be reading them, and OpenSlide closes on collection."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]  # type: ignore[return-value]
        value = make()
        with self._lock:
            value = self._items.setdefault(key, value)  # type: ignore[assignment]
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class OpenSlideView:
    """An open slide and its DeepZoom tiler (our own handle: never the tiler's private one)."""

    osr: openslide.OpenSlide
    dz: DeepZoomGenerator


@dataclass
class SlideInfo:
    """What the index shows of one slide file (or DICOM series)."""

    path: Path
    rel: str
    error: str | None = None
    size: tuple[int, int] = (0, 0)
    mpp: float | None = None
    vendor: str = "?"
    series: str | None = None  # DICOM SeriesInstanceUID: files of one series are one slide
    members: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """`W x H px, mpp, vendor`."""
        mpp = f"{self.mpp:.3f} um/px" if self.mpp else "no mpp"
        return f"{self.size[0]} x {self.size[1]} px, {mpp}, {self.vendor}"


class MapTiles:
    """DeepZoom tiles of a probability map laid over its slide: the slide's own tile
    geometry (from its DeepZoomGenerator), each lattice cell a sharp block of its colour
    (nearest cell per pixel, never smoothed), RGBA, fully transparent outside tissue
    (map 0) and below the threshold."""

    def __init__(self, prob: np.ndarray, downsample: tuple[float, float], dz: DeepZoomGenerator) -> None:
        self.prob, self.ds, self.dz = prob, downsample, dz
        self.colours = colourise(prob, CMAP)

    def dzi(self) -> str:
        return self.dz.get_dzi("png")

    def _lattice(self, v: np.ndarray, axis: int) -> np.ndarray:
        """Map column (axis 0, from level-0 x) or row (axis 1, from y) of each coordinate:
        pixel [r, c] covers ((c + .5) dx, (r + .5) dy), so cell c spans [c dx, (c + 1) dx)."""
        n = self.prob.shape[1 - axis]
        return np.clip(np.floor(np.asarray(v, float) / self.ds[axis]).astype(int), 0, n - 1)

    def tile(self, level: int, col: int, row: int, threshold: float) -> np.ndarray:
        """`(h, w, 4)` uint8 RGBA; raises ValueError for an address outside the pyramid."""
        (x0, y0), _, _ = self.dz.get_tile_coordinates(level, (col, row))
        tw, th = self.dz.get_tile_dimensions(level, (col, row))
        scale = 2.0 ** (self.dz.level_count - 1 - level)  # level-0 pixels per tile pixel
        cells = np.ix_(self._lattice(y0 + (np.arange(th) + 0.5) * scale, 1),
                       self._lattice(x0 + (np.arange(tw) + 0.5) * scale, 0))
        values = self.prob[cells]
        shown = ((values > 0) & (values >= threshold))[..., None]
        rgba = np.dstack([self.colours[cells], np.full(values.shape, 255, np.uint8)])
        # hidden pixels are (0, 0, 0, 0): OpenSeadragon's WebGL drawer blends as if alpha were
        # premultiplied, so a colour left under alpha 0 would be added onto the slide
        return np.where(shown, rgba, 0).astype(np.uint8)

    def value(self, x: float, y: float) -> float | None:
        """The map's value at level-0 `(x, y)`, None off the slide."""
        w0, h0 = self.dz.level_dimensions[-1]
        if not (0 <= x < w0 and 0 <= y < h0):
            return None
        return float(self.prob[self._lattice(y, 1), self._lattice(x, 0)])


def truth_polygons(path: Path, slide_size: tuple[int, int]) -> dict:
    """An annotation's outlines as `{"file", "positive": [[[x, y], ...]], "negative": [...]}`;
    one wholly off the slide (another slide's) is refused, as Mask_gen refuses it."""
    find_annotation(path.parent, companion_stem(path, "annotation"))  # several there must agree
    ann = load_annotation(path)
    if len(ann) and not overlaps(ann, slide_size):
        raise ViewerError(f"{path}: lies wholly outside the {slide_size[0]}x{slide_size[1]} slide: an annotation "
                          "of another slide?")
    return {"file": path.name, **{part: [v.tolist() for v in getattr(ann, part)] for part in ("positive", "negative")}}


def legend_gradient(cmap: str = CMAP, stops: int = 11) -> str:
    """A CSS linear-gradient of the colour map from 0 (left) to 1 (right)."""
    cols = colourise(np.linspace(0, 1, stops)[None, :], cmap)[0]
    return "linear-gradient(to right, " + ", ".join(
        f"rgb({r},{g},{b}) {100 * i / (stops - 1):g}%" for i, (r, g, b) in enumerate(cols)) + ")"


class Library:
    """The slides under `slide_dir` and their companion files in `maps_dir`."""

    def __init__(self, slide_dir: Path, maps_dir: Path | None, routes: frozenset[str] = frozenset()) -> None:
        self.slide_dir, self.maps_dir = slide_dir, maps_dir
        self.routes = routes  # top-level folder names the app's own URLs start with ("_thumb", ...)
        self._cache: dict[tuple, tuple[tuple, object]] = {}  # (what, path) -> (stamp, value)
        self._lock = threading.Lock()

    def _cached(self, what: str, path: Path, make: Callable[[], V]) -> V:
        """`make()`, kept while `path`'s modification time, size and inode stand (a folder's
        time changes when a file in it is added, removed or renamed: every writer here
        renames its outputs in), so an index of hundreds of slides lists each folder once."""
        try:
            st = path.stat()
        except OSError:
            return make()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)  # a file copied over with its time kept differs in size
        with self._lock:
            hit = self._cache.get((what, path))
        if hit and hit[0] == stamp:
            return hit[1]  # type: ignore[return-value]
        value = make()
        with self._lock:
            self._cache[(what, path)] = (stamp, value)
        return value

    def names(self, folder: Path) -> dict[str, Path]:
        """The visible files of `folder` by name (see `_cached`)."""
        return self._cached("names", folder, lambda: visible_names(folder) if folder.is_dir() else {})

    def resolve(self, rel: str) -> Path:
        """The slide file `rel` names under slide_dir, as the index lists them; 404 for
        anything else. `..` is resolved by name, so a URL cannot climb out; a slide that the
        user linked into SLIDE_DIR (a symbolic link to elsewhere) is served, but never a
        file through a linked folder (a link to / would open the whole disk) or a hidden one."""
        path = Path(os.path.normpath(self.slide_dir / rel))
        parts = path.relative_to(self.slide_dir).parts if self.slide_dir in path.parents else ()
        folders = (self.slide_dir.joinpath(*parts[:i]) for i in range(1, len(parts)))
        if (not parts or path.suffix.lower() not in sl.SLIDE_EXTENSIONS or any(p.startswith(".") for p in parts)
                or any(f.is_symlink() for f in folders) or not path.is_file()):
            abort(404)
        return path

    def rel(self, path: Path) -> str:
        return path.relative_to(self.slide_dir).as_posix()

    def files(self) -> list[Path]:
        """Slide files under slide_dir, sorted; left out: hidden files and folders, top-level
        folders named like the viewer's own URLs, this tool's heat-map TIFFs, and names a
        URL cannot carry (not UTF-8: a warning names their folder)."""
        found = []
        for p in self.slide_dir.rglob("*"):
            parts = p.relative_to(self.slide_dir).parts
            if (p.suffix.lower() not in sl.SLIDE_EXTENSIONS or any(part.startswith(".") for part in parts)
                    or not p.is_file()):
                continue
            if len(parts) > 1 and parts[0] in self.routes:  # its URLs would open the viewer's own routes
                warnings.warn(f"{self.slide_dir / parts[0]}: a folder named like the viewer's URLs; its slides are "
                              "not listed (rename it)")
            elif not utf8(p.name):
                warnings.warn(f"{p.parent}: a slide whose name is not UTF-8 ({ascii(p.name)}) is not listed")
            elif not self._cached("map tiff", p, lambda p=p: sl.is_map_tiff(p)):
                found.append(p)
        return sorted(found)

    def info(self, path: Path) -> SlideInfo:
        """Size, mpp, vendor and DICOM series of `path`, cached while the file is unchanged."""
        return self._cached("info", path, lambda: self._read_info(path))

    def _read_info(self, path: Path) -> SlideInfo:
        info = SlideInfo(path, self.rel(path))
        try:
            osr = sl.open_slide(path)
        except sl.SlideError as err:
            info.error = str(err).split(": ", 1)[-1]
        else:
            mpp = sl.slide_mpp(osr)
            info.size, info.mpp = osr.dimensions, mpp[0] if mpp else None
            info.vendor = osr.properties.get(openslide.PROPERTY_NAME_VENDOR, "?")
            info.series = osr.properties.get("dicom.SeriesInstanceUID") if info.vendor == "dicom" else None
            osr.close()
        return info

    def slides(self) -> list[SlideInfo]:
        """One entry per slide: the files of a DICOM series (one folder, one series UID)
        collapse into their first file, which lists the others as `members`."""
        out: list[SlideInfo] = []
        first: dict[tuple[Path, str], SlideInfo] = {}
        for path in self.files():
            info = self.info(path)
            key = (path.parent, info.series or "")
            if info.series and key in first:
                first[key].members.append(path.name)
                continue
            info.members = [path.name]
            first[key] = info
            out.append(info)
        return out

    def map_folders(self) -> list[tuple[str, Path]]:
        """`(name, folder)` where maps and lesions are looked for: MAPS_DIR, then its sub-folders."""
        if self.maps_dir is None or not self.maps_dir.is_dir():
            return []
        return self._cached("folders", self.maps_dir, self._map_folders)

    def _map_folders(self) -> list[tuple[str, Path]]:
        subs = sorted(p for p in self.maps_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if any(p.name == TOP for p in subs):  # its maps would pass for MAPS_DIR's own
            warnings.warn(f"{self.maps_dir / TOP}: a folder named {TOP!r} is not read (the name of MAPS_DIR's own maps)")
        return [(TOP, self.maps_dir)] + [(p.name, p) for p in subs if p.name != TOP]

    def companions(self, path: Path, kind: str) -> dict[str, Path]:
        """`{name: file}` of the slide's `kind` ("prob" or "lesions") files, by the pairing rule."""
        found = ((name, companion(folder, path.stem, kind, self.names(folder))) for name, folder in self.map_folders())
        return {name: f for name, f in found if f is not None}

    def truth(self, path: Path) -> Path | None:
        """The slide's annotation: in its own folder, else MAPS_DIR, else a sub-folder of it;
        never an export of predicted lesions (`evaluate.py lesions --to geojson|xml`)."""
        for folder in [path.parent] + [f for _, f in self.map_folders()]:
            for found in all_companions(folder, path.stem, "annotation", self.names(folder)):
                if not self._cached("lesions", found, lambda f=found: is_lesion_export(f)):
                    return found
        return None

    def label(self, name: str) -> str:
        return self.maps_dir.name if name == TOP and self.maps_dir else name


def utf8(name: str) -> bool:
    """Whether a file name can go into a URL (one read from a Latin-1 archive cannot)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def create_app(slide_dir: str | Path, maps_dir: str | Path | None = None, cache_size: int = 8) -> Flask:
    """The viewer as a Flask app; `cache_size` open slides and `cache_size` maps are kept."""
    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"),
                static_url_path="/_static")
    lib = Library(Path(slide_dir).resolve(), Path(maps_dir).resolve() if maps_dir else None, ROUTES)
    slides, overlays = LRUCache(cache_size), LRUCache(cache_size)
    gradient = legend_gradient()

    def view(path: Path) -> OpenSlideView:
        def make() -> OpenSlideView:
            osr = sl.open_slide(path)
            return OpenSlideView(osr, DeepZoomGenerator(osr, TILE, OVERLAP, limit_bounds=False))
        return slides.get((path, path.stat().st_mtime_ns), make)

    def map_tiles(rel: str, name: str) -> MapTiles:
        path = lib.resolve(rel)
        npy = lib.companions(path, "prob").get(name)
        if npy is None:
            abort(404)

        def make() -> MapTiles:
            prob, meta = load_probability_map(npy, slide=path)
            v = view(path)
            check_fits_slide(npy, prob.shape, meta["downsample"], v.osr.dimensions)
            return MapTiles(prob, tuple(meta["downsample"]), v.dz)
        return overlays.get((npy, npy.stat().st_mtime_ns, path), make)

    def image_response(img: Image.Image, fmt: str):
        buf = BytesIO()
        img.save(buf, fmt, **({"quality": 85} if fmt == "jpeg" else {"compress_level": 3}))
        return app.response_class(buf.getvalue(), mimetype=f"image/{fmt}")

    def query_float(name: str, default: float | None = None, lo: float = -math.inf, hi: float = math.inf) -> float:
        raw = request.args.get(name)
        try:
            value = default if raw is None else float(raw)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not lo <= value <= hi:
            bounds = f" in [{lo:g}, {hi:g}]" if math.isfinite(lo) or math.isfinite(hi) else ""
            abort(400, f"query parameter {name!r} must be a finite number{bounds}")
        return value

    @app.errorhandler(CrfError)
    def bad_file(err: CrfError):
        """A bad slide, map, lesion or annotation file: its one-line message, never a 500,
        with the served folders' paths on this machine left out (a browser sees names)."""
        text = one_line(err)
        for folder in filter(None, (lib.slide_dir, lib.maps_dir)):
            text = text.replace(f"{folder}{os.sep}", "").replace(f"{folder}:", f"{folder.name}:")
        return app.response_class(text + "\n", status=422, mimetype="text/plain")

    @app.route("/")
    def index():
        entries = [(s, lib.companions(s.path, "prob"), lib.companions(s.path, "lesions"), lib.truth(s.path))
                   for s in lib.slides()]
        return render_template("index.html", root=lib.slide_dir, maps_dir=lib.maps_dir, entries=entries,
                               label=lib.label)

    @app.route("/_osd/<path:name>")
    def osd(name: str):
        return send_from_directory(OSD, name)

    @app.route("/_thumb/<path:rel>")
    def thumbnail(rel: str):
        osr = sl.open_slide(lib.resolve(rel))  # not cached: an index of many slides would flush the cache
        try:
            return image_response(osr.get_thumbnail((200, 200)).convert("RGB"), "jpeg")
        finally:
            osr.close()

    @app.route("/<path:rel>.dzi")
    def dzi(rel: str):
        return app.response_class(view(lib.resolve(rel)).dz.get_dzi("jpeg"), mimetype="application/xml")

    @app.route("/<path:rel>_files/<int:level>/<int:col>_<int:row>.<fmt>")
    def tile(rel: str, level: int, col: int, row: int, fmt: str):
        path = lib.resolve(rel)
        if fmt not in ("jpeg", "png"):
            abort(404)
        try:
            img = view(path).dz.get_tile(level, (col, row))
        except ValueError:
            abort(404)  # no such level or tile
        except openslide.OpenSlideError as err:
            raise ViewerError(f"{path}: OpenSlide cannot read this tile ({err})") from None
        return image_response(img, fmt)

    @app.route("/_map/<name>/<path:rel>.dzi")
    def map_dzi(name: str, rel: str):
        return app.response_class(map_tiles(rel, name).dzi(), mimetype="application/xml")

    @app.route("/_map/<name>/<path:rel>_files/<int:level>/<int:col>_<int:row>.png")
    def map_tile(name: str, rel: str, level: int, col: int, row: int):
        tiles, t = map_tiles(rel, name), query_float("t", 0.0, 0.0, 1.0)
        try:
            rgba = tiles.tile(level, col, row, t)
        except ValueError:
            abort(404)
        return image_response(Image.fromarray(rgba, "RGBA"), "png")

    @app.route("/_value/<name>/<path:rel>")
    def map_value(name: str, rel: str):
        value = map_tiles(rel, name).value(query_float("x"), query_float("y"))
        return jsonify(value=value)

    @app.route("/_lesions/<name>/<path:rel>")
    def lesions(name: str, rel: str):
        path = lib.resolve(rel)
        csv = lib.companions(path, "lesions").get(name)
        if csv is None:
            abort(404)
        found, (w, h) = read_lesions(csv), view(path).osr.dimensions
        if len(found) and not ((found[:, 1] < w) & (found[:, 2] < h)).any():  # coordinates are never negative
            raise ViewerError(f"{csv}: every lesion lies outside the {w}x{h} slide: the lesions of another slide?")
        return jsonify(found.tolist())

    @app.route("/_truth/<path:rel>")
    def truth(rel: str):
        path = lib.resolve(rel)
        found = lib.truth(path)
        if found is None:
            abort(404)
        return jsonify(truth_polygons(found, view(path).osr.dimensions))

    @app.route("/<path:rel>")
    def page(rel: str):
        path = lib.resolve(rel)
        view(path)  # a slide OpenSlide cannot open answers 422 with its reason
        info = lib.info(path)
        return render_template("slide.html", rel=rel, summary=info.summary(), root_dir=ROOT, gradient=gradient,
                               osd=(OSD / "openseadragon.min.js").exists(), config=page_config(rel, path, info))

    def page_config(rel: str, path: Path, info: SlideInfo) -> dict:
        """Everything the page's script needs: URLs, maps, lesion sets, neighbours."""
        order = [s for s in lib.slides() if s.error is None]
        here = next((i for i, s in enumerate(order) if s.path.parent == path.parent and path.name in s.members), None)
        prev = order[here - 1] if here else None
        nxt = order[here + 1] if here is not None and here + 1 < len(order) else None
        return {
            "rel": rel, "width": info.size[0], "height": info.size[1], "mpp": info.mpp,
            "dzi": url_for("dzi", rel=rel),
            "maps": [{"name": n, "label": lib.label(n), "dzi": url_for("map_dzi", name=n, rel=rel),
                      "value": url_for("map_value", name=n, rel=rel)} for n in lib.companions(path, "prob")],
            "lesions": [{"name": lib.label(n), "url": url_for("lesions", name=n, rel=rel)}
                        for n in lib.companions(path, "lesions")],
            "truth": url_for("truth", rel=rel) if lib.truth(path) else None,
            "prev": url_for("page", rel=prev.rel) if prev else None,
            "next": url_for("page", rel=nxt.rel) if nxt else None,
            "index": url_for("index"), "osd_images": url_for("osd", name="images/"),
        }

    return app


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("slide_dir", type=given_path, help="folder of slides (sub-folders too)")
    p.add_argument("--maps", type=given_path, help="folder of <stem>_prob.npy maps and lesion CSVs (and sub-folders of them)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the slides to the network")
    p.add_argument("--port", type=number(int, 1, 65535), default=5000, help="port to serve on")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.slide_dir.is_dir():
        raise UserError(f"{args.slide_dir}: not a directory")
    if args.maps is not None and not args.maps.is_dir():
        raise UserError(f"{args.maps}: not a directory")
    if not (OSD / "openseadragon.min.js").exists():
        print("note: OpenSeadragon is missing; run `npm install` here (pages will say so)")
    check_port_free(args.host, args.port)
    create_app(args.slide_dir, args.maps).run(host=args.host, port=args.port, threaded=True)
    return 0


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program holds with one line (werkzeug would print its own
    several and exit 1)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv4, IPv6, a host name
        with socket.create_server((host, port), family=family):
            pass
    except OSError as err:  # socket.gaierror too
        why = os.strerror(err.errno) if isinstance(err.errno, int) and err.errno > 0 else (err.strerror or str(err))
        hint = "; another viewer running? give another --port" if err.errno == errno.EADDRINUSE else ""
        raise UserError(f"cannot serve on {host}:{port} ({why}{hint})") from None


if __name__ == "__main__":
    run(main)
