"""A training run's per-epoch log (log.csv) and its curves (curves.png)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .errors import CrfError
from .io import atomic_path, save_figure


class LogError(CrfError):
    """A log.csv this package cannot have written."""


def read_log(path: Path) -> list[dict]:
    """The rows of log.csv (none when it does not exist), each with a whole-number epoch."""
    if not path.exists():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            row["epoch"] = int(row["epoch"])
    except (UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError):
        raise LogError(f"{path}: not a training log (expected a CSV with an epoch column of whole numbers); "
                       "move it away to start the log afresh") from None
    return rows


def append_log(path: Path, row: dict) -> None:
    """Add `row` to log.csv, rewriting it atomically (new columns extend the header); a
    row of an epoch already logged (a resumed run redoing it) replaces it and those after."""
    rows = [r for r in read_log(path) if r["epoch"] < row["epoch"]] + [row]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_curves(log_csv: Path, png: Path) -> None:
    """Loss and validation metrics per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_csv)
    ep = [r["epoch"] for r in rows]

    def col(k):
        return [float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows]

    gaps = [k for k in ("train_dense_gap", "valid_dense_gap") if k in rows[0]]
    fig, axes = plt.subplots(1, 3 if gaps else 2, figsize=(15 if gaps else 10, 4))
    a, b = axes[:2]
    for k in ("train_loss", "valid_loss", "train_total_loss", "valid_total_loss"):
        if k in rows[0]:
            a.plot(ep, col(k), marker="o", label=k)
    for k in ("train_acc", "valid_acc", "valid_balanced_acc", "valid_auc"):
        if k in rows[0]:
            b.plot(ep, col(k), marker="o", label=k)
    a.set(xlabel="epoch", title="loss")
    b.set(xlabel="epoch", title="metrics", ylim=(0, 1.02))
    a.legend(), b.legend(loc="lower right")
    if gaps:  # a scale of its own: the gap is often 100x below the loss
        for k in gaps:
            axes[2].plot(ep, col(k), marker="o", label=k)
        axes[2].set(xlabel="epoch", title="dense-consistency gap", yscale="log")
        axes[2].legend()
    save_figure(fig, png, dpi=90)
