#!/usr/bin/env python3
"""Patch_gen.py: not yet implemented (see the project's open issues)."""
import sys

if __name__ == "__main__":
    print("Patch_gen.py: not yet implemented", file=sys.stderr)
    sys.exit(2)
