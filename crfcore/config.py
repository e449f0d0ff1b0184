"""The training config: one typed, frozen table of keys, their defaults and their help.

`load_config` builds it from defaults <- a config JSON <- `key=value` overrides, refusing
unknown keys and wrong types by name; `TrainConfig.check` refuses combinations that cannot
train. The README's config table is `markdown_table()` (a test keeps them equal).
Checkpoints store `TrainConfig.to_dict()`.
"""
from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

from .cli import INT_MAX, within
from .errors import CrfError
from .io import read_json

CHOICES = {"mode": ("grid", "classify"), "optimizer": ("sgd", "adamw"),
           "schedule": ("none", "cosine", "step"), "device": ("auto", "cpu", "cuda"),
           "precision": ("auto", "fp32", "bf16", "fp16"),
           "best_metric": ("auc", "balanced_acc", "acc", "loss", "total_loss")}


class ConfigError(CrfError):
    """A config file or --set value that is unknown or invalid; the message names it."""


def key(default: Any, help: str) -> Any:  # noqa: A002 - the word the table uses
    """A config field with its help text (tuples are immutable, so safe as defaults)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    mode: str = key("grid", "`grid`: WSI patch grids, labels from the slides' annotations; `classify`: image folders")
    data_path_tumor_train: Optional[str] = key(None, "grid: tumour training set folder (list.txt + N.png)")
    data_path_normal_train: Optional[str] = key(None, "grid: normal training set folder")
    json_path_train: Optional[str] = key(None, "grid: folder of annotations (NCRF JSON, XML, GeoJSON or txt), one per training slide")
    data_path_tumor_valid: Optional[str] = key(None, "grid: tumour validation set folder")
    data_path_normal_valid: Optional[str] = key(None, "grid: normal validation set folder")
    json_path_valid: Optional[str] = key(None, "grid: folder of the validation slides' annotations")
    data_path_train: Optional[str] = key(
        None, "a single training folder (grid: list.txt folder; classify: class sub-folders)")
    data_path_valid: Optional[str] = key(None, "a single validation folder")
    image_size: int = key(768, "grid: side of a training image (grid of patches), pixels")
    patch_size: int = key(256, "grid: side of one cell; classify: images are resized to this")
    crop_size: int = key(224, "grid: centre crop of each cell fed to the CNN; classify: unused")
    mpp: Optional[float] = key(None, "microns per pixel the patches were cut at (Patch_gen.py --mpp; the data "
                                     "folders' sides.txt places their labels); prob_map.py reads its crops at it; "
                                     "null: level 0 of every slide, as NCRF")
    grid: int = key(3, "CRF grid side (1 = plain CNN baseline, 3, 5, 7); grid mode needs "
                       "image_size/patch_size = grid or grid 1")
    crf_iters: int = key(10, "mean-field iterations")
    width_mult: float = key(1.0, "MobileNetV2 width multiplier")
    pretrained: Optional[str] = key(None, "local torchvision MobileNetV2 ImageNet state dict (nothing is downloaded)")
    init_from: Optional[str] = key(None, "checkpoint to fine-tune from (weights whose shapes fit; new head otherwise)")
    dense_consistency: float = key(0.0, "grid: weight of a loss that trains the model for prob_map.py "
                                        "--method dense (its window outputs must match the crops'), fine-tuning "
                                        "init_from with batch norm frozen; 0 = off")
    optimizer: str = key("sgd", "`sgd` (momentum, as NCRF) or `adamw`")
    lr: float = key(0.001, "learning rate")
    momentum: float = key(0.9, "SGD momentum")
    weight_decay: float = key(0.0001, "weight decay")
    schedule: str = key("none", "learning-rate schedule per epoch: `none`, `cosine` or `step`")
    step_size: int = key(10, "`step` schedule: epochs between decays")
    gamma: float = key(0.1, "`step` schedule: decay factor")
    epochs: int = key(20, "training epochs")
    max_steps: Optional[int] = key(None, "cap on training steps per epoch (quick runs)")
    batch_size: int = key(10, "samples per batch (grid with a tumour and a normal set: "
                              "batch_size // 2 of each, at least 1)")
    class_weights: Optional[tuple[float, ...]] = key(None, "loss weight per class, e.g. [1.0, 3.0] "
                                                           "(grid: [normal, tumour])")
    color_jitter: Optional[tuple[float, ...]] = key(
        (0.25, 0.75, 0.25, 0.04), "ColorJitter brightness, contrast, saturation, hue (NCRF's); null for none")
    hed_jitter: float = key(0.0, "stain augmentation (Tellez et al. 2018): each of H, E, D scaled by "
                                 "U(1-s, 1+s) and shifted by U(-s, s); 0 = off, 0.05 light, 0.2 strong")
    stain_norm: Optional[str] = key(None, "reference image for Macenko stain normalisation (torchstain) of "
                                          "every patch, in training and in prob_map.py; null = off")
    flip: bool = key(True, "random horizontal flips (joint with the label grid)")
    rotate: bool = key(True, "random 90-degree rotations (joint with the label grid)")
    workers: int = key(2, "DataLoader worker processes")
    seed: int = key(0, "random seed (data order, augmentation, initialisation)")
    device: str = key("auto", "`auto` (CUDA when present), `cpu`, `cuda`")
    precision: str = key("auto", "`auto` (CUDA: bf16/fp16 mixed precision; CPU: fp32), `fp32`, `bf16`, `fp16`")
    best_metric: str = key("auc", "validation metric that picks best.ckpt: auc, balanced_acc, acc, loss, or "
                                  "total_loss (with dense_consistency: loss + dense_consistency * the dense gap)")
    # Set by train.py, stored in checkpoints; not for config files.
    classes: Optional[tuple[str, ...]] = key(None, "set by train.py: the class names")
    num_classes: Optional[int] = key(None, "set by train.py: 1 (grid mode) or the number of classes")
    stain_reference: Optional[dict] = key(None, "set by train.py: the fitted stain_norm reference")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # JSON arrays become tuples: the config stays immutable
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if isinstance(value, int) and not isinstance(value, bool) and hints[f.name] in (float, Optional[float]):
                object.__setattr__(self, f.name, float(value))
            _check_type(f.name, value, hints[f.name])

    def check(self) -> "TrainConfig":
        """Refuse values and combinations that cannot train; return self."""
        self.check_values()
        self._check_mode()
        return self

    def check_model_values(self) -> "TrainConfig":
        """Refuse values of the keys a model is built from that no training run writes
        (what a checkpoint's config must pass; its training-only keys are not its user's
        business); return self."""
        if self.mode not in CHOICES["mode"]:
            raise ConfigError(f"config mode={self.mode!r}: expected one of {', '.join(CHOICES['mode'])}")
        for name in MODEL_KEYS:
            self._check_range(name)
        if self.mode == "grid" and self.crop_size > self.patch_size:
            raise ConfigError("crop_size must not exceed patch_size")
        return self

    def check_values(self) -> "TrainConfig":
        """Refuse values that cannot train, whatever the data; return self."""
        self.check_model_values()
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config {name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        for name in (n for n in RANGES if n not in MODEL_KEYS):  # the model's were checked above
            self._check_range(name)
        for name, values, bounds in (("class_weights", self.class_weights, (0, None, False)),
                                     ("color_jitter", (self.color_jitter or ())[:3], (0, None, False)),
                                     ("color_jitter", (self.color_jitter or ())[3:], (0, 0.5, False))):
            if not all(_in_range(v, *bounds) for v in values or ()):
                raise ConfigError(f"config {name}={getattr(self, name)!r}: expected numbers {_range_text(*bounds)}")
        if self.class_weights is not None and not any(self.class_weights):
            raise ConfigError(f"config class_weights={self.class_weights!r}: expected some weight above 0")
        if self.color_jitter is not None and len(self.color_jitter) != 4:
            raise ConfigError(f"config color_jitter={self.color_jitter!r}: expected 4 numbers (brightness, "
                              "contrast, saturation, hue) or null")
        if self.dense_consistency and self.mode != "grid":
            raise ConfigError("config dense_consistency: grid mode only (classify images have no context)")
        if self.best_metric == "total_loss" and not self.dense_consistency:
            raise ConfigError("config best_metric total_loss is loss + dense_consistency * the dense gap: it needs "
                              "dense_consistency above 0 (else use loss)")
        return self

    def _check_range(self, name: str) -> None:
        value = getattr(self, name)
        if value is not None and not _in_range(value, *RANGES[name]):
            raise ConfigError(f"config {name}={value!r}: expected {_range_text(*RANGES[name])}")

    def _check_mode(self) -> None:
        if self.dense_consistency and not (self.init_from or self.pretrained):
            raise ConfigError("config dense_consistency fine-tunes a trained model (its batch norm is frozen): "
                              "set init_from (or pretrained)")
        if self.mode == "classify":
            if not self.data_path_train:
                raise ConfigError("classify mode needs data_path_train (a folder of class sub-folders)")
            if self.grid != 1:
                raise ConfigError("classify mode has no CRF: set grid to 1")
            return
        cells = self.image_size // self.patch_size
        if self.grid not in GRIDS:  # the CRF's grids: refused here, before any data is read
            raise ConfigError(f"config grid={self.grid}: expected one of {', '.join(map(str, GRIDS))}")
        if self.image_size % self.patch_size or self.grid not in (1, cells):
            raise ConfigError(f"image_size {self.image_size} / patch_size {self.patch_size} must be "
                              f"a whole grid, and grid ({self.grid}) that number or 1")
        for split in ("train", "valid"):
            pair = [k for k in (f"data_path_tumor_{split}", f"data_path_normal_{split}") if getattr(self, k)]
            if pair and getattr(self, f"data_path_{split}"):
                raise ConfigError(f"config data_path_{split} and {' + '.join(pair)}: set one or the other "
                                  "(a single folder, or the tumour and normal folders)")
        if not (self.data_path_tumor_train and self.data_path_normal_train) and not self.data_path_train:
            raise ConfigError("grid mode needs data_path_tumor_train + data_path_normal_train "
                              "(or data_path_train) and json_path_train")
        if not self.json_path_train:
            raise ConfigError("grid mode needs json_path_train (a folder of the slides' annotations)")

    def to_dict(self) -> dict:
        """Plain JSON-able values (tuples as lists), for config.json and checkpoints."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config stored by a checkpoint (keys of older versions that are gone are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)


