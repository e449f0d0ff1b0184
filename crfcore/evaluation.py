"""Measuring predictions: patch-level metrics and reports, NMS lesions, the Camelyon16
FROC, slide-level ROC, pixel-level scores and hard-negative points."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from .annotations import LESION_CLASS, LESION_COLOUR, asap_xml, geojson_feature
from .errors import CrfError
from .io import save_figure
from .tiling import is_number


class EvaluationError(CrfError):
    """Inputs that cannot be evaluated (a malformed lesion file, one class only)."""


def patch_metrics(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC and per-class accuracy.

    `prob`: `(n,)` tumour probabilities (binary) or `(n, C)` class probabilities."""
    y_true = np.asarray(y_true).astype(int)
    prob = np.asarray(prob, float)
    pred = (prob >= 0.5).astype(int) if prob.ndim == 1 else prob.argmax(1)
    out = {"acc": skm.accuracy_score(y_true, pred),
           "balanced_acc": skm.balanced_accuracy_score(y_true, pred) if len(np.unique(y_true)) > 1
           else float("nan")}
    present = np.unique(y_true)
    if len(present) < 2:
        out["auc"] = float("nan")
    elif prob.ndim == 1:
        out["auc"] = skm.roc_auc_score(y_true, prob)
    elif prob.shape[1] == 2:
        out["auc"] = skm.roc_auc_score(y_true, prob[:, 1])
    else:
        out["auc"] = skm.roc_auc_score(y_true, prob, multi_class="ovr", labels=np.arange(prob.shape[1]))
    for k in present:
        out[f"acc_class{k}"] = float((pred[y_true == k] == k).mean())
    return {k: float(v) for k, v in out.items()}


def patch_report(y_true: np.ndarray, prob: np.ndarray, class_names: list[str],
                 png: str | Path | None = None, title: str = "") -> str:
    """sklearn's classification report (precision, recall, F1, support) and, if `png` is
    given, the confusion-matrix picture; ends with `balanced_accuracy=... auc=...`."""
    prob = np.asarray(prob, float)
    pred = (prob >= 0.5).astype(int) if prob.ndim == 1 else prob.argmax(1)
    labels = list(range(len(class_names)))
    text = skm.classification_report(y_true, pred, labels=labels, target_names=class_names,
                                     digits=4, zero_division=0)
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cm = skm.confusion_matrix(y_true, pred, labels=labels)
        fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2.5))
        skm.ConfusionMatrixDisplay(cm, display_labels=class_names).plot(ax=ax, cmap="Blues",
                                                                        colorbar=False)
        ax.set_title(title or "confusion matrix")
        save_figure(fig, png)
    m = patch_metrics(y_true, prob)
    return text + f"balanced_accuracy={m['balanced_acc']:.4f} auc={m['auc']:.4f}"


# ----------------------------------------------------------------------------- lesions (NMS)

CAMELYON_MPP = 0.243          # um per level-0 pixel on Camelyon16 slides
FROC_FP_RATES = (0.25, 0.5, 1, 2, 4, 8)


def find_lesions(prob: np.ndarray, downsample: tuple[float, float], threshold: float = 0.5,
                 radius: int = 12, sigma: float = 0.0) -> np.ndarray:
    """NCRF's non-maximum suppression: take the maximum while it exceeds `threshold`, emit
    `(prob, x, y)` (level-0 centre of that map pixel), zero the square `[r - radius,
    r + radius) x [c - radius, c + radius)` around it, repeat. Returns `(n, 3)`."""
    p = np.array(prob, dtype=np.float64)
    if sigma > 0:
        from skimage.filters import gaussian
        p = gaussian(p, sigma=sigma)  # as NCRF's nms.py smooths (its border mode, `nearest`)
    out = []
    h, w = p.shape
    while p.size and p.max() > threshold:
        r, c = np.unravel_index(np.argmax(p), p.shape)  # first maximum in row-major order
        out.append((p[r, c], int((c + 0.5) * downsample[0]), int((r + 0.5) * downsample[1])))
        p[max(r - radius, 0):min(r + radius, h), max(c - radius, 0):min(c + radius, w)] = 0
        p[r, c] = 0  # radius 0 would otherwise loop forever (as NCRF's does)
    return np.array(out, dtype=np.float64).reshape(-1, 3)


def lesions_csv(lesions: np.ndarray) -> str:
    return "".join(f"{p:0.5f},{int(x)},{int(y)}\n" for p, x, y in lesions)


