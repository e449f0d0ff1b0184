"""What every script shares: one-line errors and warnings, exit status 2 for bad input."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable, Sequence

from .annotations import AnnotationError
from .io import ArrayFileError
from .slide import SlideError

USER_ERRORS: tuple[type[BaseException], ...] = (SlideError, AnnotationError, ArrayFileError,
                                                  ValueError, FileNotFoundError, FileExistsError,
                                                  NotADirectoryError, PermissionError, ModuleNotFoundError)


class UserError(Exception):
    """A mistake in the user's input or options: reported as one line, exit status 2."""


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)`; turn user errors into `error: ...` on stderr and exit status 2."""
    warnings.showwarning = _one_line_warning
    try:
        status = main(argv)
    except (UserError, *USER_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


def parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
