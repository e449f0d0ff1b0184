#!/usr/bin/env python3
"""A peer, side by side: TIAToolbox's PatchPredictor against crfcore's `lattice` method.

Both run the same CNN (a grid-1 MobileNetV2: ImageNet normalisation, crop 224, one
sigmoid tumour probability; no CRF, which TIAToolbox has not) over the same patches of
the same synthetic slide, on the same device with the same torch threads, batch size,
DataLoader workers, precision (fp32), memory format (channels-last) and memory allocator
settings (freed memory kept for reuse, as prob_map.py keeps it). Ours folds batch norm
into the convolutions and fuses each convolution + ReLU6 (`crfcore.model.inference_copy`),
and runs the network's first blocks once per slide region for the overlapping crops read
from it (`crfcore.shared_stem`: each crop's own numbers), as prob_map.py does; TIAToolbox
runs each patch through the network as given. Prints patches/s
of each (best of `--passes` passes, the two taken in turn, so both see the same load of
a shared machine), their ratio and the largest difference of the probabilities at
matching points. The last line:

  peers: lattice_patches_per_s=<a> tiatoolbox_patches_per_s=<b> ratio=<a/b> max_abs_diff=<d> patches=<n>

Pairing. TIAToolbox tiles the slide from (0, 0): its patches start at multiples of the
stride. crfcore crops a `crop` square centred on each lattice point, so the crop of
point `(r, c)` starts at `Geometry.crop_origin` = centre - crop / 2 (centre = (c + 0.5)
* stride). The two coincide pixel for pixel when that origin is a multiple of the
stride: at stride 32 (the default) with crop 224, point `c` is TIAToolbox's grid
column `c - 3`. At NCRF's stride 64 the crops start 48 pixels (mod 64) off
TIAToolbox's grid, so no patch pairs up: `--stride 64` times both sides on their own
grids over equally many patches and reports max_abs_diff=n/a.

Which patches. crfcore gets a mask with an n x n block of lattice points; TIAToolbox
gets a mask at the same downsample whose cells are covered exactly by the n x n patches
paired with them (it keeps a patch when any of its cells is in the mask), and the bench
checks that the patches it returns are exactly those.

Extras with `--breakdown`: each side's reading alone (its DataLoader, no CNN) and the
CNN alone on ready tensors, channels-last and NCHW, so the gap can be placed.

Needs the optional extra: pip install -e '.[peers]' (see the README for a separate
environment: TIAToolbox pins older torch, numpy and others). Without it: one line, exit 0.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from crfcore import inference, synthetic
from crfcore import slide as sl
from crfcore.cli import HelpFormatter, add_workers, run
from crfcore.datasets import normalise_batch
from crfcore.device import retain_freed_memory
from crfcore.errors import CrfError
from crfcore.model import CRFNet, model_from_checkpoint
from crfcore.testing import varied_model

SKIP = "peers: skipped: TIAToolbox is not installed (pip install -e '.[peers]')"
MARGIN = 4  # lattice points between the block and the slide edge: every crop lies inside the slide


class PeerError(CrfError):
    """A bench setting that cannot give a side-by-side."""


# ----------------------------------------------------------------------------- geometry


def block_points(n: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and cols (row-major) of an `n x n` block of lattice points from `(first, first)`."""
    r, c = np.meshgrid(np.arange(first, first + n), np.arange(first, first + n), indexing="ij")
    return r.ravel(), c.ravel()


