"""A bundle a vehicle can trust: confinement, the pinned digest and signatures, verify-what-you-run, manifest
validation, input guards. (Atomic re-export: test_bundle_write.py.) Each case of the attack matrix in
benchmarks/bundle_attacks.py has a test here."""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgequant._runtime import edgequant_runtime as rt

from conftest import DIGITS, ROOT


def copy_of(bundle, tmp_path, name="copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(bundle.path if hasattr(bundle, "path") else bundle, dst)
    return dst


def edit_manifest(folder: Path, change) -> bytes:
    """Apply ``change(manifest)`` and write the manifest back, with its digest file matching (an attacker who
    edits one edits both) → the new manifest bytes."""
    m = json.loads((folder / "manifest.json").read_text())
    change(m)
    raw = json.dumps(m, indent=2).encode()
    (folder / "manifest.json").write_bytes(raw)
    (folder / "manifest.sha256").write_text(rt.bundle_digest(raw) + "\n")
    return raw


def sample() -> np.ndarray:
    return np.load(DIGITS / "data" / "0004.npy")[None]


# --- 1. confinement ---------------------------------------------------------------------------------------------

def _list_file(m, name, path):
    m["files"][name] = {"sha256": rt.sha256_file(path), "bytes": os.path.getsize(path)}


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "/etc/passwd", "sub/model.onnx", "..", ".hidden",
                                   "a\\b.onnx"])
def test_paths_outside_the_bundle_are_refused(digits_bundle, tmp_path, entry):
    b = copy_of(digits_bundle, tmp_path)

    def escape(m):
        m["files"][entry] = {"sha256": rt.sha256_file("/etc/passwd"), "bytes": os.path.getsize("/etc/passwd")}
        m["model"]["file"] = entry

    edit_manifest(b, escape)
    with pytest.raises(rt.BundleError) as err:
        rt.Session(b)
    assert "must be a plain file name inside the bundle" in str(err.value) and json.dumps(entry) in str(err.value)


def test_symlinks_out_of_the_bundle_and_special_files_are_refused(digits_bundle, tmp_path):
    b = copy_of(digits_bundle, tmp_path)
    outside = tmp_path / "outside.onnx"
    shutil.copy(b / "model.onnx", outside)
    (b / "model.onnx").unlink()
    os.symlink(outside, b / "model.onnx")  # same bytes, same hash: still not the bundle's own file
    with pytest.raises(rt.BundleError, match=r"model.onnx is a symbolic link to .*outside.onnx, outside the bundle"):
        rt.Session(b)
    (b / "model.onnx").unlink()
    os.symlink("../outside.onnx", b / "model.onnx")
    with pytest.raises(rt.BundleError, match="outside the bundle"):
        rt.Session(b)
    (b / "model.onnx").unlink()
    shutil.move(outside, b / "int8.onnx")  # a link to a file beside it in the folder is followed
    os.symlink("int8.onnx", b / "model.onnx")
    rt.Session(b)
    (b / "model.onnx").unlink()
    os.mkfifo(b / "model.onnx")  # a FIFO would block a naive open() forever
    with pytest.raises(rt.BundleError, match="model.onnx is not a regular file"):
        rt.Session(b)


def test_provider_caches_go_to_the_apps_folder_never_the_manifests(target_bundle, tmp_path, monkeypatch):
    bundle = target_bundle("jetson-orin")
    # on the CPU provider here: an AVX2-only CPU's saturating int8 does not matter to where caches go
    sess = rt.Session(bundle.path, allow_fallback=True, allow_saturating_cpu=True, cache_dir=tmp_path / "cache")
    options = sess.resolve_options({"trt_engine_cache_path": "trt_cache", "trt_fp16_enable": "True"})
    assert options == {"trt_engine_cache_path": str(tmp_path / "cache" / "trt_cache"), "trt_fp16_enable": "True"}
    assert not (bundle.path / "trt_cache").exists()
    default = rt.Session(bundle.path, allow_fallback=True, allow_saturating_cpu=True)
    home = tmp_path / "home"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    path = default.resolve_options({"trt_timing_cache_path": "t"})["trt_timing_cache_path"]
    assert path == str(home / "edgequant" / default.digest[7:23] / "t") and Path(path).is_dir()
    b = copy_of(bundle, tmp_path)
    escape = "../../escaped"

    def inject(m):
        m["runtime"]["providers"][0]["options"]["trt_engine_cache_path"] = escape

    edit_manifest(b, inject)
    with pytest.raises(rt.BundleError, match=r"runtime.providers\[0\].options.trt_engine_cache_path must be a "
                                             r"value without a path"):
        rt.Session(b, allow_fallback=True)
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


