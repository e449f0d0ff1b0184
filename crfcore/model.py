"""MobileNetV2 (torchvision) backbone + linear logit head + CRF; checkpoints.

Input `[B, N, 3, H, W]` (N = grid*grid patches, row-major); output `[B, N]` logits (one
tumour logit per patch) or `[B, N, C]` for a C-class patch classifier (grid 1).
"""
from __future__ import annotations

import copy
import pickle
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from . import __version__
from .config import GRIDS, TrainConfig
from .crf import CRF
from .errors import CrfError, OutputError
from .io import atomic_path
from .layers import fuse_conv_relu6, merge_after_conv, phased_strided_depthwise, relu6_from_output
from .stain import stain_arrays

class CheckpointError(CrfError):
    """A checkpoint that cannot be read or does not fit the model asked for."""


@dataclass(frozen=True)
class ModelConfig:
    grid: int = 3          # CRF grid side; 1 = plain CNN, no CRF
    crf_iters: int = 10
    width_mult: float = 1.0
    num_classes: int = 1   # 1: one tumour logit per patch; C >= 2: softmax classes

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise CheckpointError(f"grid must be one of {GRIDS}, got {self.grid}")
        if self.num_classes > 1 and self.grid != 1:
            raise CheckpointError("a multi-class classifier has no CRF: use grid 1")
        if self.num_classes < 1 or self.crf_iters < 0 or self.width_mult <= 0:
            raise CheckpointError(f"bad model config {self}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class CRFNet(nn.Module):
    """MobileNetV2 features -> pooled feature (1280-d at width 1) -> logit head -> CRF."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        backbone = torchvision.models.mobilenet_v2(weights=None, width_mult=cfg.width_mult)
        self.features = relu6_from_output(phased_strided_depthwise(backbone.features))
        self.feature_dim = backbone.last_channel
        self.fc = nn.Linear(self.feature_dim, cfg.num_classes)
        self.crf = CRF(cfg.grid * cfg.grid, cfg.crf_iters) if cfg.grid > 1 else None

    def embed(self, x: torch.Tensor, first_block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches `[M, 3, H, W]` -> logits `[M]` (or `[M, C]`) and pooled features `[M, D]`;
        from `first_block` on, `x` is what the blocks before it gave (crfcore.shared_stem)."""
        body = self.features[first_block:] if first_block else self.features
        feats = nn.functional.adaptive_avg_pool2d(body(x), 1).flatten(1)
        logits = self.fc(feats)
        return (logits.squeeze(1) if self.cfg.num_classes == 1 else logits), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[:2]
        logits, feats = self.embed(x.flatten(0, 1))
        return self.join(logits, feats, b, n)

    def join(self, logits: torch.Tensor, feats: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """`embed`'s outputs of `b` samples of `n` patches -> the model's output (the CRF's
        when grid > 1)."""
        logits = logits.reshape(b, n, *logits.shape[1:])
        if self.crf is None:
            return logits
        if n != self.crf.W.shape[0]:
            raise ValueError(f"input has {n} patches per sample, the CRF expects {self.crf.W.shape[0]}")
        return self.crf(logits, feats.reshape(b, n, -1))


def fold_batch_norm(model: CRFNet) -> CRFNet:
    """An inference copy of `model` (eval mode) with every batch norm folded into the
    convolution before it (torch's `fuse_conv_bn_eval`). Outputs agree to about 1e-6;
    the CNN runs about 1.3x faster on the CPU, where eager batch norm is a pass of its own
    over every activation (bench/cpu_settings.py). The model itself is left untouched."""
    model = copy.deepcopy(model).eval()
    merge_after_conv(model, nn.BatchNorm2d, fuse_conv_bn_eval)
    return model


def inference_copy(model: CRFNet) -> CRFNet:
    """The copy every map and prediction runs: batch norm folded (`fold_batch_norm`), then
    each convolution + ReLU6 fused (`fuse_conv_relu6`). The model itself is left untouched."""
    return fuse_conv_relu6(fold_batch_norm(model))


def load_pretrained_backbone(model: CRFNet, path: str | Path) -> None:
    """Load ImageNet weights from a local torchvision MobileNetV2 state dict (the
    `features.*` entries; the classifier is ignored: the head is always new)."""
    state = load_weights_file(path, "pretrained weights file")
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    feats = {k[len("features."):]: v for k, v in state.items() if isinstance(k, str) and k.startswith("features.")}
    if not feats:
        raise CheckpointError(f"{path}: no 'features.*' weights: not a torchvision MobileNetV2 state dict")
    try:
        model.features.load_state_dict(feats)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit this backbone (width_mult "
                              f"{model.cfg.width_mult}?): {str(err).splitlines()[0]}") from None


LEGACY_TORCH_FILE = b"\x80\x02\x8a\x0a"  # pickle protocol 2, then torch's 10-byte magic number


def load_weights_file(path: str | Path, what: str = "checkpoint", map_location: str | torch.device = "cpu"):
    """What a `torch.save` file holds, loaded safely (`weights_only`); every way it can be
    wrong is a `CheckpointError` naming the file."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: is a folder, not a {what} file" if Path(path).is_dir()
                              else f"{path}: no such {what}")
    with open(path, "rb") as fh:
        head = fh.read(4)
    # torch.save writes a zip archive (directory at the end), or before torch 1.6 a pickle
    # starting with its magic number, which torch still reads
    if not zipfile.is_zipfile(path) and head != LEGACY_TORCH_FILE:
        truncated = head == b"PK\x03\x04"
        raise CheckpointError(f"{path}: truncated or corrupt {what} (an interrupted copy?)" if truncated
                              else f"{path}: not a {what} (not a file written by torch.save)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: not a {what} of crfcore (it holds objects other than weights)") from None
    except Exception as err:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a readable {what} ({str(err).splitlines()[0]})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint dict (safe `weights_only` loading)."""
    ckpt = load_weights_file(path, "checkpoint", map_location)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("state_dict"), dict)
            and all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())):
        raise CheckpointError(f"{path}: not a crfcore checkpoint (no state_dict of weights and config)")
    try:  # a config no training run could have written (a hand-edited or foreign file)
        TrainConfig.from_dict(ckpt["config"]).check_model_values()
        if ckpt["config"].get("stain_reference"):
            stain_arrays(ckpt["config"]["stain_reference"])
    except CrfError as err:
        raise CheckpointError(f"{path}: {err}") from None
    weights = ckpt["state_dict"].items()
    broken = next((k for k, v in weights if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:
        raise CheckpointError(f"{path}: weight {broken} is NaN or infinite (a diverged training run?)")
    return ckpt


def model_from_checkpoint(path: str | Path, expect: dict | None = None,
                          map_location: str | torch.device = "cpu", needs: tuple[str, ...] = ()) -> tuple[CRFNet, dict]:
    """Build the model a checkpoint describes and load its weights. `expect`: config
    values the caller needs; a differing one is refused by name. `needs`: config keys
    that must be there."""
    ckpt = load_checkpoint(path, map_location)
    cfg = ckpt["config"]
    for key, want in (expect or {}).items():
        if cfg.get(key) != want:
            raise CheckpointError(f"{path}: checkpoint has {key}={cfg.get(key)!r}, expected {want!r}")
    missing = [k for k in needs if cfg.get(k) is None]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint's config has no {', '.join(missing)}")
    try:
        model = CRFNet(ModelConfig.from_dict(cfg))
    except CheckpointError as err:  # a config value out of range: name the file
        raise CheckpointError(f"{path}: {err}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit its own config ({str(err).splitlines()[0]})") from None
    return model, ckpt


def init_from_checkpoint(model: CRFNet, path: str | Path) -> list[str]:
    """Fine-tuning: copy every weight of the checkpoint whose name and shape fit `model`
    (e.g. all but the head when the class count differs); return the names left new.
    The whole backbone must fit: fine-tuning from another backbone is refused."""
    state = load_checkpoint(path)["state_dict"]
    own = model.state_dict()
    fit = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    backbone = [k for k in own if k.startswith("features.")]
    misfit = [k for k in backbone if k not in fit]
    if misfit:  # some of a wider or narrower backbone fit by chance (its last layer is 1,280 wide at any width)
        raise CheckpointError(f"{path}: {len(misfit)} of this model's {len(backbone)} backbone weights are "
                              f"missing from it or of another shape (first: {misfit[0]}); a different width_mult?")
    model.load_state_dict(fit, strict=False)
    return sorted(set(own) - set(fit))


def save_checkpoint(path: str | Path, model: nn.Module, config: dict, **extra) -> None:
    """Atomically write `{state_dict, config, crfcore_version, **extra}`."""
    net = model.module if hasattr(model, "module") else model
    with atomic_path(path, ".ckpt") as tmp:
        try:
            torch.save({"state_dict": net.state_dict(), "config": config,
                        "crfcore_version": __version__, **extra}, tmp)
        except RuntimeError as err:  # torch's zip writer reports a full disk this way
            raise OutputError(f"{path}: cannot write the checkpoint ({str(err).splitlines()[0]})") from None


