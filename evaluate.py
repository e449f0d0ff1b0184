#!/usr/bin/env python3
"""Evaluate probability maps and models.

  python evaluate.py lesions PROB.npy -o LESIONS.csv [--threshold 0.5] [--radius 12] [--sigma 0]
                     [--to csv|xml|geojson]
  python evaluate.py froc LESIONS_DIR TRUTH_DIR [--level 5] [--slides DIR] [--plot froc.png]
  python evaluate.py slides PROBS_DIR LABELS.csv [--plot roc.png]
  python evaluate.py pixels PROB.npy TUMOUR_MASK.npy [--threshold 0.5] [--tissue TISSUE.npy]
  python evaluate.py patches CKPT DATASET_DIR [--json JSON_DIR]
  python evaluate.py negatives PROBS_DIR TRUTH_DIR -o COORDS.txt [--threshold 0.5] [--per-slide N]

Files are paired with slides by the slide's exact stem: lesions `<stem>.csv`, maps
`<stem>_prob.npy`, truth `<stem>.json|.xml|.geojson` or a mask `<stem>_mask.tif`.
"""
from __future__ import annotations

from crfcore.startup import quiet_ctrl_c

quiet_ctrl_c()  # first: Ctrl-C while the libraries below load is one line

import argparse
import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np

from crfcore import evaluation as ev
from crfcore import masks
from crfcore import slide as sl
from crfcore.annotations import find_annotation, is_lesion_export, load_annotation, load_truth, same_polygons
from crfcore.cli import PROBABILITY, UserError, add_workers, given_path, number, parser, run
from crfcore.errors import CrfError
from crfcore.heatmap import check_picture_output, load_probability_map
from crfcore.io import (COMPANIONS, atomic_write_text, check_fits_slide, check_spares_inputs, companion, companion_stem,
                        file_sha256, matching_name, save_figure, sidecar_path, visible_files, visible_names)
from crfcore.tilefolder import tiles_in
from crfcore.tiling import format_coords, read_coords

MAX_TRUTH_PIXELS = 2**26  # an evaluation raster larger than this is a mistake (a bad coordinate)


def cmd_lesions(args) -> None:
    prob, meta = load_probability_map(args.prob)
    csv_path, export = lesion_outputs(args.output, args.to)
    if export is not None and export.is_file() and not is_lesion_export(export):
        raise UserError(f"{export}: exists and holds annotations other than predicted lesions (the truth?); "
                        "the export would replace it: choose another -o")
    check_replaceable(csv_path, ev.read_lesions, "a lesion list (prob,x,y)")
    found = ev.find_lesions(prob, tuple(meta["downsample"]), args.threshold, args.radius, args.sigma)
    atomic_write_text(csv_path, ev.lesions_csv(found))
    if export is not None:
        text = ev.lesions_asap_xml(found) if export.suffix == ".xml" else json.dumps(ev.lesions_geojson(found))
        atomic_write_text(export, text)
    print(f"{meta['slide']}: {len(found)} lesions above {args.threshold} -> {csv_path}"
          + (f" and {export}" if export is not None else ""))


LESION_FORMATS = ("csv", "xml", "geojson")


def lesion_outputs(out: Path, to: str | None) -> tuple[Path, Path | None]:
    """`lesions -o OUT --to TO` writes the CSV (OUT with .csv) and, unless TO is csv, the
    export (OUT with .xml or .geojson). Without --to, OUT's suffix says which."""
    if out.name in ("", ".", "..") or out.is_dir():
        raise UserError(f"{out}: is a folder; -o names the lesion list, LESIONS.csv")
    suffix = out.suffix[1:].lower()
    if suffix and suffix not in LESION_FORMATS:
        raise UserError(f"{out}: -o ends with .csv (the lesion list), or .xml or .geojson (the list and that export)")
    if to is not None and suffix not in ("", "csv", to):
        ends = "with .csv" if to == "csv" else f"with .{to} or .csv"
        raise UserError(f"{out}: a .{suffix} name, but --to {to}: end -o {ends}, or drop --to")
    to = to or suffix or "csv"
    return out.with_suffix(".csv"), (None if to == "csv" else out.with_suffix("." + to))


