import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from crfcore import loaders, memory, training
from crfcore.datasets import GridDataset
from crfcore.model import CRFNet, ModelConfig, init_from_checkpoint, load_checkpoint, save_checkpoint
from conftest import ROOT, call, load_script, run_script, shared

TINY = {"image_size": 96, "patch_size": 32, "crop_size": 32, "width_mult": 0.25, "batch_size": 8,
        "workers": 0, "optimizer": "adamw", "lr": 0.002, "epochs": 1}


@pytest.fixture(scope="module")
def grid_data(syn_slide, tmp_path_factory):
    """The reduced chain: xml2json -> Mask_gen -> Patch_gen -> coord_list_gen."""
    d = tmp_path_factory.mktemp("grid")
    call("xml2json.py", syn_slide.path.with_suffix(".xml"), "-o", d / "json" / "syn_tumor.json")
    for kind in ("tumor", "normal"):
        call("Mask_gen.py", syn_slide.path, "-o", d / f"{kind}.npy", "--kind", kind,
                   "--annotation", d / "json" / "syn_tumor.json", "--downsample", "16")
        call("Patch_gen.py", syn_slide.path, "--mask", d / f"{kind}.npy", "-o", d / f"p_{kind}",
                   "--mode", "random", "--num", "12", "--image-size", "96", "--workers", "0", "--quiet")
        call("coord_list_gen.py", d / f"p_{kind}", "-o", d / kind)
        shutil.copytree(d / kind, d / f"{kind}_valid")  # the same patches: a set of its own is a folder of its own
    cfg = {"mode": "grid", "data_path_tumor_train": str(d / "tumor"), "data_path_normal_train": str(d / "normal"),
           "json_path_train": str(d / "json"), "data_path_tumor_valid": str(d / "tumor_valid"),
           "data_path_normal_valid": str(d / "normal_valid"), **TINY}
    (d / "cfg.json").write_text(json.dumps(cfg))
    return d


def test_grid_dataset_labels_follow_the_annotation(grid_data, syn_slide):
    from crfcore.datasets import GridDataset
    ds = GridDataset(grid_data / "tumor", grid_data / "json", 96, 32, 32)
    x, y = ds[0]
    assert x.shape == (9, 3, 32, 32) and y.shape == (9,)
    _, cx, cy = ds.coords[0]
    assert y[4] == syn_slide.annotation.contains(np.array([[cx, cy]]))[0]
    assert ds.labels[:, 4].mean() > 0.9  # centres were drawn inside the tumour mask


def test_augmentation_keeps_labels_on_their_cells():
    from crfcore.datasets import Augment
    img = np.zeros((96, 96, 3), np.uint8)
    img[:32, 64:] = 255  # top-right cell white
    labels = np.zeros((3, 3))
    labels[0, 2] = 1
    aug = Augment(None, True, True)
    for seed in range(12):
        a, l = aug(img, labels, np.random.default_rng(seed))
        r, c = np.argwhere(l == 1)[0]
        assert a[r * 32 + 16, c * 32 + 16].min() == 255


def test_train_one_epoch_writes_everything(grid_data, tmp_path):
    call("train.py", grid_data / "cfg.json", tmp_path / "run", "--quiet")
    for name in ("train.ckpt", "best.ckpt", "log.csv", "curves.png", "config.json"):
        assert (tmp_path / "run" / name).exists(), name
    ckpt = load_checkpoint(tmp_path / "run" / "best.ckpt")
    assert ckpt["config"]["grid"] == 3 and ckpt["epoch"] == 1 and "crfcore_version" in ckpt
    log = (tmp_path / "run" / "log.csv").read_text()
    assert "valid_auc" in log and "valid_acc_tumor" in log


