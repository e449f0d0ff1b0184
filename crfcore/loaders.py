"""Training data for train.py: the data sets a config names, with augmentation and stain
normalisation, and loaders whose batches are half tumour, half normal (NCRF's sampling)
and shared out between torchrun ranks."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler

from .config import TrainConfig
from .datasets import Augment, DataError, FolderDataset, GridDataset
from .device import DistEnv, fork_safe_opencv
from .stain import HEDJitter, MacenkoNormaliser


def augment_for(cfg: TrainConfig) -> Augment:
    return Augment(cfg.color_jitter, cfg.flip, cfg.rotate, HEDJitter(cfg.hed_jitter) if cfg.hed_jitter else None)


def stain_normaliser(cfg: TrainConfig) -> MacenkoNormaliser | None:
    """The Macenko normaliser of a config: the stored reference, else fitted on `stain_norm`."""
    if cfg.stain_reference:
        return MacenkoNormaliser.from_dict(cfg.stain_reference)
    return MacenkoNormaliser.fit(cfg.stain_norm) if cfg.stain_norm else None


def grid_sets(cfg: TrainConfig, split: str, augment: Augment | None,
              normalise: MacenkoNormaliser | None) -> list[GridDataset]:
    """The tumour and normal sets (or the single set) of `split`; items carry the whole
    image too when the dense-consistency loss is on (validation measures the gap too)."""
    context = cfg.dense_consistency > 0
    js = getattr(cfg, f"json_path_{split}") or cfg.json_path_train
    return [GridDataset(p, js, cfg.image_size, cfg.patch_size, cfg.crop_size, augment, normalise, context,
                        mpp_set=cfg.mpp is not None) for p in grid_folders(cfg, split)]


def grid_folders(cfg: TrainConfig, split: str) -> list[str]:
    """The coord_list_gen.py folders of `split`: tumour and normal, or the single one."""
    return [getattr(cfg, k) for k in folder_keys(cfg, split)]


def folder_keys(cfg: TrainConfig, split: str) -> list[str]:
    """The config keys of the folders `split` reads: tumour and normal (grid mode), or the
    single one; only those set."""
    pair = [f"data_path_tumor_{split}", f"data_path_normal_{split}"] if cfg.mode == "grid" else []
    return [k for k in pair if getattr(cfg, k)] or [k for k in [f"data_path_{split}"] if getattr(cfg, k)]


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
            batches = [order[i:i + self.batch].tolist() for i in range(0, len(order), self.batch)]
            if len(batches) > 1 and len(batches[-1]) == 1:  # batch norm cannot train on one image of 1x1 features
                last = batches.pop()
                batches[-1] += last
            return batches
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

    @property
    def largest(self) -> int:
        """The most samples a batch holds (what a training step must fit in memory)."""
        return self.largest_for(self.batch)

    def largest_for(self, batch: int) -> int:
        """The most samples a batch would hold with `batch_size` `batch`, as `_all` cuts
        them: half of each of two sets (at least one each), or one set's batches with a
        last batch of one joined to the one before."""
        if len(self.sizes) == 2:
            return 2 * max(1, batch // 2)
        n = self.sizes[0]
        last = n % batch or batch
        return batch + 1 if n > batch and last == 1 else min(batch, n)

    def batch_size_within(self, samples: int) -> int:
        """The largest `batch_size` whose batches hold at most `samples` (0: none does)."""
        return next((b for b in range(samples, 0, -1) if self.largest_for(b) <= samples), 0)

    def __len__(self) -> int:
        return len(self._mine())


def collate(items):
    """Stacked inputs (each part of a tuple input on its own) and targets."""
    xs, ys = zip(*items)
    x = tuple(map(torch.stack, zip(*xs))) if isinstance(xs[0], tuple) else torch.stack(xs)
    return x, torch.as_tensor(np.stack([np.asarray(y) for y in ys]))


def check_classes(ds: FolderDataset, what: str, least: int) -> None:
    """Refuse a classify set with fewer than `least` classes, or a class without images."""
    counts = np.bincount([k for _, k in ds.items], minlength=len(ds.classes))
    empty = [c for c, n in zip(ds.classes, counts) if not n]
    if empty:
        raise DataError(f"{ds.root}: the {what} has no images of class(es) {empty}")
    if len(ds.classes) < least:
        raise DataError(f"{ds.root}: the {what} has {len(ds.classes)} class sub-folder(s) {ds.classes}; "
                        f"a classifier needs at least {least}")


def check_folders(cfg: TrainConfig) -> None:
    """Refuse one folder given as two sets: as tumour and normal set of a split (a set of
    both labels at once), or as a training and a validation set (validation scores, and
    so best.ckpt, would be measured on training data)."""
    keys = [k for split in ("train", "valid") for k in folder_keys(cfg, split)]
    given = [(k, Path(getattr(cfg, k)).resolve()) for k in keys]
    for i, (key, path) in enumerate(given):
        other = next((k for k, p in given[:i] if p == path), None)
        if other is not None:
            raise DataError(f"{getattr(cfg, key)}: config {other} and {key} are the same folder; "
                            "each set needs a folder of its own")


def build_loaders(cfg: TrainConfig, env: DistEnv = DistEnv(), norm: MacenkoNormaliser | None = None):
    """Training loader (balanced batches), validation loader (None without a valid set)
    and the class names; `norm` stain-normalises every image."""
    check_folders(cfg)
    if cfg.mode == "grid":
        train_sets = grid_sets(cfg, "train", augment_for(cfg), norm)
        if not any(s.labels.any() for s in train_sets):  # a detector of tumour with no tumour to learn from
            raise DataError(f"{', '.join(grid_folders(cfg, 'train'))}: no cell of the training set is tumour by the "
                            f"annotations in {cfg.json_path_train} (the wrong json_path_train?)")
        valid_sets = grid_sets(cfg, "valid", None, norm)  # none when no validation folder is set
        classes = ["normal", "tumor"]
    else:
        train = FolderDataset(cfg.data_path_train, cfg.patch_size, augment_for(cfg), cfg.classes, norm)
        classes = train.classes
        check_classes(train, "training set", least=2)
        train_sets = [train]
        valid_sets = ([FolderDataset(cfg.data_path_valid, cfg.patch_size, None, classes, norm)]
                      if cfg.data_path_valid else [])
        if valid_sets and cfg.best_metric == "auc":  # a class without images has no AUC: no epoch would be best
            check_classes(valid_sets[0], "validation set (best_metric auc)", least=len(classes))
    sizes = [len(s) for s in train_sets]
    half = cfg.batch_size // 2
    if len(sizes) == 2 and half > max(sizes):  # each batch would repeat both sets, all in memory at once
        raise DataError(f"config batch_size {cfg.batch_size} takes {half} samples of each set per step, more than "
                        f"the larger set's {max(sizes)}: lower batch_size")
    sampler = BalancedBatches(sizes, cfg.batch_size, cfg.seed, env.rank, env.world, cfg.max_steps)
    kw = dict(num_workers=fork_safe_opencv(cfg.workers), collate_fn=collate, persistent_workers=False,
              pin_memory=torch.cuda.is_available())
    train_loader = DataLoader(ConcatDataset(train_sets), batch_sampler=sampler, **kw)
    valid_loader = (DataLoader(ConcatDataset(valid_sets), batch_size=cfg.batch_size, shuffle=False, **kw)
                    if valid_sets else None)
    return train_loader, valid_loader, classes
