"""Measuring predictions: patch-level metrics and reports (more in the evaluate issue)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn import metrics as skm


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

        from .io import atomic_path

        cm = skm.confusion_matrix(y_true, pred, labels=labels)
        fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2.5))
        skm.ConfusionMatrixDisplay(cm, display_labels=class_names).plot(ax=ax, cmap="Blues",
                                                                        colorbar=False)
        ax.set_title(title or "confusion matrix")
        fig.tight_layout()
        with atomic_path(png) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
    m = patch_metrics(y_true, prob)
    return text + f"balanced_accuracy={m['balanced_acc']:.4f} auc={m['auc']:.4f}"