INTERNAL = ("classes", "num_classes", "stain_reference")
GRIDS = (1, 3, 5, 7)  # the CRF's grid sizes (1: the plain CNN)
# The numeric keys a checkpoint's model and maps are built from.
MODEL_KEYS = ("grid", "crf_iters", "width_mult", "image_size", "patch_size", "crop_size", "mpp")
# Each numeric key's range: (least, most or None, whether `least` itself is refused).
RANGES: dict[str, tuple[float, float | None, bool]] = {
    "image_size": (1, 2**16, False), "patch_size": (1, 2**16, False), "crop_size": (1, 2**16, False),
    "grid": (1, 7, False), "crf_iters": (0, 1000, False), "width_mult": (0, 4, True),
    "epochs": (1, INT_MAX, False), "max_steps": (1, INT_MAX, False), "batch_size": (1, INT_MAX, False),
    "step_size": (1, INT_MAX, False), "workers": (0, 1024, False), "seed": (0, 2**32 - 1, False),
    "lr": (0, 10, True), "momentum": (0, 1, False), "weight_decay": (0, 10, False), "gamma": (0, 10, True),
    "mpp": (0, 1000, True), "dense_consistency": (0, None, False), "hed_jitter": (0, 0.999, False),
}


def _in_range(value: Any, least: float, most: float | None, open_least: bool) -> bool:
    """Whether the number `value` lies in a RANGES range."""
    return within(value, None if open_least else least, most, least if open_least else None)


