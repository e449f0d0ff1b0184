"""Training and validation of the MobileNetV2-CRF model: loss, prediction, random state,
the resumable `Run` (checkpoints, exact resume, DistributedDataParallel under torchrun)
and reports of a checkpoint on a data folder.

The config is `crfcore.config.TrainConfig`, the data `crfcore.loaders`, devices and
precision `crfcore.device`, the log and curves `crfcore.runlog`.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import INTERNAL, ConfigError, TrainConfig
from .consistency import DenseConsistent, check_geometry
from .datasets import FolderDataset, GridDataset
from .device import (DistEnv, autocast, cpu_has_native_bf16, fork_safe_opencv, reader_workers, resolve_device,
                     resolve_precision)
from .errors import CrfError
from .evaluation import patch_metrics, patch_report
from .heatmap import check_picture_output
from .io import atomic_write_json, atomic_write_text, check_spares_inputs, ensure_free_space
from .layers import all_finite
from .memory import free_bytes, gb, step_memory
from .model import CRFNet, ModelConfig, init_from_checkpoint, load_checkpoint, load_pretrained_backbone
from .model import inference_copy, model_from_checkpoint, save_checkpoint
from .loaders import build_loaders, collate, grid_folders, stain_normaliser
from .runlog import append_log, plot_curves, read_log
from .trainset import read_lock


PENDING_BEST = ".best.pending.ckpt"  # a new best.ckpt until train.ckpt commits its epoch
# What --resume may change; any other key would make the resumed run a different one
# (the optimiser's state overrides a new weight_decay, best_metric compares unlike values).
RESUME_MAY_CHANGE = ("epochs", "lr", "workers", "device", "precision", "pretrained", "init_from")


class TrainingError(CrfError):
    """Training cannot go on (a NaN loss or parameter); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- steps


def loss_fn(cfg: TrainConfig, num_classes: int, device: torch.device):
    w = cfg.class_weights
    if num_classes == 1:
        if w is None:
            return nn.BCEWithLogitsLoss()
        if len(w) != 2:
            raise ConfigError("class_weights for grid mode: [normal, tumour]")
        wn, wt = w

        def weighted(logits, target):
            loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
            return (loss * (target * wt + (1 - target) * wn)).mean()
        return weighted
    if w is not None and len(w) != num_classes:
        raise ConfigError(f"class_weights has {len(w)} values for {num_classes} classes")
    return nn.CrossEntropyLoss(weight=None if w is None else torch.tensor(w, dtype=torch.float32, device=device))


def flat(out: torch.Tensor, y: torch.Tensor, num_classes: int):
    """Model output and targets flattened to one row per patch."""
    if num_classes == 1:
        return out.reshape(-1).float(), y.reshape(-1).float()
    return out.reshape(-1, num_classes).float(), y.reshape(-1).long()


def probabilities(out: torch.Tensor, num_classes: int) -> np.ndarray:
    return (torch.sigmoid(out) if num_classes == 1 else torch.softmax(out, -1)).detach().cpu().numpy()


class Predictions(NamedTuple):
    """What `predict` returns: targets and probabilities (one row per patch), the mean
    task loss, and the mean dense-consistency gap (nan unless the model reports one)."""
    y: np.ndarray
    p: np.ndarray
    loss: float
    dense_gap: float


