"""viewer.py in headless Chromium: the heat map sits on the planted tumour, the threshold
slider hides the low cells, the truth outline lies on the tumour and the lesion marker
where its CSV puts it. Skipped as a whole when Chromium or OpenSeadragon is missing;
`CRF_CHROMIUM` names the browser (empty: none), else `chromium` / `chromium-browser` on PATH."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest

from conftest import ROOT
from test_viewer import LOW_BOX, load_viewer, write_viewer_data


def find_chromium() -> str | None:
    """The Chromium to drive: `CRF_CHROMIUM` when set (empty or not an executable: none),
    else the first of chromium, chromium-browser on PATH."""
    named = os.environ.get("CRF_CHROMIUM")
    if named is not None:
        return named if named and os.access(named, os.X_OK) and Path(named).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium, or set CRF_CHROMIUM)"),
    pytest.mark.skipif(not (ROOT / "node_modules" / "openseadragon").exists(),
                       reason="needs OpenSeadragon (npm install, run by Install/install.sh)"),
]
WIDTH, HEIGHT = 1000, 700
LEGEND = (220, 70)  # screen pixels of the bottom-right corner the colour legend covers


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The viewer on the demo-like data of test_viewer, served on a free loopback port,
    plus `/_frame?src=URL`: the page in a fixed-size iframe of the same origin. (Headless
    Chromium lays a page out shorter than its window and stretches it at capture time,
    which would draw the stale canvas and the DOM outlines apart; an iframe keeps one
    size throughout. Same origin, so its tile fetches hold the virtual clock.)"""
    from flask import request
    from werkzeug.serving import make_server

    d = tmp_path_factory.mktemp("browse")
    s = write_viewer_data(d)
    app = load_viewer().create_app(d / "slides", d / "maps")
    app.add_url_rule("/_frame", "frame", lambda: (
        f'<body style="margin:0"><iframe src="{request.args["src"]}" style="border:0;display:block;'
        f'width:{WIDTH}px;height:{HEIGHT}px"></iframe></body>'))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", s, d
    server.shutdown()


def screenshot(base: str, path: str, folder: Path, budget: int) -> tuple[np.ndarray, list[str]]:
    """RGB screenshot of the viewer page `path` (in its fixed-size frame), and the
    uncaught script errors Chromium logged while showing it."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / "shot.png"
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                          "--no-first-run", "--disable-background-networking", "--disable-component-update",
                          "--disable-sync", f"--user-data-dir={folder / 'profile'}", f"--window-size={WIDTH},{HEIGHT}",
                          f"--virtual-time-budget={budget}", "--enable-logging=stderr", "--v=0",
                          f"--screenshot={shot}", f"{base}/_frame?{urlencode({'src': path})}"],
                         check=True, capture_output=True, text=True, timeout=120)
    errors = [line.split("CONSOLE", 1)[1] for line in run.stderr.splitlines()
              if "CONSOLE" in line and "Uncaught" in line]
    return cv2.imread(str(shot))[..., ::-1].astype(int), errors


def slide_box(img: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the slide's bright glass inside the black viewer."""
    bright = img.sum(axis=2) > 600
    viewer_rows = np.flatnonzero(img[:, 2].sum(axis=1) < 30)  # rows where the viewer's left edge is black
    if not viewer_rows.size:
        return None
    mid_r, mid_c = int(viewer_rows.mean()), img.shape[1] // 2
    cols, rows = np.flatnonzero(bright[mid_r]), viewer_rows[bright[viewer_rows, mid_c]]
    return (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) if cols.size and rows.size else None


COLOURS = {  # how each layer looks on screen, blended over the slide
    "heat high": lambda r, g, b: (r > 1.8 * g) & (r > 1.4 * b) & (r > 80),
    "heat low": lambda r, g, b: (b > r + 60) & (g > r + 25),
    "lesion": lambda r, g, b: (g > 180) & (r < 120) & (b < 120),
    "truth": lambda r, g, b: (r > 200) & (g > 180) & (b < 90),
}


def layers(img: np.ndarray) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[int, int]] | None:
    """Per layer, the (x, y) of its pixels as fractions of the slide's box; None when no
    slide is visible yet. The colour legend's corner is left out (it holds every colour)."""
    img = img.copy()
    img[-LEGEND[1]:, -LEGEND[0]:] = 0
    box = slide_box(img)
    if box is None:
        return None
    top, bottom, left, right = box
    crop = img[top:bottom, left:right]
    found = {}
    for name, test in COLOURS.items():
        ys, xs = np.nonzero(test(crop[..., 0], crop[..., 1], crop[..., 2]))
        found[name] = (xs / (right - left), ys / (bottom - top))
    return found, (right - left, bottom - top)


def problems(img: np.ndarray, s, threshold: float) -> list[str]:
    """What is wrong with a screenshot of v at `threshold` (empty: all is right)."""
    got = layers(img)
    if got is None:
        return ["no slide visible"]
    found, (w, h) = got
    if abs(w / h / (s.width / s.height) - 1) > 0.02:
        return [f"slide box {w}x{h} has not the slide's aspect ratio"]
    x0, y0, x1, y1 = s.annotation.bounds()
    errors = []
    near = lambda name, at, tol: (len(found[name][0]) and  # noqa: E731
                                  max(abs(found[name][0].mean() - at[0]), abs(found[name][1].mean() - at[1])) <= tol)
    tumour = ((x0 + x1) / 2 / s.width, (y0 + y1) / 2 / s.height)
    if len(found["heat high"][0]) < 200 or not near("heat high", tumour, 0.03):
        errors.append(f"heat-map red: {len(found['heat high'][0])} pixels, not centred on the tumour")
    low = ((LOW_BOX[0] + LOW_BOX[2]) / 2 / s.width, (LOW_BOX[1] + LOW_BOX[3]) / 2 / s.height)
    low_n = len(found["heat low"][0])
    if threshold < 0.3 and (low_n < 200 or not near("heat low", low, 0.02)):
        errors.append(f"low cells: {low_n} pixels, expected on the low block at {low}")
    if threshold > 0.3 and low_n > 20:
        errors.append(f"low cells: {low_n} pixels still shown above the threshold")
    if len(found["lesion"][0]) < 20 or not near("lesion", (500 / s.width, 400 / s.height), 0.02):
        errors.append(f"lesion marker: {len(found['lesion'][0])} pixels, not at (500, 400)")
    tx, ty = found["truth"]
    want = np.array([x0 / s.width, x1 / s.width, y0 / s.height, y1 / s.height])
    if len(tx) < 100 or np.abs(np.array([tx.min(), tx.max(), ty.min(), ty.max()]) - want).max() > 0.015:
        errors.append(f"truth outline: {len(tx)} pixels, its box is not the tumour's {want.round(3)}")
    return errors


def check(served, tmp_path, threshold: float) -> None:
    """Screenshot v at `threshold`; a frame taken before the tiles arrived is retried with
    more (virtual) time."""
    base, s, _ = served
    for attempt, budget in enumerate((4000, 16000)):
        page = f"/sub/v.tif?animation=0&t={threshold}"
        img, script_errors = screenshot(base, page, tmp_path / f"try{attempt}", budget)
        errors = script_errors + problems(img, s, threshold)
        if not errors:
            return
    pytest.fail(f"{'; '.join(errors)} (see {tmp_path / f'try{attempt}' / 'shot.png'})")


def test_heat_map_truth_and_lesions_lie_on_the_tumour(served, tmp_path):
    check(served, tmp_path, threshold=0.0)


def test_threshold_slider_hides_the_low_cells(served, tmp_path):
    check(served, tmp_path, threshold=0.5)