def _range_text(least: float, most: float | None, open_least: bool) -> str:
    low = f"{'above' if open_least else 'at least'} {least:g}"
    return low if most is None else f"{low} and at most {most:g}"


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Refuse a value whose JSON type does not fit the field's annotation (bools are not numbers)."""
    if not _fits(value, hint):
        raise ConfigError(f"config {name}={value!r}: expected {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    """`float`, `float or null`, `tuple of float`: a field's annotation as a user reads it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_type_name(args[0])}"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(v, args[0]) for v in value)
    return isinstance(value, origin or hint)


def parse_value(text: str) -> Any:
    """A `--set` value: JSON when it parses (numbers, null, lists), else the plain string."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON (or a number of more digits than Python converts)
        return text


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Defaults <- config JSON <- `key=value` overrides; unknown keys are refused by name.
    The keys train.py sets (`INTERNAL`) are dropped from a file (a run's config.json holds
    them) and refused in overrides."""
    in_file: dict = _read_json(Path(path)) if path is not None else {}
    for name in (*INTERNAL, "crfcore_version"):  # a run's config.json holds them (older ones the version)
        in_file.pop(name, None)
    given, set_keys = dict(in_file), set()
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        if name in INTERNAL:
            raise ConfigError(f"--set {name}: set by train.py from the data, not a config key")
        given[name] = parse_value(value)
        set_keys.add(name)
    known = [f.name for f in fields(TrainConfig)]
    for where, keys in ((path, in_file), ("--set", set_keys)):
        unknown = sorted(set(keys) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown config key(s) {unknown}; known keys: "
                              f"{', '.join(k for k in known if k not in INTERNAL)}")
    try:
        return TrainConfig(**given).check()
    except ConfigError as err:
        raise ConfigError(f"{_culprit(path, in_file, set_keys, err)}: {err}") from None


def _culprit(path: str | Path | None, in_file: dict, set_keys: set[str], err: ConfigError) -> str | Path:
    """Where a refused config came from: the file when its keys alone are refused the
    same way, or when the refusal names no key given with --set; else --set."""
    if path is None:
        return "--set"
    try:
        TrainConfig(**in_file).check()
    except ConfigError as alone:
        if str(alone) == str(err):
            return path
    named = any(re.search(rf"\b{re.escape(k)}\b", str(err)) for k in set_keys)
    return "--set" if named else path


def _read_json(path: Path) -> dict:
    data = read_json(path, "config file", ConfigError, unique_keys=True)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of config keys")
    return data


def markdown_table() -> str:
    """The README's table of config keys, defaults and meanings."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in fields(TrainConfig):
        if f.name not in INTERNAL:
            default = json.dumps(list(f.default) if isinstance(f.default, tuple) else f.default)
            rows.append(f"| `{f.name}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)
