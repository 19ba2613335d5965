"""Writing bundles: a reader during a re-export sees the whole old or the whole new bundle; killed and
interrupted writes leave nothing behind (after the next run); a full disk is one line; modes follow the umask."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgequant._runtime import edgequant_runtime as rt
from edgequant.bundle import atomic
from edgequant.bundle.core import load_bundle, write_bundle

from conftest import DIGITS

WRITER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from edgequant.bundle.core import write_bundle

    src, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    manifest = json.loads((src / "manifest.json").read_text())
    manifest.pop("files")
    report = json.loads((src / "report.json").read_text())
    a = {p.name: p.read_bytes() for p in src.iterdir() if p.suffix in (".onnx", ".png", ".html", ".npz")}
    b = dict(a, **{"model.onnx": a["model.fp32.onnx"]})  # another valid model: another digest
    print("ready", flush=True)
    for i in range(n):
        write_bundle(out, b if i % 2 else a, manifest, report, force=True)
        print(i, flush=True)
""")


def _writer(tmp_path: Path, src: Path, out: Path, n: int) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(src), str(out), str(n)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_a_reader_during_re_exports_sees_a_whole_bundle(digits_bundle, tmp_path):
    out = tmp_path / "out"
    first = _writer(tmp_path, digits_bundle.path, out, 1)
    assert first.wait() == 0, first.stderr.read()
    digests, broken = set(), []
    writer = _writer(tmp_path, digits_bundle.path, out, 8)
    opens = 0
    while writer.poll() is None or opens < 50:
        try:
            read = rt.open_bundle(out, all_files=True)  # every file, size and sha256, against one manifest
            digests.add(read.digest)
        except rt.BundleError as exc:
            broken.append(str(exc))
        opens += 1
    assert writer.wait() == 0, writer.stderr.read()
    assert broken == [] and len(digests) == 2 and opens >= 50
    assert _partials(tmp_path) == []


def test_killed_writes_leave_no_partial_folder_after_the_next_run(digits_bundle, tmp_path):
    out = tmp_path / "out"
    rng = random.Random(0)
    left = 0
    for _ in range(6):
        writer = _writer(tmp_path, digits_bundle.path, out, 50)
        assert writer.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        left += bool(_partials(tmp_path))
        if out.exists():
            rt.open_bundle(out, all_files=True)  # whatever is at OUT is a whole bundle
    assert left >= 1  # the kills did land mid-write ...
    after = _writer(tmp_path, digits_bundle.path, out, 1)
    assert after.wait() == 0
    assert _partials(tmp_path) == []  # ... and the next run removed what they left
    rt.open_bundle(out, all_files=True)


def test_a_running_writers_folder_is_not_removed(tmp_path):
    out = tmp_path / "out"
    with atomic.Staging(out) as stage:
        stage.write("a.txt", b"x")
        assert atomic.remove_leftovers(tmp_path, "out") == []  # locked by its writer
        assert stage.folder.exists()
        stage.commit()
    assert (out / "a.txt").read_bytes() == b"x" and _partials(tmp_path) == []


@pytest.mark.parametrize("umask,dirs,files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_modes_follow_the_umask(digits_bundle, tmp_path, umask, dirs, files):
    old = os.umask(umask)
    try:
        b = load_bundle(digits_bundle.path)
        data = {p.name: p.read_bytes() for p in b.path.iterdir() if p.suffix in (".onnx", ".npz")}
        manifest = {k: v for k, v in b.manifest.items() if k != "files"}
        write_bundle(tmp_path / "out", data, manifest, b.report)
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == dirs
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {files}


def test_a_full_disk_is_one_line_and_the_old_bundle_survives(digits_bundle, tmp_path, monkeypatch):
    from edgequant.cli import cli

    out = tmp_path / "out"
    b = load_bundle(digits_bundle.path)
    write_bundle(out, {name: (b.path / name).read_bytes() for name in ("model.onnx", "model.fp32.onnx", "golden.npz")},
                 {k: v for k, v in b.manifest.items() if k != "files"}, b.report)
    before = rt.open_bundle(out).digest
    real, calls = atomic._write, []

    def fill(path, data):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(atomic, "_write", fill)
    result = CliRunner().invoke(cli, ["export", str(b.path / "model.fp32.onnx"), "--calibrate", str(DIGITS / "data"),
                                      "-o", str(out), "--force", "--no-progress"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "cannot write the bundle to" in result.output and "the disk is full" in result.output
    assert rt.open_bundle(out, all_files=True).digest == before and _partials(tmp_path) == []


def test_sigint_at_any_moment_is_one_line_and_true(digits_bundle, tmp_path):
    """Ctrl-C at random moments of `edgequant export --force`: exit 130, one line, and "nothing was written"
    only when OUT still holds the old bundle."""
    out = tmp_path / "out"
    args = [sys.executable, "-c", "from edgequant_cli import main; main()", "export",
            str(digits_bundle.path / "model.fp32.onnx"), "--calibrate", str(DIGITS / "data"), "-o", str(out),
            "--force", "--no-progress"]
    first = _writer(tmp_path, digits_bundle.path, out, 1)
    assert first.wait() == 0
    for delay in (1.0, 3.0):  # (in the first ~0.2 s the interpreter itself starts: no program of ours runs yet)
        before = rt.open_bundle(out).digest
        (out / "report.json").write_text(json.dumps({"marker": delay}))  # tells the old bundle from a new one
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:  # finished before the signal
            continue
        assert proc.returncode == 130 and err.count("\n") == 1 and "Traceback" not in err, err
        old = json.loads((out / "report.json").read_text()).get("marker") == delay
        assert ("nothing was written" in err) == old, err
        assert rt.open_bundle(out, all_files=True).digest == before or not old
        assert _partials(tmp_path) == []