def test_resume_continues_exactly(grid_data, tmp_path):
    call("train.py", grid_data / "cfg.json", tmp_path / "a", "--set", "epochs=2", "--quiet")
    call("train.py", grid_data / "cfg.json", tmp_path / "b", "--set", "epochs=1", "--quiet")
    call("train.py", grid_data / "cfg.json", tmp_path / "b", "--set", "epochs=2", "--resume", "--quiet")
    a = load_checkpoint(tmp_path / "a" / "train.ckpt")
    b = load_checkpoint(tmp_path / "b" / "train.ckpt")
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-5), k
    proc = call("train.py", grid_data / "cfg.json", tmp_path / "a", check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    proc = call("train.py", grid_data / "cfg.json", tmp_path / "b", "--set", "epochs=3", "--set", "mpp=0.5",
                "--resume", check=False)  # another resolution is another model
    assert proc.returncode == 2 and "['mpp']" in proc.stderr
    for change in ("weight_decay=0.5", "best_metric=loss", "schedule=cosine", "seed=3"):  # another run
        proc = call("train.py", grid_data / "cfg.json", tmp_path / "b", "--set", "epochs=3", "--set", change,
                    "--resume", check=False)
        assert proc.returncode == 2 and f"['{change.split('=')[0]}']" in proc.stderr, change
    before = (tmp_path / "b" / "config.json").read_text()  # fewer epochs than done: nothing to train (a hostile test)
    proc = call("train.py", grid_data / "cfg.json", tmp_path / "b", "--set", "epochs=1", "--resume", check=False)
    assert proc.returncode == 2 and "has trained 2 epochs; epochs=1 is fewer" in proc.stderr
    assert (tmp_path / "b" / "config.json").read_text() == before


def lr_column(run) -> list[float]:
    rows = (run / "log.csv").read_text().splitlines()
    k = rows[0].split(",").index("lr")
    return [float(r.split(",")[k]) for r in rows[1:]]


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_a_run_resumed_with_more_epochs_follows_the_longer_schedule(grid_data, tmp_path, schedule):
    """From a hostile review: the stored cosine scheduler kept the old length, so the
    learning rate of the added epochs climbed back from 0; and log.csv gave each epoch
    the next epoch's rate. A run resumed to 3 epochs now logs what a fresh 3-epoch run does."""
    sched = ("--set", f"schedule={schedule}", "--set", "step_size=1", "--set", "gamma=0.5", "--quiet")
    call("train.py", grid_data / "cfg.json", tmp_path / "fresh", "--set", "epochs=3", *sched)
    call("train.py", grid_data / "cfg.json", tmp_path / "r", "--set", "epochs=1", *sched)
    call("train.py", grid_data / "cfg.json", tmp_path / "r", "--set", "epochs=3", "--resume", *sched)
    want = [0.002, 0.0015, 0.0005] if schedule == "cosine" else [0.002, 0.001, 0.0005]
    assert lr_column(tmp_path / "fresh") == pytest.approx(want) and lr_column(tmp_path / "r") == pytest.approx(want)


def test_without_validation_best_is_picked_by_training_and_says_so(grid_data, tmp_path):
    cfg = {k: v for k, v in json.loads((grid_data / "cfg.json").read_text()).items() if "valid" not in k}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    res = call("train.py", tmp_path / "c.json", tmp_path / "r")
    assert "no validation set: best.ckpt is picked by train_acc, not by validation auc" in res.stderr + res.stdout
    assert load_checkpoint(tmp_path / "r" / "best.ckpt")["best_metric"] == "train_acc"
    import shutil

    shutil.copy(tmp_path / "r" / "best.ckpt", tmp_path / "r" / "train.ckpt")  # not a checkpoint to resume from
    res = call("train.py", tmp_path / "c.json", tmp_path / "r", "--resume", "--set", "epochs=2", check=False)
    assert res.returncode == 2 and "has no optimizer, scheduler, rng" in res.stderr and "Traceback" not in res.stderr


def test_a_validation_set_added_on_resume_picks_best_afresh(grid_data, tmp_path):
    """A run resumed with a validation set it did not have picks best.ckpt by the
    validation metric from then on, never comparing it with the training value before."""
    from crfcore.runlog import read_log
    cfg = {k: v for k, v in json.loads((grid_data / "cfg.json").read_text()).items() if "valid" not in k}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    call("train.py", tmp_path / "c.json", tmp_path / "r", "--set", "best_metric=loss", "--quiet")
    res = call("train.py", grid_data / "cfg.json", tmp_path / "r", "--set", "best_metric=loss", "--set", "epochs=2",
               "--resume")
    assert "was picked by train_loss; from here on by valid_loss" in res.stderr + res.stdout
    best, log = load_checkpoint(tmp_path / "r" / "train.ckpt"), read_log(tmp_path / "r" / "log.csv")
    assert (best["best_metric"], best["best_epoch"]) == ("valid_loss", 2)
    assert best["best"] == pytest.approx(float(log[1]["valid_loss"]))
    assert load_checkpoint(tmp_path / "r" / "best.ckpt")["epoch"] == 2


def test_config_errors_are_one_line(grid_data, tmp_path):
    proc = call("train.py", grid_data / "cfg.json", tmp_path / "x", "--set", "lernrate=1", check=False)
    assert proc.returncode == 2 and "lernrate" in proc.stderr and "Traceback" not in proc.stderr
    cfg = json.loads((grid_data / "cfg.json").read_text())
    cfg["json_path_train"] = str(tmp_path)  # no JSON for the slide
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    proc = call("train.py", tmp_path / "c.json", tmp_path / "y", check=False)
    assert proc.returncode == 2 and "syn_tumor" in proc.stderr and "Traceback" not in proc.stderr
    cfg["epochs"] = "3"  # a review: a bad value did not name the file it came from
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    proc = call("train.py", tmp_path / "c.json", tmp_path / "z", check=False)
    assert proc.returncode == 2 and f"error: {tmp_path / 'c.json'}: config epochs='3': expected int" in proc.stderr
    proc = call("train.py", tmp_path / "c.json", tmp_path / "z", "--set", "epochs=0", check=False)
    assert proc.returncode == 2 and "error: --set: config epochs=0" in proc.stderr
    proc = call("train.py", grid_data / "cfg.json", tmp_path / "z", "--set", "grid=5", check=False)
    assert proc.returncode == 2 and "error: --set: " in proc.stderr and "grid (5)" in proc.stderr
    cfg["epochs"], cfg["bogus"] = 3, 1  # unknown keys in both: each source named with its own
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    proc = call("train.py", tmp_path / "c.json", tmp_path / "z", "--set", "typo=3", check=False)
    assert f"error: {tmp_path / 'c.json'}: unknown config key(s) ['bogus']" in proc.stderr
    del cfg["bogus"]
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    proc = call("train.py", tmp_path / "c.json", tmp_path / "z", "--set", "typo=3", check=False)
    assert "error: --set: unknown config key(s) ['typo']" in proc.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(grid_data, tmp_path, monkeypatch):
    call("train.py", grid_data / "cfg.json", tmp_path / "r", "--quiet")
    before = (tmp_path / "r" / "train.ckpt").read_bytes()
    real_loss_fn = training.loss_fn  # a diverged model's loss (lr is bounded now: no quick divergence to use)
    monkeypatch.setattr(training, "loss_fn", lambda *a: lambda o, t: real_loss_fn(*a)(o, t) * float("nan"))
    fresh = call("train.py", grid_data / "cfg.json", tmp_path / "f", "--quiet", check=False)
    assert fresh.returncode == 2 and "no epoch was completed" in fresh.stderr  # no train.ckpt to speak of
    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in call("train.py", grid_data / "cfg.json", tmp_path / "file",
                                                   check=False).stderr
    proc = call("train.py", grid_data / "cfg.json", tmp_path / "r", "--resume", "--set", "epochs=2", "--quiet",
                check=False)
    assert proc.returncode == 2 and "loss is nan" in proc.stderr.lower()
    assert (tmp_path / "r" / "train.ckpt").read_bytes() == before


def test_dense_consistency_fine_tune(grid_data, tmp_path):
    """train.py with dense_consistency: fine-tunes init_from with batch norm frozen, logs
    the gap on the training and the validation set, and can pick best.ckpt by the loss it
    minimises on validation (best_metric total_loss); without init_from it is refused."""
    from crfcore.consistency import DenseConsistent
    from crfcore.datasets import GridDataset
    from crfcore.runlog import read_log
    call("train.py", grid_data / "cfg.json", tmp_path / "base", "--quiet")
    base = tmp_path / "base" / "train.ckpt"
    call("train.py", grid_data / "cfg.json", tmp_path / "dense", "--set", "dense_consistency=0.5",
         "--set", f'init_from="{base}"', "--set", "epochs=3", "--set", "best_metric=total_loss", "--quiet")
    log = read_log(tmp_path / "dense" / "log.csv")
    col = {k: np.array([float(r[k]) for r in log]) for k in log[0] if k != "epoch"}
    assert len(log) == 3 and np.isfinite(col["train_dense_gap"]).all() and np.isfinite(col["valid_dense_gap"]).all()
    assert np.allclose(col["valid_total_loss"], col["valid_loss"] + 0.5 * col["valid_dense_gap"])
    best = load_checkpoint(tmp_path / "dense" / "best.ckpt")
    assert best["best_metric"] == "valid_total_loss" and best["epoch"] == int(np.argmin(col["valid_total_loss"])) + 1
    # the logged validation gap is the gap of the last epoch's weights over the validation images
    last = CRFNet(ModelConfig(grid=3, width_mult=0.25))
    last.load_state_dict(load_checkpoint(tmp_path / "dense" / "train.ckpt")["state_dict"])
    net = DenseConsistent(last, 32, 32).eval()
    sets = [GridDataset(grid_data / k, grid_data / "json", 96, 32, 32, context=True) for k in ("tumor_valid", "normal_valid")]
    items = [ds[i][0] for ds in sets for i in range(len(ds))]
    with torch.no_grad():
        _, gap = net((torch.stack([c for c, _ in items]), torch.stack([x for _, x in items])))
    assert gap.item() == pytest.approx(col["valid_dense_gap"][-1], rel=1e-4)
    old, new = load_checkpoint(base)["state_dict"], load_checkpoint(tmp_path / "dense" / "train.ckpt")["state_dict"]
    assert all(torch.equal(old[k], new[k]) for k in old if "running" in k)  # batch norm frozen
    assert not torch.equal(old["fc.weight"], new["fc.weight"])
    proc = call("train.py", grid_data / "cfg.json", tmp_path / "x", "--set", "dense_consistency=1.0", check=False)
    assert proc.returncode == 2 and "init_from" in proc.stderr and "Traceback" not in proc.stderr
    proc = call("train.py", grid_data / "cfg.json", tmp_path / "y", "--set", "best_metric=total_loss", check=False)
    assert proc.returncode == 2 and "needs dense_consistency" in proc.stderr and "Traceback" not in proc.stderr


def test_fine_tune_to_a_different_head(tmp_path):
    seven = CRFNet(ModelConfig(grid=1, num_classes=7, width_mult=0.25))
    save_checkpoint(tmp_path / "seven.ckpt", seven, {"mode": "classify", "grid": 1, "num_classes": 7,
                                                     "width_mult": 0.25})
    five = CRFNet(ModelConfig(grid=1, num_classes=5, width_mult=0.25))
    new = init_from_checkpoint(five, tmp_path / "seven.ckpt")
    assert new == ["fc.bias", "fc.weight"]
    assert torch.equal(five.features[0][0].weight, seven.features[0][0].weight)


def test_classify_mode_on_idc_with_report(tmp_path):
    idc = shared("idc")
    train, valid = tmp_path / "train", tmp_path / "valid"
    for c in ("0", "1"):
        files = sorted((idc / c).iterdir())
        for split, chunk in ((train, files[:40]), (valid, files[40:60])):
            (split / c).mkdir(parents=True)
            for f in chunk:
                (split / c / f.name).symlink_to(f)
    cfg = {"mode": "classify", "grid": 1, "data_path_train": str(train), "data_path_valid": str(valid),
           "patch_size": 48, "width_mult": 0.25, "batch_size": 16, "workers": 0, "epochs": 1,
           "optimizer": "adamw"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    proc = call("train.py", tmp_path / "cfg.json", tmp_path / "run", "--quiet")
    assert "precision" in proc.stdout and "balanced_accuracy=" in proc.stdout
    assert (tmp_path / "run" / "confusion_matrix.png").exists()
    proc = call("train.py", "--evaluate", tmp_path / "run" / "best.ckpt", valid, "--quiet")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("balanced_accuracy=") and " auc=" in last
    assert f"confusion matrix -> {valid / 'confusion_matrix.png'}" in proc.stdout
    (valid / "confusion_matrix.png").unlink()  # a read-only data folder: --plot puts the picture elsewhere
    proc = call("train.py", "--evaluate", tmp_path / "run" / "best.ckpt", valid, "--plot", tmp_path / "cm.png", "--quiet")
    assert (tmp_path / "cm.png").is_file() and not (valid / "confusion_matrix.png").exists()
    bad = call("train.py", "--evaluate", tmp_path / "run" / "best.ckpt", valid, "--plot", tmp_path / "cm.xyz",
               check=False)
    assert bad.returncode == 2 and "cannot write a .xyz picture" in bad.stderr
    image = sorted((valid / "1").iterdir())[0]  # a review: --plot onto one of the images replaced it
    bad = call("train.py", "--evaluate", tmp_path / "run" / "best.ckpt", valid, "--plot", image, check=False)
    assert bad.returncode == 2 and "is not a picture this tool wrote" in bad.stderr and image.stat().st_size < 20000


def test_torchrun_two_processes_on_cpu(grid_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29531", str(ROOT / "train.py"), str(grid_data / "cfg.json"),
                           str(tmp_path / "ddp"), "--set", 'device="cpu"', "--quiet"], capture_output=True,
                          text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "train.ckpt")
    single = loaders.BalancedBatches([12, 12], 8, 0)
    assert ckpt["step"] == len(single) // 2  # each rank took half the batches
    assert (tmp_path / "ddp" / "log.csv").read_text().count("\n") == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nccl backend)")