def tia_grid(geom: inference.Geometry, rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
    """TIAToolbox grid indices `(n, 2)` (x, y) of the patches pixel-identical to the crops
    of lattice points `(rows, cols)`; None when the crops are off its grid."""
    s = geom.integer_stride()
    origin = geom.crop_origin(geom.centres(rows, cols))
    return origin // s if s and not (origin % s).any() else None


def tia_mask(shape: tuple[int, int], grid: np.ndarray, crop: int, stride: int) -> np.ndarray:
    """A mask at downsample `stride` (shape `(H/s, W/s)`) that TIAToolbox's rule (a patch
    is kept when any of the mask cells it covers is set) meets for exactly the patches
    at `grid` (x, y indices, a full rectangle). Patch `i` covers cells `i .. i + crop // s - 1`,
    so cells from `first + crop // s - 1` to `last` are touched by the block and by
    nothing outside it."""
    lo, hi = grid.min(0), grid.max(0)
    if len(grid) != np.prod(hi - lo + 1):
        raise PeerError("the patches must form a full rectangle")
    span = crop // stride
    if np.any(hi - lo + 1 < span):
        raise PeerError(f"the block must be at least {span} points wide for TIAToolbox's mask to single it out")
    mask = np.zeros(shape, np.uint8)
    mask[lo[1] + span - 1:hi[1] + 1, lo[0] + span - 1:hi[0] + 1] = 1
    return mask


# ----------------------------------------------------------------------------- models


def grid1_cnn(ckpt: Path) -> tuple[CRFNet, int, int]:
    """The CNN of a grid checkpoint (its backbone and head; a CRF is dropped) with its
    patch and crop sizes."""
    model, ck = model_from_checkpoint(ckpt, expect={"mode": "grid"})
    if model.cfg.num_classes != 1:
        raise PeerError(f"{ckpt}: a {model.cfg.num_classes}-class classifier; the bench needs one tumour logit")
    cnn = CRFNet(type(model.cfg)(grid=1, crf_iters=model.cfg.crf_iters, width_mult=model.cfg.width_mult))
    cnn.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("crf.")})
    return cnn.eval(), ck["config"]["patch_size"], ck["config"]["crop_size"]


def tia_model(cnn: CRFNet, channels_last: bool = True):
    """`cnn` as a TIAToolbox model: uint8 NHWC batches in, ImageNet-normalised as crfcore
    does (`normalise_batch`), channels-last as crfcore runs it (or NCHW, as TIAToolbox's
    own `CNNModel.infer_batch` does), sigmoid out `[n, 1]`."""
    from tiatoolbox.models.models_abc import ModelABC

    fmt = torch.channels_last if channels_last else torch.contiguous_format

    class SigmoidCNN(ModelABC):
        def __init__(self, net: CRFNet) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.net.embed(x)[0].float())[:, None]

        @staticmethod
        def infer_batch(model: torch.nn.Module, batch_data: torch.Tensor, device: str) -> np.ndarray:
            # TIAToolbox's own CNNModel.infer_batch, with crfcore's normalisation
            x = normalise_batch(batch_data.to(device)).contiguous(memory_format=fmt)
            model.eval()
            with torch.inference_mode():
                return model(x).cpu().numpy()

    return SigmoidCNN(copy.deepcopy(cnn).to(memory_format=fmt))


# ----------------------------------------------------------------------------- the two sides


