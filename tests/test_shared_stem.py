"""The lattice method's shared stem (crfcore.shared_stem) gives each crop's own numbers."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from crfcore import inference
from crfcore.model import CRFNet, ModelConfig, inference_copy
from crfcore.shared_stem import stem_cells, stem_plan
from crfcore.testing import varied_model


def crop_stems(features, plan, region, corners):
    """The reference: each crop cut out and run through the stem on its own."""
    c = plan.crop
    crops = torch.stack([region[0, :, y:y + c, x:x + c] for x, y in corners.tolist()])
    return features[:plan.blocks](crops.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("width, crop, step", [(1.0, 224, 64), (0.5, 96, 12), (0.25, 160, 4)])
def test_stem_cells_are_each_crops_own(width, crop, step):
    torch.manual_seed(0)
    model = inference_copy(CRFNet(ModelConfig(grid=1, width_mult=width)).eval())
    plan = stem_plan(model.features, crop)
    assert (plan.stride, plan.top, plan.bottom) == (4, 3, 2)  # MobileNetV2's first 4 blocks
    h, w = crop + 2 * step, crop + 3 * step
    region = torch.randn(1, 3, h, w).contiguous(memory_format=torch.channels_last)
    corners = np.array([(x, y) for y in range(0, h - crop + 1, step) for x in range(0, w - crop + 1, step)])
    with torch.no_grad():
        got = stem_cells(model.features, plan, region, corners, batch=5)
        want = crop_stems(model.features, plan, region, corners)
        whole = model.features[:plan.blocks](region)[0]
    assert torch.equal(got, want)
    # the edge bands are real: the region's own cells differ there, and only there
    x, y = corners[-1] // 4
    window = whole[:, y:y + plan.side, x:x + plan.side]
    inner = slice(plan.top, plan.side - plan.bottom)
    assert torch.equal(window[:, inner, inner], want[-1][:, inner, inner])
    assert not torch.allclose(window[:, :plan.top], want[-1][:, :plan.top])
    assert not torch.allclose(window[:, :, -plan.bottom:], want[-1][:, :, -plan.bottom:])


def test_no_plan_where_it_cannot_apply():
    features = CRFNet(ModelConfig(grid=1, width_mult=0.25)).features
    assert stem_plan(features, 28) is None  # the strips would be wider than half the crop
    assert stem_plan(features, 226) is None  # not a whole number of stem cells
    assert stem_plan(features, 224) is not None


def test_it_is_used_only_where_it_saves_work():
    features = CRFNet(ModelConfig(grid=1, width_mult=0.25)).features
    ncrf, demo = stem_plan(features, 224), stem_plan(features, 56)
    block = (7 * 64 + 224, 15 * 64 + 224)  # a full block of 8 x 16 crops at NCRF's geometry
    assert ncrf.worth_sharing(block, 128, batch=64)
    assert not ncrf.worth_sharing(block, 128, batch=4)  # its stem would hold more than a batch of crops
    assert not ncrf.worth_sharing((224, 224 + 15 * 64), 2, batch=64)  # two crops far apart
    assert not demo.worth_sharing((7 * 32 + 56, 15 * 32 + 56), 128, batch=64)  # the strips cost more than the crops


@pytest.mark.parametrize("tta, precision", [(1, "fp32"), (8, "fp32"), (1, "bf16")])
def test_lattice_map_is_the_same_with_the_stem_shared(border_slide, tta, precision, monkeypatch):
    s, mask, meta = border_slide
    model = varied_model(s.path, 160, 3, width=0.25, head_scale=20, crf_std=0.3, seed=4)
    if tta == 8:  # a subset of points: TTA runs the CNN 8 times
        keep = np.zeros_like(mask)
        keep[::4, ::4] = mask[::4, ::4]
        mask = keep
    opts = inference.Options(batch_size=48, workers=0, quiet=True, band_rows=8, tta=tta, precision=precision)
    shared = []
    embed_region = inference.embed_region
    monkeypatch.setattr(inference, "embed_region", lambda *a: shared.append(len(a[3])) or embed_region(*a))
    got, method = inference.probability_map(model, s.path, mask, meta["downsample"], 160, 160, "lattice", opts)
    assert method == "lattice" and sum(shared) > 100
    whole = replace(opts, share_stem=False)
    want, _ = inference.probability_map(model, s.path, mask, meta["downsample"], 160, 160, "lattice", whole)
    assert got[mask].std() > 0.05  # a map worth comparing
    if precision == "fp32":
        assert np.abs(got - want).max() < 1e-6
    else:  # PyTorch 2.14's oneDNN rounds a few cells of the thin edge strips one bf16 step apart from
        # the crop's own (37 of 1.6 million in one region); this test model's head (x20) makes that
        # 0.05 at a few points, where its bf16 map is 0.77 off its fp32 map
        off = np.abs(got - want)[mask]
        assert off.max() < 0.1 and off.mean() < 1e-3 and (off > 0.01).mean() < 0.02
