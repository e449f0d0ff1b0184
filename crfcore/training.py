"""Training and validation of the MobileNetV2-CRF model: configs, balanced batches,
metrics, logs, checkpoints, exact resume and DistributedDataParallel under torchrun."""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Sampler
from tqdm import tqdm

from . import __version__
from .datasets import Augment, FolderDataset, GridDataset
from .errors import CrfError
from .evaluation import patch_metrics, patch_report
from .io import atomic_path, atomic_write_json
from .model import CRFNet, ModelConfig, init_from_checkpoint, load_checkpoint, load_pretrained_backbone
from .model import save_checkpoint

# Every config key, its default and its meaning (the README's table is made from this).
DEFAULTS: dict[str, tuple[Any, str]] = {
    "mode": ("grid", "`grid`: WSI patch grids, labels from annotation JSON; `classify`: image folders"),
    "data_path_tumor_train": (None, "grid: tumour training set folder (list.txt + N.png)"),
    "data_path_normal_train": (None, "grid: normal training set folder"),
    "json_path_train": (None, "grid: folder of annotation JSONs, one per training slide"),
    "data_path_tumor_valid": (None, "grid: tumour validation set folder"),
    "data_path_normal_valid": (None, "grid: normal validation set folder"),
    "json_path_valid": (None, "grid: annotation JSONs of the validation slides"),
    "data_path_train": (None, "a single training folder (grid: list.txt folder; classify: class sub-folders)"),
    "data_path_valid": (None, "a single validation folder"),
    "image_size": (768, "grid: side of a training image (grid of patches), pixels"),
    "patch_size": (256, "grid: side of one cell; classify: images are resized to this"),
    "crop_size": (224, "grid: centre crop of each cell fed to the CNN; classify: unused"),
    "grid": (3, "CRF grid side (1 = plain CNN baseline, 3, 5, 7); grid mode needs image_size/patch_size = grid or grid 1"),
    "crf_iters": (10, "mean-field iterations"),
    "width_mult": (1.0, "MobileNetV2 width multiplier"),
    "pretrained": (None, "local torchvision MobileNetV2 ImageNet state dict (nothing is downloaded)"),
    "init_from": (None, "checkpoint to fine-tune from (weights whose shapes fit; new head otherwise)"),
    "optimizer": ("sgd", "`sgd` (momentum, as NCRF) or `adamw`"),
    "lr": (0.001, "learning rate"),
    "momentum": (0.9, "SGD momentum"),
    "weight_decay": (0.0001, "weight decay"),
    "schedule": ("none", "learning-rate schedule per epoch: `none`, `cosine` or `step`"),
    "step_size": (10, "`step` schedule: epochs between decays"),
    "gamma": (0.1, "`step` schedule: decay factor"),
    "epochs": (20, "training epochs"),
    "max_steps": (None, "cap on training steps per epoch (quick runs)"),
    "batch_size": (10, "samples per batch (grid: half tumour, half normal with two sets)"),
    "class_weights": (None, "loss weight per class, e.g. [1.0, 3.0] (grid: [normal, tumour])"),
    "color_jitter": ([0.25, 0.75, 0.25, 0.04], "ColorJitter brightness, contrast, saturation, hue (NCRF's); null for none"),
    "flip": (True, "random horizontal flips (joint with the label grid)"),
    "rotate": (True, "random 90-degree rotations (joint with the label grid)"),
    "workers": (2, "DataLoader worker processes"),
    "seed": (0, "random seed (data order, augmentation, initialisation)"),
    "device": ("auto", "`auto` (CUDA when present), `cpu`, `cuda`"),
    "precision": ("auto", "`auto` (CUDA: bf16/fp16 mixed precision; CPU: fp32), `fp32`, `bf16`, `fp16`"),
    "best_metric": ("auc", "validation metric that picks best.ckpt: auc, balanced_acc, acc or loss"),
}
MODEL_KEYS = ("mode", "grid", "crf_iters", "width_mult", "image_size", "patch_size", "crop_size")


class ConfigError(CrfError):
    """A config file or --set value that is unknown or invalid; the message names it."""


