"""Torch datasets: patch cutting from slides (Patch_gen.py), patch-grid images with
label grids (train.py grid mode) and plain image folders (classify mode)."""
from __future__ import annotations

import functools
import struct
import warnings
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import slide as sl
from .annotations import find_annotation, load_truth
from .device import fork_safe_opencv
from .errors import CrfError
from .io import visible_files, write_image
from .scale import ReadScale, resize
from .tiling import GridGeometry, group_boxes, read_coords
from .trainset import BUILD, LEGACY_FIX, SIDES, read_sides


class SlideDataset(Dataset):
    """A dataset that reads one slide; the handle opens lazily, once in each worker."""

    slide_path: Path
    _slide = None

    @property
    def slide(self):
        if self._slide is None:
            self._slide = sl.open_slide(self.slide_path)
        return self._slide


class PatchCutter(SlideDataset):
    """Reads the regions of `group_boxes(boxes)` (one item each), slices the patches out at
    `level` and writes them as PNGs `out_dir/names[i]`; returns how many it wrote.
    Meant for a DataLoader with workers: each worker opens the slide once. With a
    `reader` (a level above 0) each patch is read on its own, as prob_map.py reads a crop:
    OpenSlide resamples a region read from a fractional level position, so a patch sliced
    from a shared region would differ from the crop the model later sees."""

    def __init__(self, slide_path: str | Path, boxes: np.ndarray, level: int, size: int,
                 out_dir: str | Path, names: list[str], batched: bool = True, out_size: int | None = None,
                 reader: ReadScale | None = None) -> None:
        self.slide_path, self.level, self.size = Path(slide_path), level, size
        self.boxes, self.out_dir, self.names = boxes, Path(out_dir), names
        self.out_size = out_size  # resize each patch to this side (reading at a scale between levels)
        self.reader = reader
        self.groups = group_boxes(boxes, max_waste=3.0 if batched and reader is None else 0.0)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> int:
        (rx0, ry0, rx1, ry1), idx = self.groups[i]
        if self.reader is not None:
            side = self.out_size or self.size
            for j in idx:
                write_image(self.out_dir / self.names[j], self.reader.read(self.slide, self.boxes[j, :2], (side, side)))
            return len(idx)
        dx, dy = sl.level_downsamples(self.slide)[self.level]
        w = int(round((rx1 - rx0) / dx)) + self.size
        h = int(round((ry1 - ry0) / dy)) + self.size
        region = sl.read_rgb(self.slide, (rx0, ry0), self.level, (w, h))
        for j in idx:
            ox, oy = int(round((self.boxes[j, 0] - rx0) / dx)), int(round((self.boxes[j, 1] - ry0) / dy))
            patch = region[oy:oy + self.size, ox:ox + self.size]
            if self.out_size:
                patch = resize(patch, (self.out_size, self.out_size))
            write_image(self.out_dir / self.names[j], patch)
        return len(idx)


def extract_patches(slide_path: str | Path, boxes: np.ndarray, level: int, size: int,
                    out_dir: str | Path, names: list[str], workers: int = 0,
                    quiet: bool = False, batched: bool = True, out_size: int | None = None,
                    reader: ReadScale | None = None) -> int:
    """Cut and write every patch (`size` pixels at `level`, resized to `out_size` if
    given; with a `reader`, each read by it, see PatchCutter); regions are read in
    `workers` DataLoader processes (`batched=False` reads each patch on its own, for
    benchmarks)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    cutter = PatchCutter(slide_path, boxes, level, size, out_dir, names, batched, out_size, reader)
    loader = DataLoader(cutter, batch_size=None, num_workers=fork_safe_opencv(workers))
    done, batches = 0, iter(loader)
    try:
        with tqdm(total=len(boxes), desc=f"patches {Path(slide_path).name}", disable=quiet) as bar:
            for n in batches:
                done += int(n)
                bar.update(int(n))
    finally:
        # stop the worker processes now, not when the iterator is collected: on an error the
        # traceback keeps it, and its workers writing, while the caller cleans up
        stop = getattr(batches, "_shutdown_workers", None)  # private, but torch's only way
        if stop is not None:
            stop()
    return done


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(CrfError):
    """A data set that is empty, malformed or lacks the annotation its labels need."""


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """`(H, W, 3)` uint8 -> `[3, H, W]` float, ImageNet-normalised."""
    return normalise_batch(torch.from_numpy(np.ascontiguousarray(rgb))[None])[0]


@functools.cache
def scale_and_shift(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet normalisation `(x / 255 - mean) / std` as `x * scale - shift`, on `device`
    (made once per device: a copy to a GPU waits for it)."""
    with torch.inference_mode(False):  # kept for later calls, which may need gradients
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (1 / (255 * std)).to(device), (mean / std).to(device)


