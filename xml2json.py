#!/usr/bin/env python3
"""Convert lesion annotations: ASAP/Camelyon XML, GeoJSON (QuPath export), vertex-list txt
or NCRF JSON to NCRF JSON (default), ASAP XML or GeoJSON (QuPath). Coordinates stay
level-0 pixels. XML groups and GeoJSON classes are kept (Camelyon's _0, _1, _2 stay as
they are) unless --rename-groups is given; NCRF JSON has no groups.

  python xml2json.py tumor_001.xml -o tumor_001.json
  python xml2json.py tumor_001.xml -o tumor_001.geojson --to geojson
  python xml2json.py qupath_export.geojson -o tumor_001.xml --to xml --rename-groups Tumor,Exclusion
  python xml2json.py annotations/ -o json/
"""
from __future__ import annotations

from crfcore.startup import quiet_ctrl_c

quiet_ctrl_c()  # first: Ctrl-C while the libraries below load is one line

import argparse
import warnings
from pathlib import Path

from crfcore import annotations as an
from crfcore.cli import UserError, for_each, given_path, parser, run
from crfcore.io import check_spares_inputs, visible_files

SUFFIXES = (".xml", ".json", ".geojson", ".txt")
OUT_SUFFIX = {"json": ".json", "xml": ".xml", "geojson": ".geojson"}
ALSO_SUFFIX = {"geojson": ".json"}  # QuPath saves GeoJSON as .json too
DEFAULT_NEGATIVE = ",".join(an.NEGATIVE_GROUPS)


def collect(inputs: list[Path], to: str) -> list[Path]:
    """The annotation files named, with directories expanded (sorted). Files already in
    the output format are left out of a directory, with a note naming them, so xml + json
    side by side work (a `.json` holding QuPath GeoJSON is an input all the same); named
    one by one, they are converted (e.g. to rename their groups)."""
    files: list[Path] = []
    left_out: list[Path] = []
    for item in inputs:
        if item.is_dir():
            for p in visible_files(item, SUFFIXES):
                same = p.suffix.lower() == OUT_SUFFIX[to] and not (to == "json" and an.holds_geojson(p))
                (left_out if same else files).append(p)
        elif item.exists():
            files.append(item)
        else:
            raise UserError(f"{item}: no such file or directory")
    why = f"{OUT_SUFFIX[to]} files are taken for earlier outputs of --to {to}"
    if not files:
        raise UserError(f"no annotation files to convert (.xml, .json, .geojson, .txt; {why}) in "
                        f"{', '.join(map(str, inputs))}; name a file to convert it anyway")
    if left_out:
        names = ", ".join(str(p) for p in left_out[:3]) + (f" and {len(left_out) - 3} more" if len(left_out) > 3 else "")
        warnings.warn(f"left out {names}: {why}; name a file to convert it anyway")
    return files


def outputs(files: list[Path], out: Path, to: str, many: bool) -> list[Path]:
    """One output per input: `out` itself for a single file, else `out/<stem><suffix>`."""
    if not many and not out.is_dir():
        return [out]
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: several inputs need -o to be a directory")
    names = [f.stem + OUT_SUFFIX[to] for f in files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"several inputs would write the same output: {', '.join(dupes)}")
    return [out / n for n in names]


