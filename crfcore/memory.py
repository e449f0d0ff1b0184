"""Will a training step fit in memory? An estimate made before the first step.

A step that does not fit in the CPU's memory is no error Python sees: the kernel kills
the process, and the shell prints `Killed`. So before training, `train.py` runs one
sample through a copy of the model and counts what autograd keeps for the backward pass
(`torch.autograd.graph.saved_tensors_hooks`), scales that to the largest batch and
refuses a batch that cannot fit, naming one that can. On CUDA the same refusal replaces
an out-of-memory error after minutes of start-up.

Measured by `bench/train_memory.py` (MobileNetV2 width 1, grid 3, crop 224, CPU, batches
2 and 8): a training step peaks at 1.48-1.75 times the saved tensors of its batch, fp32
and bf16, with and without `dense_consistency` (the gradients of the activations, the
optimiser and its workspaces come on top); hence `STEP_OVERHEAD`, with which the
estimate came to 0.87-1.00 of the measured peak in that run, and 0.82-1.08 at batch 2 in
another (2 steps): a guide within about 20 %, not a bound, so a batch whose step comes
that close to the free memory may be refused though it would just fit, or pass though it
would not.

A container, a SLURM job or a systemd unit may limit a process's memory below the
machine's (a cgroup limit): the kernel then kills at that limit, so the limit left is
what counts (`cgroup_free`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

from .device import autocast

STEP_OVERHEAD = 1.7  # a step's peak over its saved tensors: 1.48-1.75 measured (module docstring)
GB = 2**30


@dataclass(frozen=True)
class StepMemory:
    """What a training step needs: `per_sample` bytes for each sample of the batch, and
    `fixed` bytes for the gradients and optimiser state of the weights."""
    per_sample: int
    fixed: int

    def need(self, batch: int) -> int:
        return self.fixed + batch * self.per_sample

    def largest_batch(self, free: int) -> int:
        """The largest batch whose step fits in `free` bytes (0: not even one sample)."""
        return max(0, (free - self.fixed) // self.per_sample)


def saved_bytes(net: nn.Module, batch, device: torch.device, precision: str) -> int:
    """Bytes autograd keeps for the backward pass of `net` on `batch` (each storage once).
    `net` is run in training mode on a copy, so its weights, batch-norm statistics and
    the random state are as before."""
    net = copy.deepcopy(net).train()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, precision):
            net(batch)
    return sum(storages.values())


def step_memory(net: nn.Module, one_sample, device: torch.device, precision: str) -> StepMemory:
    """The `StepMemory` of training `net` (Adam-like: two state tensors per weight) from
    a batch of one sample."""
    weights = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    per_sample = saved_bytes(net, one_sample, device, precision)
    return StepMemory(per_sample=round(STEP_OVERHEAD * per_sample), fixed=3 * weights)


def free_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still get: the GPU's free memory, or the machine's
    available memory and free swap; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    machine = psutil.virtual_memory().available + psutil.swap_memory().free
    limited = cgroup_free()
    return machine if limited is None else min(machine, limited)


# What a memory cgroup's folder holds: its limit, its use, and in memory.stat the page
# cache in that use and its shared memory; the kernel reclaims the cache but for shared
# memory (which has nowhere to go without swap) before it kills (cgroup v2, then v1).
_CGROUP_FILES = {"v2": ("memory.max", "memory.current", "file", "shmem"),
                 "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_shmem")}
_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as about 2**63


def cgroup_free(root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's memory cgroup still allows: the least that it or any cgroup
    above it leaves under its limit; None where no limit is set or none can be read."""
    found = _own_cgroup(root, own)
    if found is None:
        return None
    top, folder, version = found
    left = [n for n in (_left_under_limit(d, version) for d in (folder, *folder.parents)
                        if d.is_relative_to(top)) if n is not None]
    return min(left, default=None)


def _own_cgroup(root: Path, own: Path) -> tuple[Path, Path, str] | None:
    """(the memory hierarchy's mount, this process's folder in it, "v1" or "v2") from
    /proc/self/cgroup. Inside a container the folder named there may not be visible,
    and the mount is the container's own cgroup."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            top, version = root / "memory", "v1"
        elif controllers == "" and (root / "cgroup.controllers").exists():
            top, version = root, "v2"
        else:
            continue
        folder = top / path.lstrip("/")
        return top, folder if folder.is_dir() else top, version
    return None


def _left_under_limit(folder: Path, version: str) -> int | None:
    """Limit minus use of one cgroup folder, reclaimable page cache (read files, active or
    not: a training run reads its images every epoch) counted as free; None without a limit."""
    limit_file, usage_file, cache_key, shmem_key = _CGROUP_FILES[version]
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= _NO_LIMIT:
            return None
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        cache = int(stat.get(cache_key, 0)) - int(stat.get(shmem_key, 0))
        used = int((folder / usage_file).read_text()) - cache
    except (OSError, ValueError):
        return None
    return max(0, int(limit) - used)


def gb(n: int) -> str:
    """Bytes for a message: GB to one decimal, MB below a tenth of a GB."""
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 2**20:.0f} MB"
