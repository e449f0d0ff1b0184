"""What every script calls first: Ctrl-C while the libraries load (torch takes seconds)
then ends the run with the one line `crfcore.cli.run` prints later, not a traceback from
inside an import. Nothing has been written yet, so exiting at once loses nothing;
`crfcore.cli.run` gives Ctrl-C back to Python (KeyboardInterrupt) when the work starts."""
import os
import signal
import sys


def _interrupted(signum, frame) -> None:
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    os._exit(130)  # no unwinding through half-imported C++ extensions


def quiet_ctrl_c() -> None:
    signal.signal(signal.SIGINT, _interrupted)
