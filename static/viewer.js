// viewer.py's slide page: OpenSeadragon with the slide, a switchable, thresholded
// probability-map overlay, the value under the cursor, truth outlines (SVG), lesion points,
// a scale bar and keyboard navigation. The server passes its URLs in #config.
"use strict";

const C = JSON.parse(document.getElementById("config").textContent);
const params = new URLSearchParams(location.search);
const $ = id => document.getElementById(id);
const problems = new Map();  // what could not be shown, by layer: one line each
function say(layer, text) {
  if (text) problems.set(layer, text); else problems.delete(layer);
  $("message").textContent = [...problems.values()].join("\n");
}

const viewer = OpenSeadragon({
  id: "view", prefixUrl: C.osd_images, tileSources: C.dzi, showNavigator: true,
  animationTime: params.get("animation") === "0" ? 0 : 1.2,
  drawer: params.get("drawer") || "canvas",  // 2-D canvas: WebGL without a GPU is several times slower
});
const slideItem = () => viewer.world.getItemAt(0);
const whenOpen = fn => { if (viewer.world.getItemCount()) fn(); else viewer.addOnceHandler("open", fn); };

// Problems with a map, lesion or annotation file come back as 4xx with a one-line reason.
async function fetchOk(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error((await r.text()).trim() || `${url}: HTTP ${r.status}`);
  return r;
}

/* ------------------------------------------------------------------ heat map */
const unit = (name, fallback) => {  // a URL parameter in [0, 1]
  const v = parseFloat(params.get(name));
  return Number.isFinite(v) ? Math.min(1, Math.max(0, v)) : fallback;
};
const heat = {
  index: Math.max(0, C.maps.findIndex(m => m.name === params.get("map"))),
  threshold: unit("t", 0),
  opacity: unit("opacity", 0.5),
  on: params.get("heat") !== "0",
  item: null,
};

function heatOpacity() { return heat.on ? heat.opacity : 0; }

// Show map `heat.index` at `heat.threshold`. The new layer is added on top and the older
// ones removed once it has all its tiles, so switching never flashes the bare slide; a
// layer whose request has been overtaken by a newer one (keys held down) is dropped.
let generation = 0;
const mapLayers = new Set();
async function showMap() {
  if (!C.maps.length) return;
  const gen = ++generation, m = C.maps[heat.index];
  $("legend-name").textContent = `${m.label}: tumour probability`;
  try { await fetchOk(m.dzi); } catch (err) { say("map", err.message); return; }
  if (gen !== generation) return;
  say("map", "");
  viewer.addTiledImage({
    tileSource: `${m.dzi}?t=${heat.threshold}`, x: 0, y: 0, width: 1, opacity: heatOpacity(),
    success: e => {
      if (gen !== generation) { viewer.world.removeItem(e.item); return; }
      heat.item = e.item;
      mapLayers.add(e.item);
      const drop = () => {
        if (gen !== generation) return;
        for (const it of mapLayers) if (it !== e.item) { viewer.world.removeItem(it); mapLayers.delete(it); }
      };
      if (e.item.getFullyLoaded()) drop();
      else { e.item.addOnceHandler("fully-loaded-change", drop); setTimeout(drop, 3000); }
    },
    error: e => say("map", `${m.label}: ${e.message}`),
  });
}

function setThreshold(t) {
  heat.threshold = Math.round(Math.min(1, Math.max(0, t)) * 100) / 100;
  $("threshold").value = heat.threshold;
  showThreshold();
  showMap();
}

function showThreshold() {
  $("threshold-value").textContent = heat.threshold.toFixed(2);
  $("legend-threshold").style.width = `${heat.threshold * 100}%`;
}

function switchMap(index) {
  heat.index = index;
  $("map").value = index;
  showMap();
}

function setHeat(on) {
  heat.on = on;
  $("heat").checked = on;
  $("legend").hidden = !on;
  if (heat.item) heat.item.setOpacity(heatOpacity());
}

if (C.maps.length) {
  $("map").value = heat.index;
  $("threshold").value = heat.threshold;
  $("opacity").value = heat.opacity;
  showThreshold();
  $("map").onchange = e => switchMap(+e.target.value);
  $("threshold").oninput = e => { heat.threshold = +e.target.value; showThreshold(); };
  $("threshold").onchange = e => setThreshold(+e.target.value);
  $("opacity").oninput = e => { heat.opacity = +e.target.value; setHeat(true); };
  $("heat").onchange = e => setHeat(e.target.checked);
  setHeat(heat.on);
  whenOpen(showMap);
}

/* ------------------------------------------------------------- value readout */
// One request at a time; the latest cursor position wins.
let pending = null, busy = false;
async function readValue() {
  if (busy || !pending || !C.maps.length) return;
  const { x, y } = pending, m = C.maps[heat.index];
  pending = null; busy = true;
  try {
    const v = (await (await fetchOk(`${m.value}?x=${x}&y=${y}`)).json()).value;
    $("readout").textContent = v === null ? "" :
      `x ${Math.round(x)}, y ${Math.round(y)}: ${m.label} ${v.toFixed(3)}`;
  } catch (err) { $("readout").textContent = ""; }
  busy = false;
  readValue();
}
new OpenSeadragon.MouseTracker({
  element: viewer.element,
  moveHandler: e => {
    const item = slideItem();
    if (!item) return;
    pending = item.viewerElementToImageCoordinates(e.position);
    readValue();
  },
});

