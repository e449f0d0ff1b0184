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
from typing import Callable, Sequence

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from . import __version__
from .config import GRIDS, TrainConfig
from .crf import CRF
from .errors import CrfError, OutputError
from .io import atomic_path
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


class StridedDepthwiseConv2d(nn.Conv2d):
    """A 3x3, stride-2, padding-1 depthwise convolution whose input gradient, under CPU
    autocast, is four stride-1 depthwise convolutions (`phased_input_grad`). oneDNN's
    own bf16 input gradient for it is 5-45x slower than its fp32 one (batch 32: 109 ms
    against 22 ms for MobileNetV2's first, 40 against 0.9 ms for its last, on a CPU with
    AMX; 75 against 6 ms for the first without AMX), while its bf16 forward pass and
    weight gradient are fast: MobileNetV2's four of them took 40 % of a bf16 training
    step. Without autocast or gradients it is a plain convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")):
            return super().forward(x)
        dtype = torch.get_autocast_dtype("cpu")  # as autocast casts a convolution's fp32 inputs
        y = PhasedInputGradConv.apply(x.to(dtype), self.weight.to(dtype), self)
        return y if self.bias is None else y + self.bias.to(dtype)[:, None, None]


class PhasedInputGradConv(torch.autograd.Function):
    """`conv`'s convolution of `x` by `weight` in their dtype, whose backward pass computes
    the weight gradient as usual and the input gradient by `phased_input_grad`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        return conv._conv_forward(x, weight, None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        c = ctx.conv
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = phased_input_grad(grad.to(x.dtype), weight, x.shape[2:])
        if ctx.needs_input_grad[1]:
            grad_w = nn.grad.conv2d_weight(x, weight.shape, grad, c.stride, c.padding, c.dilation, c.groups)
        return grad_x, grad_w, None


# A 3x3, stride-2, padding-1 convolution reads input row 2m + a (a = 0 or 1) through
# these (kernel row, output row) pairs: a = 0 through row 1 at output row m; a = 1
# through row 2 at m and row 0 at m + 1. Written as a stride-1, padding-1 3x3 kernel
# over the gradient, output row m + d sits at that kernel's row d + 1:
# (row of the stride-1 kernel, row of the weight), and the same for columns.
PHASE_TAPS = {0: ((1, 1),), 1: ((1, 2), (2, 0))}


def phased_input_grad(grad: torch.Tensor, weight: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The input gradient `[N, C, *size]` of a 3x3, stride-2, padding-1 depthwise
    convolution with `weight` `[C, 1, 3, 3]`, from its output gradient `grad`: the input
    pixels of each parity (even or odd row, even or odd column) get a stride-1 depthwise
    convolution of `grad`, which runs at forward-pass speed in bf16. Channels-last; on an
    odd side, a view cut from one a row or column larger."""
    n, c, rows, cols = grad.shape
    out = grad.new_empty(n, rows, 2, cols, 2, c)  # channels-last [N, 2 rows, 2 cols, C]
    for a, row_taps in PHASE_TAPS.items():
        for b, col_taps in PHASE_TAPS.items():
            kernel = weight.new_zeros(weight.shape)
            for r, wr in row_taps:
                for s, ws in col_taps:
                    kernel[:, 0, r, s] = weight[:, 0, wr, ws]
            out[:, :, a, :, b] = nn.functional.conv2d(grad, kernel, None, 1, 1, 1, c).permute(0, 2, 3, 1)
    # an odd side has one row or column fewer than twice the output's
    return out.view(n, 2 * rows, 2 * cols, c).permute(0, 3, 1, 2)[:, :, :size[0], :size[1]]


def phased_strided_depthwise(features: nn.Module) -> nn.Module:
    """`features` with every 3x3, stride-2, padding-1 depthwise convolution made a
    `StridedDepthwiseConv2d` holding the same parameters (same state-dict keys, devices
    and dtypes), in place."""
    for parent in list(features.modules()):
        for name, conv in list(parent.named_children()):
            if (type(conv) is nn.Conv2d and conv.groups == conv.in_channels > 1 and conv.kernel_size == (3, 3)
                    and conv.stride == (2, 2) and conv.padding == (1, 1) and conv.dilation == (1, 1)
                    and conv.padding_mode == "zeros"):
                # built on the meta device: no memory and no random draws (seeded models stay as they were)
                new = StridedDepthwiseConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                             conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                                             conv.padding_mode, device="meta")
                new.weight, new.bias = conv.weight, conv.bias
                setattr(parent, name, new)
    return features


class ReLU6(nn.ReLU6):
    """torchvision's ReLU6, whose in-place form keeps its output for the backward pass.
    Autograd's gradient for an in-place ReLU6 reads the input, so it copies every
    activation before clamping it: a pass over each of MobileNetV2's 35 activations in
    every training step. The output gives the same gradient: 0 < y < 6 exactly where
    0 < x < 6."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace and torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
            return ReLU6FromOutput.apply(x)
        return super().forward(x)  # also what torch.jit traces: it cannot trace a Python Function


# 6.0's bf16 bit pattern as an int16. Non-negative bf16 numbers sort as their int16
# patterns do; negative ones, -0.0 included, are negative int16s.
BF16_SIX = int(torch.tensor(6.0, dtype=torch.bfloat16).view(torch.int16))


class ReLU6FromOutput(torch.autograd.Function):
    """In-place ReLU6 whose backward pass reads the output (setup_context: torch.func works too).
    On the CPU a bf16 input is clamped as int16 bit patterns to those of [+0.0, 6.0]: the
    same numbers as clamp gives (negative numbers and -0.0 become +0.0, +inf 6) and 2-3x faster
    (bf16 clamp converts every value to fp32 and back: 7 % of a bf16 training step). A NaN,
    which clamp keeps, becomes 0 or 6, so the training loop checks that parameters and
    batch-norm statistics stay finite (`all_finite`)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            x.view(torch.int16).clamp_(0, BF16_SIX)
            return x
        return x.clamp_(0.0, 6.0)

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.mark_dirty(inputs[0])
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, y, 0.0, 6.0)  # zero where y <= 0 or y >= 6


def all_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of `model` is finite: a NaN that a
    bf16 ReLU6 turned into 0 or 6 leaves NaN in a batch norm's running statistics (or
    came from a parameter), where the loss may no longer show it."""
    # the largest magnitude of each: NaN and inf carry through it, huge finite values do not overflow
    peaks = [t.detach().abs().amax().float() for t in (*model.parameters(), *model.buffers())
             if t.is_floating_point() and t.numel()]
    return bool(torch.isfinite(torch.stack(peaks)).all()) if peaks else True


def relu6_from_output(features: nn.Module) -> nn.Module:
    """`features` with every ReLU6 made a `ReLU6` (no parameters: state dicts unchanged), in place."""
    for parent in list(features.modules()):
        for name, act in list(parent.named_children()):
            if type(act) is nn.ReLU6:
                setattr(parent, name, ReLU6(inplace=act.inplace))
    return features


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


def merge_after_conv(model: nn.Module, kind: type, merge: Callable[[nn.Conv2d, nn.Module], nn.Module],
                     when: Callable[[nn.Conv2d], bool] = lambda conv: True) -> None:
    """In place, in every nn.Sequential: each convolution (for which `when` holds) followed
    by a `kind` module, past any Identity a previous merge left, becomes
    `merge(conv, module)`, and that module an Identity."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        kids = [(name, m) for name, m in seq.named_children() if not isinstance(m, nn.Identity)]
        for (conv_name, conv), (name, module) in zip(kids, kids[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(module, kind) and when(conv):
                setattr(seq, conv_name, merge(conv, module))
                setattr(seq, name, nn.Identity())


# oneDNN's convolution with an element-wise step applied as it writes its output (what
# torch.compile's Inductor lowers a convolution + activation to); absent from builds without it
FUSED_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
FUSED_DTYPES = (torch.float32, torch.bfloat16)


class ConvReLU6(nn.Module):
    """A convolution and the ReLU6 after it in one oneDNN call on the CPU, for inference.
    Same numbers as the two for finite values; but eager ReLU6 is a pass of its own over
    every expanded activation, 18 % of MobileNetV2's CPU time (bench/bf16.py --by-layer).
    The two run as they were off the CPU, with gradients, with oneDNN switched off, for
    inputs that are not a 4-D fp32/bf16 batch, or under autocast to another dtype."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if not self.fusable(x, dtype):
            return nn.functional.relu6(c(x))
        # the op is not on autocast's lists: cast as autocast does for a convolution
        w, b = c.weight.to(dtype), None if c.bias is None else c.bias.to(dtype)
        return torch.ops.mkldnn._convolution_pointwise(x.to(dtype), w, b, c.padding, c.stride, c.dilation,
                                                       c.groups, "hardtanh", [0.0, 6.0], "")

    def fusable(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        return (x.device.type == "cpu" and x.dim() == 4 and not torch.is_grad_enabled()
                and torch.backends.mkldnn.enabled and x.dtype in FUSED_DTYPES
                and self.conv.weight.dtype in FUSED_DTYPES and dtype in FUSED_DTYPES)


def fuse_conv_relu6(model: nn.Module) -> nn.Module:
    """`model` with every convolution followed by a ReLU6 (an Identity between them, where
    batch norm was folded) replaced by a `ConvReLU6`, in place; unchanged when this
    PyTorch lacks the fused op, or when a weight is not finite (oneDNN's clamp turns NaN
    into 0, and a diverged model must give a NaN map, which is refused, not a plausible one)."""
    finite = all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    if not (FUSED_CONV and finite):
        return model
    # the fused op pads with zeros, given as numbers
    merge_after_conv(model, nn.ReLU6, lambda conv, _: ConvReLU6(conv),
                     when=lambda conv: conv.padding_mode == "zeros" and not isinstance(conv.padding, str))
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


