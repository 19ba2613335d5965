"""Extract the code snippets of the project's Markdown pages (README.md, docs/*.md, runtimes/README.md) and run them.

How a fenced block is treated is decided by its language tag and by an optional marker, an HTML comment on the
line right before the fence (blank lines in between are allowed):

- ```` ```sh ```` / ``bash`` / ``shell``: every line is a command; the block runs in ``bash -euo pipefail``.
- ```` ```console ````: lines starting with ``$ `` are commands (a trailing ``\\`` continues onto the next line);
  every other line is output the page shows. The commands run, and each shown line (lines may be left out
  between them; ``...`` says so to the reader; a line ending in ``...`` matches the lines that start so) must
  appear in that order in what they print on stdout and stderr, digits aside: figures may differ
  between CPUs, the words and the layout may not.
- ```` ```python ````: the block runs as a script with ``python``.
- any other tag (``text``, ``json``, ``toml``, ``cpp``, ``kotlin``, ...): shown, not run. A block without a tag
  is shown too, but one that looks like a command (a line starting with ``$ ``, ``edgequant``, ``python``,
  ``pip``) is an error: tag it ``sh``/``console`` to run it, or ``text`` for a synopsis. A ``text`` block with
  a ``$ `` prompt line, or that starts as Python code (``import``/``from ... import``), is an error unless
  marked: a reader would run it, so it runs here or says why not.

Markers (each alone on its line, so a marker quoted in prose is not one):

- ``<!-- snippet: skip — REASON -->`` before a fence: the block does not run here; REASON says why (needs a
  Jetson, downloads a model, installs packages, ...). A skip without a reason is an error.
- ``<!-- snippet: tested-by tests/test_x.py::test_name -->`` before a fence: another test runs what the block
  shows; the named test must exist.
- ``<!-- snippet: given build/digits -->`` anywhere on a page: before the page's first snippet, the working
  folder holds that bundle (built once per test session and copied). Known: see ``GIVENS``.

Snippets of one page run in order in one fresh working folder, in which ``examples/``, ``toolchains/``,
``runtimes/``, ``benchmarks/`` and ``.ci/`` of the repository are linked, so ``build/...`` outputs land in a
temporary folder and a later snippet sees what an earlier one wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_SHELL = {"sh", "bash", "shell"}
RUN_PYTHON = {"python", "py", "python3"}
CONSOLE = {"console"}
LINKED = ("examples", "toolchains", "runtimes", "benchmarks", ".ci")
GIVENS = ("build/digits",)
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
_MARK = re.compile(r"<!--\s*snippet:\s*([\w-]+)\s*(.*?)\s*-->")
_COMMANDISH = re.compile(r"^\s*(\$ |edgequant\b|python3?\b|pip\b)")


@dataclass
class Snippet:
    page: Path
    line: int                      # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None = None      # skip | tested-by | None
    marker_arg: str = ""

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.marker is None and self.lang in RUN_SHELL | RUN_PYTHON | CONSOLE


@dataclass
class Page:
    path: Path
    snippets: list[Snippet] = field(default_factory=list)
    givens: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def pages() -> list[Path]:
    """Every page whose snippets are tested: README.md, docs/*.md (new pages are picked up), runtimes/README.md."""
    found = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "runtimes" / "README.md"]
    return [p for p in found if p.is_file()]


def parse(path: Path) -> Page:
    """A Markdown file → its fenced blocks, markers and the problems a reader of the page would trip over."""
    page = Page(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = path.relative_to(ROOT)
    pending: tuple[str, str, int] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        for kind, arg in ([_MARK.fullmatch(line.strip()).groups()] if _MARK.fullmatch(line.strip()) else []):
            if kind == "given":
                if arg not in GIVENS:
                    page.problems.append(f"{rel}:{i + 1}: unknown given {arg!r} (known: {', '.join(GIVENS)})")
                page.givens.append(arg)
            elif kind in ("skip", "tested-by"):
                pending = (kind, arg.lstrip("—–-: ").strip(), i + 1)
            else:
                page.problems.append(f"{rel}:{i + 1}: unknown marker 'snippet: {kind}' (skip, tested-by, given)")
        m = _FENCE.match(line)
        if m:
            indent, fence, lang = m.groups()
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            snip = Snippet(path, i - len(body), lang.lower(), "\n".join(body) + "\n")
            if pending:
                snip.marker, snip.marker_arg = pending[0], pending[1]
                pending = None
            page.snippets.append(snip)
            _lint(snip, page.problems)
        elif line.strip() and pending and not _MARK.fullmatch(line.strip()):
            page.problems.append(f"{rel}:{pending[2]}: marker 'snippet: {pending[0]}' is not right before a fence")
            pending = None
        i += 1
    return page


def _lint(snip: Snippet, problems: list[str]) -> None:
    if snip.marker == "skip" and not snip.marker_arg:
        problems.append(f"{snip.where}: 'snippet: skip' needs a reason, e.g. <!-- snippet: skip — needs a Jetson -->")
    if snip.marker == "tested-by":
        file, _, name = snip.marker_arg.partition("::")
        test = ROOT / file
        if not (test.is_file() and name and re.search(rf"^\s*def {re.escape(name)}\(", test.read_text(), re.M)):
            problems.append(f"{snip.where}: 'snippet: tested-by {snip.marker_arg}' names no existing test "
                            "(tests/test_x.py::test_name)")
    if not snip.lang and any(_COMMANDISH.match(line) for line in snip.text.splitlines()):
        problems.append(f"{snip.where}: an untagged block that looks like a command: tag it ```sh or ```console "
                        "to run it, ```text to show it, or mark it <!-- snippet: skip — why -->")
    shown_only = snip.lang in ("", "text") and snip.marker is None
    lines = [x for x in snip.text.splitlines() if x.strip()]
    if shown_only and any(x.startswith("$ ") for x in lines):
        problems.append(f"{snip.where}: a '$ ' command in a text block: tag it ```console to run it, or mark it "
                        "<!-- snippet: skip — why --> or <!-- snippet: tested-by tests/...::test -->")
    if shown_only and lines and re.match(r"(import \w|from [\w.]+ import )", lines[0]):
        problems.append(f"{snip.where}: Python code in a text block: tag it ```python to run it, or mark it "
                        "<!-- snippet: skip — why --> or <!-- snippet: tested-by tests/...::test -->")
    if snip.lang in CONSOLE and snip.marker is None and not any(
            line.startswith("$ ") for line in snip.text.splitlines()):
        problems.append(f"{snip.where}: a console block without a '$ ' command line")


def console_commands(text: str) -> tuple[list[str], list[str]]:
    """A console block → (commands, shown output lines)."""
    commands, shown = [], []
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("$ "):
            cmd = line[2:]
            while cmd.endswith("\\"):
                cmd = cmd[:-1] + " " + next(lines, "").strip()
            commands.append(cmd)
        elif line.strip():
            shown.append(line)
    return commands, shown


def _mask(line: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[-+]?\d[\d.,e+-]*", "#", line)).strip()


def missing_output(shown: list[str], printed: str) -> str | None:
    """The first shown line that is not in the printed output (digits masked, in order), or None."""
    got = [_mask(x) for x in printed.splitlines()]
    pos = 0
    for want in shown:
        if want.strip() == "...":
            continue
        w = _mask(want)
        prefix = w.endswith("...") and w[:-3].rstrip()
        hit = next((i for i in range(pos, len(got))
                    if (got[i].startswith(prefix) if prefix else got[i] == w)), None)
        if hit is None:
            return want
        pos = hit + 1
    return None


def workspace(folder: Path) -> Path:
    """A fresh working folder in which the repository's example paths resolve."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if (ROOT / name).exists():
            (folder / name).symlink_to(ROOT / name)
    return folder


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    env["COLUMNS"] = "200"
    return env


def run(snip: Snippet, cwd: Path, timeout: float = 900) -> str | None:
    """Run one snippet in cwd → None when it did what the page says, else a message with its output."""
    env = environment()
    if snip.lang in RUN_PYTHON:
        argv, shown = [sys.executable, "-c", snip.text], []
    elif snip.lang in CONSOLE:
        commands, shown = console_commands(snip.text)
        argv = ["bash", "-euo", "pipefail", "-c", "\n".join(commands)]
    else:
        argv, shown = ["bash", "-euo", "pipefail", "-c", snip.text], []
    # a console block shows what a terminal shows: stdout and stderr together, in order
    merged = {"stderr": subprocess.STDOUT} if shown else {"stderr": subprocess.PIPE}
    proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout, **merged)
    if proc.returncode != 0:
        return (f"{snip.where}: exit {proc.returncode}\n--- snippet\n{snip.text}--- stdout\n{proc.stdout[-3000:]}"
                f"\n--- stderr\n{(proc.stderr or '')[-3000:]}")
    if shown:
        miss = missing_output(shown, proc.stdout)
        if miss is not None:
            return (f"{snip.where}: the page shows\n  {miss}\nbut the command printed (digits aside, in order):\n"
                    f"{proc.stdout[-3000:]}")
    return None


def copy_given(name: str, source: Path, cwd: Path) -> None:
    shutil.copytree(source, cwd / name)