def read_lesions(path: str | Path) -> np.ndarray:
    """A `prob,x,y` CSV (NCRF's, no header) as `(n, 3)`; non-finite values, probabilities
    outside 0-1 and negative coordinates are refused."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # -sig: a spreadsheet's BOM
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = [float(v) for v in line.split(",")]
            except ValueError:
                row = []
            if lineno == 1 and all(not is_number(v) and v.strip() for v in line.split(",")):
                raise EvaluationError(f"{path}:1: a header line ({line.strip()!r}); a lesion list has none, only "
                                      "prob,x,y numbers per line (NCRF's format): remove it")
            if len(row) != 3 or not all(math.isfinite(v) for v in row):
                raise EvaluationError(f"{path}:{lineno}: expected 'prob,x,y' (finite numbers), got {line.strip()!r}")
            if not (0 <= row[0] <= 1 and row[1] >= 0 and row[2] >= 0):
                raise EvaluationError(f"{path}:{lineno}: expected a probability from 0 to 1 and level-0 pixel "
                                      f"coordinates of 0 or more, got {line.strip()!r}")
            rows.append(row)
    return np.array(rows, float).reshape(-1, 3)


def lesions_asap_xml(lesions: np.ndarray) -> str:
    """Lesions as ASAP Dot annotations (name with the probability to 4 decimals) in a
    group of their own, "Predicted lesion", never the truth's."""
    return asap_xml(((f"lesion {i} p={p:.4f}", "Dot", LESION_CLASS, [(x, y)])
                     for i, (p, x, y) in enumerate(lesions)), {LESION_CLASS: LESION_COLOUR})


def lesions_geojson(lesions: np.ndarray) -> dict:
    """Lesions as GeoJSON Points for QuPath in a class of their own, "Predicted lesion",
    with the probability (4 decimals) as a measurement."""
    # "name" (a foreign member, which GeoJSON readers pass over) marks even an empty export as one
    return {"type": "FeatureCollection", "name": LESION_CLASS, "features": [
        geojson_feature({"type": "Point", "coordinates": [int(x), int(y)]}, f"lesion {i} p={p:.4f}",
                        LESION_CLASS, LESION_COLOUR, measurements={"probability": round(float(p), 4)})
        for i, (p, x, y) in enumerate(lesions)]}


# ----------------------------------------------------------------------------- FROC


def evaluation_mask(tumour: np.ndarray, level_downsample: float, mpp: float = CAMELYON_MPP) -> np.ndarray:
    """Camelyon16's evaluation mask: tumour regions dilated by 75 um (half of it on each
    side, as the official code measures), holes filled, labelled with 8-connectivity."""
    from scipy import ndimage as nd
    from skimage import measure

    if not tumour.any():  # no tumour: no region (the transform would measure from a corner)
        return np.zeros(tumour.shape, np.int64)
    distance = nd.distance_transform_edt(~tumour.astype(bool))
    filled = nd.binary_fill_holes(distance < dilation_pixels(level_downsample, mpp))
    return measure.label(filled, connectivity=2)


def dilation_pixels(level_downsample: float, mpp: float = CAMELYON_MPP) -> float:
    """How far (pixels of the level) `evaluation_mask` dilates a tumour: 75 um / 2."""
    return 75 / (mpp * level_downsample * 2)


def isolated_tumour_cells(labels: np.ndarray, level_downsample: float, mpp: float = CAMELYON_MPP) -> set[int]:
    """Labels of regions whose major axis is below 275 um (ITCs: neither hits nor misses)."""
    from skimage import measure

    threshold = 275 / (mpp * level_downsample)
    return {r.label for r in measure.regionprops(labels) if r.axis_major_length < threshold}


def slide_hits(lesions: np.ndarray, labels: np.ndarray | None, itc: set[int],
               downsample: tuple[float, float]) -> tuple[list[float], np.ndarray, int]:
    """(false-positive probabilities, best probability per tumour region (0 = missed),
    number of countable tumours) of one slide, as Camelyon16's evaluation code does.
    `labels` is on a lattice of per-axis `downsample` (level-0 pixels per label pixel)."""
    if labels is None or labels.max() == 0:
        return [float(p) for p in lesions[:, 0]], np.zeros(0), 0
    n = int(labels.max())
    tp = np.zeros(n)
    fp = []
    for p, x, y in lesions:
        r, c = int(y / downsample[1]), int(x / downsample[0])
        hit = labels[r, c] if 0 <= r < labels.shape[0] and 0 <= c < labels.shape[1] else 0
        if hit == 0:
            fp.append(float(p))
        elif hit not in itc:
            tp[hit - 1] = max(tp[hit - 1], p)
    keep = np.array([k + 1 not in itc for k in range(n)])
    return fp, tp[keep], int(keep.sum())