def normalise_batch(u8: torch.Tensor) -> torch.Tensor:
    """`[n, H, W, 3]` uint8 (on any device) -> `[n, 3, H, W]` float, ImageNet-normalised.
    Workers hand over uint8 (4x less to copy); this runs where the model does."""
    scale, shift = scale_and_shift(u8.device)
    # one scale and one shift, in place: three passes over one float buffer, not four
    # over three; the permuted view keeps the channels-last layout
    return u8.permute(0, 3, 1, 2).float().mul_(scale).sub_(shift)


def cut_grid(rgb: np.ndarray, patch: int, crop: int) -> np.ndarray:
    """`(S, S, 3)` image -> `(g*g, crop, crop, 3)`: cells of `patch`, each centre-cropped."""
    g = rgb.shape[0] // patch
    o = (patch - crop) // 2
    cells = rgb[:g * patch, :g * patch].reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4)
    return cells[:, :, o:o + crop, o:o + crop].reshape(g * g, crop, crop, 3)


def context_image(rgb: np.ndarray, patch: int, crop: int) -> np.ndarray:
    """The grid image from the first crop's corner on (for the dense-consistency loss,
    `crfcore.consistency`): every cell's crop corner then sits at a multiple of `patch`."""
    o = (patch - crop) // 2
    return np.ascontiguousarray(rgb[o:, o:])


Normaliser = Callable[[np.ndarray], np.ndarray]  # e.g. crfcore.stain.MacenkoNormaliser


def normalise_cells(rgb: np.ndarray, patch: int, crop: int, normalise: Normaliser) -> np.ndarray:
    """Stain-normalise the centre `crop` of each `patch` cell of a grid image on its own:
    the pixels the CNN will see, exactly as inference normalises each crop."""
    out = np.array(rgb)
    o = (patch - crop) // 2
    for y in range(o, out.shape[0] - patch + o + 1, patch):
        for x in range(o, out.shape[1] - patch + o + 1, patch):
            out[y:y + crop, x:x + crop] = normalise(out[y:y + crop, x:x + crop])
    return out


class Augment:
    """Stain (HED) jitter, colour jitter, flips and 90-degree rotations applied jointly to an
    image and its `(g, g)` label grid (so each label stays on its cell)."""

    def __init__(self, color_jitter: tuple[float, ...] | None, flip: bool, rotate: bool,
                 stain: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None) -> None:
        from torchvision.transforms import ColorJitter

        self.jitter = ColorJitter(*color_jitter) if color_jitter and any(color_jitter) else None
        self.flip, self.rotate, self.stain = flip, rotate, stain

    def __call__(self, rgb: np.ndarray, labels: np.ndarray, rng: np.random.Generator | None = None):
        """`rng` defaults to one seeded from torch's generator, which DataLoader seeds per
        worker (and --resume restores), so augmentation is reproducible."""
        if rng is None:
            rng = np.random.default_rng(torch.randint(2**62, ()).item())
        if self.stain is not None:
            rgb = self.stain(rgb, rng)
        if self.jitter is not None:
            t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
            rgb = self.jitter(t).permute(1, 2, 0).numpy()
        if self.flip and rng.random() < 0.5:
            rgb, labels = rgb[:, ::-1], labels[:, ::-1]
        if self.rotate:
            k = int(rng.integers(4))
            rgb, labels = np.rot90(rgb, k, axes=(0, 1)), np.rot90(labels, k, axes=(0, 1))
        return rgb, labels


MAX_SCALE = 64  # level-0 pixels per image pixel beyond which a sides.txt line is taken as corrupt


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int] | None:
    """`(width, height)` from a PNG's header (its IHDR chunk), or None when the file does
    not start as a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def image_size(path: Path) -> tuple[int, int] | None:
    """`(width, height)` of an image OpenCV can decode (the whole of it), else None."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return None if img is None else (img.shape[1], img.shape[0])


