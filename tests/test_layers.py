"""crfcore.layers: the faster layers give the same numbers, for training and inference."""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crfcore.layers import FUSED_CONV, ConvReLU6, StridedDepthwiseConv2d
from crfcore.model import CRFNet, ModelConfig, fold_batch_norm, inference_copy


@pytest.mark.skipif(not FUSED_CONV, reason="this PyTorch build has no oneDNN fused convolution")
def test_fused_conv_relu6_gives_the_same_outputs():
    """inference_copy fuses MobileNetV2's 35 convolution + ReLU6 pairs into oneDNN calls:
    the same numbers in fp32 (and within bf16 rounding under autocast); with gradients it
    runs the plain convolution and ReLU6."""
    torch.manual_seed(4)
    model = CRFNet(ModelConfig(grid=3, width_mult=0.5)).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_var.uniform_(0.3, 3.0)
    folded, fused = fold_batch_norm(model), inference_copy(model)
    assert sum(isinstance(m, ConvReLU6) for m in fused.modules()) == 35
    assert not any(isinstance(m, torch.nn.ReLU6) for m in fused.modules())
    x = torch.randn(2, 9, 3, 64, 64).contiguous()
    with torch.inference_mode():
        assert torch.allclose(fused(x), folded(x), atol=1e-5)
        with torch.autocast("cpu", torch.bfloat16):
            assert torch.allclose(fused(x).float(), folded(x).float(), atol=0.05)
    with torch.no_grad():
        one = next(m for m in fused.modules() if isinstance(m, ConvReLU6))
        y = torch.randn(1, one.conv.in_channels, 16, 16) * 10
        assert torch.allclose(one(y), torch.nn.functional.relu6(one.conv(y)), atol=1e-5)
        assert one(y).max() == 6 and one(y).min() == 0
    y.requires_grad_(True)
    one(y).sum().backward()  # the plain path: gradients flow
    assert y.grad is not None


def test_the_fused_copy_keeps_nan_and_other_dtypes_to_the_plain_path(monkeypatch):
    """oneDNN's clamp maps NaN to 0: a model with a non-finite weight is not fused, so its
    map stays NaN (and is refused) instead of looking plausible. Inputs the op does not
    take (float64, 3-D) and oneDNN switched off run the plain convolution and ReLU6."""
    model = CRFNet(ModelConfig(grid=1, width_mult=0.25)).eval()
    bad = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bad.running_mean[0] = float("nan")
    copy = inference_copy(model)
    assert not any(isinstance(m, ConvReLU6) for m in copy.modules())
    with torch.inference_mode():
        assert torch.isnan(copy.embed(torch.rand(1, 3, 32, 32))[0]).all()
    fused = inference_copy(CRFNet(ModelConfig(grid=1, width_mult=0.25)).eval())
    one = next(m for m in fused.modules() if isinstance(m, ConvReLU6))
    y = torch.randn(1, one.conv.in_channels, 9, 9)
    with torch.inference_mode():
        want = torch.nn.functional.relu6(one.conv(y))
        assert torch.allclose(one.double()(y.double()), want.double(), atol=1e-5)
        one.float()
        assert torch.allclose(one(y[0]), want[0], atol=1e-5)  # unbatched
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
        assert not one.fusable(y, y.dtype) and torch.allclose(one(y), want, atol=1e-5)


def test_without_the_fused_op_inference_copy_only_folds(monkeypatch):
    import crfcore.layers

    monkeypatch.setattr(crfcore.layers, "FUSED_CONV", False)
    copy = inference_copy(CRFNet(ModelConfig(grid=1, width_mult=0.25)).eval())
    assert not any(isinstance(k, ConvReLU6) for k in copy.modules())
    assert sum(isinstance(k, torch.nn.ReLU6) for k in copy.modules()) == 35