def froc(fp_probs: list[list[float]], tp_probs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Average false positives per slide and sensitivity at every threshold (Camelyon16).

    The thresholds are the detections' probabilities; missed tumours hold 0 and never
    count. (The official script dropped the lowest probability instead, which is the 0
    of a missed tumour when there is one, but a real detection otherwise, so that a
    perfect detector scored below 1.)"""
    fps = np.concatenate([np.asarray(f, float) for f in fp_probs]) if fp_probs else np.zeros(0)
    tps = np.concatenate([np.asarray(t, float) for t in tp_probs]) if tp_probs else np.zeros(0)
    n_tumours = len(tps)
    thresholds = np.unique(np.concatenate([fps, tps]))
    thresholds = thresholds[thresholds > 0]
    total_fp = np.array([(fps >= t).sum() for t in thresholds] + [0], float)
    total_tp = np.array([(tps >= t).sum() for t in thresholds] + [0], float)
    return total_fp / len(fp_probs), total_tp / max(n_tumours, 1)


def froc_score(avg_fp: np.ndarray, sensitivity: np.ndarray,
               rates: tuple[float, ...] = FROC_FP_RATES) -> tuple[float, np.ndarray]:
    """Sensitivity at the given average FP rates (interpolated) and their mean."""
    sens = np.interp(rates, avg_fp[::-1], sensitivity[::-1])
    return float(sens.mean()), sens


# ----------------------------------------------------------------------------- slide level


SCREENING_SENSITIVITY = 0.99  # the screening operating point: miss at most 1 % of tumour slides


def slide_roc(labels: np.ndarray, scores: np.ndarray, n_boot: int = 2000, seed: int = 0,
              sensitivity: float = SCREENING_SENSITIVITY) -> dict:
    """ROC AUC with a bootstrap 95 % interval, and the best specificity with at least
    `sensitivity` (the share of normal slides that could be skipped missing at most
    1 - sensitivity); "sensitivity" in the result is the one reached there."""
    labels, scores = np.asarray(labels, int), np.asarray(scores, float)
    if len(np.unique(labels)) < 2:
        raise EvaluationError("slide-level ROC needs both tumour and normal slides")
    auc = skm.roc_auc_score(labels, scores)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[i])) == 2:
            boots.append(skm.roc_auc_score(labels[i], scores[i]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    fpr, tpr, thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    ok = tpr >= sensitivity
    j = np.flatnonzero(ok)[np.argmin(fpr[ok])]
    return {"auc": float(auc), "auc_low": float(lo), "auc_high": float(hi),
            "specificity": float(1 - fpr[j]), "threshold": float(thr[j]), "sensitivity": float(tpr[j]),
            "fpr": fpr, "tpr": tpr}


# ----------------------------------------------------------------------------- pixel level


def pixel_scores(prob: np.ndarray, truth: np.ndarray, tissue: np.ndarray, threshold: float) -> dict:
    """IoU and Dice of `prob >= threshold` against `truth` over the whole map (NaN when
    neither has a tumour pixel: a normal slide called normal is no overlap of 0), and the
    threshold-free ROC AUC of `prob` for `truth` over the `tissue` pixels (NaN when the
    truth has one class there)."""
    pred = prob >= threshold
    inter, union = int((pred & truth).sum()), int((pred | truth).sum())
    t, p = truth[tissue], prob[tissue]
    auc = float(skm.roc_auc_score(t, p)) if 0 < t.sum() < t.size else float("nan")
    nan = float("nan")
    return {"iou": inter / union if union else nan, "dice": 2 * inter / (inter + union) if union else nan,
            "auc": auc, "tumour_pixels": int(t.sum()), "tissue_pixels": int(t.size)}


# ----------------------------------------------------------------------------- hard negatives


def hard_negatives(prob: np.ndarray, tumour: np.ndarray, downsample: tuple[float, float], threshold: float,
                   n: int, margin_px: float = 0.0, sample: str = "prob",
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """Up to `n` level-0 points `(x, y)` (map-pixel centres) where the map says tumour
    (`prob > threshold`) but the truth does not, farther than `margin_px` map pixels from
    any tumour: false positives to add to the normal training set, as NCRF mined them.
    `sample` "top" takes the highest probabilities, "prob" draws with weight = probability."""
    from scipy import ndimage as nd

    # (with no tumour at all the distance transform has nothing to measure from: all is far)
    far = ~tumour if margin_px <= 0 or not tumour.any() else nd.distance_transform_edt(~tumour) > margin_px
    rows, cols = np.nonzero((prob > threshold) & far)
    p = prob[rows, cols].astype(float)
    if len(p) > n:
        if sample == "top":
            pick = np.argsort(-p, kind="stable")[:n]
        else:
            pick = (rng or np.random.default_rng(0)).choice(len(p), n, replace=False, p=p / p.sum())
        rows, cols = rows[pick], cols[pick]
    order = np.lexsort((cols, rows))
    xs = ((cols[order] + 0.5) * downsample[0]).astype(int)
    ys = ((rows[order] + 0.5) * downsample[1]).astype(int)
    return np.stack([xs, ys], 1).reshape(-1, 2)
