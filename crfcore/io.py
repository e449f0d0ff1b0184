"""Atomic file writes, `.npy` arrays with their `.json` sidecars, and the one rule that
pairs a slide with its masks, maps, lesions and annotations.

Every output is written to a hidden temporary file in the same folder and renamed, so a
crash never leaves a half-written file behind; the file gets the mode a plain `open()`
would give (the umask), and a path that is a device or other special file is refused.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np

from . import __version__
from .errors import CrfError, OutputError

# ----------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | Path) -> Path:
    """`path` as a Path; refuse one that exists and is not a regular file (a device, a
    FIFO, a directory): renaming onto it would replace it."""
    path = Path(path)
    if path.exists() and not path.is_file():
        what = "a directory" if path.is_dir() else "a device or other special file"
        raise OutputError(f"{path}: is {what}, not a file to write")
    broken = next((p for p in path.parents if p.is_symlink() and not p.exists()), None)
    if broken is not None:
        raise OutputError(f"{path}: cannot write ({broken} is a link to nothing)")
    nearest = next((p for p in path.parents if p.exists()), None)
    if nearest is not None and not nearest.is_dir():
        raise OutputError(f"{path}: cannot write ({nearest} is a file, not a folder)")
    return path


PICTURE_SOFTWARE = "crfcore picture"  # in every picture save_figure writes: its own are told from others'
_TEXT_PICTURES = ("pdf", "svg", "eps", "ps")  # formats whose mark is text in the file (their Creator)
_JPEG = {"pil_kwargs": {"comment": PICTURE_SOFTWARE}}
_TIFF = {"pil_kwargs": {"tiffinfo": {305: PICTURE_SOFTWARE}}}  # tag 305: Software
# The picture formats written, and where each carries PICTURE_SOFTWARE.
PICTURE_MARKS = {"png": {"metadata": {"Software": PICTURE_SOFTWARE}},
                 **{f: {"metadata": {"Creator": PICTURE_SOFTWARE}} for f in _TEXT_PICTURES},
                 "jpg": _JPEG, "jpeg": _JPEG, "tif": _TIFF, "tiff": _TIFF}


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """Lay out a matplotlib figure, write it atomically to `path` (marked as this tool's,
    `PICTURE_MARKS`) and free it."""
    import matplotlib.pyplot as plt

    fmt = Path(path).suffix[1:].lower()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=fmt or None, **PICTURE_MARKS.get(fmt, {}))
    finally:
        plt.close(fig)


PICTURE_MAX_BYTES = 64 * 2**20  # a file larger than this is no picture save_figure wrote (not read to find out)


def is_own_picture(path: Path) -> bool:
    """Whether `path` is a picture `save_figure` wrote (it carries `PICTURE_SOFTWARE`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size > PICTURE_MAX_BYTES:  # a slide, say: no picture of ours is that large
            return False
        if path.suffix[1:].lower() in _TEXT_PICTURES:
            return PICTURE_SOFTWARE.encode() in path.read_bytes()
        with warnings.catch_warnings():  # a large image's size warning: ours are small, so it is not ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                found = [*im.info.values(), *(getattr(im, "tag_v2", None) or {}).values()]
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False
    return any(v in (PICTURE_SOFTWARE, PICTURE_SOFTWARE.encode()) for v in found if isinstance(v, (str, bytes)))


def check_spares_inputs(outputs: Iterable[str | Path | None], inputs: Iterable[str | Path | None]) -> None:
    """Refuse, before any work, an output that is one of the run's inputs (the same file,
    by any name) or another of its outputs: writing it would replace what the run reads."""
    ins = [Path(p) for p in inputs if p is not None and Path(p).is_file()]
    seen: list[Path] = []
    for out in (Path(o) for o in outputs if o is not None):
        if any(out.resolve() == o.resolve() for o in seen):
            raise OutputError(f"{out}: is named for two outputs of this run; give each its own name")
        seen.append(out)
        same = next((i for i in ins if os.path.samefile(out, i)), None) if out.is_file() else None
        if same is not None:
            raise OutputError(f"{out}: is also an input of this run ({same}); writing it would replace it: "
                              "choose another output name")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def remove_stale_temps(path: Path) -> int:
    """Delete the temporary files a killed writer of `path` left behind (their writer's
    process id is in the name and no longer runs); return how many."""
    removed = 0
    if not path.parent.is_dir():
        return 0
    for tmp in path.parent.glob(f".{path.name}.*"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    if removed:
        warnings.warn(f"{path}: removed {removed} temporary file(s) left by a killed earlier run")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the body succeeds.
    An `OSError` on the temporary file is reported as an `OutputError` naming `path`."""
    path = check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix or path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or err})") from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask like open()
        os.replace(tmp, path)
    except OSError as err:
        if err.filename in (None, name, str(path)) or getattr(err, "filename2", None) in (name, str(path)):
            raise OutputError(f"{path}: cannot write ({err.strerror or err})") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # never the locale's: readers read UTF-8


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def write_image(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 array as an image (format from the suffix), atomically; a
    failed encode or write (a full disk) is an `OutputError`, never a silent success."""
    try:  # encoded in memory: a full disk is then one OSError, not libpng's own message as well
        ok, encoded = cv2.imencode(Path(path).suffix, np.ascontiguousarray(rgb[..., ::-1]))
    except cv2.error as err:
        raise OutputError(f"{path}: cannot encode the image ({str(err).strip().splitlines()[-1]})") from None
    if not ok:
        raise OutputError(f"{path}: cannot encode the image")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy `src` to `dst` through a temporary file: a full disk never leaves a truncated `dst`."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def ensure_free_space(path: str | Path, nbytes: int, what: str = "output") -> None:
    """Refuse to start a long computation whose `nbytes` output cannot be written to `path`:
    a path `check_output_path` refuses, a folder this user cannot write, too little space."""
    folder = check_output_path(path).parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{path}: cannot write ({folder} is not writable)")
    if os.statvfs(folder).f_flag & os.ST_RDONLY:  # root passes os.access even there
        raise OutputError(f"{path}: cannot write ({folder} is on a read-only file system)")
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise OutputError(f"{path}: the {what} needs {nbytes:,} bytes but only {free:,} are free on that "
                          "file system")


# ----------------------------------------------------------------------------- arrays + sidecars


def read_json(path: str | Path, what: str, error: type[CrfError] = CrfError, unique_keys: bool = False) -> object:
    """What the JSON file `path` (a `what`) holds; every way it can be unreadable is an
    `error` naming the file (a byte-order mark is allowed). With `unique_keys`, so is a key
    given twice in one object (JSON itself lets the last one win, silently)."""
    path, a_what = Path(path), f"{'an' if what[:1] in tuple('aeiou') else 'a'} {what}"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not {a_what}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (expected {a_what})") from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return json.loads(text, object_pairs_hook=unique_object if unique_keys else None)
    except json.JSONDecodeError as err:
        raise error(f"{path}: malformed JSON at line {err.lineno}: {err.msg}") from None
    except RecursionError:
        raise error(f"{path}: malformed JSON (nested too deeply)") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise error(f"{path}: malformed JSON ({str(err).splitlines()[0]})") from None


def unique_object(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict; a key given twice is a ValueError naming it."""
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise ValueError(f"key {twice!r} is given twice")
    return dict(pairs)


def sidecar_path(npy: str | Path) -> Path:
    """`<name>.json` beside `<name>.npy`; a path without a name ('/') is no array file."""
    if not Path(npy).name:
        raise ArrayFileError(f"{npy}: is no .npy file")
    return Path(npy).with_suffix(".json")


class ArrayFileError(CrfError):
    """An array file or sidecar that is missing, malformed or belongs to another slide."""


class ValuesChangedWarning(UserWarning):
    """An array read whose values are not those its sidecar records (its SHA-256)."""


def sidecar_json(path: Path) -> dict | None:
    """The JSON object the file `path` holds, or None (unreadable, or not an object)."""
    try:
        meta = read_json(path, "sidecar")
    except CrfError:
        return None
    return meta if isinstance(meta, dict) else None


def own_sidecar(path: Path) -> dict | None:
    """What `path` holds when it is a sidecar `save_array` wrote, else None (an annotation
    of the same name, say, or an unreadable file)."""
    meta = sidecar_json(path)
    return meta if meta is not None and {"shape", "crfcore_version"} <= meta.keys() else None


def check_array_output(path: str | Path, kind: str | None = None) -> None:
    """Refuse to write the array `path` when saving would replace a file other than an
    earlier output's sidecar at its sidecar's path (an annotation named like the output),
    or, given the `kind` to write, an array of another kind (a tissue mask as a map's -o)."""
    side = sidecar_path(check_output_path(path))
    check_output_path(side)
    settle(path)
    meta = own_sidecar(side) if side.is_file() else {}
    if meta is None:
        raise OutputError(f"{path}: writing it would replace {side}, which is not a sidecar of crfcore "
                          "(an annotation?); choose another output name")
    if kind and Path(path).is_file() and meta.get("kind") not in (None, kind):
        raise OutputError(f"{path}: holds a {meta['kind']} array, which a {kind} array would replace; "
                          "choose another output name")


MAKER = {"probability": "prob_map.py"}  # which script writes each kind (masks: Mask_gen.py)


def save_array(path: str | Path, array: np.ndarray, meta: dict) -> None:
    """Write `array` to `path` (.npy) and `meta` (+ shape, hash, version) to its sidecar.
    A kill at any moment leaves the old pair or the new one, as the next reader sees it:
    the new sidecar waits beside the old one (`pending_sidecar_path`) until the new array
    is in place, and `settle` finishes or undoes a save stopped between the two."""
    path = Path(path)
    check_array_output(path, meta.get("kind"))
    # the sidecar names its array's content: two runs writing one map at once can leave one
    # run's array under the other's sidecar, and prob_map.py then makes it again (no lock to wait on)
    meta = {**meta, "shape": list(array.shape), "array_sha256": array_sha256(array), "crfcore_version": __version__}
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array)
        atomic_write_json(pending_sidecar_path(path), meta)
    try:
        os.replace(pending_sidecar_path(path), sidecar_path(path))
    except OSError as err:
        raise OutputError(f"{sidecar_path(path)}: cannot write ({err.strerror or err})") from None


def pending_sidecar_path(npy: str | Path) -> Path:
    """Where `save_array` keeps an array's new sidecar until the new array is in place."""
    side = sidecar_path(npy)
    return side.with_name(f".{side.name}.pending")


def settle(npy: str | Path) -> None:
    """Finish or undo a `save_array` that a kill stopped: its pending sidecar goes in when
    the array in place is the one it records, else it goes (the old pair stands). In a
    folder this process cannot write, nothing changes (the array then reads with a
    warning when its sidecar does not record it)."""
    pending = pending_sidecar_path(npy)
    if not pending.is_file():
        return
    recorded = (sidecar_json(pending) or {}).get("array_sha256")
    try:
        new = recorded is not None and Path(npy).is_file() and recorded == array_sha256(_read_array(Path(npy)))
    except ArrayFileError:  # a truncated array in place: the pending sidecar cannot be its own
        new = False
    try:
        if new:
            os.replace(pending, sidecar_path(npy))
        else:
            pending.unlink()
    except OSError:
        pass


def array_sha256(array: np.ndarray) -> str:
    """The SHA-256 of an array's values (its C-order bytes, hashed without a copy)."""
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def load_array(path: str | Path, kind: str | tuple[str, ...] | None = None,
               slide: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """Read a 2-D array and its sidecar; check the sidecar's lattice, `kind` and, when given,
    the slide: its file name (a str), or the slide file itself (a Path: its size in bytes
    too, where the sidecar records it). Non-finite values are refused; values that are not
    those the sidecar records (its hash) are read with a warning."""
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    maker = MAKER.get(kinds[0], "Mask_gen.py") if kinds else "Mask_gen.py or prob_map.py"
    side = sidecar_path(path)
    settle(path)
    if not path.is_file():
        raise ArrayFileError(f"{path}: is a folder, not a .npy file" if path.is_dir() else f"{path}: no such file")
    if not side.is_file():
        raise ArrayFileError(f"{path}: sidecar {side.name} is missing (write it with {maker})")
    array = _read_array(path)
    meta = read_json(side, "sidecar", ArrayFileError)
    if not isinstance(meta, dict) or not isinstance(meta.get("slide"), str):
        raise ArrayFileError(f"{side}: not a sidecar (expected a JSON object naming its slide)")
    if list(array.shape) != meta.get("shape"):
        raise ArrayFileError(f"{path}: shape {array.shape} does not match its sidecar {meta.get('shape')}")
    if meta.get("array_sha256") not in (None, array_sha256(array)):  # older sidecars have none
        # read all the same: an array edited on purpose keeps what its sidecar says of it
        warnings.warn(f"{path}: its values are not those its sidecar {side.name} records (edited since, or "
                      f"written by two runs at once: then make it again with {maker})", ValuesChangedWarning)
    if array.ndim != 2:
        raise ArrayFileError(f"{path}: is a {array.ndim}-D array; masks and maps are 2-D [row, col]")
    if kinds is not None and meta.get("kind") not in kinds:
        what = f"is a {meta['kind']!r} array" if meta.get("kind") else f"has no 'kind' in its sidecar {side.name}"
        raise ArrayFileError(f"{path}: {what}, expected {' or '.join(map(repr, kinds))}")
    if slide is not None and meta.get("slide") != Path(slide).name:
        raise ArrayFileError(f"{path}: belongs to slide {meta.get('slide')!r}, not {Path(slide).name!r}")
    size = slide.stat().st_size if isinstance(slide, Path) and slide.is_file() else None  # the file, not a name
    if isinstance(meta.get("slide_bytes"), int) and size not in (None, meta["slide_bytes"]):
        raise ArrayFileError(f"{path}: made from a {meta['slide_bytes']:,}-byte {meta['slide']}, but {slide} has "
                             f"{size:,} bytes: another slide of the same name?")
    meta["downsample"] = _downsample(path, meta)
    level = meta.setdefault("level", None)  # null: the lattice is no pyramid level of the slide
    if level is not None and (not isinstance(level, int) or isinstance(level, bool) or level < 0):
        raise ArrayFileError(f"{side}: 'level' must be null or a pyramid level (0, 1, ...), got {level!r}")
    if meta.get("mpp") is not None and not _positive_pair(meta["mpp"]):
        raise ArrayFileError(f"{side}: 'mpp' must be null or two positive numbers, got {meta['mpp']!r}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        what = "map" if meta.get("kind") == "probability" else "mask" if meta.get("kind") else "array"
        raise ArrayFileError(f"{path}: {bad} cell(s) are NaN or infinite; refusing a non-finite {what}")
    return array, meta


ARRAY_KINDS = "biuf"  # bool, int, unsigned, float: what masks and maps hold


def _read_array(path: Path) -> np.ndarray:
    """The array in the .npy file `path`: a non-empty array of numbers, or an ArrayFileError."""
    try:
        array = np.load(path, allow_pickle=False)
    except EOFError:
        raise ArrayFileError(f"{path}: cannot read the array (empty or truncated file)") from None
    except Exception as err:  # numpy parses the header as Python: a corrupt one raises many types
        raise ArrayFileError(f"{path}: cannot read the array ({(str(err).splitlines() or [type(err).__name__])[0]})") from None
    if not isinstance(array, np.ndarray):  # np.load opens an .npz archive as well
        array.close()
        raise ArrayFileError(f"{path}: is an .npz archive, not one .npy array")
    if array.dtype.kind not in ARRAY_KINDS:
        raise ArrayFileError(f"{path}: holds {array.dtype} values; masks and maps hold numbers")
    if array.size == 0:
        raise ArrayFileError(f"{path}: is an empty {'x'.join(map(str, array.shape))} array")
    return array


MAX_DOWNSAMPLE = 1e6  # level-0 pixels per array cell: beyond this no slide has two cells


def _downsample(path: Path, meta: dict) -> list[float]:
    """The sidecar's per-axis downsample, checked: two positive numbers up to MAX_DOWNSAMPLE."""
    ds = meta.get("downsample")
    if not _positive_pair(ds) or max(ds) > MAX_DOWNSAMPLE:
        raise ArrayFileError(f"{sidecar_path(path)}: 'downsample' must be two positive numbers up to "
                             f"{MAX_DOWNSAMPLE:g}, got {ds!r}")
    return [float(v) for v in ds]


def _positive_pair(value: object) -> bool:
    """Whether `value` is a list of two positive finite numbers (not bools, not strings)."""
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    for v in value))


def check_fits_slide(path: str | Path, shape: tuple[int, ...], downsample: Sequence[float],
                     slide_size: tuple[int, int]) -> None:
    """Refuse an array whose lattice does not cover the slide: `shape * downsample` must
    equal the slide's level-0 size to within one array pixel on each axis."""
    h, w = shape[:2]
    (dx, dy), (w0, h0) = downsample, slide_size
    if abs(w * dx - w0) >= dx or abs(h * dy - h0) >= dy:
        raise ArrayFileError(f"{path}: a {w}x{h} lattice at downsample {dx:g}x{dy:g} covers "
                             f"{w * dx:.0f}x{h * dy:.0f} level-0 pixels, but the slide is {w0}x{h0}")


# ----------------------------------------------------------------------------- pairing files with slides

# What follows a slide's stem in the name of each kind of companion file. The rule:
# `<stem><suffix>` exactly (case-insensitively when no exact-case name exists), never a
# bare prefix, so `s1.tif` never takes `s10_tissue.npy`.
COMPANIONS: dict[str, tuple[str, ...]] = {
    "tissue": ("_tissue.npy",),
    "tumor": ("_tumor.npy",),
    "normal": ("_normal.npy",),
    "prob": ("_prob.npy",),
    "lesions": (".csv", "_lesions.csv", "_prob.csv"),
    "annotation": (".json", ".xml", ".geojson", ".txt"),
    "truth_mask": ("_mask.tif", ".tif", "_mask.tiff", ".tiff"),  # Camelyon16's Tumor_001_Mask.tif
}


def lock_folder(folder: Path, how: int, busy: str, error: type[CrfError] = OutputError) -> int:
    """A descriptor of `folder` holding flock `how` (fcntl.LOCK_EX or LOCK_SH; the folder
    itself: no lock file to leave behind; closing it lets go); a folder locked against it
    is an `error`: "<folder>: <busy> this folder; wait for it"."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise error(f"{folder}: {busy} this folder; wait for it") from None
    return fd


def resolved_folder(path: Path) -> Path:
    """`path` resolved (`new/../data` is `data`), or an OutputError naming it (a symlink loop)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:
        raise OutputError(f"{path}: cannot resolve the folder ({getattr(err, 'strerror', None) or err})") from None


def make_folder(path: Path) -> list[Path]:
    """Make folder `path` with its missing parents; return the folders made, deepest first
    (for `remove_empty` when the run that needed them is refused)."""
    made = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(folders: list[Path]) -> None:
    """Remove these folders (deepest first) while they are empty: a refused run leaves none
    of the folders it made behind, and never a folder with something in it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): what is above it stays too
            return


def visible_files(folder: str | Path, suffixes: Sequence[str] = ()) -> list[Path]:
    """Regular files directly in `folder` whose names end with one of `suffixes` (any when
    empty), sorted; hidden files (temporary files of writers among them) are left out."""
    folder = Path(folder)
    low = tuple(s.lower() for s in suffixes)
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.is_file() and (not low or p.name.lower().endswith(low)))


def visible_names(folder: str | Path) -> dict[str, Path]:
    """`{name: path}` of `visible_files(folder)`."""
    return {p.name: p for p in visible_files(folder)}


def companion(folder: str | Path, stem: str, kind: str, names: dict[str, Path] | None = None) -> Path | None:
    """The file in `folder` that belongs to the slide `stem` as `kind` (see COMPANIONS),
    or None. The first suffix of the kind that matches wins."""
    found = all_companions(folder, stem, kind, names)
    return found[0] if found else None


def all_companions(folder: str | Path, stem: str, kind: str, names: dict[str, Path] | None = None) -> list[Path]:
    """Every file in `folder` that belongs to the slide `stem` as `kind`, in the order of
    the kind's suffixes; a name matches exactly, else in another case when only one does.
    `names`: the folder's `visible_names`, when the caller keeps them (the viewer)."""
    folder = Path(folder)
    if names is None:
        if not folder.is_dir():
            return []
        names = visible_names(folder)
    lower = {}
    for name, p in names.items():
        lower.setdefault(name.lower(), []).append(p)
    found = []
    for suffix in COMPANIONS[kind]:
        want = stem + suffix
        if want in names:
            found.append(names[want])
        elif len(lower.get(want.lower(), [])) == 1:
            found.append(lower[want.lower()][0])
    return found


def matching_name(name: str, names: Iterable[str]) -> str | None:
    """`name` when it is one of `names`, else the one of them equal to it in another case;
    None where none or several are (`all_companions`' rule, for one lookup)."""
    names = list(names)
    if name in names:
        return name
    same = [n for n in names if n.lower() == name.lower()]
    return same[0] if len(same) == 1 else None


def companion_stem(path: str | Path, kind: str) -> str:
    """The slide stem of a companion file: its name without the kind's suffix."""
    name = Path(path).name
    for suffix in sorted(COMPANIONS[kind], key=len, reverse=True):
        if name.lower().endswith(suffix.lower()):
            return name[:-len(suffix)]
    return Path(path).stem


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex (checkpoints are recorded by content, not path)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