class TrainingError(CrfError):
    """Training cannot go on (a NaN loss); the last good checkpoint is kept."""


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> dict:
    """Defaults <- config JSON <- `key=value` overrides; unknown keys are refused by name."""
    cfg = {k: v for k, (v, _) in DEFAULTS.items()}
    given: dict = dict(base or {})
    if path is not None:
        try:
            given.update(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        given[key] = parse_value(value)
    unknown = sorted(set(given) - set(DEFAULTS) - {"num_classes", "classes", "crfcore_version"})
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known keys: {', '.join(DEFAULTS)}")
    cfg.update(given)
    check_config(cfg)
    return cfg


def check_config(cfg: dict) -> None:
    choices = {"mode": ("grid", "classify"), "optimizer": ("sgd", "adamw"),
               "schedule": ("none", "cosine", "step"), "device": ("auto", "cpu", "cuda"),
               "precision": ("auto", "fp32", "bf16", "fp16"),
               "best_metric": ("auc", "balanced_acc", "acc", "loss")}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"config {key}={cfg[key]!r}: expected one of {', '.join(allowed)}")
    for key in ("image_size", "patch_size", "crop_size", "epochs", "batch_size", "grid"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"config {key}={cfg[key]!r}: expected a positive integer")
    if cfg["mode"] == "grid":
        cells = cfg["image_size"] // cfg["patch_size"]
        if cfg["image_size"] % cfg["patch_size"] or cfg["grid"] not in (1, cells):
            raise ConfigError(f"image_size {cfg['image_size']} / patch_size {cfg['patch_size']} must be "
                              f"a whole grid, and grid ({cfg['grid']}) that number or 1")
        if cfg["crop_size"] > cfg["patch_size"]:
            raise ConfigError("crop_size must not exceed patch_size")
        two = cfg["data_path_tumor_train"] and cfg["data_path_normal_train"]
        if not two and not cfg["data_path_train"]:
            raise ConfigError("grid mode needs data_path_tumor_train + data_path_normal_train "
                              "(or data_path_train) and json_path_train")
        if not cfg["json_path_train"]:
            raise ConfigError("grid mode needs json_path_train (annotation JSONs)")
    elif not cfg["data_path_train"]:
        raise ConfigError("classify mode needs data_path_train (a folder of class sub-folders)")
    if cfg["mode"] == "classify" and cfg["grid"] != 1:
        raise ConfigError("classify mode has no CRF: set grid to 1")


# ----------------------------------------------------------------------------- data


def augment_for(cfg: dict) -> Augment:
    return Augment(cfg["color_jitter"], cfg["flip"], cfg["rotate"])


def grid_sets(cfg: dict, split: str, augment: Augment | None) -> list[GridDataset]:
    """The tumour and normal sets (or the single set) of `split`."""
    js = cfg[f"json_path_{split}"] or cfg["json_path_train"]
    paths = [cfg[f"data_path_tumor_{split}"], cfg[f"data_path_normal_{split}"]]
    paths = [p for p in paths if p] or [cfg[f"data_path_{split}"]]
    return [GridDataset(p, js, cfg["image_size"], cfg["patch_size"], cfg["crop_size"], augment)
            for p in paths if p]