def check_replaceable(path: Path, read, what: str) -> None:
    """Refuse to replace an existing `path` unless `read` takes it as `what`: an earlier
    output of this command, never another file of the same name."""
    if path.is_file() and path.stat().st_size:
        try:
            read(path)
        except CrfError:
            raise UserError(f"{path}: exists and is not {what}; not replaced: choose another output") from None


def run_files(args) -> list[Path]:
    """Every file the command may read (an output must not be one of them)."""
    files = [getattr(args, n, None) for n in ("prob", "mask", "tissue", "labels", "ckpt")]
    files += [sidecar_path(f) for f in files[:3] if f is not None]
    for name, suffixes in (("lesions_dir", COMPANIONS["lesions"]), ("probs_dir", (*COMPANIONS["prob"], "_prob.json")),
                           ("truth_dir", COMPANIONS["annotation"] + COMPANIONS["truth_mask"])):
        if getattr(args, name, None) is not None:
            files += visible_files(getattr(args, name), suffixes)
    if getattr(args, "slides", None) is not None:
        files += sl.find_slides(args.slides)
    return [f for f in files if f is not None]


def slides_by_stem(slides_dir: Path | None) -> dict[str, Path]:
    """The slides of `slides_dir` (listed once) by stem; of two with one stem, the first."""
    found: dict[str, Path] = {}
    for p in sl.find_slides(slides_dir) if slides_dir is not None else []:
        found.setdefault(p.stem, p)
    return found


def truth_lattice(slide_path: Path | None, level: int, bounds, mpp: float) -> masks.Lattice:
    """Where the truth is rasterised: the slide's level `level` (its real downsample), or a
    lattice of that downsample over the slide when the pyramid is shallower; without a
    slide, a nominal `2**level` lattice over the annotation's extent and the evaluation
    mask's dilation beyond it (a hit just past a tumour's edge is still a hit)."""
    if slide_path is not None:
        with sl.open_slide(slide_path) as s:
            if level < s.level_count:
                return masks.Lattice.for_slide(s, level=level)
            return masks.Lattice.for_slide(s, downsample=2.0 ** level)
    ds = 2.0 ** level
    pad = math.ceil(ev.dilation_pixels(ds, mpp)) + 2
    return masks.Lattice((int(bounds[3] / ds) + pad, int(bounds[2] / ds) + pad), (ds, ds), level)


def truth_labels(stem: str, truth_dir: Path, level: int, mpp: float,
                 slide_path: Path | None) -> tuple[np.ndarray | None, tuple[float, float]]:
    """Labelled evaluation mask of a slide and its per-axis downsample, from its
    annotation or a Camelyon16 mask TIFF; None for a normal slide (no truth, no polygons)."""
    path = find_annotation(truth_dir, stem)
    check_not_misnamed(truth_dir, stem, path)
    if path is not None:
        ann = load_truth(path)
        if not ann.positive:
            return None, (1.0, 1.0)
        if slide_path is not None:
            with sl.open_slide(slide_path) as s:
                size = s.dimensions
            if not masks.overlaps(ann, size):
                raise UserError(f"{path}: lies wholly outside {slide_path.name}'s {size[0]}x{size[1]} level-0 "
                                "pixels: the truth of another slide? (its tumour would count as a normal slide)")
        lat = truth_lattice(slide_path, level, ann.bounds(), mpp)
        if lat.shape[0] * lat.shape[1] > MAX_TRUTH_PIXELS:
            raise UserError(f"{path}: reaches ({ann.bounds()[2]:.0f}, {ann.bounds()[3]:.0f}): too large an "
                            "evaluation raster; a coordinate is wrong, or give --slides to bound it by the slide")
        return tumour_labels(masks.annotation_mask(ann, lat), lat.downsample, mpp)
    tif = companion(truth_dir, stem, "truth_mask")
    if tif is not None:
        with sl.open_slide(tif) as m:
            if slide_path is not None:
                with sl.open_slide(slide_path) as s:
                    check_same_size(tif, m.dimensions, s.dimensions, slide_path.name)
            lvl = min(level, m.level_count - 1)  # a shallow mask pyramid: its deepest level, real downsample
            ds = sl.level_downsamples(m)[lvl]
            pixels = sl.read_level(m, lvl, background=0)  # a sparse TIFF's missing tiles: no tumour
        check_grey(tif, pixels)
        return tumour_labels(pixels[..., 0] > 0, ds, mpp)
    return None, (1.0, 1.0)


