"""The ``edgequant`` command's entry point. It makes Ctrl-C during start-up (importing edgequant, torch, onnx
takes a second or more) one line and exit 130 instead of a traceback, then hands over to ``edgequant.cli``."""

import os
import signal
import sys


def _interrupted(*_):
    sys.stderr.write("interrupted: nothing was written\n")
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted)
    from edgequant.cli import main as run  # sets the ordinary KeyboardInterrupt handling back

    run()
