#!/usr/bin/env python3
"""DeepZoom web viewer of the slides under SLIDE_DIR, with probability-map overlays and
lesion points from MAPS_DIR (prob_map.py / evaluate.py output). URL scheme of
OpenSlide's multi-slide DeepZoom server: `/` index, `/<path>` viewer, `/<path>.dzi`,
`/<path>_files/<level>/<col>_<row>.jpeg`; plus `/<path>.overlay.dzi` (+ tiles) and
`/<path>.lesions.json`."""
from __future__ import annotations

from collections import OrderedDict
from io import BytesIO
from pathlib import Path

import numpy as np
from flask import Flask, abort, jsonify, render_template_string, send_from_directory
from openslide import ImageSlide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from crfcore import slide as sl
from crfcore.cli import UserError, parser, run

ROOT = Path(__file__).resolve().parent
OSD = ROOT / "node_modules" / "openseadragon" / "build" / "openseadragon"
TILE, OVERLAP = 254, 1

INDEX = """<!doctype html><title>slides</title><h1>Slides in {{ root }}</h1><ul>
{% for rel, err in items %}<li>{% if err %}{{ rel }}: <em>cannot be opened ({{ err }})</em>
{% else %}<a href="/{{ rel }}">{{ rel }}</a>{% endif %}</li>{% endfor %}</ul>"""

PAGE = """<!doctype html><title>{{ rel }}</title>
<style>body{margin:0;font-family:sans-serif}#view{width:100%;height:88vh;background:#000}
#bar{padding:6px}#scale{position:fixed;left:12px;bottom:14vh;border-bottom:3px solid #fff;
color:#fff;font-size:12px;text-shadow:0 0 2px #000;z-index:9}</style>
<div id="bar"><b>{{ rel }}</b> {{ props }}
{% if overlay %}<label><input type="checkbox" id="ov" checked> heat map</label>
<input type="range" id="op" min="0" max="1" step="0.05" value="0.5"> opacity{% endif %}
{% if lesions %}<label><input type="checkbox" id="le" checked> lesions</label>{% endif %}</div>
<div id="view"></div>{% if mpp %}<div id="scale"></div>{% endif %}
{% if osd %}<script src="/_osd/openseadragon.min.js"></script><script>
const v = OpenSeadragon({id: "view", prefixUrl: "/_osd/images/", tileSources: "/{{ rel }}.dzi",
  showNavigator: true,
  animationTime: new URLSearchParams(location.search).get("animation") === "0" ? 0 : 1.2});
{% if mpp %}const sb = document.getElementById("scale");
v.addHandler("animation", () => {  // a 1-2-5 scale bar about 120 screen pixels long
  const umPerPx = {{ mpp }} / v.viewport.viewportToImageZoom(v.viewport.getZoom(true));
  const raw = 120 * umPerPx, p = Math.pow(10, Math.floor(Math.log10(raw)));
  const nice = [1, 2, 5, 10].map(k => k * p).filter(x => x <= raw).pop();
  sb.style.width = (nice / umPerPx) + "px";
  sb.textContent = nice >= 1000 ? (nice / 1000) + " mm" : nice + " \u00b5m"; });{% endif %}
{% if overlay %}v.addTiledImage({tileSource: "/{{ rel }}.overlay.dzi", x: 0, y: 0, width: 1, opacity: 0.5,
  success: e => { const it = e.item;
    document.getElementById("ov").onchange = ev => it.setOpacity(ev.target.checked ? +document.getElementById("op").value : 0);
    document.getElementById("op").oninput = ev => it.setOpacity(+ev.target.value); }});{% endif %}
{% if lesions %}fetch("/{{ rel }}.lesions.json").then(r => r.json()).then(ls => { const els = [];
  const add = () => { const slide = v.world.getItemAt(0);
    for (const [p, x, y] of ls) { const d = document.createElement("div");
      d.style = "width:12px;height:12px;border:2px solid #0f0;border-radius:50%;margin:-8px"; d.title = p;
      v.addOverlay({element: d, location: slide.imageToViewportCoordinates(x, y)}); els.push(d); } };
  if (v.world.getItemCount()) add(); else v.addOnceHandler("open", add);
  document.getElementById("le").onchange = ev => els.forEach(d => d.style.display = ev.target.checked ? "" : "none");
});{% endif %}
</script>{% else %}<p>OpenSeadragon is missing: run <code>npm install</code> in {{ root_dir }}
(Install/install.sh does it when npm is present).</p>{% endif %}"""


def overlay_image(prob: np.ndarray) -> Image.Image:
    """The map as an RGBA image: jet colours on tissue, transparent elsewhere."""
    from crfcore.heatmap import colourise

    rgba = np.dstack([colourise(prob), np.where(prob > 0, 255, 0).astype(np.uint8)])
    return Image.fromarray(rgba, "RGBA")