def test_torchrun_nccl_on_gpu(grid_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                           "--master_port", "29532", str(ROOT / "train.py"), str(grid_data / "cfg.json"),
                           str(tmp_path / "ddp"), "--quiet"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "train.ckpt")
    assert ckpt["step"] == len(loaders.BalancedBatches([12, 12], 8, 0))


def test_reduced_pipeline_chain(grid_data, syn_slide, tmp_path):
    """Every stage interface in order, as example/run_pipeline.sh calls them (tiny sizes)."""
    run_script("train.py", grid_data / "cfg.json", tmp_path / "model", "--quiet")
    run_script("Mask_gen.py", syn_slide.path, "-o", tmp_path / "tissue.npy", "--kind", "tissue",
               "--downsample", "32")
    run_script("Mask_gen.py", syn_slide.path, "-o", tmp_path / "tumour.npy", "--kind", "tumor",
               "--annotation", grid_data / "json" / "syn_tumor.json", "--downsample", "32")
    run_script("prob_map.py", syn_slide.path, tmp_path / "model" / "best.ckpt", tmp_path / "tissue.npy",
               tmp_path / "maps" / "syn_tumor_prob.npy", "--workers", "1", "--quiet")
    run_script("prob_map_show.py", tmp_path / "maps" / "syn_tumor_prob.npy", "-o", tmp_path / "o.png",
               "--slide", syn_slide.path)
    run_script("evaluate.py", "lesions", tmp_path / "maps" / "syn_tumor_prob.npy", "-o",
               tmp_path / "les" / "syn_tumor.csv", "--threshold", "0.0")
    proc = run_script("evaluate.py", "froc", tmp_path / "les", grid_data / "json")
    assert "FROC=" in proc.stdout
    proc = run_script("evaluate.py", "pixels", tmp_path / "maps" / "syn_tumor_prob.npy", tmp_path / "tumour.npy")
    assert "IoU=" in proc.stdout
    assert (tmp_path / "o.png").stat().st_size > 1000