class GridDataset(Dataset):
    """NCRF's training set: `list.txt` (`slide_id,x,y`) + `0.png, 1.png, ...`; each item is
    `(patches [N, 3, crop, crop], labels [N])`, labels = tumour at each cell centre by the
    slide's annotation JSON in `json_dir`, at level-0 points: an image cut at another
    resolution covers its sides.txt extent (`mpp_set`: the config's mpp says they were).
    With `context`, the first element is the pair `(patches, context_image)` (the same
    augmented image, for the dense-consistency loss)."""

    def __init__(self, data_dir: str | Path, json_dir: str | Path, image_size: int,
                 patch_size: int, crop_size: int, augment: Augment | None = None,
                 normalise: Normaliser | None = None, context: bool = False, mpp_set: bool = False) -> None:
        self.dir = Path(data_dir)
        self.context = context
        if not (self.dir / "list.txt").exists():
            killed = (self.dir / BUILD).exists()  # a coord_list_gen.py --overwrite killed while swapping sets
            raise DataError(f"{self.dir}: no list.txt (" + ("an interrupted coord_list_gen.py --overwrite: run it "
                            "again to finish it)" if killed else "make it with coord_list_gen.py)"))
        self.coords = read_coords(self.dir / "list.txt")
        if not self.coords:
            raise DataError(f"{self.dir}: list.txt is empty")
        self.geom = GridGeometry(image_size, patch_size, crop_size)
        self.augment, self.normalise = augment, normalise
        self._check_images()
        self.annotations, self.annotation_paths = {}, []
        for sid in sorted({c[0] for c in self.coords}):
            path = find_annotation(json_dir, sid)
            if path is None:
                raise DataError(f"slide {sid!r} of {self.dir} has no annotation {sid}.json (or .xml, .geojson, .txt) in {json_dir} "
                                "(normal slides need an empty one)")
            self.annotations[sid] = load_truth(path)  # a file of which nothing is read would label all normal
            self.annotation_paths.append(path)
        scale = self._level0_sides(mpp_set) / image_size  # level-0 pixels per image pixel, (n, 2)
        offsets = self.geom.cell_offsets()
        self.labels = np.stack([self.annotations[s].contains(np.array([x, y]) + offsets * k)
                                for (s, x, y), k in zip(self.coords, scale)]).astype(np.float32)

    def _level0_sides(self, mpp_set: bool) -> np.ndarray:
        """Level-0 `(w, h)` of each image: sides.txt, else its own size (level 0, as NCRF's folders)."""
        sides, size = read_sides(self.dir, len(self.coords)), self.geom.image_size
        if sides is None:
            if mpp_set:
                raise DataError(f"{self.dir}: no sides.txt, but the config's mpp says the images were cut at "
                                f"another resolution than level 0: {LEGACY_FIX}")
            return np.full((len(self.coords), 2), size)
        ratio = sides / size
        wild = np.flatnonzero(((ratio < 1 / MAX_SCALE) | (ratio > MAX_SCALE)).any(1))
        if wild.size:
            w, h = sides[wild[0]]
            raise DataError(f"{self.dir / 'sides.txt'}: line {wild[0] + 1}: {w},{h} level-0 pixels for a {size}-pixel "
                            f"image is not a resolution (more than {MAX_SCALE}x apart)")
        self._check_one_resolution_per_slide(sides)
        off = np.abs(ratio - 1).max(1) > 0.01
        if off.any() and not mpp_set:
            w, h = sides[np.argmax(off)]
            warnings.warn(f"{self.dir}: images of {size} pixels cover {w}x{h} level-0 pixels (cut at --level or "
                          "--mpp), but the config's mpp is null, so prob_map.py would read level 0: set mpp to "
                          "what Patch_gen.py cut them at")
        return sides

    def _check_one_resolution_per_slide(self, sides: np.ndarray) -> None:
        """Every image of one slide was cut at one resolution (e.g. a level-0 cut appended to
        an --mpp one is refused: the model would learn from both under one mpp)."""
        ids, slide_of = np.unique([c[0] for c in self.coords], return_inverse=True)
        lo, hi = np.full((len(ids), 2), np.iinfo(np.int64).max), np.zeros((len(ids), 2), np.int64)
        np.minimum.at(lo, slide_of, sides)
        np.maximum.at(hi, slide_of, sides)
        bad = np.flatnonzero((hi > lo * 1.01).any(1))
        if bad.size:
            k = bad[0]
            raise DataError(f"{self.dir / 'sides.txt'}: the images of slide {ids[k]} cover {lo[k, 0]}x{lo[k, 1]} and "
                            f"{hi[k, 0]}x{hi[k, 1]} level-0 pixels: cut at two resolutions (Patch_gen.py runs "
                            "at different --level/--mpp gathered into one folder)")

    def files(self) -> list[Path]:
        """Every file the data set reads (an output must be none of them)."""
        return [self.dir / "list.txt", self.dir / SIDES, *self.annotation_paths,
                *(self.dir / f"{i}.png" for i in range(len(self.coords)))]

    def _check_images(self) -> None:
        """Refuse a folder whose images are missing or of another size than image_size
        before any worker starts (their errors would arrive wrapped in tracebacks)."""
        missing = next((i for i in range(len(self.coords)) if not (self.dir / f"{i}.png").is_file()), None)
        if missing is not None:
            raise DataError(f"{self.dir}: list.txt names {len(self.coords)} images but {missing}.png is missing")
        size = self.geom.image_size
        for i in range(len(self.coords)):  # PNG headers (about 1 s per 100,000 cached): not hours into a run
            path = self.dir / f"{i}.png"
            wh = png_size(path) or image_size(path)  # another format named .png is read too, as cv2 reads it
            if wh is None:
                raise DataError(f"{path}: missing or unreadable image")
            if wh != (size, size):
                raise DataError(f"{path}: is {wh[0]}x{wh[1]}, but image_size is {size} "
                                "(make the patches with Patch_gen.py --image-size, or change the config)")
        self._read(0)

    def __len__(self) -> int:
        return len(self.coords)

    def _read(self, i: int) -> np.ndarray:
        path = self.dir / f"{i}.png"
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{path}: missing or unreadable image")
        size = self.geom.image_size
        if img.shape[:2] != (size, size):
            raise DataError(f"{path}: is {img.shape[1]}x{img.shape[0]}, but image_size is {size} "
                            "(make the patches with Patch_gen.py --image-size, or change the config)")
        return img[..., ::-1]

    def __getitem__(self, i: int):
        rgb, g = self._read(i), self.geom.grid
        if self.normalise is not None:
            rgb = normalise_cells(rgb, self.geom.patch_size, self.geom.crop_size, self.normalise)
        labels = self.labels[i].reshape(g, g)
        if self.augment is not None:
            rgb, labels = self.augment(rgb, labels)
        cells = cut_grid(rgb, self.geom.patch_size, self.geom.crop_size)
        patches = torch.stack([to_tensor(c) for c in cells])
        labels = torch.from_numpy(np.ascontiguousarray(labels).reshape(-1).copy())
        if self.context:
            return (patches, to_tensor(context_image(rgb, self.geom.patch_size, self.geom.crop_size))), labels
        return patches, labels


