#!/usr/bin/env python3
"""bf16 autocast + channels-last against fp32 on this CPU: CNN speed for inference
(forward, batch norm folded and each convolution + ReLU6 fused, as prob_map.py runs it;
`--unfused`: folded only) and training (forward, backward, SGD
step), interleaved and best of `--repeats`, so a shared machine's busy moments count less;
freed memory is kept for reuse, as the scripts keep it (`retain_freed_memory`).

  python bench/bf16.py [--width 1.0 --crop 224 --batch 32] [--by-layer] [--unfused]

Prints whether the CPU has native bf16 (avx512_bf16 / AMX), then one line per setting
and the ratios. `--by-layer` also splits an inference pass's time between the
pointwise (1x1) convolutions, the depthwise ones, the full 3x3 stem and everything in
between (residual additions, autocast's casts, pooling, the head, and the ReLU6s when
unfused), each summed
over the repeats. What bf16 does to the maps and metrics of a trained model:
bench/agreement.py.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from crfcore.device import autocast, cpu_has_native_bf16, retain_freed_memory
from crfcore.layers import ConvReLU6
from crfcore.model import CRFNet, ModelConfig, fold_batch_norm, inference_copy


def step_time(model: CRFNet, x: torch.Tensor, precision: str, train: bool) -> float:
    """Seconds of one forward (inference) or one training step on `x`."""
    cpu = torch.device("cpu")
    t = time.perf_counter()
    if train:
        model.train()
        with autocast(cpu, precision):
            logits, _ = model.embed(x)
        logits.float().square().mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 1e-6 * p.grad
                p.grad = None
    else:
        model.eval()
        with torch.no_grad(), autocast(cpu, precision):
            model.embed(x)
    return time.perf_counter() - t


def conv_kind(m: torch.nn.Module) -> str | None:
    """The kind of a convolution, fused with its ReLU6 or not (None for other modules)."""
    m = m.conv if isinstance(m, ConvReLU6) else m
    if not isinstance(m, torch.nn.Conv2d):
        return None
    return "depthwise" if m.groups > 1 else ("pointwise" if m.kernel_size == (1, 1) else "full 3x3")


def by_layer(folded: CRFNet, x: torch.Tensor, repeats: int) -> None:
    """Seconds of each convolution kind and of the rest, fp32 against bf16 (forward hooks
    time each convolution; the rest is the pass minus them), after one warm-up pass each."""
    spent: dict[tuple[str, str], float] = {}
    state = {"on": False, "precision": "fp32"}

    def start(m, _):
        m.started = time.perf_counter()

    def stop(m, *_):
        if state["on"]:
            key = (state["precision"], conv_kind(m))
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - m.started

    hooks = [h for m in folded.modules() if conv_kind(m)
             for h in (m.register_forward_pre_hook(start), m.register_forward_hook(stop))]
    for on in (False,) + (True,) * repeats:
        for precision in ("fp32", "bf16"):
            state.update(on=on, precision=precision)
            t = step_time(folded, x, precision, False)
            if on:
                spent[precision, "pass"] = spent.get((precision, "pass"), 0.0) + t
    for h in hooks:
        h.remove()
    for p in ("fp32", "bf16"):
        spent[p, "between"] = spent[p, "pass"] - sum(v for (q, k), v in spent.items() if q == p and k != "pass")
    total = spent["fp32", "pass"]
    for kind in ("pointwise", "depthwise", "full 3x3", "between", "pass"):
        a, b = spent["fp32", kind], spent["bf16", kind]
        print(f"  {kind:<10} fp32 {a:6.3f} s ({a / total:4.0%}), bf16 {b:6.3f} s: bf16 {a / b:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--by-layer", action="store_true", help="also split inference time by layer kind")
    p.add_argument("--unfused", action="store_true", help="inference without convolution + ReLU6 fused")
    args = p.parse_args()
    retain_freed_memory()  # as train.py and prob_map.py run
    torch.manual_seed(0)
    model = CRFNet(ModelConfig(grid=1, width_mult=args.width)).to(memory_format=torch.channels_last)
    folded = fold_batch_norm(model) if args.unfused else inference_copy(model)  # as prob_map.py runs it
    x = torch.randn(args.batch, 3, args.crop, args.crop).contiguous(memory_format=torch.channels_last)
    print(f"native bf16: {cpu_has_native_bf16()}; {torch.get_num_threads()} threads; load {os.getloadavg()[0]:.1f}; "
          f"width {args.width}, crop {args.crop}, batch {args.batch}; inference "
          f"{'unfused' if args.unfused else 'convolution + ReLU6 fused'}")
    best = {}
    for _ in range(args.repeats):
        for train in (False, True):
            for precision in ("fp32", "bf16"):
                key = (train, precision)
                best[key] = min(best.get(key, float("inf")), step_time(model if train else folded, x, precision, train))
    for train in (False, True):
        what = "training" if train else "inference"
        f32, b16 = best[(train, "fp32")], best[(train, "bf16")]
        print(f"{what}: fp32 {args.batch / f32:.1f} patches/s, bf16 {args.batch / b16:.1f} patches/s: "
              f"bf16 {f32 / b16:.2f}x")
    if args.by_layer:
        print(f"inference by layer kind ({args.repeats} passes each):")
        by_layer(folded, x, args.repeats)


if __name__ == "__main__":
    main()
