"""Every shell, console and Python snippet of README.md, docs/*.md and runtimes/README.md runs as written.

The rules (language tags, ``<!-- snippet: skip — why -->``, ``<!-- snippet: tested-by tests/...::test -->``,
``<!-- snippet: given build/digits -->``, ``$ `` lines vs shown output) are in ``tests/snippets.py`` and
docs/README.md. One test per page: its snippets run in order in one temporary working folder.
"""

from __future__ import annotations

import re

import pytest

import snippets

PAGES = snippets.pages()


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(snippets.ROOT)) for p in PAGES])
def test_page_snippets_run(path, tmp_path, digits_bundle):
    page = snippets.parse(path)
    assert not page.problems, "\n".join(page.problems)
    cwd = snippets.workspace(tmp_path / "work")
    for name in page.givens:
        snippets.copy_given(name, digits_bundle.path, cwd)
    for snip in page.snippets:
        if snip.runs:
            failure = snippets.run(snip, cwd)
            assert failure is None, failure


def test_markers_are_found_and_checked(tmp_path, monkeypatch):
    """The parser refuses what a reader would trip over: a skip without a reason, a tested-by naming no test, an
    untagged command, a marker not followed by a fence."""
    monkeypatch.setattr(snippets, "ROOT", tmp_path)
    page = tmp_path / "p.md"
    page.write_text("<!-- snippet: skip -->\n```sh\nfalse\n```\n"
                    "<!-- snippet: tested-by tests/test_nothing.py::test_nope -->\n```python\nraise SystemExit(1)\n```\n"
                    "```\nedgequant export a -o b\n```\n"
                    "<!-- snippet: skip — needs a Jetson -->\n\nsome prose\n```sh\ntrue\n```\n"
                    "<!-- snippet: skip — needs a Jetson -->\n```sh\nnvidia-smi\n```\n"
                    "```console\n$ echo hi\nhi\n```\n"
                    "```text\n$ edgequant inspect build/x\n```\n"
                    "```text\nimport edgequant\n```\n", encoding="utf-8")
    parsed = snippets.parse(page)
    text = "\n".join(parsed.problems)
    assert "p.md:2: 'snippet: skip' needs a reason" in text
    assert "names no existing test" in text
    assert "p.md:9: an untagged block that looks like a command" in text
    assert "p.md:12: marker 'snippet: skip' is not right before a fence" in text
    assert "p.md:26: a '$ ' command in a text block" in text
    assert "p.md:29: Python code in a text block" in text
    assert len(parsed.problems) == 6
    runs = [s for s in parsed.snippets if s.runs]
    assert [s.text for s in runs] == ["true\n", "$ echo hi\nhi\n"]
    assert parsed.snippets[4].marker_arg == "needs a Jetson"


def test_console_output_is_compared_digits_aside(tmp_path):
    snip = snippets.Snippet(tmp_path / "x.md", 1, "console",
                            "$ printf 'size 98.1 KiB\\nother\\ncosine 0.99\\n'\nsize 1.0 KiB\n...\ncosine 0.5\n")
    assert snippets.run(snip, tmp_path).__class__ is type(None)
    prefix = snippets.Snippet(tmp_path / "x.md", 1, "console", "$ echo 'checked on AVX2 9 cores'\nchecked on ...\n")
    assert snippets.run(prefix, tmp_path) is None
    bad = snippets.Snippet(snip.page, 1, "console", "$ printf 'size 98.1 MiB\\n'\nsize 1.0 KiB\n")
    assert "the page shows\n  size 1.0 KiB" in snippets.run(bad, tmp_path).replace(str(tmp_path) + "/", "")


def test_setup_commands_are_what_ci_runs():
    """README's second set-up command is .ci/run; .ci/run ends with the test command."""
    readme = snippets.parse(snippets.ROOT / "README.md")
    setup = [s for s in readme.snippets if s.lang in snippets.RUN_SHELL and ".ci/run" in s.text]
    assert setup, "README.md has no set-up block running .ci/run"
    ci = (snippets.ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^python3 -m pytest -q\s*$", ci, re.M)
    first = [s for s in readme.snippets if "pip install torch==2.13.0" in s.text]
    assert first and "pip install -c .ci/constraints.txt -e ." in first[0].text.replace("\\\n", " ")
    assert "python3 -m pip install -q torch==2.13.0" in ci


def test_readme_is_short_with_the_set_up_in_the_first_screen():
    lines = (snippets.ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move reference material to docs/"
    first_screen = "\n".join(lines[:40])
    assert "pip install torch==2.13.0" in first_screen and "\n.ci/run\n" in first_screen
    assert max(len(x) for x in lines[:40] if not x.startswith("<!--")) <= 120