class FolderDataset(Dataset):
    """ImageFolder-style class sub-folders; items `(image [1, 3, s, s], class index)`."""

    EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

    def __init__(self, root: str | Path, size: int, augment: Augment | None = None,
                 classes: Sequence[str] | None = None, normalise: Normaliser | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory of class sub-folders")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = list(classes or found)
        extra = sorted(set(found) - set(self.classes))
        if extra:
            raise DataError(f"{self.root}: classes {extra} are not among the model's {self.classes}")
        self.items = [(p, k) for k, c in enumerate(self.classes) if (self.root / c).is_dir()
                      for p in visible_files(self.root / c, self.EXTS)]  # not ._x.png, .ipynb_checkpoints
        if not self.items:
            raise DataError(f"{self.root}: no images in class sub-folders")
        self.size, self.augment, self.normalise = size, augment, normalise

    def files(self) -> list[Path]:
        """Every file the data set reads (an output must be none of them)."""
        return [p for p, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, k = self.items[i]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{path}: unreadable image")
        rgb = cv2.resize(img[..., ::-1], (self.size, self.size), interpolation=cv2.INTER_AREA)
        if self.normalise is not None:
            rgb = self.normalise(rgb)
        if self.augment is not None:
            rgb, _ = self.augment(rgb, np.zeros((1, 1)))
        return to_tensor(rgb).unsqueeze(0), k
