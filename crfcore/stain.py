"""Stain variation, the main reason models fail across patients and labs: HED-space
jitter for augmentation (Tellez et al. 2018) and Macenko normalisation to a reference
image (torchstain's implementation)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .errors import CrfError

MIN_STAINED = 64  # pixels of optical density above torchstain's 0.15 that a fit needs


class StainError(CrfError):
    """A stain reference that cannot be read or fitted."""


class HEDJitter:
    """Tellez et al.'s HED augmentation: colour deconvolution to haematoxylin, eosin and
    DAB (scikit-image's Ruifrok matrix), each channel `x -> a * x + b` with `a ~ U(1-s, 1+s)`
    and `b ~ U(-s, s)`, and back to RGB. `s` 0.05 is their "light", 0.2 "strong"."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from skimage.color import hed2rgb, rgb2hed

        s = self.sigma
        hed = rgb2hed(rgb) * rng.uniform(1 - s, 1 + s, 3) + rng.uniform(-s, s, 3)
        return np.clip(hed2rgb(hed) * 255 + 0.5, 0, 255).astype(np.uint8)


def stain_arrays(d: object) -> tuple[np.ndarray, np.ndarray]:
    """A stored reference's stain vectors (3 x 2) and maximum concentrations (2), checked."""
    try:
        he, max_c = np.asarray(d["he_ref"], float).reshape(3, 2), np.asarray(d["max_c_ref"], float).reshape(2)
    except (LookupError, TypeError, ValueError):
        raise StainError(f"malformed stain reference {str(d)[:80]!r}: expected he_ref (3 x 2) and "
                         "max_c_ref (2 numbers)") from None
    if not (np.isfinite(he).all() and np.isfinite(max_c).all()):
        raise StainError("malformed stain reference: its numbers are not finite")
    return he, max_c


class MacenkoNormaliser:
    """Map an image's H&E stain vectors and concentrations onto a reference's (Macenko et
    al. 2009, via torchstain). Images with too little stain to fit (glass, fat) are left as
    they are. The reference is a few numbers, stored in checkpoints by `to_dict`."""

    def __init__(self, he_ref: np.ndarray, max_c_ref: np.ndarray) -> None:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        self._norm = NumpyMacenkoNormalizer()
        self._norm.HERef = np.asarray(he_ref, float).reshape(3, 2)
        self._norm.maxCRef = np.asarray(max_c_ref, float).reshape(2)

    @classmethod
    def fit(cls, image_path: str | Path) -> "MacenkoNormaliser":
        """Fit the reference stains on an RGB image file."""
        import cv2

        img = cv2.imread(str(image_path), cv2.IMREAD_COLOR) if Path(image_path).is_file() else None  # no OpenCV warning
        if img is None:
            raise StainError(f"{image_path}: stain reference is missing or not an image")
        norm = cls(np.zeros((3, 2)), np.ones(2))
        rgb = np.ascontiguousarray(img[..., ::-1])
        if not _stained_enough(rgb):
            raise StainError(f"{image_path}: too little stained tissue to fit a stain reference")
        with np.errstate(all="ignore"):
            norm._norm.fit(rgb)
        if not np.isfinite(norm._norm.HERef).all():
            raise StainError(f"{image_path}: the stain fit failed (not an H&E image?)")
        return norm

    @classmethod
    def from_dict(cls, d: dict) -> "MacenkoNormaliser":
        return cls(*stain_arrays(d))

    def to_dict(self) -> dict:
        return {"he_ref": self._norm.HERef.tolist(), "max_c_ref": self._norm.maxCRef.tolist()}

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """`(H, W, 3)` uint8 -> the same image in the reference's stains."""
        if not _stained_enough(rgb):
            return rgb
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out, _, _ = self._norm.normalize(np.ascontiguousarray(rgb), stains=False)
        except np.linalg.LinAlgError:
            return rgb
        return out if np.isfinite(out).all() else rgb


def _stained_enough(rgb: np.ndarray) -> bool:
    """Whether enough pixels carry stain (optical density >= 0.15 in every channel, as
    torchstain keeps them) for the eigen-decomposition to be meaningful."""
    od = -np.log((rgb.reshape(-1, 3).astype(float) + 1) / 240)
    return int(np.all(od >= 0.15, axis=1).sum()) >= MIN_STAINED
