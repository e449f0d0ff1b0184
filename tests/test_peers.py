"""bench/peers.py without TIAToolbox: the pairing of crfcore's crops with TIAToolbox's
grid, the mask that singles out the paired patches, and the skip line."""
import importlib.util

import numpy as np
import pytest

from conftest import load_script
from crfcore.inference import Geometry


def peers():
    return load_script("bench/peers.py")


def test_stride_32_crops_lie_on_tiatoolbox_grid():
    p = peers()
    geom = Geometry(1, 256, 224, (32.0, 32.0))
    rows, cols = p.block_points(4, 5)
    grid = p.tia_grid(geom, rows, cols)
    # point c: centre 32c + 16, crop from 32c + 16 - 112 = 32 (c - 3)
    assert np.array_equal(grid, np.stack([cols - 3, rows - 3], 1))
    assert np.array_equal(grid * 32, geom.crop_origin(geom.centres(rows, cols)))


def test_stride_64_crops_are_off_tiatoolbox_grid():
    geom = Geometry(1, 256, 224, (64.0, 64.0))
    assert peers().tia_grid(geom, *peers().block_points(3, 4)) is None  # 64c - 80: 48 mod 64


@pytest.mark.parametrize("stride", [32, 64])
def test_mask_selects_exactly_the_block(stride):
    """TIAToolbox keeps a patch when any mask cell it covers is set: patch i covers cells
    i .. floor(i + crop / s) - 1 (its bounds scaled to the mask and truncated)."""
    p, crop = peers(), 224
    rows, cols = p.block_points(9, 6)
    grid = np.stack([cols, rows], 1)
    mask = p.tia_mask((30, 30), grid, crop, stride)
    span = crop // stride
    kept = {(x, y) for y in range(30) for x in range(30) if mask[y:y + span, x:x + span].any()}
    assert kept == {tuple(g) for g in grid.tolist()}


def test_mask_refuses_a_block_too_narrow():
    p = peers()
    rows, cols = p.block_points(5, 6)
    with pytest.raises(p.PeerError, match="at least 7"):
        p.tia_mask((30, 30), np.stack([cols, rows], 1), 224, 32)


def test_skips_without_tiatoolbox(capsys):
    if importlib.util.find_spec("tiatoolbox") is not None:
        pytest.skip("TIAToolbox is installed here: the bench would run")
    assert peers().main([]) == 0
    assert capsys.readouterr().out.strip() == peers().SKIP
    assert peers().SKIP == "peers: skipped: TIAToolbox is not installed (pip install -e '.[peers]')"
