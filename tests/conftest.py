"""Shared fixtures: the real data folder (skipped when absent) and synthetic slides."""
from __future__ import annotations

import importlib.util
import io
import os
import sys
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from crfcore import masks, synthetic

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CRF_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when the data folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data not found at {path}")
    return path


@pytest.fixture(scope="session")
def syn_slide(tmp_path_factory) -> synthetic.SyntheticSlide:
    """A 2048 x 1536 synthetic slide with two planted tumours and its ASAP XML."""
    d = tmp_path_factory.mktemp("syn")
    return synthetic.write_slide(d / "syn_tumor.tif", 2048, 1536, tumours=2, seed=3,
                                 tumour_radius=0.13, xml=d / "syn_tumor.xml")


@dataclass
class Result:
    """What a script's `main` did: exit status, standard output and error."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def border_slide(tmp_path_factory):
    """Tissue running off the left and top edges, a tumour inside, and its tissue mask."""
    d = tmp_path_factory.mktemp("border")
    s = synthetic.write_slide(d / "edge.tif", 768, 640, tumours=1, seed=5, tumour_radius=0.15,
                              tissue=[(0.2, 0.3, 0.45, 0.5)])
    mask, meta = masks.make_mask(s.path, "tissue", downsample=16)
    masks.save_mask(d / "edge_tissue.npy", mask, meta)
    assert mask[:, 0].any() and mask[0, :].any()
    return s, mask, meta


def load_script(name: str):
    """A top-level script (e.g. "prob_map.py") as a module, loaded once."""
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"script_{Path(name).stem}", ROOT / name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look their module up there
        spec.loader.exec_module(module)
        _SCRIPTS[name] = module
    return _SCRIPTS[name]


_SCRIPTS: dict = {}


def call(name: str, *args, check: bool = True) -> Result:
    """Run a script's `main(argv)` in this process through `crfcore.cli.run`, as its
    `__main__` does (so errors give exit status 2 and one line), capturing its output."""
    from crfcore.cli import run

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            run(load_script(name).main, [str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    result = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{name} failed ({code}):\n{result.stdout}\n{result.stderr}")
    return result


def run_script(name: str, *args: str, check: bool = True):
    """Run a top-level script as its own process (the end-to-end chain); return the
    CompletedProcess."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextmanager
def file_size_limit(nbytes: int):
    """Files larger than `nbytes` cannot be written while inside (EFBIG, as on a full
    disk): a real failing file system for this process and its workers, no mocks."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
