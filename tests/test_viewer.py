import importlib.util
from pathlib import Path
import numpy as np
import pytest

from crfcore import masks, synthetic
from crfcore.heatmap import save_probability_map
from conftest import ROOT


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("viewer", ROOT / "viewer.py")
    viewer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(viewer)
    d = tmp_path_factory.mktemp("view")
    (d / "slides" / "sub").mkdir(parents=True)
    s = synthetic.write_slide(d / "slides" / "sub" / "v.tif", 1024, 768, tumours=1, seed=2)
    (d / "slides" / "broken.svs").write_text("not a slide")
    (d / "secret.txt").write_text("outside")
    tumour, meta = masks.make_mask(s.path, "tumor", s.annotation, downsample=16)
    save_probability_map(d / "maps" / "v_prob.npy", tumour.astype(np.float32), meta)
    (d / "maps" / "v.csv").write_text("0.9,500,400\n")
    app = viewer.create_app(d / "slides", d / "maps")
    app.testing = True
    return app.test_client(), s


def test_index_lists_slides_and_broken_ones(client):
    c, _ = client
    html = c.get("/").get_data(as_text=True)
    assert 'href="/sub/v.tif"' in html and "broken.svs" in html and "cannot be opened" in html


def test_dzi_and_tiles(client):
    c, _ = client
    dzi = c.get("/sub/v.tif.dzi")
    assert dzi.status_code == 200 and 'Width="1024"' in dzi.get_data(as_text=True)
    tile = c.get("/sub/v.tif_files/10/0_0.jpeg")  # 1024 px wide: levels 0..10
    assert tile.status_code == 200 and tile.mimetype == "image/jpeg" and tile.data[:2] == b"\xff\xd8"
    assert c.get("/sub/v.tif_files/99/0_0.jpeg").status_code == 404


def test_overlay_and_lesions(client):
    c, _ = client
    dzi = c.get("/sub/v.tif.overlay.dzi")
    assert dzi.status_code == 200 and 'Width="64"' in dzi.get_data(as_text=True)
    tile = c.get("/sub/v.tif.overlay_files/6/0_0.png")
    assert tile.status_code == 200 and tile.data[:4] == b"\x89PNG"
    assert c.get("/sub/v.tif.lesions.json").get_json() == [[0.9, 500.0, 400.0]]
    page = c.get("/sub/v.tif").get_data(as_text=True)
    assert "1024 x 768 px" in page and "0.250 um/px" in page and "heat map" in page and "lesions" in page


def test_path_traversal_is_refused(client):
    c, _ = client
    assert c.get("/../secret.txt").status_code == 404
    assert c.get("/%2e%2e/secret.txt.dzi").status_code == 404
    assert c.get("/nothing.tif.dzi").status_code == 404


CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
@pytest.mark.skipif(not (ROOT / "node_modules" / "openseadragon").exists(),
                    reason="needs OpenSeadragon (npm install, run by Install/install.sh)")
def slide_box(img: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the slide's bright glass inside the black viewer."""
    bright = img.sum(axis=2) > 600
    viewer_rows = np.flatnonzero(img[:, 2].sum(axis=1) < 30)  # rows where the viewer's left edge is black
    if not viewer_rows.size:
        return None
    mid_r, mid_c = int(viewer_rows.mean()), img.shape[1] // 2
    cols, rows = np.flatnonzero(bright[mid_r]), viewer_rows[bright[viewer_rows, mid_c]]
    return (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) if cols.size and rows.size else None


def overlay_errors(img: np.ndarray, s) -> list[str]:
    """What is wrong with a screenshot: the overlay's red must sit on the planted tumour
    (3 % of the slide's extent) and the lesion marker of v.csv at (500, 400) (2 %).
    Positions are fractions of the slide's box on screen, so a canvas that headless
    Chromium shows stretched to a stale size still measures right; the marker (an HTML
    element, not stretched with the canvas) is only checked when the box has the slide's
    aspect ratio."""
    box = slide_box(img)
    if box is None:
        return ["no slide visible"]
    top, bottom, left, right = box
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    ry, rx = np.nonzero(((r > 1.8 * g) & (r > 1.4 * b) & (r > 80))[top:bottom, left:right])
    gy, gx = np.nonzero(((g > 180) & (r < 120) & (b < 120))[top:bottom, left:right])
    if len(rx) < 200 or len(gx) < 20:
        return [f"overlay pixels {len(rx)}, lesion-marker pixels {len(gx)}"]
    x0, y0, x1, y1 = s.annotation.bounds()
    want = {"overlay": (((x0 + x1) / 2 / s.width, (y0 + y1) / 2 / s.height), 0.03),
            "lesion": ((500 / s.width, 400 / s.height), 0.02)}
    got = {"overlay": (rx.mean() / (right - left), ry.mean() / (bottom - top)),
           "lesion": (gx.mean() / (right - left), gy.mean() / (bottom - top))}
    if abs((right - left) / (bottom - top) / (s.width / s.height) - 1) > 0.02:
        del want["lesion"]
    return [f"{k} at {got[k]}, expected {w}" for k, (w, tol) in want.items()
            if max(abs(got[k][0] - w[0]), abs(got[k][1] - w[1])) > tol]


def test_browser_shows_the_heat_map_on_the_tumour(client, tmp_path):
    """Headless Chromium opens the viewer page: the overlay's red is on the planted tumour
    and the lesion marker where v.csv puts it. A screenshot taken before the tiles arrived
    is retried with more (virtual) time."""
    import subprocess
    import threading

    import cv2
    from werkzeug.serving import make_server

    c, s = client
    server = make_server("127.0.0.1", 0, c.application, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for attempt, budget in enumerate((4000, 16000)):
            shot = tmp_path / f"shot{attempt}.png"
            subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                            "--no-first-run", "--disable-background-networking", "--disable-component-update",
                            "--disable-sync", f"--user-data-dir={tmp_path / f'profile{attempt}'}",
                            "--window-size=1000,800", f"--virtual-time-budget={budget}", f"--screenshot={shot}",
                            f"http://127.0.0.1:{server.server_port}/sub/v.tif?animation=0"],
                           check=True, capture_output=True, timeout=180)
            errors = overlay_errors(cv2.imread(str(shot))[..., ::-1].astype(int), s)
            if not errors:
                break
    finally:
        server.shutdown()
    assert not errors, f"{'; '.join(errors)} (see {shot})"
