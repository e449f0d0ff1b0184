"""Atomic file writes and `.npy` arrays with their `.json` sidecars.

Every output is written to a temporary file in the same folder and renamed, so a
crash never leaves a half-written file behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from . import __version__


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the body succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def sidecar_path(npy: str | Path) -> Path:
    return Path(npy).with_suffix(".json")


class ArrayFileError(Exception):
    """An array file or sidecar that is missing, malformed or belongs to another slide."""


def save_array(path: str | Path, array: np.ndarray, meta: dict) -> None:
    """Write `array` to `path` (.npy) and `meta` (+ shape, version) to its sidecar."""
    path = Path(path)
    meta = {**meta, "shape": list(array.shape), "crfcore_version": __version__}
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array)
    atomic_write_json(sidecar_path(path), meta)


def load_array(path: str | Path, kind: str | None = None,
               slide: str | None = None) -> tuple[np.ndarray, dict]:
    """Read an array and its sidecar; check `kind` and the slide's file name if given."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.exists():
        raise ArrayFileError(f"{path}: no such file")
    if not side.exists():
        raise ArrayFileError(f"{path}: sidecar {side.name} is missing (write masks with Mask_gen.py)")
    try:
        array = np.load(path, allow_pickle=False)
        meta = json.loads(side.read_text())
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise ArrayFileError(f"{path}: cannot read array or sidecar ({err})") from None
    if list(array.shape) != meta.get("shape"):
        raise ArrayFileError(f"{path}: shape {array.shape} does not match its sidecar {meta.get('shape')}")
    if kind is not None and meta.get("kind") not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ArrayFileError(f"{path}: is a {meta.get('kind')!r} array, expected {kind!r}")
    if slide is not None and meta.get("slide") != Path(slide).name:
        raise ArrayFileError(f"{path}: belongs to slide {meta.get('slide')!r}, not {Path(slide).name!r}")
    return array, meta
