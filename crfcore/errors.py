"""The one base class of the errors crfcore reports to users.

A `CrfError` is a problem with the user's input or environment (a file that is not a
slide, a malformed annotation, a full disk): `crfcore.cli.run` prints its message as one
line and exits with status 2. Every module's own error class derives from it. Anything
else that escapes a script is a bug and keeps its traceback.
"""
from __future__ import annotations


class CrfError(Exception):
    """Bad input or environment; the message names the file and what is wrong."""


class OutputError(CrfError):
    """An output that cannot be written (read-only or full file system, a special file)."""
