"""Where and how the model runs: the device, the precision (autocast), and the torchrun
rank/world environment that training and multi-slide inference share."""
from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import torch

from .errors import CrfError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt() parameters


class DeviceError(CrfError):
    """A device or precision that this machine cannot give."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # the processes on this machine

    @classmethod
    def from_env(cls) -> "DistEnv":
        try:
            world = int(os.environ.get("WORLD_SIZE", 1))
            return cls(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)),
                       int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        except ValueError:
            raise DeviceError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers "
                              "(set by torchrun)") from None

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` (CUDA when present), `cpu` or `cuda` (the process's GPU under torchrun)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device cuda asked for, but CUDA is not available on this machine")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"process {local_rank} has no GPU: {torch.cuda.device_count()} GPU(s) here; "
                              "start at most that many processes per node, or use device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def retain_freed_memory() -> bool:
    """Keep freed memory in this process for reuse (glibc: never trim the heap, never
    serve a block by mmap). By default glibc hands large freed blocks back to the OS, so
    every CNN pass faults its activation buffers back in, page by page: MobileNetV2
    inference ran 4.3x and training 2.0x slower for it on this project's 2-core machine
    (bench/cpu_settings.py). The process then keeps its peak memory until it ends, which
    suits the batch scripts that call this (prob_map.py, train.py, evaluate.py), except
    at a fork: see `_release_before_fork`. False where the C library is not glibc."""
    global _fork_hook
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    if not _fork_hook:
        os.register_at_fork(before=lambda: _release_before_fork(trim))
        _fork_hook = True
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


_fork_hook = False


def _release_before_fork(trim) -> None:
    """Hand the freed memory kept for reuse back to the OS before this process forks (a
    DataLoader's workers). A forked child shares the parent's pages copy-on-write, and
    while it lives every kept page the parent writes again is copied: the dense_ncrf
    bench's fine-tune, a 14 GB trainer at batch 16, needed more than this machine's 24 GB
    at the start of epoch 2 and was killed. After the trim the child shares only live
    memory; the parent faults its buffers back in once per fork, not once per pass."""
    trim(0)


def fork_safe_opencv(workers: int) -> int:
    """`workers`, after making OpenCV safe for DataLoader workers forked from this process
    (where there are any): its thread pool does not survive a fork, and a worker forked
    while a pool thread held the pool's lock waits on it for ever (a kill -9 sweep saw one
    Patch_gen.py worker stuck so, in pthread_mutex_lock inside cv2, in about 60 runs).
    OpenCV then runs single-threaded in this process and its workers: the CNN's threads,
    not OpenCV's, use the cores, and the workers are the parallel readers."""
    if workers:
        cv2.setNumThreads(0)
    return workers


def reader_workers(asked: int | None, device: torch.device) -> int:
    """DataLoader workers reading slides beside the CNN: as asked, else 0 on the CPU and 2
    with CUDA. On the CPU the CNN's threads already use every core and worker processes
    preempt them: on 2 cores, maps came 1.27x (lattice) and 2.16x (dense) faster with the
    reading done in the main process (bench/cpu_settings.py)."""
    if asked is not None:
        return asked
    return 0 if device.type == "cpu" else 2


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), read at run time."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(device: torch.device, precision: str) -> str:
    """The precision `auto` stands for: on CUDA bf16 mixed precision (fp16 where bf16 is
    missing); on the CPU fp32, even where the CPU has native bf16: the rule was bf16 only
    if it moved a trained model's maps by at most 0.01 with unchanged metrics, and on the
    demo's trained models bf16 autocast moved them by up to 0.045-0.077 (bench/agreement.py;
    FROC, slide AUC and pixel AUC unchanged), for 1.3-1.6x the speed (docs/speed.md, bf16 on the CPU)."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r} (expected one of {', '.join(PRECISIONS)})")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError("precision fp16 needs CUDA; use bf16 on the CPU")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
