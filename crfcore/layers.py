"""MobileNetV2's layers swapped for faster ones that give the same numbers.

For training (installed by `model.CRFNet`): under CPU autocast, the strided depthwise
convolutions' input gradient as stride-1 convolutions (`StridedDepthwiseConv2d`); and a
ReLU6 that keeps its output, not a copy of its input (`ReLU6`), clamping CPU bf16 as
int16 bit patterns, with `all_finite`, the check that needs. For inference
(`model.inference_copy`): each convolution and the ReLU6 after it in one oneDNN call
(`ConvReLU6`), after `merge_after_conv` has folded batch norm in.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


# ----------------------------------------------------------------------------- training


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


# The input gradient of a 3x3, stride-2, padding-1 convolution at input row 2m + a:
#   a = 0: weight row 1 times gradient row m;
#   a = 1: weight row 2 times gradient row m, plus weight row 0 times gradient row m + 1.
# In a stride-1, padding-1 3x3 kernel run over the gradient, gradient row m + d is
# kernel row d + 1. So, per parity a: (kernel row, weight row) pairs; columns alike.
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


# ----------------------------------------------------------------------------- inference


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
    if not (FUSED_CONV and all_finite(model)):
        return model
    # the fused op pads with zeros, given as numbers
    merge_after_conv(model, nn.ReLU6, lambda conv, _: ConvReLU6(conv),
                     when=lambda conv: conv.padding_mode == "zeros" and not isinstance(conv.padding, str))
    return model
