"""One way to keep third-party chatter out of the user's terminal.

The exporters (torch.onnx, optimum, transformers) narrate every step on stdout, dump graphs on stderr when they
fail, warn about optional packages and log at INFO; ONNX Runtime's quantizers log each node. The CLI's output
is ours: inside :func:`quiet`, the named loggers only pass records at ``level`` or above, and (``streams``)
warnings, stdout and stderr are swallowed. Failures are not hidden: the caller re-raises them as one
``EdgeQuantError`` line."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

__all__ = ["EXPORTER_LOGGERS", "quiet"]

# The exporters' loggers: a failure is re-raised as one ExportError, so their log lines are noise (CRITICAL).
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")


@contextlib.contextmanager
def quiet(*loggers: str, level: int = logging.ERROR, streams: bool = True, all_loggers: bool = False
          ) -> Iterator[None]:
    """Within the block: ``loggers`` pass only records at ``level`` or above (``all_loggers``: every logger drops
    WARNING and below), and with ``streams`` warnings, stdout and stderr are swallowed. Restored afterwards."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, loggers)]
    for lg, _ in saved:
        lg.setLevel(level)
    previous = logging.root.manager.disable
    if all_loggers:
        logging.disable(logging.WARNING)
    try:
        if streams:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                yield
        else:
            yield
    finally:
        logging.disable(previous)
        for lg, lvl in saved:
            lg.setLevel(lvl)
