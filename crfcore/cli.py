"""What every script shares: one-line errors and warnings, exit status 2 for bad input.

The policy: a `CrfError` (every crfcore error class derives from it) or an `OSError`
is the user's input or environment, reported as one line naming the file, exit status 2.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from .errors import CrfError


class UserError(CrfError):
    """A mistake in the user's input or options: reported as one line, exit status 2."""


# Suffixes of files, not folders: `-o mask.png` asks for a file, where a folder would be made.
FILE_SUFFIXES = {".npy", ".npz", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svg", ".pdf", ".csv", ".json", ".txt"}


def check_npy_or_folder(out: Path, what: str) -> None:
    """Refuse an `-o` that names a new file of another kind (`mask.png`) where a `.npy`
    file or a folder is meant: it would become a folder of that name."""
    if not out.exists() and out.suffix != ".npy" and out.suffix.lower() in FILE_SUFFIXES:
        raise UserError(f"{out}: {what} is a .npy file: end -o with .npy, or name a folder without a suffix")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def one_line(err: BaseException) -> str:
    """The message to show for a user error. An error raised in a DataLoader worker
    arrives wrapped in torch's "Caught ... Original Traceback" text: keep its last line,
    without the exception's class name."""
    text = str(err)
    if "Original Traceback" in text:  # first: torch re-raises a worker's error as its own type
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    if isinstance(err, OSError) and not isinstance(err, CrfError):
        where = err.filename if err.filename is not None else ""
        reason = err.strerror or str(err)
        return f"{where}: {reason}" if where else reason
    return " ".join(text.split("\n"))


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)` and exit with its status; user errors become `error: ...` on
    stderr and exit status 2."""
    warnings.showwarning = _one_line_warning
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt again (crfcore.startup)
    try:
        status = main(argv)
    except (CrfError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown once (argparse adds them; help texts never repeat them), left out
    where there is none (None, False); descriptions kept as written (usage examples)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:  # 0 is shown
            return action.help or ""
        return super()._get_help_string(action)


def parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


INT_MAX = 2**31 - 1


def number(kind: type = float, least: float | None = None, most: float | None = None,
           above: float | None = None) -> Callable[[str], float]:
    """An argparse `type`: a finite `kind` (int or float) that is >= `least`, <= `most` and
    > `above` (each where given; an int without `most` is at most `INT_MAX`, so it fits the
    C code it reaches). A value outside is refused at parsing, before any work, so a bad option never
    reaches a step that deletes or writes."""
    what = "an integer" if kind is int else "a number"
    if least is not None and most is not None:
        expected = f"{what} from {least} to {most}"
    else:
        limits = [f">= {least}" if least is not None else "", f"> {above}" if above is not None else "",
                  f"<= {most}" if most is not None else ""]
        expected = " ".join([what, " and ".join(x for x in limits if x)]).strip()

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if kind is int and most is None and value > INT_MAX:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r} (more than {INT_MAX})")
        if not within(value, least, most, above):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def within(value: float, least: float | None = None, most: float | None = None, above: float | None = None) -> bool:
    """Whether the number `value` is finite (ints of any size are) and >= `least`, <= `most`
    and > `above`, each where given: the range check of options and of config keys alike."""
    return ((not isinstance(value, float) or math.isfinite(value)) and (least is None or value >= least)
            and (most is None or value <= most) and (above is None or value > above))


def given_path(text: str) -> Path:
    """An argparse `type` for a path: an empty one (an unset shell variable) is refused,
    not taken as '.', the working folder (a slide folder to map, or a folder to write into)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


PROBABILITY = number(float, 0, 1)
DEFAULT_WORKERS = 2


def add_workers(p: argparse.ArgumentParser, beside_cnn: bool = False) -> None:
    """`--workers`: the same option and meaning in every script. Beside a CNN the default
    is `crfcore.device.reader_workers`'s (0 on the CPU, 2 with CUDA)."""
    why = "; default 0 when the CNN runs on the CPU, whose threads use every core, 2 with CUDA" if beside_cnn else ""
    p.add_argument("--workers", type=number(int, 0), default=None if beside_cnn else DEFAULT_WORKERS,
                   help=f"DataLoader worker processes reading images or slides (0: in the main process{why})")


def for_each(jobs: Sequence, name: Callable[[object], str], work: Callable[[object], None],
             quiet: bool = True) -> None:
    """Run `work` on every job (a progress bar over several unless `quiet`); a job that
    fails with a user error is reported on its own line and the batch goes on; at the end
    the failures are named (exit status 2)."""
    from tqdm import tqdm

    failed = []
    for job in tqdm(jobs, desc="slides", disable=quiet or len(jobs) < 2):
        try:
            work(job)
        except (CrfError, OSError) as err:
            if len(jobs) == 1:
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            failed.append(name(job))
    if failed:
        raise UserError(f"{len(failed)} of {len(jobs)} failed: {', '.join(failed)}")