def to_device(x: torch.Tensor | tuple[torch.Tensor, ...], device) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A batch (or `(cells, context)`) on `device`."""
    if isinstance(x, (tuple, list)):
        return tuple(v.to(device, non_blocking=True) for v in x)
    return x.to(device, non_blocking=True)


@torch.no_grad()
def predict(model: nn.Module, loader, device, precision: str, num_classes: int, loss=None,
            quiet: bool = False, desc: str = "valid") -> Predictions:
    """Run `model` over `loader` (a `DenseConsistent` model also gives its gap)."""
    model.eval()
    ys, ps, total, n = [], [], 0.0, 0
    gap, images = 0.0, 0  # the gap is a mean over a batch's images
    for x, y in tqdm(loader, desc=desc, disable=quiet, leave=False):
        y = y.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(to_device(x, device))
        if isinstance(out, tuple):
            out, batch_gap = out
            gap, images = gap + float(batch_gap) * len(y), images + len(y)
        o, t = flat(out, y, num_classes)
        if loss is not None:
            total += float(loss(o, t)) * len(t)
            n += len(t)
        ys.append(t.cpu().numpy())
        ps.append(probabilities(o, num_classes))
    nan = float("nan")
    return Predictions(np.concatenate(ys), np.concatenate(ps), total / n if n else nan,
                       gap / images if images else nan)


# ----------------------------------------------------------------------------- random state


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": json.dumps(random.getstate())}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------- the run


def make_optimizer(cfg: TrainConfig, model: nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))


def lr_factor(cfg: TrainConfig):
    """The schedule as the factor of the base learning rate at each epoch, in closed form:
    a run resumed with more epochs then follows the longer schedule from the epoch reached
    (a recursive scheduler's stored state would keep the old length)."""
    if cfg.schedule == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * min(e, cfg.epochs) / cfg.epochs))
    if cfg.schedule == "step":
        return lambda e: cfg.gamma ** (e // cfg.step_size)
    return lambda e: 1.0


def model_config(cfg: TrainConfig) -> ModelConfig:
    return ModelConfig(grid=cfg.grid, crf_iters=cfg.crf_iters, width_mult=cfg.width_mult,
                       num_classes=cfg.num_classes)


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether `new` beats `old` in the log column `metric` (losses: lower)."""
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return not math.isnan(new)
    return new < old if metric.endswith("loss") else new > old


class Run:
    """One training run in SAVE_DIR (resumable). Under torchrun, rank 0 writes the files.

    An epoch's outputs are written: a new best as `.best.pending.ckpt`, log.csv,
    curves.png, then train.ckpt, the epoch's commit point, and last the pending best
    renamed to best.ckpt. A run killed before the commit resumes from the previous
    train.ckpt, drops the pending best (so best.ckpt stays the best train.ckpt records)
    and redoes the epoch; one killed after it renames the pending best on resume."""

    def __init__(self, cfg: TrainConfig, save_dir: str | Path, resume: bool = False, quiet: bool = False) -> None:
        self.save_dir, self.quiet = Path(save_dir), quiet
        self.env = DistEnv.from_env()
        self.device = resolve_device(cfg.device, self.env.local_rank)
        self.precision = resolve_precision(self.device, cfg.precision)
        self._init_distributed()
        ckpt = self._resume_checkpoint(cfg) if resume else None
        if ckpt is not None:
            cfg = cfg.replace(classes=ckpt["config"].get("classes"),
                              stain_reference=ckpt["config"].get("stain_reference"))
        set_seed(cfg.seed)
        norm = stain_normaliser(cfg)
        # held until close(): coord_list_gen.py must not replace a set while it is read
        self.locks = [read_lock(Path(p)) for p in training_set_folders(cfg)]
        self.train_loader, self.valid_loader, classes = build_loaders(cfg, self.env, norm)
        self.cfg = cfg.replace(classes=tuple(classes), num_classes=1 if cfg.mode == "grid" else len(classes),
                               stain_reference=norm.to_dict() if norm else None)
        self.num_classes = self.cfg.num_classes
        self.best_metric = self._best_metric()
        self.model = self._build_model(fresh=ckpt is None)
        self.opt, self.sched = make_optimizer(self.cfg, self.model)
        self.loss = loss_fn(self.cfg, self.num_classes, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.epoch, self.step, self.best, self.best_epoch = 0, 0, None, 0
        if ckpt is not None:
            self._restore(ckpt, cfg.lr)
        self.scored = self._scored()
        if self.epoch < self.cfg.epochs:
            self._check_memory()
        self.net = self._wrap_ddp()

    # -- construction steps

    def _init_distributed(self) -> None:
        if self.env.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def _resume_checkpoint(self, cfg: TrainConfig) -> dict:
        path = self.save_dir / "train.ckpt"
        if not path.exists():
            raise ConfigError(f"--resume: {path} does not exist")
        ckpt = load_checkpoint(path)
        stored = TrainConfig.from_dict(ckpt["config"]).to_dict()
        diff = [k for k, v in cfg.to_dict().items()
                if k not in (*INTERNAL, *RESUME_MAY_CHANGE) and not k.startswith(("data_path", "json_path"))
                and stored[k] != v]
        if diff:
            raise ConfigError(f"--resume: the config differs from the checkpoint's in {diff}; only "
                              f"{', '.join(RESUME_MAY_CHANGE)} and the data folders may change on resume")
        return ckpt

    def _best_metric(self) -> str:
        """The log column that picks best.ckpt: the validation metric asked for, else (no
        validation set) the training loss or accuracy, which the log says."""
        if self.valid_loader is not None:
            return f"valid_{self.cfg.best_metric}"
        fallback = {"loss": "train_loss", "total_loss": "train_total_loss"}.get(self.cfg.best_metric, "train_acc")
        self.log(f"no validation set: best.ckpt is picked by {fallback}, not by validation {self.cfg.best_metric}")
        return fallback

    def _build_model(self, fresh: bool) -> CRFNet:
        model = CRFNet(model_config(self.cfg))
        if fresh and self.cfg.pretrained:
            load_pretrained_backbone(model, self.cfg.pretrained)
        if fresh and self.cfg.init_from:
            new = init_from_checkpoint(model, self.cfg.init_from)
            self.log(f"fine-tuning from {self.cfg.init_from}; new weights: {', '.join(new) or 'none'}")
        return model.to(self.device, memory_format=torch.channels_last)

    def _restore(self, ckpt: dict, lr: float) -> None:
        missing = [k for k in ("optimizer", "scheduler", "rng", "epoch", "step", "best") if k not in ckpt]
        if missing:
            raise ConfigError(f"--resume: {self.save_dir / 'train.ckpt'} has no {', '.join(missing)}: not a checkpoint "
                              "train.py wrote to resume from (best.ckpt copied over it?)")
        self.model.load_state_dict(ckpt["state_dict"])
        self.opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["scheduler"]  # all the closed form needs (older runs stored other schedulers' states)
        self.sched.last_epoch, self.sched.base_lrs = state["last_epoch"], list(state["base_lrs"])
        self.epoch, self.step, self.best = ckpt["epoch"], ckpt["step"], ckpt["best"]
        if self.cfg.epochs < self.epoch:  # it would train nothing, and config.json would claim the shorter run
            raise ConfigError(f"--resume: {self.save_dir / 'train.ckpt'} has trained {self.epoch} epochs; "
                              f"epochs={self.cfg.epochs} is fewer (set epochs above {self.epoch} to train on)")
        self.best_epoch = ckpt.get("best_epoch", 0)
        if ckpt.get("best_metric", self.best_metric) != self.best_metric:  # a validation set added or dropped
            self.log(f"best.ckpt (epoch {self.best_epoch}) was picked by {ckpt['best_metric']}; from here on by "
                     f"{self.best_metric}, whose first value will replace it")
            self.best = None  # unlike columns are not compared
        set_rng_state(ckpt["rng"])
        self.log(f"resuming after epoch {self.epoch} (step {self.step})")
        if lr != ckpt["config"]["lr"]:  # an explicit new lr (e.g. lower) applies from here
            self.sched.base_lrs = [lr] * len(self.opt.param_groups)
            self.log(f"learning rate set to {lr} (was {ckpt['config']['lr']})")
        for group, f, base in zip(self.opt.param_groups, self.sched.lr_lambdas, self.sched.base_lrs):
            group["lr"] = base * f(self.sched.last_epoch)  # this run's schedule (epochs may have changed)
        self._check_outputs()

    def _check_outputs(self) -> None:
        """Refuse to resume from a run whose best.ckpt or log.csv no longer match its
        train.ckpt (files deleted or replaced by hand)."""
        if not self.main or not self.epoch:
            return
        best, pending = self.save_dir / "best.ckpt", self.save_dir / PENDING_BEST
        if pending.exists():  # committed by train.ckpt (killed before the rename), or not (dropped)
            if load_checkpoint(pending).get("epoch") == self.best_epoch == self.epoch:
                pending.replace(best)
            else:
                pending.unlink()
        got = load_checkpoint(best).get("epoch", 0) if best.exists() else None
        if self.best_epoch and got is not None and got > self.epoch:  # older versions wrote best.ckpt first
            warnings.warn(f"{best} is epoch {got}, which a kill cut short (an older version wrote it before "
                          f"train.ckpt); epoch {self.best_epoch}'s weights, the best train.ckpt records, are gone, "
                          "so the best is chosen again from the redone epoch on")
            self.best, self.best_epoch = None, 0
        elif self.best_epoch and got != self.best_epoch:
            raise ConfigError(f"--resume: {best} is missing or is not epoch {self.best_epoch}, the best "
                              "that train.ckpt records; restore it or start a new run")
        logged = [r["epoch"] for r in read_log(self.save_dir / "log.csv")]
        if [e for e in logged if e <= self.epoch] != list(range(1, self.epoch + 1)):
            raise ConfigError(f"--resume: {self.save_dir / 'log.csv'} does not hold epochs 1..{self.epoch}")

    def _scored(self) -> nn.Module:
        """What training and validation run: the model, wrapped to report its dense-consistency
        gap when that loss is on."""
        if not self.cfg.dense_consistency:
            return self.model
        why = check_geometry(self.model, self.cfg.patch_size)
        if why:
            raise ConfigError(f"config {why}")
        return DenseConsistent(self.model, self.cfg.patch_size, self.cfg.crop_size)

    def _check_memory(self) -> None:
        """Refuse a batch whose training step cannot fit in memory (crfcore.memory): on
        the CPU it would end in the kernel's kill, with no message."""
        free = free_bytes(self.device)
        if free is None:
            return
        state = rng_state()  # reading a sample augments it: the run's draws must not move
        try:
            sample = to_device(collate([self.train_loader.dataset[0]])[0], self.device)
        finally:
            set_rng_state(state)
        step = step_memory(self.scored, sample, self.device, self.precision)
        sharing = self.env.local_world if self.device.type == "cpu" else 1  # a node's CPU ranks share its memory
        batches = self.train_loader.batch_sampler
        need = sharing * step.need(batches.largest)
        where = f"free on {self.device.type.upper()}" if self.device.type == "cuda" else "available"
        if need > free:
            fits = batches.batch_size_within(step.largest_batch(free // sharing))
            bf16 = (self.precision == "fp32" and (cpu_has_native_bf16() if self.device.type == "cpu"
                                                  else torch.cuda.is_bf16_supported()))
            hint = (f"lower batch_size to {fits}" if fits else "not even the smallest batch fits")
            hint += " (or precision bf16, which about halves it)" if bf16 else ""
            raise ConfigError(f"config batch_size {self.cfg.batch_size}: a training step needs about {gb(need)} "
                              f"({gb(step.per_sample)} a sample, {self.precision}), more than the {gb(free)} "
                              f"{where}; {hint}")
        self.log(f"memory: a training step needs about {gb(need)} of the {gb(free)} {where}")

    def _wrap_ddp(self) -> nn.Module:
        """What a training step calls: `scored`, under DistributedDataParallel when there
        are several processes."""
        if self.env.world == 1:
            return self.scored
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.scored, device_ids=ids)

    @property
    def main(self) -> bool:
        return self.env.main

    def log(self, text: str) -> None:
        if self.main and not self.quiet:
            tqdm.write(text)

    # -- epochs

    def train_epoch(self, max_steps: int | None = None) -> dict:
        """One pass over the training batches (the first `max_steps` only, if given)."""
        self.net.train()
        self.train_loader.batch_sampler.epoch = self.epoch
        total, n, correct, gap = 0.0, 0, 0, 0.0
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                   disable=self.quiet or not self.main, leave=False, total=max_steps)
        for i, (x, y) in enumerate(bar):
            if max_steps is not None and i == max_steps:
                break
            loss, o, t, step_gap = self._step(x, y)
            total += loss * len(t)
            gap += step_gap * len(t)
            n += len(t)
            pred = (o > 0).long() if self.num_classes == 1 else o.argmax(-1)
            correct += int((pred == t.long()).sum())
            bar.set_postfix(loss=f"{total / n:.4f}")
        self.sched.step()
        row = {"train_loss": total / max(n, 1), "train_acc": correct / max(n, 1)}
        if self.cfg.dense_consistency:
            row.update(self._with_gap("train", row["train_loss"], gap / max(n, 1)))
        return row

    def _with_gap(self, split: str, loss: float, gap: float) -> dict:
        """The dense-consistency columns of `split`: the gap, and the loss the run
        minimises (task loss + dense_consistency * gap)."""
        return {f"{split}_dense_gap": gap, f"{split}_total_loss": loss + self.cfg.dense_consistency * gap}

    def _step(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
              y: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor, float]:
        """One optimiser step; returns the task loss, outputs, targets and the
        dense-consistency gap (0 when off). `x` is a batch, or `(cells, context)`."""
        x, y = to_device(x, self.device), y.to(self.device, non_blocking=True)
        gap = torch.zeros(())
        with autocast(self.device, self.precision):
            out = self.net(x)
        if isinstance(out, tuple):
            out, gap = out
        o, t = flat(out, y, self.num_classes)
        task = self.loss(o, t)
        loss = task + self.cfg.dense_consistency * gap
        if not torch.isfinite(loss):
            self._diverged(f"loss is {loss.item()}")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if not all_finite(self.model):  # what a bf16 ReLU6 may hide from the loss (layers.ReLU6FromOutput)
            self._diverged("a parameter or batch-norm statistic is not finite", "lower lr, or a NaN in the data?")
        self.step += 1
        return task.item(), o.detach(), t, gap.item()

    def _diverged(self, what: str, hint: str = "lower lr?") -> None:
        kept = (f"{self.save_dir / 'train.ckpt'} keeps the last good epoch" if self.epoch
                else "no epoch was completed")
        raise TrainingError(f"{what} at epoch {self.epoch + 1}, step {self.step + 1}; stopped, {kept} ({hint})")

    def validate(self) -> dict:
        if self.valid_loader is None:
            return {}
        y, p, loss, gap = predict(self.scored, self.valid_loader, self.device, self.precision,
                                  self.num_classes, self.loss, self.quiet)
        m = patch_metrics(y, p)
        out = {"valid_loss": loss, "valid_acc": m["acc"], "valid_balanced_acc": m["balanced_acc"],
               "valid_auc": m["auc"]}
        if self.cfg.dense_consistency:
            out.update(self._with_gap("valid", loss, gap))
        for k, name in enumerate(self.cfg.classes):
            if f"acc_class{k}" in m:
                out[f"valid_acc_{name}"] = m[f"acc_class{k}"]
        return out

    def fit(self) -> dict:
        row: dict = {}
        while self.epoch < self.cfg.epochs:
            t0, lr = time.perf_counter(), self.opt.param_groups[0]["lr"]  # the epoch's: it steps at its end
            row = {"epoch": self.epoch + 1, **self.train_epoch()}
            self._barrier()
            if self.main:
                row.update(self.validate())
                row.update(step=self.step, lr=lr,
                           seconds=round(time.perf_counter() - t0, 2))
            self.epoch += 1
            if self.main:
                self.save(row)
            self._barrier()
        return row

    def _barrier(self) -> None:
        if self.env.world > 1:
            torch.distributed.barrier()

    def save(self, row: dict) -> None:
        """Write the epoch's outputs, train.ckpt as the commit point (see the class docstring)."""
        metric = self.best_metric
        value = row[metric]
        is_best = better(metric, value, self.best)
        if is_best:
            self.best, self.best_epoch = value, self.epoch
        config = self.cfg.to_dict()
        common = dict(epoch=self.epoch, step=self.step, best=self.best, best_metric=metric, best_epoch=self.best_epoch)
        if is_best:
            save_checkpoint(self.save_dir / PENDING_BEST, self.model, config, **common)
        append_log(self.save_dir / "log.csv", row)
        plot_curves(self.save_dir / "log.csv", self.save_dir / "curves.png")
        save_checkpoint(self.save_dir / "train.ckpt", self.model, config, **common, optimizer=self.opt.state_dict(),
                        scheduler=self.sched.state_dict(), rng=rng_state())
        if is_best:
            (self.save_dir / PENDING_BEST).replace(self.save_dir / "best.ckpt")
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        self.log(shown + ("  (best)" if is_best else ""))

    def report(self) -> str | None:
        """Classification report + confusion matrix of best.ckpt on the validation set."""
        if self.valid_loader is None or not self.main:
            return None
        best = self.save_dir / "best.ckpt"
        if best.exists():
            self.model.load_state_dict(load_checkpoint(best)["state_dict"])
        y, p, *_ = predict(self.scored, self.valid_loader, self.device, self.precision,
                           self.num_classes, quiet=self.quiet)
        text = patch_report(y, p, list(self.cfg.classes), self.save_dir / "confusion_matrix.png",
                            "validation set, best.ckpt")
        atomic_write_text(self.save_dir / "report.txt", text + "\n")
        return text

    def close(self) -> None:
        if self.env.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for fd in self.locks:
            os.close(fd)
        self.locks = []


def training_set_folders(cfg: TrainConfig) -> list[str]:
    """The coord_list_gen.py folders (list.txt + images) a grid-mode run reads."""
    if cfg.mode != "grid":
        return []
    return [p for split in ("train", "valid") for p in grid_folders(cfg, split) if Path(p).is_dir()]


# what a run writes into SAVE_DIR (the last two in classify mode)
RUN_FILES = ("config.json", "train.ckpt", "best.ckpt", PENDING_BEST, "log.csv", "curves.png",
             "confusion_matrix.png", "report.txt")


def check_run_paths(cfg: TrainConfig, config: Path, save_dir: Path) -> None:
    """Refuse, before any work, a SAVE_DIR (resolved) that is one of the run's data
    folders, or whose run files would replace one of the run's input files (the config
    file, `init_from`, `pretrained`, `stain_norm`), by any name. The run's own config.json
    may be the config file (a restart, a resume): it is the run's record, rewritten with
    the run's config."""
    data = [p for p in (getattr(cfg, f.name) for f in fields(cfg) if f.name.startswith(("data_path", "json_path")))
            if p and Path(p).is_dir()]
    if save_dir.is_dir() and any(os.path.samefile(save_dir, p) for p in data):
        raise ConfigError(f"{save_dir}: is one of the run's data folders; give SAVE_DIR a folder of its own")
    own = save_dir / "config.json"
    inputs = [cfg.init_from, cfg.pretrained, cfg.stain_norm]
    if not (own.is_file() and Path(config).is_file() and os.path.samefile(own, config)):
        inputs.append(config)
    check_spares_inputs([save_dir / name for name in RUN_FILES], inputs)


def write_config(cfg: TrainConfig, save_dir: Path) -> None:
    atomic_write_json(save_dir / "config.json", cfg.to_dict())


def confusion_picture(data_dir: str | Path, plot: str | Path | None = None) -> Path:
    """Where a report's confusion matrix goes: `--plot`, else DATA_DIR/confusion_matrix.png."""
    return Path(plot) if plot else Path(data_dir) / "confusion_matrix.png"


def evaluate_folder(ckpt_path: str | Path, data_dir: str | Path, picture: str | Path,
                    batch_size: int = 64, workers: int | None = None, device: str = "auto",
                    json_dir: str | Path | None = None, quiet: bool = False) -> str:
    """Report of a checkpoint on any data folder: class sub-folders (classify) or a
    list.txt grid folder with `json_dir` (grid). Writes the confusion matrix to `picture`
    (`confusion_picture`), checked before the work."""
    picture = Path(picture)
    check_picture_output(picture)
    ensure_free_space(picture, 0, "picture")  # a read-only data folder is named now, not after the work
    dev = resolve_device(device)
    model, ckpt = model_from_checkpoint(ckpt_path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    norm = stain_normaliser(cfg)
    if cfg.mode == "classify":
        ds = FolderDataset(data_dir, cfg.patch_size, None, cfg.classes, norm)
    else:
        if json_dir is None:
            raise ConfigError(f"{ckpt_path}: a grid-mode checkpoint needs --json DIR with the slides' annotations")
        ds = GridDataset(data_dir, json_dir, cfg.image_size, cfg.patch_size, cfg.crop_size, None, norm,
                         mpp_set=cfg.mpp is not None)
    check_spares_inputs([picture], [ckpt_path, *ds.files()])  # --plot DATA/1.png would replace an image
    workers = fork_safe_opencv(reader_workers(workers, dev))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    model = inference_copy(model).to(dev, memory_format=torch.channels_last)
    y, p, *_ = predict(model, loader, dev, resolve_precision(dev, cfg.precision), model.cfg.num_classes, quiet=quiet)
    title = f"{Path(ckpt_path).name} on {Path(data_dir).name}"  # the folder, not where it lies on this machine
    return patch_report(y, p, list(cfg.classes), picture, title)