/* --------------------------------------------------------------- scale bar */
if (C.mpp) {
  viewer.addHandler("update-viewport", () => {  // a 1-2-5 bar about 120 screen pixels long
    const item = slideItem();
    if (!item) return;
    const umPerPx = C.mpp / item.viewportToImageZoom(viewer.viewport.getZoom(true));
    const raw = 120 * umPerPx, p = Math.pow(10, Math.floor(Math.log10(raw)));
    const nice = [1, 2, 5, 10].map(k => k * p).filter(x => x <= raw).pop();
    $("scale").style.width = `${nice / umPerPx}px`;
    $("scale").textContent = nice >= 1000 ? `${nice / 1000} mm` : `${nice} \u00b5m`;
  });
}

/* ------------------------------------------------------------ truth outline */
// Polygons in level-0 pixels inside one SVG group; the group's transform follows the view.
const SVG = "http://www.w3.org/2000/svg";
const shapes = $("outline-shapes");
function placeOutline() {
  const item = slideItem();
  if (!item) return;
  const a = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const b = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(C.width, C.height));
  const sx = (b.x - a.x) / C.width, sy = (b.y - a.y) / C.height;
  shapes.setAttribute("transform", `translate(${a.x} ${a.y}) scale(${sx} ${sy})`);
}
function setTruth(on) {
  $("outline").style.display = on ? "" : "none";
  if ($("truth")) $("truth").checked = on;
}
if (C.truth) {
  fetchOk(C.truth).then(r => r.json()).then(t => {
    for (const part of ["positive", "negative"]) {
      for (const poly of t[part]) {
        const p = document.createElementNS(SVG, "path");
        p.setAttribute("class", part);
        p.setAttribute("d", "M" + poly.map(([x, y]) => `${x} ${y}`).join("L") + "Z");
        shapes.appendChild(p);
      }
    }
    viewer.addHandler("update-viewport", placeOutline);
    whenOpen(placeOutline);
  }).catch(err => say("truth", err.message));
  $("truth").onchange = e => setTruth(e.target.checked);
  setTruth(params.get("truth") !== "0");
}

/* ------------------------------------------------------------ lesion points */
const COLOURS = ["#00ff00", "#ff00ff", "#00ffff", "#ffffff"];
const lesionMarks = C.lesions.map(() => []);
function setLesions(i, on) {  // a class, not style.display: OpenSeadragon sets that on every frame
  lesionMarks[i].forEach(d => d.classList.toggle("off", !on));
  document.querySelector(`.lesion-set[data-index="${i}"]`).checked = on;
}
C.lesions.forEach((set, i) => {
  const box = document.querySelector(`.lesion-set[data-index="${i}"]`);
  box.checked = params.get("lesions") !== "0";  // the page is drawn with every box ticked
  box.onchange = e => setLesions(i, e.target.checked);
  fetchOk(set.url).then(r => r.json()).then(points => whenOpen(() => {
    for (const [p, x, y] of points) {
      const d = document.createElement("div");
      d.className = "lesion";
      d.style.borderColor = COLOURS[i % COLOURS.length];
      d.title = `${set.name}: p = ${p.toFixed(3)} at (${Math.round(x)}, ${Math.round(y)})`;
      viewer.addOverlay({ element: d, location: slideItem().imageToViewportCoordinates(x, y) });
      lesionMarks[i].push(d);
    }
    setLesions(i, box.checked);  // as the box says by now: the URL's lesions=, or what the user set meanwhile
  })).catch(err => say(`lesions ${i}`, err.message));
});

/* -------------------------------------------------------------- navigation */
// Links to other slides keep the current map, threshold, opacity and layers (lesions: all off or not).
// A layer this page lacks passes on as it came (a slide without lesions keeps lesions=0).
function carry(url) {
  if (!url) return null;
  const q = new URLSearchParams();
  for (const k of ["animation", "map", "t", "opacity", "heat", "truth", "lesions"]) {
    if (params.has(k)) q.set(k, params.get(k));
  }
  const live = (key, value, when) => { if (when) q.set(key, value); else q.delete(key); };
  if (C.maps.length) {
    q.set("map", C.maps[heat.index].name);
    live("t", heat.threshold, heat.threshold);
    live("opacity", heat.opacity, heat.opacity !== 0.5);
    live("heat", "0", !heat.on);
  }
  if ($("truth")) live("truth", "0", !$("truth").checked);
  const sets = [...document.querySelectorAll(".lesion-set")];
  if (sets.length) live("lesions", "0", sets.every(box => !box.checked));  // the boxes: the URL's, or the user's
  const s = q.toString();
  return s ? `${url}?${s}` : url;
}
const go = url => { if (url) location.href = carry(url); };
for (const [id, url] of [["prev", C.prev], ["next", C.next]]) {
  if (url) $(id).onclick = e => { e.preventDefault(); go(url); };
}

const help = $("help");
$("help-button").onclick = () => { help.hidden = !help.hidden; };
const KEYS = {
  n: () => go(C.next), p: () => go(C.prev), i: () => { location.href = C.index; },
  h: () => C.maps.length && setHeat(!heat.on),
  m: () => C.maps.length > 1 && switchMap((heat.index + 1) % C.maps.length),
  "[": () => C.maps.length && setThreshold(heat.threshold - 0.05),
  "]": () => C.maps.length && setThreshold(heat.threshold + 0.05),
  t: () => C.truth && setTruth(!$("truth").checked),
  l: () => {
    const on = ![...document.querySelectorAll(".lesion-set")].some(box => box.checked);  // what the user sees
    C.lesions.forEach((_, i) => setLesions(i, on));
  },
  "?": () => { help.hidden = !help.hidden; },
  Escape: () => { help.hidden = true; },
};
document.addEventListener("keydown", e => {
  if (e.ctrlKey || e.metaKey || e.altKey || e.target.closest?.("input, select, textarea")) return;
  const act = KEYS[e.key];
  if (act) { e.preventDefault(); act(); }
});