def create_app(slide_dir: str | Path, maps_dir: str | Path | None = None, cache_size: int = 8) -> Flask:
    slide_dir = Path(slide_dir).resolve()
    maps_dir = Path(maps_dir).resolve() if maps_dir else None
    app = Flask(__name__)
    open_slides: OrderedDict[Path, DeepZoomGenerator] = OrderedDict()

    def resolve(rel: str) -> Path:
        path = (slide_dir / rel).resolve()
        if slide_dir not in path.parents or not path.is_file():
            abort(404)  # path traversal, or no such slide
        return path

    def deepzoom(path: Path) -> DeepZoomGenerator:
        if path not in open_slides:
            try:
                open_slides[path] = DeepZoomGenerator(sl.open_slide(path), TILE, OVERLAP, limit_bounds=False)
            except sl.SlideError:
                abort(404)
            if len(open_slides) > cache_size:
                open_slides.popitem(last=False)
        open_slides.move_to_end(path)
        return open_slides[path]

    def map_for(path: Path, kind: str) -> Path | None:
        if maps_dir is None:
            return None
        found = sorted(maps_dir.rglob(f"{path.stem}*{kind}"))
        return found[0] if found else None

    def overlay_dz(path: Path) -> DeepZoomGenerator:
        key = path.with_suffix(".overlay")
        if key not in open_slides:
            npy = map_for(path, "_prob.npy")
            if npy is None:
                abort(404)
            from crfcore.heatmap import load_probability_map
            prob, _ = load_probability_map(npy, slide=path)
            open_slides[key] = DeepZoomGenerator(ImageSlide(overlay_image(prob)), TILE, OVERLAP)
        return open_slides[key]

    def tile(dz: DeepZoomGenerator, level: int, col: int, row: int, fmt: str):
        try:
            img = dz.get_tile(level, (col, row))
        except ValueError:
            abort(404)
        buf = BytesIO()
        img.save(buf, "png" if fmt == "png" else "jpeg", quality=85)
        return app.response_class(buf.getvalue(), mimetype=f"image/{fmt}")

    @app.route("/")
    def index():
        items = []
        for p in sorted(slide_dir.rglob("*")):
            if p.is_file() and p.suffix.lower() in sl.SLIDE_EXTENSIONS:
                try:
                    sl.open_slide(p).close()
                    items.append((p.relative_to(slide_dir).as_posix(), None))
                except sl.SlideError as err:
                    items.append((p.relative_to(slide_dir).as_posix(), str(err).split(": ", 1)[-1]))
        return render_template_string(INDEX, root=slide_dir, items=items)

    @app.route("/_osd/<path:name>")
    def osd(name):
        return send_from_directory(OSD, name)

    @app.route("/<path:rel>.dzi")
    def dzi(rel):
        if rel.endswith(".overlay"):
            return app.response_class(overlay_dz(resolve(rel[:-8])).get_dzi("png"), mimetype="application/xml")
        return app.response_class(deepzoom(resolve(rel)).get_dzi("jpeg"), mimetype="application/xml")

    @app.route("/<path:rel>_files/<int:level>/<int:col>_<int:row>.<fmt>")
    def tiles(rel, level, col, row, fmt):
        if fmt not in ("jpeg", "png"):
            abort(404)
        if rel.endswith(".overlay"):
            return tile(overlay_dz(resolve(rel[:-8])), level, col, row, "png")
        return tile(deepzoom(resolve(rel)), level, col, row, fmt)

    @app.route("/<path:rel>.lesions.json")
    def lesions(rel):
        csv = map_for(resolve(rel), ".csv")
        if csv is None:
            abort(404)
        from crfcore.evaluation import read_lesions
        return jsonify(read_lesions(csv).tolist())

    @app.route("/<path:rel>")
    def page(rel):
        path = resolve(rel)
        s = deepzoom(path)._osr
        mpp = sl.slide_mpp(s)
        props = (f"{s.dimensions[0]} x {s.dimensions[1]} px, "
                 f"{'%.3f um/px' % mpp[0] if mpp else 'no mpp'}, {s.properties.get('openslide.vendor', '?')}")
        return render_template_string(PAGE, rel=rel, props=props, mpp=mpp[0] if mpp else None,
                                      overlay=map_for(path, "_prob.npy") is not None,
                                      lesions=map_for(path, ".csv") is not None,
                                      osd=(OSD / "openseadragon.min.js").exists(), root_dir=ROOT)

    return app


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("slide_dir", type=Path)
    p.add_argument("--maps", type=Path, help="folder of *_prob.npy maps and lesion CSVs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    args = p.parse_args(argv)
    if not args.slide_dir.is_dir():
        raise UserError(f"{args.slide_dir}: not a directory")
    if not (OSD / "openseadragon.min.js").exists():
        print("note: OpenSeadragon is missing; run `npm install` here (pages will say so)")
    create_app(args.slide_dir, args.maps).run(host=args.host, port=args.port, threaded=True)
    return 0



if __name__ == "__main__":
    run(main)
