#!/usr/bin/env python3
"""Train the MobileNetV2-CRF patch classifier (grid mode) or a plain patch classifier
(classify mode) from a config JSON; or report a checkpoint on a data folder.

  python train.py CONFIG.json SAVE_DIR [--set key=value ...] [--resume]
  python train.py --evaluate CKPT DATA_DIR [--json JSON_DIR]
  torchrun --nproc_per_node K train.py CONFIG.json SAVE_DIR      (DistributedDataParallel)
"""
from __future__ import annotations

from crfcore.startup import quiet_ctrl_c

quiet_ctrl_c()  # first: Ctrl-C while the libraries below load is one line

import argparse
import sys

from crfcore import training
from crfcore.cli import UserError, given_path, number, parser, run
from crfcore.config import load_config
from crfcore.device import DistEnv, retain_freed_memory
from crfcore.io import make_folder, remove_empty, resolved_folder
from crfcore.trainset import run_lock


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("config", nargs="?", type=given_path, help="config JSON (keys: see README)")
    p.add_argument("save_dir", nargs="?", type=given_path, help="output folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (JSON value), repeatable")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="shortcut for --set device=...")
    p.add_argument("--workers", type=number(int, 0), help="shortcut for --set workers=... (DataLoader processes)")
    p.add_argument("--resume", action="store_true", help="continue SAVE_DIR/train.ckpt exactly")
    p.add_argument("--evaluate", nargs=2, type=given_path, metavar=("CKPT", "DATA_DIR"),
                   help="report a checkpoint on a data folder and exit")
    p.add_argument("--json", type=given_path, help="--evaluate of a grid model: the slides' annotation folder")
    p.add_argument("--plot", type=given_path, help="--evaluate: confusion matrix picture (default: DATA_DIR/confusion_matrix.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    retain_freed_memory()  # the CNN's buffers are reused, not faulted back in
    if args.evaluate:
        ckpt, data = args.evaluate
        picture = training.confusion_picture(data, args.plot)
        report = training.evaluate_folder(ckpt, data, picture, json_dir=args.json, quiet=args.quiet,
                                          device=args.device or "auto", workers=args.workers)
        print(f"confusion matrix -> {picture}\n{report}")  # the report's metrics line last, for scripts
        return 0
    if args.config is None or args.save_dir is None:
        p.error("CONFIG and SAVE_DIR are required (or --evaluate CKPT DATA_DIR)")
    if args.plot or args.json:
        p.error("--plot and --json go with --evaluate")
    shortcuts = [f"{k}={v}" for k, v in (("device", args.device), ("workers", args.workers)) if v is not None]
    cfg = load_config(args.config, [*args.set, *shortcuts])
    args.save_dir = resolved_folder(args.save_dir)  # `new/../data` is `data`, and makes no `new`
    if args.save_dir.exists() and not args.save_dir.is_dir():
        raise UserError(f"{args.save_dir}: exists and is not a directory (SAVE_DIR is a run's folder)")
    if args.resume and not (args.save_dir / "train.ckpt").is_file():  # a mistyped folder is not made
        raise UserError(f"--resume: {args.save_dir / 'train.ckpt'} does not exist")
    training.check_run_paths(cfg, args.config, args.save_dir)
    main_rank = DistEnv.from_env().main  # torchrun: rank 0 makes SAVE_DIR and writes in it
    made = make_folder(args.save_dir) if main_rank else []
    with run_lock(args.save_dir, held=main_rank):  # a second run into SAVE_DIR is refused
        try:
            return train(cfg, args)
        except BaseException:  # Ctrl-C too; under the lock, so no other run is in the folder
            remove_empty(made)  # a refused run leaves none of the folders it made
            raise


def train(cfg, args) -> int:
    """The run itself (SAVE_DIR locked)."""
    if not args.resume and (args.save_dir / "train.ckpt").exists():
        raise UserError(f"{args.save_dir} already holds a run; use --resume or another SAVE_DIR")
    run_ = training.Run(cfg, args.save_dir, resume=args.resume, quiet=args.quiet)
    if run_.main:
        training.write_config(run_.cfg, args.save_dir)
    try:
        last = run_.fit()
        report = run_.report() if cfg.mode == "classify" else None
    finally:
        run_.close()
    if run_.main:
        if report:
            print(report)
        best = args.save_dir / "best.ckpt"
        metric = f"; last epoch valid_auc={last['valid_auc']:.4f}" if "valid_auc" in last else ""
        if best.exists() and run_.best_epoch:  # which epoch the maps will use, and why
            metric = f"; best.ckpt is epoch {run_.best_epoch} ({run_.best_metric}={run_.best:.4f}){metric}"
        print(f"done: {best}, train.ckpt, log.csv, curves.png{metric}" if best.exists()
              else f"done: {args.save_dir}/train.ckpt, log.csv (no epoch gave a finite {run_.best_metric}: no best.ckpt)")
    return 0


if __name__ == "__main__":
    run(main, sys.argv[1:])