@pytest.mark.parametrize("crash_before", ["log.csv", "curves.png", "train.ckpt", "best.ckpt"])
def test_a_kill_between_an_epochs_writes_resumes_consistently(grid_data, tmp_path, monkeypatch, crash_before):
    """Epoch 2 dies just before one of its outputs is written (as a kill -9 would leave
    it; best.ckpt: the rename of the pending best after train.ckpt); best.ckpt is then
    always the best that train.ckpt records (never the uncommitted epoch's), and --resume
    ends with best.ckpt, log.csv and train.ckpt of epoch 2, equal to an uninterrupted run."""
    slow = ("--set", "best_metric=loss", "--set", "lr=0.0001")
    call("train.py", grid_data / "cfg.json", tmp_path / "ref", "--set", "epochs=2", *slow, "--quiet")
    call("train.py", grid_data / "cfg.json", tmp_path / "r", "--set", "epochs=1", *slow, "--quiet")
    real_ckpt, real_log, real_plot = training.save_checkpoint, training.append_log, training.plot_curves

    def killed_at(name, real):
        def write(path, *args, **kw):
            if path.name == crash_before:
                raise KeyboardInterrupt  # the process dies here
            return real(path, *args, **kw)
        return write
    monkeypatch.setattr(training, "save_checkpoint", killed_at("train.ckpt", real_ckpt))
    monkeypatch.setattr(training, "append_log", killed_at("log.csv", real_log))
    monkeypatch.setattr(training, "plot_curves", lambda log, png: killed_at("curves.png", real_plot)(png, log)
                        if png.name == crash_before else real_plot(log, png))
    real_replace = Path.replace
    monkeypatch.setattr(Path, "replace", lambda src, dst: killed_at("best.ckpt", real_replace)(Path(dst), src)
                        if Path(dst).name == crash_before else real_replace(src, dst))
    with pytest.raises(SystemExit) as died:
        from crfcore.cli import run
        run(load_script("train.py").main, [str(grid_data / "cfg.json"), str(tmp_path / "r"), "--resume", "--set",
                                           "epochs=2", *slow, "--quiet"])
    assert died.value.code == 130
    monkeypatch.undo()
    committed = load_checkpoint(tmp_path / "r" / "train.ckpt")
    assert committed["epoch"] == (2 if crash_before == "best.ckpt" else 1)  # train.ckpt commits the epoch
    assert load_checkpoint(tmp_path / "r" / "best.ckpt")["epoch"] == 1  # never an uncommitted best
    res = call("train.py", grid_data / "cfg.json", tmp_path / "r", "--resume", "--set", "epochs=2", *slow, "--quiet")
    assert "best.ckpt" in res.stdout
    for name in ("train.ckpt", "best.ckpt"):
        a, b = load_checkpoint(tmp_path / "ref" / name), load_checkpoint(tmp_path / "r" / name)
        assert a["epoch"] == b["epoch"] and a.get("best_epoch") == b.get("best_epoch"), name
        for k, v in a["state_dict"].items():
            assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-5), (name, k)
    assert [r.split(",")[0] for r in (tmp_path / "r" / "log.csv").read_text().splitlines()[1:]] == ["1", "2"]