def skip_own_outputs(files: list[Path], targets: list[Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """Folder runs: leave out, with a warning, an input that would be its own output (a
    QuPath `.json` converted in place), so the other files are still converted; the
    third list holds those left out (the run then ends with exit status 2)."""
    keep = [(f, t) for f, t in zip(files, targets) if not (t.exists() and t.resolve() == f.resolve())]
    skipped = sorted(set(files) - {f for f, _ in keep})
    for f in skipped:
        warnings.warn(f"{f}: its output would replace it (QuPath GeoJSON saved as .json?); skipped: convert it "
                      "into another folder")
    if not keep:
        raise UserError("every input would be its own output; give -o another folder")
    return [f for f, _ in keep], [t for _, t in keep], skipped


def rename_groups(option: str | None, to: str) -> tuple[str, str] | None:
    """`--rename-groups POSITIVE,NEGATIVE` as a pair, checked."""
    if option is None:
        return None
    if to == "json":
        raise UserError("--rename-groups needs --to xml or geojson (NCRF JSON has no groups)")
    names = option.split(",")
    if len(names) != 2 or not all(n.strip() for n in names) or names[0].strip() == names[1].strip():
        raise UserError(f"--rename-groups wants two different group names, POSITIVE,NEGATIVE; got {option!r}")
    return names[0].strip(), names[1].strip()


def group_lists(positive: str, negative: str | None) -> tuple[list[str], list[str]]:
    """`--positive-groups` and `--negative-groups` (None: the default) as lists, checked: a
    group named twice would take its polygons twice, and one in both lists would be
    tumour and not."""
    # "_0, _1" names _1, not " _1" (a group no file has: its polygons were dropped)
    pos, neg = ([g.strip() for g in option.split(",") if g.strip()] for option in (positive, negative or DEFAULT_NEGATIVE))
    for option, groups in (("--positive-groups", pos), ("--negative-groups", neg)):
        if len(set(groups)) < len(groups):
            raise UserError(f"{option}: a group is named twice ({','.join(groups)})")
    if negative is None:  # the default list yields a group the user named positive
        neg = [g for g in neg if g not in pos]
    if both := sorted(set(pos) & set(neg)):
        raise UserError(f"group(s) {', '.join(both)} named both in --positive-groups and --negative-groups")
    return pos, neg


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("inputs", nargs="+", type=given_path, metavar="INPUT", help="annotation files or directories")
    p.add_argument("-o", "--output", required=True, type=given_path,
                   help="output file (one input) or directory (several)")
    p.add_argument("--to", choices=tuple(OUT_SUFFIX), default="json", help="output format")
    p.add_argument("--positive-groups", default=",".join(an.POSITIVE_GROUPS),
                   help="XML groups / GeoJSON classes that are tumour, comma-separated")
    p.add_argument("--negative-groups",
                   help="XML groups / GeoJSON classes that are non-tumour islands inside tumour "
                        f"(default: {DEFAULT_NEGATIVE}, less any group named in --positive-groups)")
    p.add_argument("--rename-groups", metavar="POSITIVE,NEGATIVE",
                   help="XML / GeoJSON output: put every positive polygon into group POSITIVE and "
                        "every negative one into NEGATIVE (default: keep the input's groups)")
    p.add_argument("--txt-group", choices=("positive", "negative"), default="positive",
                   help="which part a vertex-list .txt polygon belongs to")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    pos, neg = group_lists(args.positive_groups, args.negative_groups)
    rename = rename_groups(args.rename_groups, args.to)
    files = collect(args.inputs, args.to)
    many = len(files) > 1 or any(Path(i).is_dir() for i in args.inputs)
    targets = outputs(files, args.output, args.to, many)
    skipped = []
    if many:
        files, targets, skipped = skip_own_outputs(files, targets)
    if not many and targets[0].suffix.lower() not in (OUT_SUFFIX[args.to], ALSO_SUFFIX.get(args.to)):
        raise UserError(f"{targets[0]}: --to {args.to} writes {OUT_SUFFIX[args.to]} files: end -o with "
                        f"{OUT_SUFFIX[args.to]} (or give --to for the format you want)")
    check_spares_inputs(targets, files)
    foreign = [t for t in targets if t.is_file() and not an.replaceable(t, args.to)]
    if foreign:  # an original ASAP XML or QuPath GeoJSON (.json too) beside the file converted, say
        raise UserError(f"{foreign[0]}: exists and was not written by this tool (an original annotation?); "
                        "not replaced: choose another output")
    def convert(job: tuple[Path, Path]) -> None:
        src, dst = job
        ann = an.load_annotation(src, pos, neg, txt_part=args.txt_group)
        if why := an.nothing_read(ann):  # --positive-groups forgotten, tumour cells: not a normal slide
            raise UserError(f"{src}: {why}; nothing written (a normal slide's regions or cells? name their classes "
                            "in --negative-groups; tumour must be drawn as regions, not cells, points or lines)")
        if not len(ann):
            warnings.warn(f"{src}: no polygons found; writing an empty annotation")
        if args.to == "json" and ann.positive and not an.rounded(ann.positive):
            raise UserError(f"{src}: every tumour polygon is left with fewer than 3 distinct vertices once rounded "
                            "to NCRF JSON's whole pixels, so the JSON would say a normal slide; nothing written")
        lost = an.lost_in_json(ann) if args.to == "json" else []
        if lost:
            warnings.warn(f"{src}: {len(lost)} polygon(s) left with fewer than 3 distinct vertices once rounded to "
                          f"whole pixels, not written: {', '.join(map(repr, lost))}")
        an.write_annotation(ann.renamed(*rename) if rename else ann, dst, to=args.to)
        kept = an.rounded if args.to == "json" else list
        print(f"{src} -> {dst}: {len(kept(ann.positive))} positive, {len(kept(ann.negative))} negative polygons")

    for_each(list(zip(files, targets)), lambda job: job[0].name, convert)
    if skipped:  # the others are converted, but the run did not do all it was asked
        raise UserError(f"{len(skipped)} input(s) not converted, each would be its own output: "
                        f"{', '.join(f.name for f in skipped)}; convert them into another folder")
    return 0


if __name__ == "__main__":
    run(main)