def check_not_misnamed(truth_dir: Path, stem: str, used: Path | None) -> None:
    """Refuse truth of slide `stem` named after the slide's file (`t1.tif.geojson`, as
    QuPath scripts that export per image name it): with no truth of the slide's own name
    (`used` None) the slide would count as normal, its tumour as false positives or mined
    as normal tissue; beside `used` it may be the newer truth, so it must hold the same
    polygons (as find_annotation asks of `t1.xml` beside `t1.geojson`)."""
    names = {n.lower(): n for n in visible_names(truth_dir)} if truth_dir.is_dir() else {}
    wanted = (f"{stem}{ext}{suffix}".lower() for ext in sl.SLIDE_EXTENSIONS for suffix in (".json", ".xml", ".geojson"))
    misnamed = next((truth_dir / names[w] for w in wanted if w in names), None)
    if misnamed is None or is_lesion_export(misnamed):
        return
    rename = f"rename it {stem}{misnamed.suffix} (or move it out if {stem} is a normal slide)"
    if used is None:
        raise UserError(f"{truth_dir}: holds no truth named {stem}.json, .xml or .geojson, but {misnamed.name}: {rename}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            same = same_polygons(load_annotation(used), load_annotation(misnamed))
    except CrfError:
        return  # no annotation: not a rival truth
    if not same:
        raise UserError(f"{truth_dir}: {used.name} (which would be used) and {misnamed.name} hold different polygons "
                        f"for slide {stem}; keep one of them, named {stem}.json, .xml or .geojson")


def tumour_labels(tumour: np.ndarray, ds: tuple[float, float], mpp: float) -> tuple[np.ndarray | None, tuple]:
    """`truth_labels`' answer for a rasterised truth: None (a normal slide) where it holds
    no tumour pixel (an empty mask TIFF, polygons that cover no pixel centre)."""
    labels = ev.evaluation_mask(tumour, ds[0], mpp)
    return (labels if labels.any() else None), ds


def check_grey(tif: Path, pixels: np.ndarray) -> None:
    """Refuse a "truth mask" in colour: a slide left in TRUTH_DIR, which would be all tumour."""
    if (pixels != pixels[..., :1]).any():
        raise UserError(f"{tif}: has colours, so it is not a truth mask (a slide? TRUTH_DIR holds annotations "
                        "or mask TIFFs)")


def check_same_size(truth: Path, size: tuple[int, int], slide_size: tuple[int, int], whose: str) -> None:
    """Refuse a truth mask TIFF whose level 0 is not its slide's size (another slide's)."""
    if tuple(slide_size) != tuple(size):
        raise UserError(f"{truth}: the truth mask is {size[0]}x{size[1]}, but its slide ({whose}) is "
                        f"{slide_size[0]}x{slide_size[1]}")


def lesion_lists(lesions_dir: Path) -> tuple[list[Path], list[str]]:
    """The lesion CSVs of LESIONS_DIR and their slide stems; one list per slide."""
    files = visible_files(lesions_dir, (".csv",))
    if not files:
        raise UserError(f"{lesions_dir}: no lesion CSV files (make them with `evaluate.py lesions`)")
    stems = [companion_stem(f, "lesions") for f in files]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        named = [f.name for f, s in zip(files, stems) if s == twice[0]]
        raise UserError(f"{lesions_dir}: {' and '.join(named)} are both lesion lists of slide {twice[0]}; keep one")
    return files, stems


def froc_hits(lesions: Path, stem: str, args, slide_path: Path | None) -> tuple[list[float], np.ndarray, bool]:
    """(false-positive probabilities, per-tumour best probabilities, is normal) of one
    slide's lesion list against its truth; the slide, when found, gives the microns per pixel."""
    mpp, found = args.mpp, ev.read_lesions(lesions)
    if slide_path is not None:
        with sl.open_slide(slide_path) as s:
            mpp, size = (sl.slide_mpp(s) or (mpp,))[0], s.dimensions
        off = np.flatnonzero((found[:, 1] >= size[0]) | (found[:, 2] >= size[1]))
        if off.size:  # a lesion list of another slide, or of a map of another size
            x, y = found[off[0], 1:]
            raise UserError(f"{lesions}: {off.size} lesion(s) outside {slide_path.name}'s {size[0]}x{size[1]} "
                            f"level-0 pixels, the first at ({x:g}, {y:g}): the lesions of another slide?")
    labels, ds = truth_labels(stem, args.truth_dir, args.level, mpp, slide_path)
    itc = ev.isolated_tumour_cells(labels, ds[0], mpp) if labels is not None else set()
    fp, tp, _ = ev.slide_hits(found, labels, itc, ds)
    return fp, tp, labels is None


def cmd_froc(args) -> None:
    files, stems = lesion_lists(args.lesions_dir)
    truths = {companion_stem(t, kind) for kind in ("annotation", "truth_mask")
              for t in visible_files(args.truth_dir, COMPANIONS[kind])  # Camelyon16's mask TIFFs too
              if not is_lesion_export(t)}
    listed = {stem.lower() for stem in stems}  # Tumor_001.json is tumor_001.csv's truth (companion's rule)
    unlisted = sorted(t for t in truths if t not in stems and t.lower() not in listed)
    if unlisted:
        print(f"note: no lesion list for {', '.join(unlisted)} (truth in {args.truth_dir}); left out")
    if args.slides is None:  # the isolated-tumour-cell rule is in microns
        print(f"note: no --slides, so every slide is taken at --mpp {args.mpp:g} um per pixel")
    slides = slides_by_stem(args.slides)
    if args.slides is not None and (missing := [s for s in stems if matching_name(s, slides) is None]):
        print(f"note: no slide in {args.slides} for {', '.join(missing)}: taken at --mpp {args.mpp:g} um per "
              "pixel (an annotation rasterised over its own extent)")
    fps, tps, normal = [], [], []
    for f, stem in zip(files, stems):
        fp, tp, is_normal = froc_hits(f, stem, args, slides.get(matching_name(stem, slides)))  # Tumor_001.tif too
        fps.append(fp)
        tps.append(tp)
        if is_normal:
            normal.append(stem)
    if normal:
        print(f"normal slides (no tumour in {args.truth_dir}): {', '.join(normal)}")
    if not sum(len(t) for t in tps):
        raise UserError(f"{args.truth_dir}: no tumour to find on these {len(files)} slides (all normal, or every "
                        "tumour an isolated tumour cell cluster): FROC is undefined")  # the mpp note is above
    avg_fp, sens = ev.froc(fps, tps)
    score, at = ev.froc_score(avg_fp, sens)
    print(f"{len(files)} slides, {sum(len(t) for t in tps)} tumours (ITCs excluded)")
    print("avg FPs/slide  " + "  ".join(f"{r:>5}" for r in ev.FROC_FP_RATES))
    print("sensitivity    " + "  ".join(f"{s:5.3f}" for s in at))
    print(f"FROC={score:.4f}")
    if args.plot:
        plot(args.plot, avg_fp, sens, "average false positives per slide", "sensitivity",
             f"FROC {score:.3f}", logx=True)


HEADER_WORDS = {"slide", "slide_id", "slides", "image", "name", "id", "file", "filename", "case"}
LABELS = {"tumor": 1, "tumour": 1, "positive": 1, "1": 1, "true": 1,
          "normal": 0, "negative": 0, "0": 0, "false": 0}


def read_labels(path: Path) -> dict[str, int]:
    out = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's byte-order mark
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text CSV file") from None
    data = [(line, row) for line, row in enumerate(rows, 1) if "".join(row).strip()]
    if data and data[0][1][0].strip().lower() in HEADER_WORDS:
        data = data[1:]  # a header line: slide,label or the like
    for line, row in data:
        if len(row) < 2:
            raise UserError(f"{path}:{line}: expected 'slide,label' lines, got {row}")
        label = LABELS.get(row[1].strip().lower())
        if label is None:
            raise UserError(f"{path}:{line}: label {row[1]!r} is not one of {', '.join(LABELS)}")
        name = Path(row[0].strip())  # a slide's file name or path, or its stem
        # only a slide extension is dropped: case.01 or TCGA-...-DX1.<uuid> are whole stems
        slide = name.stem if name.suffix.lower() in sl.SLIDE_EXTENSIONS else name.name
        if out.get(slide, label) != label:
            raise UserError(f"{path}:{line}: slide {slide} is listed again with another label")
        out[slide] = label
    if not out:
        raise UserError(f"{path}: no 'slide,label' lines")
    return out


def cmd_slides(args) -> None:
    labels = read_labels(args.labels)
    names, y, score, unlabelled = [], [], [], []
    for f in visible_files(args.probs_dir, COMPANIONS["prob"]):
        prob, meta = load_probability_map(f)
        stem = matching_name(Path(meta["slide"]).stem, labels)  # Test_001 in Camelyon16's list for test_001.tif
        if stem is None:
            unlabelled.append(f"{f.name} ({Path(meta['slide']).stem})")
            continue
        if stem in names:
            raise UserError(f"{f}: is a second map of slide {meta['slide']} in {args.probs_dir}; keep one")
        names.append(stem)
        y.append(labels[stem])
        score.append(float(prob.max()) if prob.size else 0.0)
    missing = sorted(set(labels) - set(names))
    if unlabelled or missing:  # an AUC over a subset, without a word, is a wrong figure
        raise UserError(f"{args.labels}: " + "; ".join(
            ([f"no label for {', '.join(unlabelled)}"] if unlabelled else [])
            + ([f"no map in {args.probs_dir} for {', '.join(missing)}"] if missing else []))
            + ": give maps and labels of the same slides")
    r = ev.slide_roc(np.array(y), np.array(score))
    print(f"{len(y)} slides ({sum(y)} tumour): AUC={r['auc']:.4f} (95% CI {r['auc_low']:.4f}-{r['auc_high']:.4f})")
    print(f"specificity at sensitivity >= {ev.SCREENING_SENSITIVITY:.0%}: {r['specificity']:.4f} "
          f"(score threshold {r['threshold']:.4f}, sensitivity reached {r['sensitivity']:.0%})")
    if args.plot:
        plot(args.plot, r["fpr"], r["tpr"], "1 - specificity", "sensitivity", f"ROC AUC {r['auc']:.3f}")


def tissue_for(args, prob: np.ndarray, meta: dict) -> tuple[np.ndarray, str]:
    """The tissue the AUC is taken over: --tissue, else the mask prob_map.py used, else
    the map's non-zero cells."""
    path = args.tissue or recorded_mask(args.prob, meta)
    if path is None:  # a map that records no mask
        return prob > 0, "map > 0"
    tissue, tissue_meta = masks.load_mask(path, slide=meta["slide"])
    check_map_lattice(path, tissue, tissue_meta, prob, meta)
    return tissue, str(path)


def recorded_mask(prob_path: Path, meta: dict) -> Path | None:
    """The tissue mask a map was made with: its recorded path (absolute since 2026-12-07),
    else the path as given to prob_map.py, from here (a project tree moved or copied); a
    file whose SHA-256 is not the recorded one is not it. None where the map records no mask."""
    if not meta.get("mask"):
        return None
    places = [Path(p) for p in (meta["mask"], meta.get("mask_given")) if p and Path(p).is_file()]
    for where in places:
        if meta.get("mask_sha256") in (None, file_sha256(where)):
            return where
    why = f"{places[0]} is not it (its SHA-256 differs: made again since?)" if places else "not found from here"
    raise UserError(f"{prob_path}: made with tissue mask {meta.get('mask_given') or meta['mask']}, {why}; "
                    "give it with --tissue")


def check_map_lattice(path: Path, mask: np.ndarray, mask_meta: dict, prob: np.ndarray, meta: dict) -> None:
    """Refuse a mask on another lattice than the map's: another shape or downsample."""
    if mask.shape != prob.shape or not np.allclose(mask_meta["downsample"], meta["downsample"], rtol=1e-3):
        ds = lambda m: "x".join(f"{v:g}" for v in m["downsample"])  # noqa: E731 (per axis: they may differ)
        raise UserError(f"{path}: a {mask.shape[1]}x{mask.shape[0]} lattice at downsample {ds(mask_meta)}, but "
                        f"the map's is {prob.shape[1]}x{prob.shape[0]} at {ds(meta)}")


def cmd_pixels(args) -> None:
    prob, meta = load_probability_map(args.prob)
    truth, truth_meta = masks.load_mask(args.mask, slide=meta["slide"], kind="tumor")
    check_map_lattice(args.mask, truth, truth_meta, prob, meta)
    tissue, where = tissue_for(args, prob, meta)
    r = ev.pixel_scores(prob, truth, tissue, args.threshold)
    auc = f"AUC={r['auc']:.4f}" if np.isfinite(r["auc"]) else \
        f"AUC=nan (the truth has only one class over the {r['tissue_pixels']} tissue pixels)"
    overlap = f"IoU={r['iou']:.4f} Dice={r['dice']:.4f}" if np.isfinite(r["iou"]) else \
        "IoU=nan Dice=nan (no tumour in the truth, none called)"
    print(f"{meta['slide']}: {overlap} at threshold {args.threshold}; {auc} over tissue ({where})")


def cmd_patches(args) -> None:
    from crfcore.device import retain_freed_memory
    from crfcore.training import confusion_picture, evaluate_folder

    retain_freed_memory()  # the CNN's buffers are reused, not faulted back in
    picture = confusion_picture(args.data, args.plot)
    report = evaluate_folder(args.ckpt, args.data, picture, json_dir=args.json, quiet=args.quiet, workers=args.workers)
    print(f"confusion matrix -> {picture}\n{report}")  # the report's metrics line last, for scripts


def map_truth(truth_dir: Path, stem: str, map_path: Path, shape: tuple[int, int],
              meta: dict) -> tuple[np.ndarray, Path | None]:
    """A slide's tumour on its map's lattice, from its annotation or its Camelyon16 mask
    TIFF (as froc reads truth), and the truth file; no truth: nothing is tumour."""
    ds = tuple(meta["downsample"])
    ann_path = find_annotation(truth_dir, stem)
    check_not_misnamed(truth_dir, stem, ann_path)
    if ann_path is not None:
        ann = load_truth(ann_path)
        extent = (shape[1] * ds[0], shape[0] * ds[1])
        if ann.positive and not masks.overlaps(ann, extent):
            raise UserError(f"{ann_path}: lies wholly outside {map_path.name}'s {extent[0]:.0f}x{extent[1]:.0f} "
                            "level-0 pixels: the truth of another slide? (its tumour would count as normal tissue)")
        return masks.annotation_mask(ann, masks.Lattice(shape, ds, meta.get("level"))), ann_path
    tif = companion(truth_dir, stem, "truth_mask")
    if tif is None:
        return np.zeros(shape, bool), None
    with sl.open_slide(tif) as m:
        if meta.get("slide_dimensions"):  # the map's slide is known: the mask must be its size exactly
            check_same_size(tif, m.dimensions, meta["slide_dimensions"], f"{meta['slide']}, as {map_path.name} records")
        check_fits_slide(map_path, shape, ds, m.dimensions)  # a mask of another slide is not squeezed onto the map
        level = sl.level_for_downsample(m, min(ds))
        (lw, lh), (dx, dy) = m.level_dimensions[level], sl.level_downsamples(m)[level]
        if lw * lh > MAX_TRUTH_PIXELS:  # averaging it down would lose thin tumour of value 1: not guessed at
            raise UserError(f"{tif}: its level nearest the map's downsample {min(ds):g} is {lw}x{lh}, too large to "
                            "read whole; write the mask with more pyramid levels")
        pixels = sl.read_level(m, level, background=0)  # a sparse TIFF's missing tiles: no tumour
    check_grey(tif, pixels)
    return masks.any_on_lattice(pixels[..., 0] > 0, (ds[0] / dx, ds[1] / dy), shape), tif


def cmd_negatives(args) -> None:
    maps = visible_files(args.probs_dir, COMPANIONS["prob"])
    if not maps:
        raise UserError(f"{args.probs_dir}: no probability maps (<slide>_prob.npy)")
    check_coords_output(args.output)
    rng = np.random.default_rng(args.seed)
    lines, total, seen = [], 0, set()
    for f in maps:
        prob, meta = load_probability_map(f)
        stem, ds = Path(meta["slide"]).stem, tuple(meta["downsample"])
        if stem in seen:  # its points would be listed twice
            raise UserError(f"{f}: is a second map of slide {meta['slide']} in {args.probs_dir}; keep one")
        seen.add(stem)
        tumour, truth = map_truth(args.truth_dir, stem, f, prob.shape, meta)
        mpp = (meta.get("mpp") or [args.mpp])[0]
        points = ev.hard_negatives(prob, tumour, ds, args.threshold, args.per_slide,
                                   args.margin_um / (mpp * ds[0]), args.sample, rng)
        lines.append(format_coords(stem, points, f))
        total += len(points)
        print(f"{stem}: {len(points)} false-positive points" + ("" if truth else " (no truth: a normal slide)"))
    atomic_write_text(args.output, "".join(lines))
    print(f"{total} hard-negative points from {len(maps)} slides -> {args.output}")


def check_coords_output(path: Path) -> None:
    """`negatives -o`: replace only an earlier coords list, never a lesion list (`prob,x,y`
    reads as one) or a training set's `list.txt`."""
    check_replaceable(path, read_coords, "a coords list (slide_id,x,y)")
    if not (path.is_file() and path.stat().st_size):
        return
    try:
        ev.read_lesions(path)
    except CrfError:
        pass
    else:
        raise UserError(f"{path}: exists and is a lesion list (prob,x,y); not replaced: choose another output")
    if path.name == "list.txt" and any((path.parent / name).exists() for name in ("0.png", "sides.txt")):
        raise UserError(f"{path}: is a training set's list (coord_list_gen.py); not replaced: choose another output")
    if tiles_in(path.with_suffix("")):
        raise UserError(f"{path}: is the list of the tiles in {path.with_suffix('').name}/ (Patch_gen.py); not "
                        "replaced: choose another output")


def plot(path: Path, x, y, xlabel: str, ylabel: str, title: str, logx: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.step(x, y, where="post")
    if logx:
        ax.set_xscale("symlog", linthresh=0.25)
        for r in ev.FROC_FP_RATES:
            ax.axvline(r, color="0.85", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(0, 1.02))
    save_figure(fig, path)


def add_commands(p) -> None:
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    q = sub.add_parser("lesions", help="NMS lesion points from a probability map", formatter_class=p.formatter_class)
    q.add_argument("prob", type=given_path, help="probability map .npy (prob_map.py)")
    q.add_argument("-o", "--output", type=given_path, required=True, help="LESIONS.csv (prob,x,y per line)")
    q.add_argument("--threshold", type=PROBABILITY, default=0.5, help="keep maxima above this probability")
    q.add_argument("--radius", type=number(int, 0, 10**6), default=12, help="suppression half-side, map pixels")
    q.add_argument("--sigma", type=number(float, 0, 1000), default=0.0, help="Gaussian smoothing of the map first, map pixels")
    q.add_argument("--to", choices=LESION_FORMATS,
                   help="also write ASAP XML points or GeoJSON points (default: as -o ends, else csv only)")
    q = sub.add_parser("froc", help="Camelyon16 FROC over a folder of lesion CSVs", formatter_class=p.formatter_class)
    q.add_argument("lesions_dir", type=given_path, help="folder of <slide>.csv lesion files")
    q.add_argument("truth_dir", type=given_path, help="annotation (JSON, XML, GeoJSON or txt) or mask TIFF per tumour slide")
    q.add_argument("--level", type=number(int, 0, 20), default=5, help="evaluation level (the slide's, or downsample 2**level)")
    q.add_argument("--mpp", type=number(float, most=1000, above=0), default=ev.CAMELYON_MPP, help="um/pixel when a slide has none")
    q.add_argument("--slides", type=given_path, help="slide folder: each slide's mpp, levels and size")
    q.add_argument("--plot", type=given_path, help="FROC curve PNG")
    q = sub.add_parser("slides", help="slide-level ROC from map maxima", formatter_class=p.formatter_class)
    q.add_argument("probs_dir", type=given_path, help="folder of <slide>_prob.npy maps")
    q.add_argument("labels", type=given_path, help="CSV: slide,label (tumor/normal or 1/0)")
    q.add_argument("--plot", type=given_path, help="ROC curve PNG")
    q = sub.add_parser("pixels", help="IoU, Dice and pixel AUC of a map against a tumour mask",
                       formatter_class=p.formatter_class)
    q.add_argument("prob", type=given_path, help="probability map .npy")
    q.add_argument("mask", type=given_path, help="tumour mask .npy on the same lattice (Mask_gen.py)")
    q.add_argument("--threshold", type=PROBABILITY, default=0.5, help="decision threshold for IoU and Dice")
    q.add_argument("--tissue", type=given_path, help="tissue mask the AUC is taken over (default: the map's own)")
    q = sub.add_parser("patches", help="classification report of a checkpoint on a data folder",
                       formatter_class=p.formatter_class)
    q.add_argument("ckpt", type=given_path, help="checkpoint from train.py")
    q.add_argument("data", type=given_path, help="class sub-folders (classify) or a list.txt folder (grid)")
    q.add_argument("--json", type=given_path, help="grid models: the slides' annotation folder")
    q.add_argument("--plot", type=given_path, help="confusion matrix picture (default: DATA/confusion_matrix.png)")
    add_workers(q, beside_cnn=True)
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q = sub.add_parser("negatives", help="hard-negative points: false positives of maps with known truth",
                       formatter_class=p.formatter_class)
    q.add_argument("probs_dir", type=given_path, help="folder of <slide>_prob.npy maps")
    q.add_argument("truth_dir", type=given_path, help="annotations per tumour slide (no file: a normal slide)")
    q.add_argument("-o", "--output", type=given_path, required=True, help="NCRF coords list slide_id,x,y")
    q.add_argument("--threshold", type=PROBABILITY, default=0.5, help="false positive: probability above this")
    q.add_argument("--per-slide", type=number(int, 1), default=200, help="at most this many points per slide")
    q.add_argument("--margin-um", type=number(float, 0), default=0.0, help="keep this far from any tumour, micrometres")
    q.add_argument("--mpp", type=number(float, most=1000, above=0), default=ev.CAMELYON_MPP, help="um/pixel when a map's slide has none")
    q.add_argument("--sample", choices=("prob", "top"), default="prob",
                   help="prob: drawn with weight = probability; top: the highest")
    q.add_argument("--seed", type=number(int, 0), default=0, help="random seed of --sample prob")


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    add_commands(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("lesions_dir", "truth_dir", "probs_dir", "slides"):
        if getattr(args, name, None) is not None and not getattr(args, name).is_dir():
            raise UserError(f"{getattr(args, name)}: not a directory")
    if getattr(args, "plot", None) is not None:
        check_picture_output(args.plot)
    outputs = [getattr(args, "plot", None), getattr(args, "output", None)]
    if args.cmd == "lesions":
        outputs = lesion_outputs(args.output, args.to)
    check_spares_inputs(outputs, run_files(args))
    {"lesions": cmd_lesions, "froc": cmd_froc, "slides": cmd_slides, "pixels": cmd_pixels,
     "patches": cmd_patches, "negatives": cmd_negatives}[args.cmd](args)
    return 0


if __name__ == "__main__":
    run(main)
