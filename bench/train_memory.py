#!/usr/bin/env python3
"""train.py's memory estimate against the measured peak of real training steps.

  python bench/train_memory.py [--batches 2 8] [--steps 3] [--width 1.0]

At NCRF's geometry (768-pixel grid images of 3 x 3 cells, crops 224), for fp32 and bf16
autocast, with and without `dense_consistency`: each case runs in a fresh process as
train.py does (freed memory kept for reuse), takes `--steps` AdamW steps on random
images and reports the growth of the process's peak resident memory over the memory it
held before the first step, beside `crfcore.memory`'s estimate of that step, which
train.py compares with the free memory. `peak/saved` is the factor that `STEP_OVERHEAD`
must cover. Linux (peak RSS from getrusage). Batch 8 fp32 with dense_consistency takes
about 13 GB.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import psutil
import torch

from crfcore.consistency import DenseConsistent
from crfcore.device import retain_freed_memory
from crfcore.memory import GB, STEP_OVERHEAD, step_memory
from crfcore.model import CRFNet, ModelConfig

CASES = [(precision, dense) for dense in (False, True) for precision in ("fp32", "bf16")]


def child(precision: str, dense: bool, batch: int, steps: int, width: float) -> dict:
    """One case in this process: the measured peak growth and the estimate, in bytes."""
    retain_freed_memory()
    cpu = torch.device("cpu")
    model = CRFNet(ModelConfig(grid=3, width_mult=width)).to(memory_format=torch.channels_last)
    net = DenseConsistent(model, 256, 224) if dense else model
    cells = torch.rand(batch, 9, 3, 224, 224)
    x = (cells, torch.rand(batch, 3, 768, 768)) if dense else cells
    opt = torch.optim.AdamW(model.parameters())
    net.train()
    before = psutil.Process().memory_info().rss
    for _ in range(steps):
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            out = net(x)
        out, gap = out if dense else (out, 0)
        opt.zero_grad(set_to_none=True)
        (out.float().mean() + gap).backward()
        opt.step()
        del out, gap
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    one = (cells[:1].clone(), x[1][:1].clone()) if dense else cells[:1].clone()
    step = step_memory(net, one, cpu, precision)
    return {"peak": peak, "estimate": step.need(batch), "saved": batch * step.per_sample / STEP_OVERHEAD}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8], help="grid images per step")
    p.add_argument("--steps", type=int, default=3, help="training steps per case (the peak settles by the third)")
    p.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.child:
        precision, dense, batch = args.child
        print(json.dumps(child(precision, dense == "1", int(batch), args.steps, args.width)))
        return 0
    print(f"case                     batch  estimate  measured peak  peak/estimate  peak/saved  "
          f"(STEP_OVERHEAD {STEP_OVERHEAD})")
    for precision, dense in CASES:
        for batch in args.batches:
            cmd = [sys.executable, __file__, "--child", precision, str(int(dense)), str(batch),
                   "--steps", str(args.steps), "--width", str(args.width)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            name = f"{precision}{' dense_consistency' if dense else ''}"
            print(f"{name:<24} {batch:5d}  {r['estimate'] / GB:5.2f} GB  {r['peak'] / GB:10.2f} GB  "
                  f"{r['peak'] / r['estimate']:13.2f}  {r['peak'] / r['saved']:10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