# --- 2. the digest an app pins, and signatures -------------------------------------------------------------------

def test_digest_is_printed_stored_recorded_and_pinned(digits_bundle, tmp_path):
    raw = (digits_bundle.path / "manifest.json").read_bytes()
    digest = "sha256:" + __import__("hashlib").sha256(raw).hexdigest()
    assert digits_bundle.digest == digest == digits_bundle.report["bundle_digest"]
    assert (digits_bundle.path / "manifest.sha256").read_text() == digest + "\n"
    assert json.loads((digits_bundle.path / "report.json").read_text())["bundle_digest"] == digest
    sess = rt.Session(digits_bundle.path, expect_digest=digest)
    assert sess.digest == digest
    rt.Session(digits_bundle.path, expect_digest=digest[7:].upper())  # bare hex, any case
    with pytest.raises(rt.BundleError, match=f"bundle digest {digest} is not the pinned sha256:0000"):
        rt.Session(digits_bundle.path, expect_digest="sha256:" + "0" * 64)
    with pytest.raises(rt.RuntimeAdapterError, match="is not a bundle digest"):
        rt.Session(digits_bundle.path, expect_digest="sha256:abc")


def test_an_edited_preprocess_changes_the_digest_and_is_refused(digits_bundle, tmp_path):
    """The attack: std 0.376 → 0.876 in the manifest changes the prediction; a pinned app refuses it, and a
    manifest that no longer matches manifest.sha256 is refused even unpinned."""
    b = copy_of(digits_bundle, tmp_path)
    pinned = digits_bundle.digest
    m = json.loads((b / "manifest.json").read_text())
    m["preprocess"] = {"kind": "image", "input": "x", "channel_order": "gray", "resize": None, "scale": 1 / 255,
                       "mean": [0.3052], "std": [0.876], "layout": "nchw"}
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(rt.BundleError, match="manifest.sha256 says sha256:.* the manifest was edited"):
        rt.Session(b)
    edit_manifest(b, lambda m: m.update(preprocess=m["preprocess"]))  # the attacker rewrites the digest file too
    with pytest.raises(rt.BundleError, match="is not the pinned"):
        rt.Session(b, expect_digest=pinned)
    result = subprocess.run([sys.executable, str(b / "edgequant_runtime.py"), str(b), "--input",
                             str(DIGITS / "data" / "0004.npy"), "--expect-digest", pinned],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "is not the pinned" in result.stderr


def test_sign_and_check_with_ed25519(digits_bundle, tmp_path):
    from click.testing import CliRunner
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgequant.cli import cli

    b = copy_of(digits_bundle, tmp_path)
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    (tmp_path / "fleet.pem").write_bytes(pem)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "fleet.pub").write_bytes(public)
    with pytest.raises(rt.BundleError, match="is not signed"):
        rt.Session(b, public_key=tmp_path / "fleet.pub")
    result = CliRunner().invoke(cli, ["sign", str(b), "--key", str(tmp_path / "fleet.pem")])
    assert result.exit_code == 0, result.output
    assert f"signed   {b} ({digits_bundle.digest})" in result.output
    assert rt.Session(b, public_key=tmp_path / "fleet.pub", expect_digest=digits_bundle.digest).digest \
        == digits_bundle.digest  # signing adds manifest.sig; the manifest and its digest are unchanged
    rt.Session(b, public_key=key.public_key().public_bytes(serialization.Encoding.Raw,
                                                           serialization.PublicFormat.Raw))
    with pytest.raises(rt.BundleError, match="is not a valid signature of manifest.json by the app's public key"):
        rt.Session(b, public_key=other.public_key())
    edit_manifest(b, lambda m: m["runtime"].update(intra_op_num_threads=1))
    with pytest.raises(rt.BundleError, match="is not a valid signature"):
        rt.Session(b, public_key=tmp_path / "fleet.pub")
    result = subprocess.run([sys.executable, str(b / "edgequant_runtime.py"), str(b), "--input",
                             str(DIGITS / "data" / "0004.npy"), "--public-key", str(tmp_path / "fleet.pub")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "is not a valid signature" in result.stderr and "Traceback" not in result.stderr
    bad = CliRunner().invoke(cli, ["sign", str(b), "--key", str(tmp_path / "fleet.pub")])
    assert bad.exit_code == 1 and "is not an unencrypted PEM private key" in bad.output
    if shutil.which("openssl"):  # docs/cli.md's recipe: keys made by OpenSSL
        c = copy_of(digits_bundle, tmp_path, "openssl")
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", "o.pem"], cwd=tmp_path, check=True)
        subprocess.run(["openssl", "pkey", "-in", "o.pem", "-pubout", "-out", "o.pub"], cwd=tmp_path, check=True)
        assert CliRunner().invoke(cli, ["sign", str(c), "--key", str(tmp_path / "o.pem")]).exit_code == 0
        assert rt.Session(c, public_key=tmp_path / "o.pub").digest == digits_bundle.digest


# --- 3. verify what you run ---------------------------------------------------------------------------------------

def test_the_model_onnxruntime_runs_is_the_model_that_was_hashed(digits_bundle, tmp_path):
    """A thread swaps model.onnx for another valid model as fast as it can while sessions open: every session
    that opens runs the verified model (or refuses), never the swapped-in one. The race is the benchmark's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bundle_attacks import raced_opens

    opens, wrong, refused = raced_opens(digits_bundle.path, tmp_path, 40)
    assert wrong == 0 and refused < opens == 40


# --- 4. the manifest schema; no traceback from any input ------------------------------------------------------------

MALFORMED = [
    ("files as a list", lambda m: m.update(files=list(m["files"])), "files must be an object"),
    ("a string where an object belongs", lambda m: m.update(model="model.onnx"), "model must be an object"),
    ("threads as a word", lambda m: m["runtime"].update(intra_op_num_threads="four"),
     "runtime.intra_op_num_threads must be an integer 0..4096, not \"four\""),
    ("bytes as a string", lambda m: m["files"]["model.onnx"].update(bytes="35004"),
     "files.model.onnx.bytes must be an integer"),
    ("no model", lambda m: m.pop("model"), "model must be present"),
    ("a hash too short", lambda m: m["files"]["model.onnx"].update(sha256="abc"), "must be 64 lowercase hex digits"),
    ("shape of floats", lambda m: m["inputs"][0].update(shape=[1.5]), "inputs[0].shape[0] must be an int"),
    ("unknown dtype", lambda m: m["inputs"][0].update(dtype="object"), "inputs[0].dtype must be one of"),
    ("no providers", lambda m: m["runtime"].update(providers=[]), "runtime.providers must be a list of 1..16"),
    ("provider name", lambda m: m["runtime"]["providers"][0].update(name="../lib.so"), "an ONNX Runtime provider"),
    ("level", lambda m: m["runtime"].update(graph_optimization_level=99), "graph_optimization_level must be one"),
    ("negative batch cap", lambda m: m["runtime"].update(max_batch=0), "runtime.max_batch must be an integer 1.."),
    ("std zero", lambda m: m.update(preprocess={"input": "x", "std": [0]}), "preprocess.std[0] must be a finite"),
    ("preprocess of no input", lambda m: m.update(preprocess={"input": "y"}), "preprocess.input must be one of"),
    ("model not listed", lambda m: m["model"].update(file="other.onnx"), "model.file must be a file listed"),
    ("schema", lambda m: m.update(schema="other"), "schema must be \"edgequant.bundle\""),
    ("version as a string", lambda m: m.update(schema_version="1"), "schema_version must be an integer"),
    ("tokenizer attr", lambda m: m.update(tokenizer={"file": "model.onnx", "max_length": 8,
                                                      "inputs": {"x": "__class__"}}),
     "tokenizer.inputs.x must be one of ids, attention_mask, type_ids"),
    ("session entry path", lambda m: m["runtime"].update(session_config={"ep.context_file_path": "/tmp/x"}),
     "must be a value without a path"),
    ("the whole manifest a list", lambda m: (m.clear(), m.update(schema=[])), "schema must be"),
]


@pytest.mark.parametrize("case,change,needle", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_manifest_is_one_line_naming_the_key(digits_bundle, tmp_path, case, change, needle):
    b = copy_of(digits_bundle, tmp_path)
    edit_manifest(b, change)
    with pytest.raises(rt.BundleError) as err:
        rt.Session(b)
    assert needle in str(err.value) and "\n" not in str(err.value) and str(b / "manifest.json") in str(err.value)


def _mutations(value, path=()):
    """Every key path of a manifest → (path, replacement) pairs of the wrong type, empty or out of range."""
    for bad in (None, "x", -1, 1.5, True, [], {}, "../x", 10 ** 12):
        yield path, bad
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _mutations(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:2]):
            yield from _mutations(v, path + (i,))


def test_every_field_of_the_manifest_malformed_is_a_bundle_error_or_harmless(digits_bundle, tmp_path):
    base = json.loads((digits_bundle.path / "manifest.json").read_text())
    b = copy_of(digits_bundle, tmp_path)
    other = 0
    cases = list(_mutations(base))
    for path, bad in cases:
        m = json.loads(json.dumps(base))
        if path:
            *head, last = path
            node = m
            for k in head:
                node = node[k]
            node[last] = bad
        else:
            m = bad
        raw = json.dumps(m).encode()
        (b / "manifest.json").write_bytes(raw)
        (b / "manifest.sha256").write_text(rt.bundle_digest(raw))
        try:
            rt.open_bundle(b)
        except rt.BundleError as exc:
            assert "\n" not in str(exc)
        except Exception:  # noqa: BLE001  (anything but a one-line BundleError is the defect counted here)
            other += 1
    assert len(cases) > 500 and other == 0


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, rt.__file__, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_inputs_never_show_a_traceback(digits_bundle, tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "ok.npy", sample())
    (tmp_path / "short.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:-20])
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (20000000, 1, 8, 8), }"
    header += b" " * (118 - len(header)) + b"\n"
    (tmp_path / "huge.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 64)
    np.savez(tmp_path / "obj.npz", x=np.array([None], dtype=object))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    nan = sample().copy()
    nan[:] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "folder.npy").mkdir()
    expect = {"obj.npy": "holds Python objects", "garbage.npy": "is not a readable .npy array",
              "short.npy": "it is truncated", "huge.npy": "holds a batch of 20000000, more than this session takes",
              "obj.npz": "holds Python objects", "bad.npz": "cannot be read as npz",
              "nan.npy": "input 'x' has 64 NaN and 0 infinite values of 64", "folder.npy": "not found",
              "missing.npy": "not found", "x.txt": "not a file this bundle takes; it takes a .npy of shape"}
    (tmp_path / "x.txt").write_text("1 2 3")
    for name, needle in expect.items():
        result = _cli(digits_bundle.path, "--input", tmp_path / name)
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (name, result.stderr)
        assert needle in result.stderr, (name, result.stderr)
    full = _cli(digits_bundle.path, "--input", tmp_path / "ok.npy", "--save", "/dev/full")
    assert full.returncode == 1 and full.stderr.count("\n") == 1 and "No space left on device" in full.stderr, \
        full.stderr
    debug = _cli(digits_bundle.path, "--input", tmp_path / "obj.npy", "--debug")
    assert "Traceback" in debug.stderr


# --- 5. input guards ---------------------------------------------------------------------------------------------

def test_nan_and_inf_frames_are_refused_unless_allowed(digits_bundle):
    sess = rt.Session(digits_bundle.path)
    frame = sample().copy()
    frame[:] = np.nan
    with pytest.raises(rt.InputError, match=r"input 'x' has 64 NaN and 0 infinite values of 64"):
        sess.run(frame)
    frame = sample().copy()
    frame[0, 0, 2, 3] = np.inf
    frame[0, 0, 1, 1] = -np.inf
    with pytest.raises(rt.InputError, match=r"input 'x' has 0 NaN and 2 infinite values of 64"):
        sess.run(frame)
    big = np.full((1, 1, 8, 8), 3e38, np.float32)  # finite values whose sum overflows are still fine
    sess.run(big)
    loose = rt.Session(digits_bundle.path, check_finite=False)
    out = loose.run(np.full((1, 1, 8, 8), np.nan, np.float32))["linear"]
    assert out.shape == (1, 10)  # the app asked for it: the int8 model answers a NaN frame with numbers


def test_nan_output_is_an_error(digits_bundle, tmp_path):
    """The fp32 reference propagates NaN: an output NaN is refused even when the input check is off."""
    sess = rt.Session(digits_bundle.path, reference=True)
    sess.check_finite = False
    assert np.isnan(sess.run(np.full((1, 1, 8, 8), np.nan, np.float32))["linear"]).all()
    sess.check_finite = True
    with pytest.raises(rt.OutputError, match=r"output 'linear' has 10 NaN values of 10"):
        sess._prepare = lambda name, value: np.asarray(value)  # let the NaN frame through the input guard
        sess.run(np.full((1, 1, 8, 8), np.nan, np.float32))


def test_batch_is_capped(digits_bundle, tmp_path):
    sess = rt.Session(digits_bundle.path, max_batch=4)
    sess.run(np.repeat(sample(), 4, axis=0))
    with pytest.raises(rt.InputError, match=r"input 'x' has a batch of 5, more than this session takes \(4\)"):
        sess.run(np.repeat(sample(), 5, axis=0))
    b = copy_of(digits_bundle, tmp_path)
    edit_manifest(b, lambda m: m["runtime"].update(max_batch=2))
    assert rt.Session(b).max_batch == 2
    assert rt.default_max_batch(10 << 20, 300, 1 << 30) == ((1 << 29) - (20 << 20)) // (64 * 300) == 26869
    assert rt.default_max_batch(10 << 20, 300, 1 << 20) == 1
    assert rt.Session(digits_bundle.path).max_batch >= 1000  # 8x8 digits: thousands fit in any machine's memory


def _png(width: int, height: int, body: bytes, colour: int = 0) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_png_bombs_are_refused_before_decompression(tmp_path):
    bomb = zlib.compress(b"\0" * (20000 * 20001 // 50))  # 8 MB of zeros in a few KB (the header says 400 MP)
    (tmp_path / "huge.png").write_bytes(_png(20000, 20000, bomb))
    with pytest.raises(rt.InputError, match=r"a 20000x20000 frame \(400000000 pixels\) is beyond the limit"):
        rt.read_png(tmp_path / "huge.png")
    rows = zlib.compress(b"\0" * (100 * 101 * 300))  # a small header over a body 300 times its size
    (tmp_path / "liar.png").write_bytes(_png(100, 100, rows))
    with pytest.raises(rt.InputError, match="PNG data has more than 10100 bytes, expected 10100"):
        rt.read_png(tmp_path / "liar.png")