def test_a_run_killed_under_the_older_write_order_resumes(grid_data, tmp_path):
    """Older versions wrote best.ckpt before train.ckpt: a kill between left best.ckpt one
    epoch ahead. Resume warns, chooses the best again from the redone epoch on, and ends
    consistent (best.ckpt is the epoch train.ckpt records)."""
    import shutil
    slow = ("--set", "best_metric=loss", "--set", "lr=0.0001")  # epoch 2 is the best at this lr
    call("train.py", grid_data / "cfg.json", tmp_path / "ref", "--set", "epochs=2", *slow, "--quiet")
    call("train.py", grid_data / "cfg.json", tmp_path / "r", "--set", "epochs=1", *slow, "--quiet")
    shutil.copy(tmp_path / "ref" / "best.ckpt", tmp_path / "r" / "best.ckpt")  # as the old order left it
    res = call("train.py", grid_data / "cfg.json", tmp_path / "r", "--resume", "--set", "epochs=2", *slow, "--quiet")
    assert "which a kill cut short" in res.stderr
    best, last = load_checkpoint(tmp_path / "r" / "best.ckpt"), load_checkpoint(tmp_path / "r" / "train.ckpt")
    assert best["epoch"] == last["best_epoch"] == 2


def test_resume_refuses_outputs_that_do_not_match(grid_data, tmp_path):
    call("train.py", grid_data / "cfg.json", tmp_path / "r", "--set", "epochs=1", "--quiet")
    (tmp_path / "r" / "best.ckpt").unlink()
    res = call("train.py", grid_data / "cfg.json", tmp_path / "r", "--resume", "--set", "epochs=2", check=False)
    assert res.returncode == 2 and "best.ckpt is missing" in res.stderr


def test_config_is_typed_and_the_readme_table_is_generated_from_it():
    from crfcore.config import ConfigError, TrainConfig, markdown_table
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README's config table differs from crfcore.config.markdown_table()"
    cfg = TrainConfig(color_jitter=[0.1, 0.2, 0.3, 0.0], lr=1)
    assert cfg.color_jitter == (0.1, 0.2, 0.3, 0.0) and isinstance(cfg.lr, float)
    with pytest.raises(Exception):
        cfg.lr = 0.5  # frozen
    for bad in ({"epochs": "3"}, {"flip": 1}, {"batch_size": True}, {"class_weights": ["a", "b"]}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="mpp='abc': expected float or null"):
        TrainConfig(mpp="abc")


@pytest.mark.parametrize("setting, message", [
    ("seed=-1", "seed=-1: expected at least 0 and at most 4.29497e\\+09"),
    ("weight_decay=-1", "weight_decay=-1.0: expected at least 0"),
    ("weight_decay=NaN", "weight_decay=nan: expected at least 0"),
    ("momentum=1.5", "momentum=1.5: expected at least 0 and at most 1"),
    ("width_mult=1e6", "width_mult=1000000.0: expected above 0 and at most 4"),
    ("max_steps=0", "max_steps=0: expected at least 1"),
    ("grid=2", "grid=2: expected one of 1, 3, 5, 7"),  # a review: was refused only when the model was built
    ("lr=1e300", "lr=1e\\+300: expected above 0 and at most 10"),  # from a hostile review: overflowed in the step
    ("gamma=1e300", "gamma=1e\\+300: expected above 0 and at most 10"),
    ("mpp=1e300", "mpp=1e\\+300: expected above 0 and at most 1000"),
    ("crf_iters=-3", "crf_iters=-3: expected at least 0"),
    ("class_weights=[-1,1]", "class_weights=\\(-1, 1\\): expected numbers at least 0"),
    ("class_weights=[0,0]", "expected some weight above 0"),
    ("color_jitter=[-1,0,0,0]", "color_jitter=.*: expected numbers at least 0"),
    ("color_jitter=[0,0,0,0.9]", "color_jitter=.*: expected numbers at least 0 and at most 0.5"),
    ("color_jitter=[0,0]", "expected 4 numbers"),
    ("epochs=" + "9" * 5000, "epochs='9999.*: expected int"),
    ("epochs=" + "9" * 40, "epochs=9999.*: expected at least 1 and at most 2.14748e\\+09"),
])
def test_every_numeric_config_key_is_range_checked(setting, message):
    """A value that cannot train is refused by name before anything runs (it used to
    reach torch or numpy and end in a traceback, or train silently: max_steps -5)."""
    from crfcore.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [setting])
    assert "\n" not in str(err.value)


