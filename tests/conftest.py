"""Shared fixtures: the real data folder (skipped when absent) and synthetic slides."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from crfcore import synthetic

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


def run_script(name: str, *args: str, check: bool = True):
    """Run a top-level script with this Python; return the CompletedProcess."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
