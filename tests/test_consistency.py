"""The dense-consistency loss (crfcore.consistency): its windows and its batch norm."""
import pytest
import torch

from crfcore.config import ConfigError, TrainConfig
from crfcore.consistency import DenseConsistent, check_geometry
from crfcore.model import CRFNet, ModelConfig


def model(grid: int) -> CRFNet:
    """A small model whose batch norms hold real statistics (of random images), so that
    its eval-mode outputs depend on the input as a trained model's do."""
    torch.manual_seed(0)
    m = CRFNet(ModelConfig(grid=grid, width_mult=0.25))
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = None  # a cumulative average
    with torch.no_grad():
        for _ in range(4):
            m.embed(torch.randn(8, 3, 64, 64))
    return m.eval()


def test_the_gap_is_zero_when_the_context_is_the_crop():
    net = DenseConsistent(model(1), patch=64, crop=64).train()
    cells = torch.randn(2, 1, 3, 64, 64)
    _, gap = net((cells, cells[:, 0]))
    assert gap.item() < 1e-5
    _, gap = net((cells, torch.randn(2, 3, 64, 64)))
    assert gap.item() > 1e-2


def test_windows_are_the_crops_cells_row_major():
    m = model(3).eval()
    net = DenseConsistent(m, patch=64, crop=56)
    context = torch.randn(1, 3, 188, 188)  # a 192 grid image from the first crop's corner (4) on
    logits, feats = net.dense(context, 3)
    fmap = m.features(context)[0]
    for r in range(3):
        for c in range(3):
            want = fmap[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean((1, 2))  # 56-pixel crop: 2 x 2 cells
            torch.testing.assert_close(feats[3 * r + c], want)
    torch.testing.assert_close(logits, m.fc(feats).squeeze(1))


def test_batch_norm_stays_frozen_in_training():
    m = model(3)
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    net = DenseConsistent(m, patch=64, crop=56).train()
    assert m.training and not any(b.training for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))
    out, gap = net((torch.randn(2, 9, 3, 56, 56), torch.randn(2, 3, 188, 188)))
    (out.sum() + gap).backward()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert m.features[0][0].weight.grad is not None


def test_gap_falls_when_trained_on_it():
    net = DenseConsistent(model(3), patch=64, crop=56).train()
    x = (torch.randn(4, 9, 3, 56, 56), torch.randn(4, 3, 188, 188))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        _, gap = net(x)
        first = first if first is not None else gap.item()
        opt.zero_grad()
        gap.backward()
        opt.step()
    assert net(x)[1].item() < 0.5 * first


def test_geometry_and_config_are_checked():
    assert check_geometry(model(3), 256) is None
    assert "multiple of the feature stride 32" in check_geometry(model(3), 48)
    base = dict(data_path_train="d", json_path_train="j")
    with pytest.raises(ConfigError, match="init_from"):
        TrainConfig(**base, dense_consistency=1.0).check()
    with pytest.raises(ConfigError, match="expected at least 0"):
        TrainConfig(**base, dense_consistency=-1.0, init_from="c").check()
    with pytest.raises(ConfigError, match="grid mode"):
        TrainConfig(mode="classify", grid=1, data_path_train="d", dense_consistency=1.0, init_from="c").check()
    TrainConfig(**base, dense_consistency=1.0, init_from="c").check()


def test_the_ncrf_geometry_bench_configs_are_valid(tmp_path):
    """bench/dense_ncrf.py's two train.py configs load as train.py loads them (unknown or
    out-of-range keys would stop the bench after its slides), the fine-tune is the demo's
    dense recipe on the first model, and its slides are not the bench slide (seed 0)."""
    import argparse
    import json

    from conftest import ROOT, load_script
    from crfcore.config import load_config

    bench = load_script("bench/dense_ncrf.py")
    cfgs = bench.configs(tmp_path, argparse.Namespace(epochs=4, tune_epochs=6))
    loaded = {}
    for name, cfg in cfgs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
        loaded[name] = load_config(tmp_path / f"{name}.json")
    demo = json.loads((ROOT / "example" / "config_dense.json").read_text())
    tune = loaded["dense"]
    assert tune.init_from == str(tmp_path / "trained.ckpt") and loaded["trained"].dense_consistency == 0
    assert (tune.dense_consistency, tune.lr, tune.schedule, tune.best_metric) == \
        (demo["dense_consistency"], demo["lr"], demo["schedule"], demo["best_metric"])
    assert check_geometry(CRFNet(ModelConfig(grid=3)), tune.patch_size) is None
    assert (tune.patch_size, tune.crop_size, tune.width_mult) == (256, 224, 1.0)
    assert 0 not in [seed for _, seed in bench.SLIDES.values()]