def test_a_second_run_into_the_same_save_dir_is_refused(grid_data, tmp_path):
    """From a hostile review: two train.py runs into one SAVE_DIR both ended 'done', the
    folder holding the second run only (train.ckpt appears after the first epoch)."""
    from crfcore.trainset import run_lock

    (tmp_path / "r").mkdir()
    with run_lock(tmp_path / "r"):  # a first run, still in its first epoch
        res = call("train.py", grid_data / "cfg.json", tmp_path / "r", "--quiet", check=False)
    assert res.returncode == 2 and "another train.py run is writing this folder" in res.stderr
    assert not (tmp_path / "r" / "train.ckpt").exists()
    call("train.py", grid_data / "cfg.json", tmp_path / "r", "--quiet")  # the lock ends with its run
    call("train.py", grid_data / "cfg.json", tmp_path / "r", "--quiet", "--resume", "--set", "epochs=2")


def test_a_last_batch_of_one_joins_the_one_before():
    """From a hostile review: classify mode at patch 32 with a last batch of one image died
    in batch norm ('Expected more than 1 value per channel')."""
    from crfcore import loaders

    sizes = [len(b) for b in loaders.BalancedBatches([5], 2, 0)]
    assert sizes == [2, 3] and sorted(i for b in loaders.BalancedBatches([5], 2, 0) for i in b) == list(range(5))
    assert [len(b) for b in loaders.BalancedBatches([6], 2, 0)] == [2, 2, 2]


def test_resume_of_a_mistyped_folder_makes_nothing(grid_data, tmp_path):
    res = call("train.py", grid_data / "cfg.json", tmp_path / "typo", "--resume", check=False)
    assert res.returncode == 2 and "train.ckpt does not exist" in res.stderr and not (tmp_path / "typo").exists()


def test_a_class_folder_skips_hidden_folders_and_files(tmp_path):
    """From a code review: `.ipynb_checkpoints` became a class and `._x.png` (macOS) an image."""
    from crfcore.datasets import FolderDataset

    for c in ("0", "1", ".ipynb_checkpoints"):
        (tmp_path / c).mkdir()
        cv2.imwrite(str(tmp_path / c / "a.png"), np.full((8, 8, 3), 128, np.uint8))
    (tmp_path / "0" / "._a.png").write_bytes(b"AppleDouble")
    ds = FolderDataset(tmp_path, 8)
    assert ds.classes == ["0", "1"] and [p.name for p, _ in ds.items] == ["a.png", "a.png"]


def test_a_run_never_replaces_its_own_inputs(grid_data, tmp_path):
    """From a hostile test: a config file, an init_from checkpoint or a stain reference
    kept in SAVE_DIR was overwritten by the run's own files; SAVE_DIR = a data folder
    blocked on its own lock; an empty SAVE_DIR trained into the working folder."""
    run = tmp_path / "run"
    run.mkdir()
    own = run / "config.json"
    own.write_text((grid_data / "cfg.json").read_text())
    before = own.read_bytes()
    for name in ("best.ckpt", "curves.png", "confusion_matrix.png", "report.txt"):
        (run / name).write_bytes(before)
    # the run's own config.json may be the config (a restart); other run files may not be inputs
    for args, name in (([own, run, "--set", f'init_from="{run / "best.ckpt"}"'], "best.ckpt"),
                       ([grid_data / "cfg.json", run, "--set", f'stain_norm="{run / "curves.png"}"'], "curves.png"),
                       ([grid_data / "cfg.json", run, "--set", f'stain_norm="{run / "confusion_matrix.png"}"'],
                        "confusion_matrix.png"),  # classify mode writes it
                       ([run / "report.txt", run], "report.txt")):
        res = call("train.py", *args, check=False)
        assert res.returncode == 2 and "is also an input of this run" in res.stderr and "Traceback" not in res.stderr
        assert f"({run / name})" in res.stderr, res.stderr
        assert (run / name).read_bytes() == before and not (run / "train.ckpt").exists()
    for data in (grid_data / "normal", tmp_path / "new" / ".." / ".." / grid_data.name / "normal"):
        res = call("train.py", grid_data / "cfg.json", data, check=False)
        assert res.returncode == 2 and "is one of the run's data folders" in res.stderr
    assert not (tmp_path / "new").exists()  # `new/..` is not made
    keep = tmp_path / "keep"  # a review: the cleanup removed a folder that existed, named through `new/..`
    keep.mkdir()
    res = call("train.py", grid_data / "cfg.json", tmp_path / "newer" / ".." / "keep", "--set",
               f'init_from="{tmp_path / "none.ckpt"}"', check=False)
    assert res.returncode == 2 and keep.is_dir() and not (tmp_path / "newer").exists()
    call("train.py", own, run, "--quiet")  # a review: a run killed before its first epoch restarts from its config.json
    assert (run / "train.ckpt").is_file() and json.loads(own.read_text())["epochs"] == 1
    res = call("train.py", grid_data / "cfg.json", "", check=False)
    assert res.returncode == 2 and "empty path" in res.stderr


def test_a_refused_run_leaves_no_save_dir_behind(grid_data, tmp_path):
    res = call("train.py", grid_data / "cfg.json", tmp_path / "new" / "er" / "run", "--set",
               f'json_path_train="{tmp_path}"', check=False)
    assert res.returncode == 2 and "syn_tumor" in res.stderr and not (tmp_path / "new").exists()  # parents too
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for script, args in (("train.py", [grid_data / "cfg.json", tmp_path / "loop"]),
                         ("coord_list_gen.py", [grid_data / "p_tumor", "-o", tmp_path / "loop"])):
        res = call(script, *args, check=False)
        assert res.returncode == 2 and "loop: cannot resolve the folder" in res.stderr and "Traceback" not in res.stderr


