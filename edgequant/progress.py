"""Progress of long stages (calibration, per-layer error, GPTQ, the accuracy budget's trials): a tqdm bar on a
terminal, a few plain log lines anywhere else.

A bar redraws itself with carriage returns, which a captured log (CI, systemd, a ROS launch file) keeps as one
line per update. So a bar is drawn only when stderr is a terminal (or the style is ``"bars"``, the CLI's
``--progress``); otherwise each stage logs, on the ``edgequant.progress`` logger at INFO: a line when it starts,
a line at each further 10% when at least ``QUIET_INTERVAL_S`` passed since the last one (a short stage logs only
its start and end), and a line when it is done, with its time. The CLI shows these lines on stderr; a Python
caller sees them once it configures logging (``logging.basicConfig(level=logging.INFO)``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["QUIET_INTERVAL_S", "progress_bar", "progress_style"]

log = logging.getLogger("edgequant.progress")
QUIET_INTERVAL_S = 10.0
_STYLE: contextvars.ContextVar[str] = contextvars.ContextVar("edgequant_progress_style", default="auto")


@contextlib.contextmanager
def progress_style(style: str) -> Iterator[None]:
    """Within this block, progress is drawn as ``"bars"``, as ``"lines"`` (log lines), or ``"auto"`` (bars on a
    terminal, lines elsewhere)."""
    if style not in ("auto", "bars", "lines"):
        raise ValueError(f"progress style must be auto, bars or lines, not {style!r}")
    token = _STYLE.set(style)
    try:
        yield
    finally:
        _STYLE.reset(token)


def _bars() -> bool:
    style = _STYLE.get()
    if style == "auto":
        stream = sys.stderr
        return bool(getattr(stream, "isatty", None) and stream.isatty())
    return style == "bars"


class _Lines:
    """The plain-log form of a progress bar: start, each further 10% at most every QUIET_INTERVAL_S, done."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit = desc, unit
        self.n = 0
        self.start = self.last = time.perf_counter()
        self.step = 0
        of = f" {self.total} {unit}s" if self.total else ""
        log.info("%s:%s ...", desc, of)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.total:
            return
        step = min(10, int(10 * self.n / self.total))
        now = time.perf_counter()
        if step > self.step and step < 10 and now - self.last >= QUIET_INTERVAL_S:
            log.info("%s: %d%% (%d/%d %ss, %.0f s)", self.desc, 10 * step, self.n, self.total, self.unit,
                     now - self.start)
            self.last = now
        self.step = max(self.step, step)

    def close(self) -> None:
        log.info("%s: done, %d %ss in %.1f s", self.desc, self.n, self.unit, time.perf_counter() - self.start)

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.close()


class _Off:
    def __init__(self, iterable: Iterable | None) -> None:
        self.iterable = iterable

    def update(self, n: int = 1) -> None:
        pass

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *_: Any) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 disable: bool = False, leave: bool = False) -> Any:
    """tqdm's interface (iterate, or ``with ... as bar: bar.update(n)``) with the output chosen as the module
    docstring says; ``disable`` shows nothing."""
    if disable:
        return _Off(iterable)
    if _bars():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return _Lines(iterable, total, desc, unit)