class BalancedBatches(Sampler):
    """Batches of half tumour, half normal indices into `ConcatDataset([tumour, normal])`
    (or plain shuffled batches of one set). An epoch covers the larger set once; the
    order depends only on (seed, epoch), and rank r of `world` takes every world-th batch
    (the batch count is cut to a multiple of `world`)."""

    def __init__(self, sizes: list[int], batch: int, seed: int, rank: int = 0, world: int = 1,
                 max_steps: int | None = None) -> None:
        self.sizes, self.batch, self.seed, self.rank, self.world = sizes, batch, seed, rank, world
        self.max_steps, self.epoch = max_steps, 0

    def _all(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if len(self.sizes) == 1:
            order = rng.permutation(self.sizes[0])
            return [order[i:i + self.batch].tolist() for i in range(0, len(order), self.batch)]
        half = max(1, self.batch // 2)
        steps = math.ceil(max(self.sizes) / half)
        streams = []
        for k, n in enumerate(self.sizes):
            reps = math.ceil(steps * half / n)
            streams.append(np.concatenate([rng.permutation(n) for _ in range(reps)])[:steps * half]
                           + sum(self.sizes[:k]))
        return [np.concatenate([s[i * half:(i + 1) * half] for s in streams]).tolist() for i in range(steps)]

    def _mine(self) -> list[list[int]]:
        batches = self._all()
        # every rank must take the same number of steps, or DDP's all-reduce waits forever
        batches = batches[:len(batches) // self.world * self.world][self.rank::self.world]
        return batches[:self.max_steps] if self.max_steps else batches

    def __iter__(self):
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


def collate(items):
    xs, ys = zip(*items)
    return torch.stack(xs), torch.as_tensor(np.stack([np.asarray(y) for y in ys]))


def build_loaders(cfg: dict, rank: int, world: int):
    """Training loader (balanced batches) and validation loader (None without a valid set)."""
    if cfg["mode"] == "grid":
        train_sets = grid_sets(cfg, "train", augment_for(cfg))
        has_valid = cfg["data_path_tumor_valid"] or cfg["data_path_normal_valid"] or cfg["data_path_valid"]
        valid_sets = grid_sets(cfg, "valid", None) if has_valid else []
        classes = ["normal", "tumor"]
    else:
        train = FolderDataset(cfg["data_path_train"], cfg["patch_size"], augment_for(cfg),
                              cfg.get("classes"))
        classes = train.classes
        train_sets = [train]
        valid_sets = ([FolderDataset(cfg["data_path_valid"], cfg["patch_size"], None, classes)]
                      if cfg["data_path_valid"] else [])
    sampler = BalancedBatches([len(s) for s in train_sets], cfg["batch_size"], cfg["seed"], rank,
                              world, cfg["max_steps"])
    kw = dict(num_workers=cfg["workers"], collate_fn=collate, persistent_workers=False,
              pin_memory=torch.cuda.is_available())
    train_loader = DataLoader(ConcatDataset(train_sets), batch_sampler=sampler, **kw)
    valid_loader = (DataLoader(ConcatDataset(valid_sets), batch_size=cfg["batch_size"], shuffle=False, **kw)
                    if valid_sets else None)
    return train_loader, valid_loader, classes


# ----------------------------------------------------------------------------- devices


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for, but CUDA is not available on this machine")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {local_rank} has no GPU: {torch.cuda.device_count()} GPU(s) here; "
                              "start at most that many processes per node, or use device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_for(device: torch.device, precision: str):
    """Mixed precision context: CUDA defaults to bf16 (fp16 where bf16 is missing); the
    CPU uses fp32 unless bf16 is asked for."""
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), precision
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs CUDA; use bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), precision


# ----------------------------------------------------------------------------- steps


def loss_fn(cfg: dict, num_classes: int, device: torch.device):
    w = cfg["class_weights"]
    if num_classes == 1:
        if w is None:
            return nn.BCEWithLogitsLoss()
        if len(w) != 2:
            raise ConfigError("class_weights for grid mode: [normal, tumour]")
        wn, wt = (float(v) for v in w)

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


@torch.no_grad()
def predict(model: nn.Module, loader, device, precision: str, num_classes: int, loss=None,
            quiet: bool = False, desc: str = "valid"):
    """Run `model` over `loader`; return (targets, probabilities, mean loss)."""
    model.eval()
    amp, _ = autocast_for(device, precision)
    ys, ps, total, n = [], [], 0.0, 0
    for x, y in tqdm(loader, desc=desc, disable=quiet, leave=False):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with amp:
            out = model(x)
        o, t = flat(out, y, num_classes)
        if loss is not None:
            total += float(loss(o, t)) * len(t)
            n += len(t)
        ys.append(t.cpu().numpy())
        ps.append(probabilities(o, num_classes))
    return np.concatenate(ys), np.concatenate(ps), (total / n if n else float("nan"))


# ----------------------------------------------------------------------------- the run


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


def make_optimizer(cfg: dict, model: nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    else:
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if cfg["schedule"] == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"])
    elif cfg["schedule"] == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, cfg["step_size"], cfg["gamma"])
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    return opt, sched


def model_config(cfg: dict, num_classes: int) -> ModelConfig:
    return ModelConfig(grid=cfg["grid"], crf_iters=cfg["crf_iters"], width_mult=cfg["width_mult"],
                       num_classes=num_classes)


def better(metric: str, new: float, old: float | None) -> bool:
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return not math.isnan(new)
    return new < old if metric == "loss" else new > old


class Run:
    """One training run in SAVE_DIR (resumable). Under torchrun, rank 0 writes the files."""

    def __init__(self, cfg: dict, save_dir: str | Path, resume: bool = False, quiet: bool = False) -> None:
        self.save_dir, self.quiet = Path(save_dir), quiet
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(cfg["device"], local_rank)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        ckpt = None
        if resume:
            path = self.save_dir / "train.ckpt"
            if not path.exists():
                raise ConfigError(f"--resume: {path} does not exist")
            ckpt = load_checkpoint(path)
            diff = [k for k in (*MODEL_KEYS, "optimizer") if ckpt["config"].get(k) != cfg.get(k)]
            if diff:
                raise ConfigError(f"--resume: the config differs from the checkpoint's in {diff}")
            cfg = {**cfg, "classes": ckpt["config"].get("classes")}
        set_seed(cfg["seed"])
        self.train_loader, self.valid_loader, classes = build_loaders(cfg, self.rank, self.world)
        num_classes = 1 if cfg["mode"] == "grid" else len(classes)
        self.cfg = {**cfg, "classes": classes, "num_classes": num_classes, "crfcore_version": __version__}
        self.num_classes = num_classes
        model = CRFNet(model_config(cfg, num_classes))
        if cfg["pretrained"] and ckpt is None:
            load_pretrained_backbone(model, cfg["pretrained"])
        if cfg["init_from"] and ckpt is None:
            new = init_from_checkpoint(model, cfg["init_from"])
            self.log(f"fine-tuning from {cfg['init_from']}; new weights: {', '.join(new) or 'none'}")
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.opt, self.sched = make_optimizer(cfg, self.model)
        self.loss = loss_fn(cfg, num_classes, self.device)
        self.amp, self.precision = autocast_for(self.device, cfg["precision"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.epoch, self.step, self.best = 0, 0, None
        if ckpt is not None:
            self.model.load_state_dict(ckpt["state_dict"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            self.epoch, self.step, self.best = ckpt["epoch"], ckpt["step"], ckpt["best"]
            set_rng_state(ckpt["rng"])
            self.log(f"resuming after epoch {self.epoch} (step {self.step})")
            if cfg["lr"] != ckpt["config"]["lr"]:  # an explicit new lr (e.g. lower) applies from here
                for group in self.opt.param_groups:
                    group["lr"] = cfg["lr"]
                self.sched.base_lrs = [cfg["lr"]] * len(self.opt.param_groups)
                self.log(f"learning rate set to {cfg['lr']} (was {ckpt['config']['lr']})")
        self.net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, text: str) -> None:
        if self.main and not self.quiet:
            tqdm.write(text)

    def train_epoch(self) -> dict:
        self.net.train()
        self.train_loader.batch_sampler.epoch = self.epoch
        total, n, correct = 0.0, 0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.cfg['epochs']}",
                   disable=self.quiet or not self.main, leave=False)
        for x, y in bar:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self.amp:
                out = self.net(x)
            o, t = flat(out, y, self.num_classes)
            loss = self.loss(o, t)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss is {loss.item()} at epoch {self.epoch + 1}, step {self.step + 1}; "
                                    f"stopped, {self.save_dir / 'train.ckpt'} keeps the last good epoch "
                                    "(lower lr?)")
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.step += 1
            total += loss.item() * len(t)
            n += len(t)
            pred = (o > 0).long() if self.num_classes == 1 else o.argmax(-1)
            correct += int((pred == t.long()).sum())
            bar.set_postfix(loss=f"{total / n:.4f}")
        self.sched.step()
        return {"train_loss": total / max(n, 1), "train_acc": correct / max(n, 1)}

    def validate(self) -> dict:
        if self.valid_loader is None:
            return {}
        y, p, loss = predict(self.model, self.valid_loader, self.device, self.cfg["precision"],
                             self.num_classes, self.loss, self.quiet)
        m = patch_metrics(y, p)
        out = {"valid_loss": loss, "valid_acc": m["acc"], "valid_balanced_acc": m["balanced_acc"],
               "valid_auc": m["auc"]}
        names = self.cfg["classes"]
        for k, name in enumerate(names):
            if f"acc_class{k}" in m:
                out[f"valid_acc_{name}"] = m[f"acc_class{k}"]
        return out

    def fit(self) -> dict:
        row: dict = {}
        while self.epoch < self.cfg["epochs"]:
            t0 = time.perf_counter()
            row = {"epoch": self.epoch + 1, **self.train_epoch()}
            if self.world > 1:
                torch.distributed.barrier()
            if self.main:
                row.update(self.validate())
                row.update(step=self.step, lr=self.opt.param_groups[0]["lr"],
                           seconds=round(time.perf_counter() - t0, 2))
                self.epoch += 1
                self.save(row)
            else:
                self.epoch += 1
            if self.world > 1:
                torch.distributed.barrier()
        return row

    def save(self, row: dict) -> None:
        metric = self.cfg["best_metric"]
        value = row.get(f"valid_{metric}", row["train_loss"] if metric == "loss" else row["train_acc"])
        is_best = better(metric, value, self.best)
        if is_best:
            self.best = value
        extra = dict(epoch=self.epoch, step=self.step, best=self.best, best_metric=metric,
                     optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(), rng=rng_state())
        save_checkpoint(self.save_dir / "train.ckpt", self.model, self.cfg, **extra)
        if is_best:
            save_checkpoint(self.save_dir / "best.ckpt", self.model, self.cfg, epoch=self.epoch,
                            step=self.step, best=self.best, best_metric=metric)
        append_log(self.save_dir / "log.csv", row)
        plot_curves(self.save_dir / "log.csv", self.save_dir / "curves.png")
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        self.log(shown + ("  (best)" if is_best else ""))

    def report(self) -> str | None:
        """Classification report + confusion matrix of best.ckpt on the validation set."""
        if self.valid_loader is None or not self.main:
            return None
        best = self.save_dir / "best.ckpt"
        if best.exists():
            self.model.load_state_dict(load_checkpoint(best)["state_dict"])
        y, p, _ = predict(self.model, self.valid_loader, self.device, self.cfg["precision"],
                          self.num_classes, quiet=self.quiet)
        text = patch_report(y, p, self.cfg["classes"], self.save_dir / "confusion_matrix.png",
                            "validation set, best.ckpt")
        (self.save_dir / "report.txt").write_text(text + "\n")
        return text

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def append_log(path: Path, row: dict) -> None:
    """Append `row` to log.csv, rewriting it atomically (new columns extend the header)."""
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    rows = [r for r in rows if int(r["epoch"]) < row["epoch"]] + [row]  # a resumed epoch replaces
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_curves(log_csv: Path, png: Path) -> None:
    """Loss and validation metrics per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(log_csv.open()))
    ep = [int(r["epoch"]) for r in rows]

    def col(k):
        return [float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows]

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for k in ("train_loss", "valid_loss"):
        if k in rows[0]:
            a.plot(ep, col(k), marker="o", label=k)
    for k in ("train_acc", "valid_acc", "valid_balanced_acc", "valid_auc"):
        if k in rows[0]:
            b.plot(ep, col(k), marker="o", label=k)
    a.set(xlabel="epoch", title="loss")
    b.set(xlabel="epoch", title="metrics", ylim=(0, 1.02))
    a.legend(), b.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def write_config(cfg: dict, save_dir: Path) -> None:
    atomic_write_json(save_dir / "config.json", cfg)


def evaluate_folder(ckpt_path: str | Path, data_dir: str | Path, out_dir: str | Path | None = None,
                    batch_size: int = 64, workers: int = 2, device: str = "auto",
                    json_dir: str | Path | None = None, quiet: bool = False) -> str:
    """Report of a checkpoint on any data folder: class sub-folders (classify) or a
    list.txt grid folder with `json_dir` (grid). Writes confusion_matrix.png to `out_dir`."""
    from .model import model_from_checkpoint

    dev = resolve_device(device)
    model, ckpt = model_from_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    if cfg["mode"] == "classify":
        ds = FolderDataset(data_dir, cfg["patch_size"], None, cfg["classes"])
    else:
        if json_dir is None:
            raise ConfigError("a grid-mode checkpoint needs --json DIR with the slides' annotations")
        ds = GridDataset(data_dir, json_dir, cfg["image_size"], cfg["patch_size"], cfg["crop_size"])
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    model = model.to(dev, memory_format=torch.channels_last)
    y, p, _ = predict(model, loader, dev, cfg.get("precision", "auto"), model.cfg.num_classes, quiet=quiet)
    out = Path(out_dir) if out_dir else Path(data_dir)
    return patch_report(y, p, cfg["classes"], out / "confusion_matrix.png", f"{Path(ckpt_path).name} on {data_dir}")