def test_keys_train_py_sets_are_not_config_keys(tmp_path):
    """A hostile test set num_classes and classes with --set and trained a phantom class.
    A run's config.json, which holds them, still starts a new run."""
    from crfcore.config import ConfigError, load_config

    for bad in ("num_classes=5", 'classes=["0","1","2"]', "stain_reference={}"):
        with pytest.raises(ConfigError, match="set by train.py"):
            load_config(None, ["mode=classify", "grid=1", "data_path_train=x", bad])
    (tmp_path / "config.json").write_text(json.dumps({"mode": "classify", "grid": 1, "data_path_train": "x",
                                                      "classes": ["a"], "num_classes": 1}))
    cfg = load_config(tmp_path / "config.json")
    assert cfg.classes is None and cfg.num_classes is None


def test_one_folder_or_the_tumour_and_normal_pair_not_both():
    """A hostile test: data_path_train beside data_path_tumor_train was silently ignored."""
    from crfcore.config import ConfigError, load_config

    base = ["data_path_tumor_train=t", "data_path_normal_train=n", "json_path_train=j"]
    with pytest.raises(ConfigError, match="data_path_train and data_path_tumor_train"):
        load_config(None, [*base[1:], "data_path_tumor_train=t", "data_path_train=d"])
    with pytest.raises(ConfigError, match="data_path_valid and data_path_normal_valid"):
        load_config(None, [*base, "data_path_valid=v", "data_path_normal_valid=n"])
    assert load_config(None, base).data_path_train is None


def test_fine_tuning_from_another_backbone_width_is_refused(tmp_path):
    """A hostile test: a width-0.5 checkpoint under width_mult 1.0 trained from scratch in
    silence (a few of its layers, 1,280 wide at any width, fit by shape)."""
    from crfcore.errors import CrfError

    half = CRFNet(ModelConfig(grid=1, width_mult=0.5))
    save_checkpoint(tmp_path / "half.ckpt", half, {"mode": "grid", "grid": 1, "width_mult": 0.5})
    with pytest.raises(CrfError, match="backbone weights are missing from it or of another shape"):
        init_from_checkpoint(CRFNet(ModelConfig(grid=1, width_mult=1.0)), tmp_path / "half.ckpt")


def _classes(root: Path, counts: dict[str, int]) -> None:
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / c / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))


@pytest.mark.parametrize("train, valid, message", [
    ({"a": 3}, None, "needs at least 2"),
    ({"a": 3, "b": 3, "c": 0}, None, "no images of class(es) ['c']"),
    ({"a": 3, "b": 3}, {"a": 2}, "no images of class(es) ['b']"),
])
def test_classify_sets_without_two_classes_with_images_are_refused(tmp_path, train, valid, message):
    """A hostile test: one class trained a sigmoid on all-zero targets; an empty class (or
    one the validation set lacks) gave AUC nan in every epoch, so no best.ckpt."""
    from crfcore.config import load_config
    from crfcore.datasets import DataError

    _classes(tmp_path / "train", train)
    sets = [f"data_path_train={tmp_path / 'train'}"]
    if valid:
        _classes(tmp_path / "valid", valid)
        sets.append(f"data_path_valid={tmp_path / 'valid'}")
    cfg = load_config(None, ["mode=classify", "grid=1", "patch_size=8", "workers=0", *sets])
    with pytest.raises(DataError) as err:
        loaders.build_loaders(cfg)
    assert message in str(err.value)
    if valid:  # with another metric a validation set without some class still picks a best epoch
        loaders.build_loaders(cfg.replace(best_metric="acc"))


def test_every_image_of_a_grid_set_is_checked_before_training(grid_data, tmp_path):
    """A hostile test: only 0.png was checked, so a bad 7.png stopped the run inside an
    epoch (hours in, on a large set), after config.json was written."""
    import shutil

    from crfcore.datasets import DataError, GridDataset

    bad = tmp_path / "tumor"
    shutil.copytree(grid_data / "tumor", bad)
    last = bad / f"{len((bad / 'list.txt').read_text().split()) - 1}.png"
    for content, message in ((b"garbage\n", "missing or unreadable image"),
                             (cv2.imencode(".png", np.zeros((50, 40, 3), np.uint8))[1].tobytes(), "is 40x50"),
                             (cv2.imencode(".jpg", np.zeros((50, 40, 3), np.uint8))[1].tobytes(), "is 40x50")):
        last.write_bytes(content)
        with pytest.raises(DataError, match=message):
            GridDataset(bad, grid_data / "json", 96, 32, 32)
        res = call("train.py", grid_data / "cfg.json", tmp_path / "run", "--set", f'data_path_tumor_train="{bad}"',
                   check=False)
        assert res.returncode == 2 and message in res.stderr and not (tmp_path / "run").exists()
    last.write_bytes(cv2.imencode(".jpg", np.zeros((96, 96, 3), np.uint8))[1].tobytes())  # a JPEG named .png
    assert len(GridDataset(bad, grid_data / "json", 96, 32, 32)) > 0  # read as before: cv2 reads by content