class Convolutions(TorchDispatchMode):
    """Records (op, dtype, output mask) of every convolution and convolution gradient run
    inside it (the mask says which gradients a convolution_backward computes)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype, tuple[bool, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:  # args: input, weight, ..., transposed at 6
            self.seen.append(("transposed" if args[6] else "forward", args[0].dtype, ()))
        if func is torch.ops.aten.convolution_backward.default:  # args: grad, ..., output mask last
            self.seen.append(("backward", args[0].dtype, tuple(args[-1])))
        return func(*args, **(kwargs or {}))


def test_phased_input_grad_is_the_strided_depthwise_input_gradient():
    """Exact in float64 against aten's own, for even, odd, 1-pixel and unequal sides."""
    from crfcore.layers import phased_input_grad

    torch.manual_seed(0)
    for side in ((16, 16), (15, 17), (7, 7), (1, 1), (2, 3)):
        x = torch.randn(2, 5, *side, dtype=torch.float64)
        w = torch.randn(5, 1, 3, 3, dtype=torch.float64)
        grad = torch.randn_like(torch.nn.functional.conv2d(x, w, None, 2, 1, 1, 5))
        want = torch.ops.aten.convolution_backward(grad, x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 5,
                                                   [True, False, False])[0]
        got = phased_input_grad(grad, w, side)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_strided_depthwise_convolutions_take_their_input_gradient_from_stride_1_convolutions_under_cpu_bf16_autocast():
    """Only with gradients: oneDNN's bf16 input gradient for them is slow. Forward pass,
    weight gradient and the four phase convolutions stay bf16, and every gradient
    matches fp32's within bf16 rounding, for even and odd sizes, with the backward pass
    run outside autocast or inside it. The swap keeps torchvision's state-dict keys."""
    import torchvision

    model = CRFNet(ModelConfig(grid=1, width_mult=0.5))
    strided = [m for m in model.modules() if isinstance(m, StridedDepthwiseConv2d)]
    assert len(strided) == 4 and all(max(m.stride) == 2 and m.groups == m.in_channels for m in strided)
    plain = torchvision.models.mobilenet_v2(weights=None, width_mult=0.5).features
    assert model.features.state_dict().keys() == plain.state_dict().keys()
    conv = strided[0]
    for side, inside in (((16, 16), False), ((15, 17), False), ((15, 17), True)):
        x = torch.randn(2, conv.in_channels, *side).to(torch.bfloat16).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            trained = conv(x)
            with torch.no_grad():
                inferred = conv(x)
        assert trained.dtype == torch.bfloat16 and torch.equal(trained, inferred)
        grad = torch.randn_like(trained)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside), Convolutions() as backward:
            trained.backward(grad)
        assert x.grad.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32
        assert backward.seen.count(("forward", torch.bfloat16, ())) == 4  # one per phase
        assert not any(kind == "backward" and mask[0] for kind, _, mask in backward.seen)  # no oneDNN input grad
        assert not any(dtype != torch.bfloat16 for _, dtype, _ in backward.seen)
        x32, w32 = x.detach().float().requires_grad_(), conv.weight.detach().bfloat16().float().requires_grad_()
        torch.nn.functional.conv2d(x32, w32, None, conv.stride, conv.padding, conv.dilation, conv.groups).backward(grad.float())
        torch.testing.assert_close(x.grad.float(), x32.grad, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(conv.weight.grad, w32.grad, rtol=2e-2, atol=5e-2)
        conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the whole model trains, also cast to bf16
        model.embed(torch.randn(2, 3, 64, 64))[0].float().sum().backward()
        assert all(m.weight.grad is not None for m in strided)
        model.to(torch.bfloat16).embed(torch.randn(2, 3, 64, 64))[0].float().sum().backward()


def test_bf16_relu6_clamps_every_bf16_number_as_clamp_does():
    """All 65,536 bf16 bit patterns: the int16 clamp gives clamp's numbers (+0.0 for every
    negative and for -0.0) and the same gradients; NaN becomes 0 or 6, which all_finite
    exists to catch."""
    from crfcore.layers import ReLU6FromOutput, all_finite

    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    nan = every.isnan()
    x = every.clone().requires_grad_()
    y = ReLU6FromOutput.apply(x * 1)  # in place needs a non-leaf
    want = every.clamp(0, 6)
    assert torch.equal(y[~nan], want[~nan]) and not y.isnan().any() and set(y[nan].tolist()) <= {0.0, 6.0}
    assert not y[every == 0].signbit().any()  # -0.0 too becomes +0.0
    grad = torch.rand(every.shape).to(torch.bfloat16)
    y.backward(grad)
    assert torch.equal(x.grad[~nan], torch.where((want > 0) & (want < 6), grad, 0)[~nan])
    with torch.no_grad():
        assert torch.equal(ReLU6FromOutput.apply(every.float()).isnan(), nan)  # fp32 keeps clamp's NaN
    model = CRFNet(ModelConfig(grid=1, width_mult=0.5))
    assert all_finite(model)
    model.features[1].conv[2].running_mean[3] = float("nan")
    assert not all_finite(model)
    model.features[1].conv[2].running_mean[3] = 0.0
    with torch.no_grad():
        model.fc.weight[0, 0] = 1e38  # huge but finite: no sum to overflow
        assert all_finite(model)
        model.fc.weight[0, 0] = float("inf")
    assert not all_finite(model)


def test_the_swap_draws_no_random_numbers_and_keeps_devices():
    import torchvision
    from crfcore.layers import phased_strided_depthwise

    torch.manual_seed(0)
    features = torchvision.models.mobilenet_v2(weights=None, width_mult=0.5).features
    before, state = {k: v.clone() for k, v in features.state_dict().items()}, torch.get_rng_state()
    phased_strided_depthwise(features)
    assert torch.equal(torch.get_rng_state(), state)  # seeded models stay as they were
    assert all(torch.equal(v, before[k]) for k, v in features.state_dict().items())
    with torch.device("meta"):
        assert next(CRFNet(ModelConfig(grid=1, width_mult=0.5)).parameters()).is_meta


class OpNames(TorchDispatchMode):
    """Records the name of every op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_relu6_keeps_its_output_for_backward_instead_of_copying_its_input():
    """Training copies no activation (torchvision's in-place ReLU6 makes autograd clone
    each one), and every gradient equals torchvision's exactly, also for inputs at and
    beyond 0 and 6; the swap keeps the state-dict keys; inference is the plain ReLU6."""
    import torchvision

    from crfcore.layers import ReLU6

    torch.manual_seed(0)
    model = CRFNet(ModelConfig(grid=1, width_mult=0.5))
    plain = CRFNet(ModelConfig(grid=1, width_mult=0.5))
    plain.load_state_dict(model.state_dict())
    for m in plain.modules():
        if isinstance(m, ReLU6):
            m.__class__ = torch.nn.ReLU6  # back to torchvision's
    assert sum(isinstance(m, ReLU6) for m in model.modules()) == 35
    tv = torchvision.models.mobilenet_v2(weights=None, width_mult=0.5).features
    assert model.features.state_dict().keys() == tv.state_dict().keys()
    x = torch.cat([torch.randn(2, 3, 48, 48) * 8, torch.zeros(1, 3, 48, 48)])
    for net in (model, plain):
        with OpNames() as ops:
            logits, _ = net.embed(x)
        net.clone_count = ops.seen.count("clone.default")
        logits.square().sum().backward()
    assert model.clone_count == 0 < plain.clone_count
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a.grad, b.grad)
    y = torch.tensor([-1.0, 0.0, 3.0, 6.0, 7.0], requires_grad=True)
    z = y * 1  # in place needs a non-leaf
    ReLU6(inplace=True)(z).sum().backward()
    assert y.grad.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]  # torch's hardtanh: zero at the bounds
    with torch.no_grad():
        assert torch.equal(ReLU6(inplace=True)(x.clone()), x.clamp(0, 6))
    # torch.func and torch.jit.trace work as with torchvision's (eval: batch norm updates no buffers)
    from torch.func import functional_call, grad
    model.eval().zero_grad()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = grad(lambda p: functional_call(model, p, (x.unsqueeze(1),)).square().sum())(params)
    model(x.unsqueeze(1)).square().sum().backward()
    assert all(torch.equal(g[k], p.grad) for k, p in model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated, still used
        torch.jit.trace(model.features, x.requires_grad_(), check_trace=False)