class Bench:
    """One slide, one CNN, one block of lattice points; each side run on demand."""

    def __init__(self, args, slide: Path, cnn: CRFNet, tmp: Path) -> None:
        self.args, self.slide, self.tmp = args, slide, tmp
        self.tia_slide = tia_slide_path(slide, args.tia_reader, tmp)
        s = args.stride
        self.geom = inference.Geometry(1, args.patch, args.crop, (float(s), float(s)))
        self.rows, self.cols = block_points(args.points, MARGIN + args.crop // s)
        w = h = slide_side(args)
        self.mask = np.zeros((h // s, w // s), bool)
        self.mask[self.rows, self.cols] = True
        self.grid = tia_grid(self.geom, self.rows, self.cols)
        # off the grid (e.g. stride 64): as many TIAToolbox patches over the same area, unpaired
        tgrid = self.grid if self.grid is not None else np.stack([self.cols, self.rows], 1) - args.crop // (2 * s)
        self.tmask = tia_mask(self.mask.shape, tgrid, args.crop, s)
        self.tgrid = tgrid
        self.cnn = cnn.eval().to(memory_format=torch.channels_last)
        self.opts = inference.Options(batch_size=args.batch_size, workers=args.workers, quiet=True)
        from tiatoolbox.models.engine.patch_predictor import PatchPredictor

        self.engine = PatchPredictor(model=tia_model(self.cnn, not args.tia_nchw), batch_size=args.batch_size,
                                     num_workers=args.workers, device="cpu", verbose=False)
        self.runs = 0

    def lattice(self) -> np.ndarray:
        """crfcore's lattice method: probabilities at the block's points, row-major."""
        out, method = inference.probability_map(self.cnn, self.slide, self.mask, self.geom.stride, self.args.patch,
                                                self.args.crop, "lattice", self.opts)
        assert method == "lattice"
        return out[self.rows, self.cols]

    def tiatoolbox(self) -> tuple[np.ndarray, np.ndarray]:
        """TIAToolbox's PatchPredictor in WSI mode at level 0: (patch top-lefts (n, 2) x, y,
        probabilities (n,)), as it returns them."""
        import zarr

        self.runs += 1
        save = self.tmp / f"tia{self.runs}"
        c, s = self.args.crop, self.args.stride
        out = self.engine.run([self.tia_slide], masks=[self.tmask], patch_mode=False, save_dir=save, overwrite=True,
                              input_resolutions=[{"units": "baseline", "resolution": 1.0}],
                              patch_input_shape=(c, c), stride_shape=(s, s), output_type="zarr",
                              return_probabilities=True)
        z = zarr.open(str(next(iter(out.values()))), mode="r")
        xy, prob = np.asarray(z["coordinates"])[:, :2], np.asarray(z["probabilities"])[:, 0]
        shutil.rmtree(save, ignore_errors=True)
        return xy, prob

    def compare(self, ours: np.ndarray, xy: np.ndarray, prob: np.ndarray) -> float | None:
        """Largest |difference| at paired points; the patch sets must be the ones asked for."""
        want = self.tgrid * self.args.stride
        got = {tuple(p) for p in xy.tolist()}
        if len(xy) != len(want) or got != {tuple(p) for p in want.tolist()}:
            raise RuntimeError(f"TIAToolbox ran {len(xy)} patches, not the {len(want)} asked for")
        if self.grid is None:
            return None
        at = {tuple(p): i for i, p in enumerate(xy.tolist())}
        theirs = prob[[at[tuple(p)] for p in want.tolist()]]
        return float(np.abs(theirs - ours).max())


def tia_slide_path(slide: Path, reader: str, tmp: Path) -> Path:
    """The name under which TIAToolbox opens the slide with `reader`: an OME-TIFF with its
    own tifffile reader; the same file through a `.svs` link with OpenSlide (as crfcore)."""
    if reader == "tifffile":
        return slide
    link = tmp / (slide.name.split(".")[0] + ".svs")
    link.unlink(missing_ok=True)
    link.symlink_to(slide.resolve())
    return link


def slide_side(args) -> int:
    """A square slide, a multiple of the stride, holding the block with `MARGIN` points to spare."""
    points = args.points + 2 * (MARGIN + args.crop // args.stride)
    return points * args.stride


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# ----------------------------------------------------------------------------- breakdown


def drain(loader, count) -> float:
    """Patches/s of iterating a DataLoader to the end (reading only)."""
    n, t = 0, time.perf_counter()
    for batch in loader:
        n += count(batch)
    return n / (time.perf_counter() - t)


def reading_rates(b: Bench) -> tuple[float, float]:
    """Patches/s of each side's reader alone, same workers."""
    g = b.geom
    origins = g.crop_origin(g.centres(b.rows, b.cols))
    regions = inference.lattice_stem(b.cnn, g, b.opts) is not None  # regions, as the lattice reads them then
    ours = DataLoader(inference.LatticePatches(b.slide, origins, g.crop, inference.region_groups(b.rows, b.cols),
                                               regions=regions), batch_size=None, num_workers=b.args.workers)
    from tiatoolbox.models.engine.io_config import ModelIOConfigABC

    c, s = b.args.crop, b.args.stride
    io = ModelIOConfigABC(input_resolutions=[{"units": "baseline", "resolution": 1.0}],
                          patch_input_shape=(c, c), stride_shape=(s, s), output_resolutions=[])
    theirs = b.engine.get_dataloader(b.tia_slide, masks=b.tmask, ioconfig=io, patch_mode=False)
    return drain(ours, lambda x: len(x[0])), drain(theirs, lambda x: len(x["image"]))


def model_rates(b: Bench, n: int = 256) -> tuple[float, float]:
    """Patches/s of the CNN alone on ready tensors, channels-last and NCHW (best of 2)."""
    x = normalise_batch(torch.randint(0, 256, (n, b.args.crop, b.args.crop, 3), dtype=torch.uint8))
    rates = []
    for fmt in (torch.channels_last, torch.contiguous_format):
        net = b.cnn.to(memory_format=fmt)
        best = 0.0
        for _ in range(2):
            t = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, n, b.args.batch_size):
                    net.embed(x[i:i + b.args.batch_size].contiguous(memory_format=fmt))
            best = max(best, n / (time.perf_counter() - t))
        rates.append(best)
    b.cnn.to(memory_format=torch.channels_last)
    return rates[0], rates[1]


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--points", type=int, default=48, help="side of the block of lattice points (149: 22,201 patches)")
    p.add_argument("--stride", type=int, default=32, help="lattice stride, level-0 pixels (64: NCRF's, no pairing)")
    p.add_argument("--patch", type=int, default=256, help="patch size (grid 1: only the crop is read)")
    p.add_argument("--crop", type=int, default=224, help="crop size, the CNN's input")
    p.add_argument("--ckpt", type=Path, help="a trained grid checkpoint: its CNN, patch and crop sizes "
                                             "(default: a random MobileNetV2 with batch-norm from the slide)")
    p.add_argument("--batch-size", type=int, default=64, help="patches per forward pass, both sides")
    add_workers(p)
    p.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    p.add_argument("--passes", type=int, default=2, help="timed passes of each side, taken in turn; the best counts")
    p.add_argument("--breakdown", action="store_true", help="also time each side's reading alone and the CNN alone")
    p.add_argument("--tia-reader", choices=("openslide", "tifffile"), default="openslide",
                   help="how TIAToolbox opens the slide: OpenSlide (as crfcore; what it does for .svs) or its "
                        "tifffile reader (what it does for OME and BigTIFF .tif files)")
    p.add_argument("--tia-nchw", action="store_true",
                   help="TIAToolbox's model in NCHW, as its own CNNModel.infer_batch runs (default: channels-last, "
                        "as crfcore)")
    p.add_argument("--keep", type=Path, help="write (or reuse) the synthetic slide at this .ome.tif path")
    return p


def write_bench_slide(path: Path, args) -> None:
    """The synthetic slide (tissue everywhere, one tumour), written unless a kept one of the right size exists."""
    side = slide_side(args)
    if path.exists():
        with sl.open_slide(path) as s:
            if s.dimensions != (side, side):
                raise PeerError(f"{path}: kept slide is {s.dimensions}, this setting needs {side}x{side}")
        return
    synthetic.write_slide(path, side, side, tumours=1, seed=0, tissue=[(0.5, 0.5, 0.8, 0.8)], tumour_radius=0.2)


def check_geometry(args) -> None:
    if args.stride <= 0 or args.patch % args.stride or args.crop > args.patch or args.passes < 1:
        raise PeerError(f"stride {args.stride} must divide patch {args.patch}, crop {args.crop} must not exceed "
                        f"the patch, and --passes must be at least 1")


def setup(args, tmp: Path) -> Bench:
    """Slide, CNN and both engines; prints what each side is given."""
    import tiatoolbox
    from tiatoolbox.wsicore.wsireader import WSIReader

    slide = args.keep or tmp / "peers.ome.tif"
    if not slide.name.lower().endswith(".ome.tif"):
        raise PeerError(f"{slide}: --keep must name an .ome.tif file (an OME-TIFF pyramid both readers open)")
    t = time.perf_counter()
    if args.ckpt:
        cnn, args.patch, args.crop = grid1_cnn(args.ckpt)
    check_geometry(args)
    write_bench_slide(slide, args)
    if not args.ckpt:  # random, batch-norm statistics from crops of the slide
        cnn = varied_model(slide, args.crop, grid=1, width=1.0, n=128)
    b = Bench(args, slide, cnn, tmp)
    side = slide_side(args)
    pairing = (f"paired pixel for pixel: crfcore crop origin = centre - {args.crop // 2} = TIAToolbox patch "
               f"top-left, lattice col c = TIAToolbox grid col c - {int(b.cols[0] - b.grid[0, 0])}"
               if b.grid is not None else "unpaired: crfcore's crops are off TIAToolbox's grid at this stride")
    print(f"peers: synthetic slide {side}x{side} ({time.perf_counter() - t:.0f} s to set up); {args.points}x"
          f"{args.points} = {len(b.rows)} patches of {args.crop} px at stride {args.stride}, grid 1 (patch "
          f"{args.patch}), {'checkpoint ' + str(args.ckpt) if args.ckpt else 'varied model'}; {pairing}")
    print(f"peers: TIAToolbox {tiatoolbox.__version__} (PatchPredictor, WSI mode, level 0, reader "
          f"{type(WSIReader.open(b.tia_slide)).__name__}, model {'NCHW' if args.tia_nchw else 'channels-last'}); "
          f"crfcore lattice (OpenSlide, channels-last); torch {torch.__version__}")
    print(f"peers: both sides: device cpu, fp32, {torch.get_num_threads()} torch threads, batch {args.batch_size}, "
          f"{args.workers} DataLoader workers; {args.passes} passes each, taken in turn; load "
          f"{os.getloadavg()[0]:.1f} at start")
    return b


def timed_passes(b: Bench, passes: int) -> tuple[float, float, float | None]:
    """Best seconds of each side over `passes` passes taken in turn, and the largest
    difference at paired points over all passes (None when unpaired)."""
    best_ours = best_theirs = float("inf")
    diffs = []
    for i in range(passes):
        ours, t_ours = timed(b.lattice)
        (xy, prob), t_theirs = timed(b.tiatoolbox)
        diffs.append(b.compare(ours, xy, prob))
        best_ours, best_theirs = min(best_ours, t_ours), min(best_theirs, t_theirs)
        print(f"pass {i + 1}: lattice {t_ours:.1f} s ({len(ours) / t_ours:.1f} patches/s), TIAToolbox "
              f"{t_theirs:.1f} s ({len(prob) / t_theirs:.1f} patches/s); load {os.getloadavg()[0]:.1f}")
    return best_ours, best_theirs, None if diffs[0] is None else max(diffs)


def breakdown(b: Bench) -> None:
    r_ours, r_theirs = reading_rates(b)
    m_cl, m_nchw = model_rates(b)
    print(f"reading alone: crfcore {r_ours:.0f} patches/s (one region read per 8x16 points), TIAToolbox "
          f"{r_theirs:.0f} patches/s (one read per patch); CNN alone: {m_cl:.1f} patches/s channels-last, "
          f"{m_nchw:.1f} NCHW")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("tiatoolbox") is None:
        print(SKIP)
        return 0
    importlib.import_module("tiatoolbox")  # its import sets the root logger to INFO: quieten it after

    logging.getLogger().setLevel(logging.ERROR)  # INFO lines and unknown-objective-power warnings, per run
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as prob_map.py runs; TIAToolbox, in this process too, gains from it alike
    with tempfile.TemporaryDirectory() as tmp:
        b = setup(args, Path(tmp))
        t_ours, t_theirs, diff = timed_passes(b, args.passes)
        if args.breakdown:
            breakdown(b)
    n = len(b.rows)
    a, t = n / t_ours, n / t_theirs
    shown = "n/a" if diff is None else f"{diff:.1e}"
    print(f"peers: lattice_patches_per_s={a:.1f} tiatoolbox_patches_per_s={t:.1f} ratio={a / t:.2f} "
          f"max_abs_diff={shown} patches={n}")
    return 0


if __name__ == "__main__":
    run(main)