def test_a_nan_that_a_bf16_relu6_hides_from_the_loss_still_stops_training(grid_data, tmp_path, monkeypatch):
    """On the CPU a bf16 ReLU6 turns NaN into 0 or 6 (layers.ReLU6FromOutput), so a NaN
    input gives a finite loss; the NaN batch-norm statistics and weight gradients it
    leaves stop training (statistics alone: test_model's all_finite check)."""
    class Poisoned(training.CRFNet):
        def embed(self, x, first_block=0):
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
            return super().embed(x, first_block)

    losses = []
    real_loss_fn = training.loss_fn
    monkeypatch.setattr(training, "loss_fn", lambda *a: lambda o, t: losses.append(real_loss_fn(*a)(o, t)) or losses[-1])
    monkeypatch.setattr(training, "CRFNet", Poisoned)
    proc = call("train.py", grid_data / "cfg.json", tmp_path / "r", "--quiet", "--set", "precision=bf16", check=False)
    assert torch.isfinite(losses[0])  # the loss cannot see it
    assert proc.returncode == 2 and "batch-norm statistic is not finite at epoch 1, step 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_one_folder_as_two_sets_and_a_batch_larger_than_the_set_are_refused(grid_data, tmp_path):
    """Before any step: a training set without a tumour cell, the tumour folder as the
    normal one, a training folder as a validation one (best.ckpt would be chosen on
    training data), and a batch_size that would repeat both sets in every batch (it once
    filled 24 GB)."""
    tumor, normal = grid_data / "tumor", grid_data / "normal"
    (tmp_path / "empty").mkdir()  # the slide's annotation with no tumour: a wrong json_path_train, say
    (tmp_path / "empty" / "syn_tumor.json").write_text('{"positive": [], "negative": []}')
    for sets, words in (({"json_path_train": tmp_path / "empty"}, "no cell of the training set is tumour"),
                        ({"data_path_normal_train": tumor}, "data_path_tumor_train and data_path_normal_train are"),
                        ({"data_path_tumor_valid": tumor}, "data_path_tumor_train and data_path_tumor_valid are"),
                        ({"data_path_normal_valid": f"{normal}/../normal"}, "data_path_normal_train and "
                                                                              "data_path_normal_valid are"),
                        ({"batch_size": 100000000}, "batch_size 100000000 takes 50000000 samples of each set per "
                                                    "step, more than the larger set's 12")):
        res = call("train.py", grid_data / "cfg.json", tmp_path / "r", "--quiet",
                   *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v if isinstance(v, int) else str(v))}")],
                   check=False)
        assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / "r" / "train.ckpt").exists()


def step_of(grid_data) -> memory.StepMemory:
    """What train.py measures for the reduced chain's config (a sample of its training set)."""
    cfg = json.loads((grid_data / "cfg.json").read_text())
    ds = GridDataset(grid_data / "tumor", grid_data / "json", cfg["image_size"], cfg["patch_size"], cfg["crop_size"])
    net = CRFNet(ModelConfig(grid=3, width_mult=cfg["width_mult"])).to(memory_format=torch.channels_last)
    return memory.step_memory(net, loaders.collate([ds[0]])[0], torch.device("cpu"), "fp32")


def test_a_batch_that_cannot_fit_is_refused_naming_one_that_does(grid_data, tmp_path, monkeypatch):
    step = step_of(grid_data)
    monkeypatch.setattr(training, "free_bytes", lambda device: step.need(4) + step.per_sample // 2)
    proc = call("train.py", grid_data / "cfg.json", tmp_path / "big", check=False)  # batch_size 8
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "config batch_size 8: a training step needs about" in line, line
    assert not (tmp_path / "big").exists()
    fits = int(re.search(r"lower batch_size to (\d+)", line)[1])
    assert fits == 4
    proc = call("train.py", grid_data / "cfg.json", tmp_path / "fits", "--set", f"batch_size={fits}")
    assert "memory: a training step needs about" in proc.stdout
    assert (tmp_path / "fits" / "best.ckpt").exists()
    monkeypatch.setattr(training, "free_bytes", lambda device: step.per_sample // 2)
    proc = call("train.py", grid_data / "cfg.json", tmp_path / "none", "--set", "batch_size=2", check=False)
    assert proc.returncode == 2 and "not even the smallest batch fits" in proc.stderr


def test_measuring_memory_does_not_change_the_run(grid_data, tmp_path, monkeypatch):
    """The sample read and the model run for the estimate leave every random draw of
    the run as it would be without them."""
    call("train.py", grid_data / "cfg.json", tmp_path / "measured", "--quiet")
    monkeypatch.setattr(training, "free_bytes", lambda device: None)  # unknown: nothing is measured
    call("train.py", grid_data / "cfg.json", tmp_path / "not", "--quiet")
    a, b = (load_checkpoint(tmp_path / r / "train.ckpt")["state_dict"] for r in ("measured", "not"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_batch_size_named_fits_the_batches_as_they_are_cut():
    """From a review: with two sets a batch holds 2 x (batch_size // 2), and one set's last
    batch of one joins the one before, so "lower batch_size to about N" named sizes that
    were refused again. `batch_size_within` names one whose batches fit."""
    two = loaders.BalancedBatches([50, 40], 8, seed=0)
    assert two.largest == 8 and two.largest_for(1) == 2 and two.largest_for(7) == 6
    assert two.batch_size_within(5) == 5 and two.largest_for(5) == 4 and two.batch_size_within(1) == 0
    one = loaders.BalancedBatches([81], 8, seed=0)  # 81 = 10 x 8 + 1: the last 1 joins the 10th batch
    assert one.largest == 9 == max(map(len, one._all()))
    assert one.batch_size_within(8) == 7 and max(map(len, loaders.BalancedBatches([81], 7, seed=0)._all())) <= 8
    for sizes in ([50, 40], [81], [9], [2]):
        for b in range(1, 12):
            batches = loaders.BalancedBatches(sizes, b, seed=0)
            assert batches.largest == max(map(len, batches._all())), (sizes, b)

