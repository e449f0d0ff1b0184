"""What every script shares: one-line errors and warnings, exit status 2 for bad input.

The policy: a `CrfError` (every crfcore error class derives from it) or an `OSError`
is the user's input or environment, reported as one line naming the file, exit status 2.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable, Sequence

from .errors import CrfError


class UserError(CrfError):
    """A mistake in the user's input or options: reported as one line, exit status 2."""


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def one_line(err: BaseException) -> str:
    """The message to show for a user error. An error raised in a DataLoader worker
    arrives wrapped in torch's "Caught ... Original Traceback" text: keep its last line,
    without the exception's class name."""
    if isinstance(err, OSError) and not isinstance(err, CrfError):
        where = err.filename if err.filename is not None else ""
        reason = err.strerror or str(err)
        return f"{where}: {reason}" if where else reason
    text = str(err)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return " ".join(text.split("\n"))


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)` and exit with its status; user errors become `error: ...` on
    stderr and exit status 2."""
    warnings.showwarning = _one_line_warning
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
    """Defaults shown once (argparse adds them; help texts never repeat them), and
    descriptions kept as written (usage examples)."""


def parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
