import numpy as np
import pytest
import torch

from crfcore.crf import CRF, mean_field
from crfcore.model import CRFNet, ModelConfig, fold_batch_norm
from conftest import ROOT


def test_crf_with_zero_w_is_identity():
    crf = CRF(9, iters=10)
    u, f = torch.randn(4, 9), torch.randn(4, 9, 32)
    assert torch.equal(crf(u, f), u)


def test_crf_is_permutation_consistent():
    torch.manual_seed(0)
    u, f, w = torch.randn(2, 9), torch.randn(2, 9, 16), torch.randn(9, 9)
    perm = torch.randperm(9)
    out = mean_field(u, f, w, 10)
    out_p = mean_field(u[:, perm], f[:, perm], w[perm][:, perm], 10)
    assert torch.allclose(out[:, perm], out_p, atol=1e-5)
    assert not torch.allclose(out, u)  # a non-zero W does change the logits


def test_crf_matches_the_formula_for_one_step():
    torch.manual_seed(1)
    u, f, w = torch.randn(9), torch.randn(9, 8), torch.randn(9, 9)
    s = torch.nn.functional.cosine_similarity(f[:, None], f[None], dim=-1)
    p = s * (w + w.T) / 2
    expect = u + p @ (2 * torch.sigmoid(u) - 1)
    assert torch.allclose(mean_field(u, f, w, 1), expect, atol=1e-5)


def test_batch_equals_items_alone_and_batch_of_one_works():
    torch.manual_seed(0)
    model = CRFNet(ModelConfig(grid=3, width_mult=0.5)).eval()
    with torch.no_grad():
        model.crf.W.normal_(0, 0.5)
        x = torch.randn(3, 9, 3, 64, 64)
        out = model(x)
        assert out.shape == (3, 9)
        for i in range(3):
            assert torch.allclose(model(x[i:i + 1]), out[i:i + 1], atol=1e-4)


def test_gradients_reach_w():
    model = CRFNet(ModelConfig(grid=3, width_mult=0.25)).train()
    x = torch.randn(2, 9, 3, 32, 32)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), torch.ones(2, 9))
    loss.backward()
    assert model.crf.W.grad is not None and model.crf.W.grad.abs().sum() > 0


def test_grid_one_and_multiclass_shapes():
    cnn = CRFNet(ModelConfig(grid=1, width_mult=0.25)).eval()
    assert cnn.crf is None and cnn(torch.randn(2, 4, 3, 32, 32)).shape == (2, 4)
    cls = CRFNet(ModelConfig(grid=1, num_classes=5, width_mult=0.25)).eval()
    assert cls(torch.randn(2, 1, 3, 32, 32)).shape == (2, 1, 5)
    assert CRFNet(ModelConfig(grid=7, width_mult=0.25)).crf.W.shape == (49, 49)


def test_bad_checkpoints_get_one_line_errors(tmp_path):
    import argparse

    from crfcore.model import CheckpointError, model_from_checkpoint, save_checkpoint

    good = tmp_path / "good.ckpt"
    save_checkpoint(good, CRFNet(ModelConfig(grid=1, width_mult=0.25)), {"mode": "grid", "grid": 1, "width_mult": 0.25})
    assert model_from_checkpoint(good, expect={"mode": "grid"})[0].cfg.grid == 1
    np.save(tmp_path / "mask.npy", np.zeros((2, 2)))
    torch.save({"a": argparse.Namespace(x=1)}, tmp_path / "object.ckpt")
    torch.save({"a": 1}, tmp_path / "plain.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:1000])
    cases = {"missing.ckpt": "no such checkpoint", "mask.npy": "not a file written by torch.save",
             "object.ckpt": "objects other than weights", "plain.ckpt": r"no state_dict of weights and config",
             "cut.ckpt": "truncated or corrupt checkpoint"}
    ckpt = torch.load(good, weights_only=True)  # hand-edited copies of a good one: each is refused by name
    state, config = ckpt["state_dict"], ckpt["config"]
    nan = {**state, "fc.bias": torch.tensor([float("nan")])}
    edits = {"config_str": ({"config": "grid"}, "no state_dict of weights and config"),
             "state_list": ({"state_dict": [1]}, "no state_dict of weights and config"),
             "state_str": ({"state_dict": {"fc.bias": "x"}}, "no state_dict of weights and config"),
             "iters_str": ({"config": {**config, "crf_iters": "a"}}, "crf_iters='a': expected int"),
             "crop0": ({"config": {**config, "crop_size": 0}}, "crop_size=0: expected at least 1"),
             "wide": ({"config": {**config, "width_mult": 1e6}}, "width_mult=1000000.0: expected above 0"),
             "mpp_str": ({"config": {**config, "mpp": "x"}}, "mpp='x': expected float or null"),
             "stain": ({"config": {**config, "stain_reference": {"x": 1}}}, "malformed stain reference"),
             "nan": ({"state_dict": nan}, "weight fc.bias is NaN or infinite")}
    for name, (edit, msg) in edits.items():
        torch.save({**ckpt, **edit}, tmp_path / f"{name}.ckpt")
        cases[f"{name}.ckpt"] = msg
    for name, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg) as err:
            model_from_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value) and str(tmp_path / name) in str(err.value)
    with pytest.raises(CheckpointError, match="config has no patch_size"):
        model_from_checkpoint(good, needs=("patch_size",))
    torch.save(ckpt, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)  # torch < 1.6's format
    assert model_from_checkpoint(tmp_path / "legacy.ckpt")[0].cfg.grid == 1
    torch.save({"a": argparse.Namespace(x=1)}, tmp_path / "legacy_object.ckpt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="objects other than weights"):
        model_from_checkpoint(tmp_path / "legacy_object.ckpt")
    # training-only keys are the training run's business: values older versions allowed still load
    torch.save({**ckpt, "config": {**config, "max_steps": 0, "weight_decay": -1.0}}, tmp_path / "older.ckpt")
    assert model_from_checkpoint(tmp_path / "older.ckpt")[0].cfg.grid == 1
    with pytest.raises(CheckpointError, match="mode='grid', expected 'classify'"):
        model_from_checkpoint(good, expect={"mode": "classify"})


def test_folded_batch_norm_gives_the_same_outputs_and_leaves_the_model_alone():
    torch.manual_seed(3)
    model = CRFNet(ModelConfig(grid=3, width_mult=0.5)).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.2, 0.2)  # statistics far from the identity, as after training
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    folded = fold_batch_norm(model)
    x = torch.randn(2, 9, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 52  # MobileNetV2's, untouched


def test_retain_freed_memory_takes_effect_under_glibc():
    import platform

    from crfcore.device import retain_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert retain_freed_memory()


KEPT_THEN_FORKED = """
import os, sys, psutil, torch
from crfcore.device import retain_freed_memory
assert retain_freed_memory()
kept = [torch.ones(2**24) for _ in range(16)]  # 1 GiB in 64 MiB blocks, then freed: kept for reuse
del kept
before = psutil.Process().memory_info().rss
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print(before - psutil.Process().memory_info().rss)
"""


def test_memory_kept_for_reuse_is_handed_back_before_a_fork():
    """The trainer keeps freed memory (retain_freed_memory); a DataLoader worker forked
    from it shares those pages copy-on-write, and the trainer's next step copied them all:
    a 14 GB run needed over 24 GB and was killed. Before a fork the kept memory goes back."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    out = subprocess.run([sys.executable, "-c", KEPT_THEN_FORKED], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert int(out.stdout) > 2**29, "less than half the freed GiB went back before the fork"
