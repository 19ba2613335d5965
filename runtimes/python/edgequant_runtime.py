"""edgequant device runtime: load an edgequant bundle and run it with ONNX Runtime.

Imports only the standard library, numpy and onnxruntime, so this one file can be copied next to a bundle
and run on a Raspberry Pi, a Jetson or any machine with onnxruntime. The bundle format is documented in
``runtimes/README.md``.

    sess = Session("path/to/bundle")              # schema, confinement, sha256 of what it runs; provider chain
    sess = Session("bundle", expect_digest="sha256:...")   # only the bundle the app was released with
    outputs = sess.run({"x": x})                   # or sess.run(x), or sess.run(camera_frame_uint8_hwc)
    embeddings, outputs = sess.run_text(["a robot arm", "a gripper"])   # bundles with a tokenizer
    print(sess.placement)                          # {provider: nodes it runs}

    python edgequant_runtime.py BUNDLE --input x.npy|x.npz|frame.png|.jpg [--bench] [--allow-fallback] [--save o.npz]
                                [--expect-digest sha256:HEX] [--public-key KEY.pem] [--cache-dir DIR]
    python edgequant_runtime.py BUNDLE --text "a robot arm" --text "a gripper" [--reference (the fp32 model)]
    python edgequant_runtime.py BUNDLE --selftest    # golden samples: PASS/FAIL line, exit 1 on FAIL
    python edgequant_runtime.py BUNDLE --generate "The robot" [--max-new-tokens 32] [--sample --seed 1]

    result = sess.generate("The robot", max_new_tokens=32)   # decoder bundles: text, tokens, tokens/s

Text goes through the bundle's own ``edgequant_text.py`` (and generation through its ``edgequant_generate.py``;
both need the ``tokenizers`` package), imported only when text is used, so array and image bundles need
nothing beyond numpy and onnxruntime.

No silent fallback: a provider of the chain that this onnxruntime lacks, nodes that ONNX Runtime placed on a
provider outside the chain, or a first (preferred) provider that got no node at all, are an error unless
``allow_fallback=True``, which logs exactly what runs where.
ONNX Runtime itself only warns. Node placement is read from ONNX Runtime's profiler (one run on zeros).

The bundle and every frame are untrusted input. The manifest is checked against ``SCHEMA`` before use; every
file it names is a plain name read through one handle of the bundle folder (no path out of it, no symlink out,
no device or FIFO); the bytes that were hashed are the bytes onnxruntime, the tokenizer and the text adapter
get. NaN/Inf inputs and NaN outputs are errors, the batch is capped, and PNG frames are size-checked before
they are decompressed. The sections below follow that order: schema, reading, signatures, frames, session,
command line.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the command line: an interrupt while the imports below run is one line too
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted: nothing was written\n"), os._exit(130)))

import argparse
import base64
import errno
import hashlib
import importlib
import io
import json
import logging
import math
import re
import signal
import stat
import struct
import tempfile
import threading
import time
import types
import zipfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "SCHEMA", "SCHEMA_VERSION", "BundleError", "InputError", "OutputError",
           "ProviderError", "RuntimeAdapterError", "SelfTest", "Session", "VerifiedBundle", "bundle_digest",
           "check_cpu", "cpu_features", "default_max_batch", "describe_cpu", "expected_input", "int8_saturates",
           "load_public_key", "open_bundle", "plain_name", "preprocess_image", "read_image", "read_png",
           "resize_bilinear", "sha256_file", "to_channels", "used_files", "validate_manifest", "verify_bundle"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DIGEST_FILE = "manifest.sha256"  # "sha256:<hex>" of manifest.json, beside it (informative: pin it in the app)
SIGNATURE_FILE = "manifest.sig"  # base64 Ed25519 signature of manifest.json's bytes (edgequant sign)
TEXT_ADAPTER = "edgequant_text.py"
GENERATE_ADAPTER = "edgequant_generate.py"
CPU = "CPUExecutionProvider"
MAX_PIXELS = 1 << 24  # 16.7 million pixels (4096 x 4096): larger PNG frames are refused before decompression

log = logging.getLogger("edgequant_runtime")


class RuntimeAdapterError(Exception):
    """A problem with the bundle, the input or the machine, reported as one line."""


class BundleError(RuntimeAdapterError):
    """The bundle is missing a file, was changed or truncated, or is from a newer schema."""


class InputError(RuntimeAdapterError):
    """An input has the wrong name, shape or dtype, or cannot be read."""


class ProviderError(RuntimeAdapterError):
    """A requested execution provider is missing, or ONNX Runtime placed nodes elsewhere."""


class OutputError(RuntimeAdapterError):
    """The model answered with NaN: its result must not be acted on."""

# --- pre-processing -------------------------------------------------------------------------------------------
# The exporter calibrates through these same functions, so a camera frame becomes exactly the tensor the
# int8 ranges were measured on.


def to_channels(image: np.ndarray, channel_order: str) -> np.ndarray:
    """uint8 image (H, W) or (H, W, 3|4) in RGB(A) order → (H, W, C) in ``channel_order`` (rgb, bgr, gray)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {img.shape}")
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if channel_order == "gray":
        if img.shape[2] == 1:
            return img
        # ITU-R 601-2 luma, the same weights as PIL's "L" mode.
        rgb = img.astype(np.float32)
        luma = rgb[:, :, 0] * 0.299 + rgb[:, :, 1] * 0.587 + rgb[:, :, 2] * 0.114
        return np.clip(np.floor(luma + 0.5), 0, 255).astype(np.uint8)[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if channel_order == "bgr":
        return img[:, :, ::-1]
    if channel_order == "rgb":
        return img
    raise ValueError(f"channel_order must be rgb, bgr or gray, not {channel_order!r}")


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) array → (height, width, C) float32, bilinear with half-pixel centres (no anti-aliasing)."""
    src = image.astype(np.float32)
    h, w = src.shape[:2]
    if (h, w) == (height, width):
        return src

    def grid(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = grid(height, h)
    x0, x1, fx = grid(width, w)
    top = src[y0][:, x0] * (1 - fx)[None, :, None] + src[y0][:, x1] * fx[None, :, None]
    bottom = src[y1][:, x0] * (1 - fx)[None, :, None] + src[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def preprocess_image(image: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 image (H, W[, C]) → float32 model input without batch axis, per the manifest's ``preprocess``.

    x = ((resize(pixels) * scale) - mean) / std, per channel, then laid out as ``layout`` (nchw → C,H,W).
    """
    img = to_channels(image, spec.get("channel_order", "rgb"))
    size = spec.get("resize")
    out = resize_bilinear(img, int(size[0]), int(size[1])) if size else img.astype(np.float32)
    out = out * np.float32(spec.get("scale", 1.0))
    channels = out.shape[2]
    mean = np.asarray(spec.get("mean", [0.0]), dtype=np.float32)
    std = np.asarray(spec.get("std", [1.0]), dtype=np.float32)
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise ValueError(f"mean/std need 1 or {channels} values, got {mean.size} and {std.size}")
    out = (out - mean.reshape(1, 1, -1)) / std.reshape(1, 1, -1)
    if spec.get("layout", "nchw") == "nchw":
        out = np.transpose(out, (2, 0, 1))
    return np.ascontiguousarray(out, dtype=np.float32)


# --- the manifest schema --------------------------------------------------------------------------------------
# Written as data, so that one function checks every key this adapter reads (type and range) before anything
# uses it, and reports the first problem as one line naming the key. runtimes/README.md documents the same
# schema. Keys a reader does not know are ignored (forward compatibility); they cannot change what it does.

_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_PROVIDER = re.compile(r"[A-Za-z0-9]{1,64}ExecutionProvider\Z")
_DTYPE_PAIR = re.compile(r"[a-z0-9]{1,16}/[a-z0-9]{1,16}\Z")
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint64", "uint32",
           "uint16", "uint8", "bool", "str")


def plain_name(value) -> bool:
    """True for a name a bundle may list: one path component (no folder, no '..', no absolute path), not hidden."""
    return isinstance(value, str) and _PLAIN.match(value) is not None


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    text = {"dict": "an object", "list": "a list"}.get(text, text)
    return text if len(text) <= 60 else text[:57] + "..."


class _Invalid(Exception):
    """A manifest entry that does not follow the schema: (key path, what it must be, the value)."""


def _need(ok: bool, at: str, what: str, value) -> None:
    if not ok:
        raise _Invalid(at, what, value)


def _str(*, choices=None, pattern=None, what=None, max_len=4096, empty=False):
    def check(v, at):
        if choices is not None:
            _need(isinstance(v, str) and v in choices, at, "one of " + ", ".join(map(str, choices)), v)
        _need(isinstance(v, str) and (empty or v != "") and len(v) <= max_len, at,
              f"a non-empty string of at most {max_len} characters" if not empty else "a string", v)
        if pattern is not None:
            _need(pattern.match(v) is not None, at, what, v)
    return check


def _int(lo: int, hi: int):
    def check(v, at):
        _need(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, at, f"an integer {lo}..{hi}", v)
    return check


def _num(*, positive=False):
    def check(v, at):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
        _need(ok, at, "a finite number" + (" > 0" if positive else ""), v)
    return check


def _bool(v, at):
    _need(isinstance(v, bool), at, "true or false", v)


def _any(v, at):  # informative entries: any JSON value
    return


def _null(inner):
    def check(v, at):
        if v is not None:
            inner(v, at)
    return check


def _list(item, lo: int, hi: int):
    def check(v, at):
        _need(isinstance(v, list) and lo <= len(v) <= hi, at, f"a list of {lo}..{hi} items", v)
        for i, x in enumerate(v):
            item(x, f"{at}[{i}]")
    return check


def _map(value, lo: int, hi: int, key=None):
    key = key or _str(max_len=256)

    def check(v, at):
        _need(isinstance(v, dict) and lo <= len(v) <= hi, at, f"an object of {lo}..{hi} entries", v)
        for k, x in v.items():
            key(k, f"{at} key")
            value(x, f"{at}.{k}")
    return check


def _obj(fields: dict):
    """fields: {key: (check, required)}; other keys are ignored."""
    def check(v, at):
        _need(isinstance(v, dict), at, "an object", v)
        for k, (inner, required) in fields.items():
            if k in v:
                inner(v[k], f"{at}.{k}" if at else k)
            else:
                _need(not required, f"{at}.{k}" if at else k, "present", "missing")
    return check


def _dim(v, at):
    _need(v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 31)
          or (isinstance(v, str) and 0 < len(v) <= 256), at, "an int, a dimension name or null", v)


def _option_value(v, at):
    # provider options and session entries are values, never paths: a cache folder is the app's (cache_dir)
    _str(max_len=4096, empty=True)(v, at)
    _need("/" not in v and "\\" not in v and "\x00" not in v and v not in (".", ".."), at,
          "a value without a path (no '/', '\\' or '..'; cache folders are chosen by the app, not the manifest)", v)


_FILE = _str(pattern=_PLAIN, what="a plain file name inside the bundle (no folder, no '..', no absolute path)")
_IO = _obj({"name": (_str(max_len=1024), True), "dtype": (_str(choices=_DTYPES), True),
            "shape": (_list(_dim, 0, 16), True)})
_MODEL = _obj({"file": (_FILE, True), "format": (_str(max_len=64), False), "opset": (_int(1, 1000), False)})
SCHEMA = _obj({
    "schema": (_str(choices=("edgequant.bundle",)), True),
    "schema_version": (_int(1, SCHEMA_VERSION), True),
    "producer": (_str(max_len=256), False),
    "model": (_MODEL, True),
    "reference_model": (_null(_MODEL), False),
    "inputs": (_list(_IO, 1, 1024), True),
    "outputs": (_list(_IO, 1, 1024), True),
    "preprocess": (_null(_obj({
        "kind": (_str(choices=("image",)), False), "input": (_str(max_len=1024), True),
        "channel_order": (_str(choices=("rgb", "bgr", "gray")), False),
        "resize": (_null(_list(_int(1, 65536), 2, 2)), False), "scale": (_num(positive=True), False),
        "mean": (_list(_num(), 1, 3), False), "std": (_list(_num(positive=True), 1, 3), False),
        "layout": (_str(choices=("nchw", "nhwc")), False)})), False),
    "quantization": (_null(_map(_any, 0, 256)), False),
    "target": (_obj({"name": (_str(max_len=256), True), "description": (_str(max_len=4096, empty=True), False)}),
               True),
    "runtime": (_obj({
        "providers": (_list(_obj({"name": (_str(pattern=_PROVIDER, what="an ONNX Runtime provider name "
                                                "(...ExecutionProvider)"), True),
                                  "options": (_map(_option_value, 0, 256), False),
                                  # the profile's declared capabilities, which `edgequant inspect` reads
                                  "kernels": (_str(choices=("ort-cpu", "declared")), False),
                                  "int8_op_types": (_list(_str(max_len=64), 0, 256), False),
                                  "per_channel_op_types": (_list(_str(max_len=64), 0, 256), False),
                                  "dtypes": (_list(_str(pattern=_DTYPE_PAIR, what="a pair like uint8/int8"), 0, 64),
                                             False),
                                  "symmetric_activations": (_bool, False), "symmetric_weights": (_bool, False),
                                  "static_shapes": (_bool, False)}), 1, 16), True),
        "graph_optimization_level": (_str(choices=("disable", "basic", "extended", "all")), False),
        "intra_op_num_threads": (_int(0, 4096), False),
        "session_config": (_map(_option_value, 0, 256), False),
        "static_shapes": (_bool, False), "cpu_int8_fusion": (_bool, False),
        "max_batch": (_int(1, 2 ** 31 - 1), False)}), True),
    "files": (_map(_obj({"sha256": (_str(pattern=_HEX64, what="64 lowercase hex digits"), True),
                         "bytes": (_int(0, 2 ** 40), True)}), 1, 4096, key=_FILE), True),
    "tokenizer": (_null(_obj({
        "file": (_FILE, True), "files": (_list(_FILE, 0, 64), False), "max_length": (_int(1, 65536), True),
        "padding": (_null(_str(max_len=32)), False), "truncation": (_bool, False),
        "pad_id": (_int(0, 2 ** 31 - 1), False), "pad_token": (_str(max_len=256, empty=True), False),
        "pad_type_id": (_int(0, 2 ** 31 - 1), False),
        "inputs": (_map(_str(choices=("ids", "attention_mask", "type_ids")), 1, 64), True)})), False),
    "pooling": (_null(_obj({"output": (_str(max_len=1024), True), "mask_input": (_str(max_len=1024), False),
                            "mode": (_str(choices=("mean", "mean_sqrt_len", "cls", "max")), False),
                            "normalize": (_bool, False)})), False),
    "source_model": (_null(_map(_any, 0, 64)), False),
    "requires_cpu": (_null(_obj({"x86_64_one_of": (_list(_str(max_len=64), 0, 16), False)})), False),
    "selftest": (_null(_obj({
        "file": (_FILE, True), "samples": (_int(0, 10 ** 6), False), "entries": (_int(1, 10 ** 6), False),
        "output_steps": (_map(_num(), 0, 1024), False), "tolerance_steps": (_num(), False)})), False),
    "generation": (_null(_obj({
        "tokenizer": (_FILE, True), "context": (_int(1, 1 << 24), True),
        "eos_token_ids": (_list(_int(0, 2 ** 31 - 1), 0, 64), False),
        "bos_token_id": (_null(_int(0, 2 ** 31 - 1)), False), "inputs": (_map(_str(max_len=1024), 0, 16), False),
        "logits": (_str(max_len=1024), False),
        "cache": (_list(_obj({"input": (_str(max_len=1024), True), "output": (_str(max_len=1024), True),
                              "shape": (_list(_int(0, 2 ** 31 - 1), 1, 8), True), "axis": (_int(0, 7), True),
                              "dtype": (_str(choices=_DTYPES), False)}), 0, 4096), False),
        "defaults": (_null(_map(_any, 0, 64)), False)})), False),
})


def _references(m: dict) -> None:
    """The entries that name another entry name one that exists."""
    files, ins, outs = m["files"], [i["name"] for i in m["inputs"]], [o["name"] for o in m["outputs"]]
    _need(len(set(ins)) == len(ins), "inputs", "a list of distinct names", ins)
    for key in ("model", "reference_model"):
        if m.get(key):
            _need(m[key]["file"] in files, f"{key}.file", "a file listed under files", m[key]["file"])
    pre = m.get("preprocess")
    if pre:
        _need(pre["input"] in ins, "preprocess.input", "one of the inputs " + ", ".join(ins), pre["input"])
    for key, name in (("selftest", "file"), ("generation", "tokenizer")):
        if m.get(key):
            _need(m[key][name] in files, f"{key}.{name}", "a file listed under files", m[key][name])
    if m.get("generation"):
        _need(GENERATE_ADAPTER in files, "files", f"an object listing {GENERATE_ADAPTER}", "without it")
    tok = m.get("tokenizer")
    if tok:
        for i, name in enumerate([tok["file"], *tok.get("files", []), TEXT_ADAPTER]):
            _need(name in files, "tokenizer.file" if i == 0 else "tokenizer.files", "a file listed under files", name)
        for name in tok["inputs"]:
            _need(name in ins, f"tokenizer.inputs.{name}", "one of the inputs " + ", ".join(ins), name)
    pool = m.get("pooling")
    if pool:
        _need(pool["output"] in outs, "pooling.output", "one of the outputs " + ", ".join(outs), pool["output"])
        if "mask_input" in pool:
            _need(pool["mask_input"] in ins, "pooling.mask_input", "one of the inputs " + ", ".join(ins),
                  pool["mask_input"])


def validate_manifest(manifest, where: str = MANIFEST) -> dict:
    """A parsed manifest → the same dict, after checking it against :data:`SCHEMA` (every key this adapter reads,
    its type and range, and that names point at existing entries); otherwise one :class:`BundleError` line."""
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if isinstance(manifest, dict) and manifest.get("schema") == "edgequant.bundle" and isinstance(version, int) \
            and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise BundleError(f"{where} has schema_version {version}, newer than this runtime reads ({SCHEMA_VERSION}): "
                          "use the edgequant_runtime.py shipped inside that bundle")
    try:
        if not isinstance(manifest, dict) or manifest.get("schema") != "edgequant.bundle":
            raise _Invalid("schema", '"edgequant.bundle" (this is not an edgequant bundle manifest)',
                           manifest.get("schema", "missing") if isinstance(manifest, dict) else manifest)
        SCHEMA(manifest, "")
        _references(manifest)
    except _Invalid as exc:
        at, what, value = exc.args
        raise BundleError(f"{where}: {at} must be {what}, not {_show(value)}; export the bundle again (a manifest "
                          "is written by edgequant, never edited)") from None
    return manifest


# --- reading the bundle: confined to its folder, each file read once ------------------------------------------
# Every file is opened relative to one open handle of the bundle folder, never following a symbolic link out of
# it, and the bytes that were hashed are the bytes handed on (to onnxruntime, the tokenizer, the text adapter):
# nothing is opened twice by path, so nothing can be swapped between the check and the use.

MAX_MANIFEST_BYTES = 16 << 20
_OPEN = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_AT = os.open in os.supports_dir_fd


class _Replaced(Exception):
    """The bundle folder was replaced (an atomic re-export) while it was being read: read the new one."""


class _Folder:
    """An open bundle folder: files are opened by plain name relative to it."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)) \
                if _AT else None
            if not path.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        except FileNotFoundError:
            raise BundleError(f"{path} is not an edgequant bundle: the folder does not exist ({MANIFEST} is missing)") \
                from None
        except OSError as exc:
            raise BundleError(f"{path} is not a readable bundle folder ({exc.strerror})") from None
        self.identity = self._identity()

    def _identity(self):
        st = os.fstat(self.fd) if self.fd is not None else os.stat(self.path)
        return st.st_dev, st.st_ino

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def replaced(self) -> bool:
        """True when the path now names another folder than the one opened (it was re-exported meanwhile)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.identity

    def _open(self, name: str) -> int:
        if not plain_name(name):
            raise BundleError(f"{self.path}: {name!r} is not a plain file name inside the bundle; a bundle lists "
                              "only its own files (no folder, '..' or absolute path)")
        if not _AT:  # no openat on this system: resolve and check that the file stays in the folder
            real = os.path.realpath(self.path / name)
            if os.path.dirname(real) != os.path.realpath(self.path):
                raise BundleError(f"{self.path / name} resolves to {real}, outside the bundle; copy the file itself "
                                  "into the bundle")
            return os.open(real, _OPEN & ~getattr(os, "O_NOFOLLOW", 0))
        try:
            return os.open(name, _OPEN, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, getattr(errno, "EMLINK", errno.ELOOP)):
                raise
        target = os.readlink(name, dir_fd=self.fd)  # a symbolic link: followed only to a file beside it
        if not plain_name(target):
            raise BundleError(f"{self.path / name} is a symbolic link to {target}, outside the bundle folder; a "
                              "bundle holds its own files: copy the file itself in (cp -L)")
        try:
            return os.open(target, _OPEN, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, getattr(errno, "EMLINK", errno.ELOOP)):
                raise BundleError(f"{self.path / name} is a chain of symbolic links; copy the file itself in") \
                    from None
            raise

    def read(self, name: str, limit: int, *, missing_ok: bool = False) -> bytes | None:
        """A plain file name → its bytes (at most ``limit + 1``, so a larger file shows as larger)."""
        try:
            fd = self._open(name)
        except FileNotFoundError:
            if self.replaced():
                raise _Replaced() from None
            if missing_ok:
                return None
            raise BundleError(f"{self.path / name} is missing from the bundle; copy the whole bundle folder") \
                from None
        except OSError as exc:
            raise BundleError(f"{self.path / name} cannot be read ({exc.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BundleError(f"{self.path / name} is not a regular file (a folder, device or pipe); a bundle "
                                  "holds plain files")
            parts, left = [], limit + 1
            while left > 0:
                block = os.read(fd, min(left, 1 << 30))
                if not block:
                    break
                parts.append(block)
                left -= len(block)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except OSError as exc:
            raise BundleError(f"{self.path / name} cannot be read ({exc.strerror})") from None
        finally:
            os.close(fd)

    def read_verified(self, name: str, meta: dict) -> bytes:
        """A file the manifest lists → its bytes, checked against the manifest's size and sha256."""
        data = self.read(name, meta["bytes"])
        if len(data) != meta["bytes"]:
            raise BundleError(f"{self.path / name} has {'more than ' if len(data) > meta['bytes'] else ''}{len(data)} "
                              f"bytes, the manifest says {meta['bytes']}: the file is truncated or changed; copy the "
                              "bundle again")
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise BundleError(f"{self.path / name} does not match its sha256 in {MANIFEST}: the file was changed; copy "
                              "the bundle again")
        return data


def bundle_digest(manifest_bytes: bytes) -> str:
    """The bytes of manifest.json → the bundle's digest, ``sha256:<hex>``. The manifest lists every file's sha256,
    so this one value pins the whole bundle."""
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def _pinned(expect: str) -> str:
    text = str(expect).strip().lower()
    text = text if text.startswith("sha256:") else "sha256:" + text
    if not _HEX64.match(text[7:]):
        raise RuntimeAdapterError(f"expect_digest {expect!r} is not a bundle digest: give 'sha256:' and 64 hex digits, "
                                  "as `edgequant export` and `edgequant inspect` print it")
    return text


class VerifiedBundle:
    """What :func:`open_bundle` read: the manifest, its bytes and digest, and the verified files it kept."""

    def __init__(self, path: Path, manifest: dict, manifest_bytes: bytes, digest: str, files: dict[str, bytes]):
        self.path, self.manifest, self.manifest_bytes, self.digest, self.files = (path, manifest, manifest_bytes,
                                                                                 digest, files)


def used_files(manifest: dict, *, reference: bool = False) -> list[str]:
    """The files a Session reads from a bundle: the model it runs, a text bundle's tokenizer and adapter, the
    self-test's golden data, a decoder bundle's tokenizer and generation adapter. Each is read once, checked
    and kept; nothing else is opened."""
    entry = manifest.get("reference_model") if reference else manifest["model"]
    names = [entry["file"]] if entry else []
    if manifest.get("tokenizer"):
        names += [manifest["tokenizer"]["file"], TEXT_ADAPTER]
    if manifest.get("selftest"):  # golden data: checked like the model, and read from the checked bytes
        names.append(manifest["selftest"]["file"])
    if manifest.get("generation"):  # a decoder bundle: its tokenizer and generation adapter
        names += [manifest["generation"]["tokenizer"], GENERATE_ADAPTER]
    return names


def open_bundle(bundle_dir: str | os.PathLike, *, keep=None, expect_digest: str | None = None,
                public_key=None, all_files: bool = False) -> VerifiedBundle:
    """Bundle folder → :class:`VerifiedBundle`: the manifest checked against the schema (and the pinned digest,
    and the Ed25519 signature when ``public_key`` is given), and the files in ``keep`` (a list of names, or a
    function manifest → names; default :func:`used_files`) read once and checked against their size and sha256.
    ``all_files`` checks every listed file too. A folder replaced by an atomic re-export while it is read is
    read again, so the result is always one whole bundle, the old or the new."""
    path = Path(bundle_dir)
    for attempt in range(3):
        folder = _Folder(path)
        try:
            return _read_bundle(folder, keep, expect_digest, public_key, all_files)
        except _Replaced:
            if attempt == 2:
                raise BundleError(f"{path} was replaced three times while it was read; try again when the export "
                                  "is done") from None
        finally:
            folder.close()
    raise AssertionError("unreachable")


def _read_bundle(folder: _Folder, keep, expect_digest, public_key, all_files) -> VerifiedBundle:
    path = folder.path
    mpath = path / MANIFEST
    raw = folder.read(MANIFEST, MAX_MANIFEST_BYTES, missing_ok=True)
    if raw is None:
        raise BundleError(f"{path} is not an edgequant bundle: {MANIFEST} is missing")
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not an edgequant manifest")
    digest = bundle_digest(raw)
    if expect_digest is not None and digest != _pinned(expect_digest):
        raise BundleError(f"{path}: bundle digest {digest} is not the pinned {_pinned(expect_digest)}: this is not "
                          "the bundle the app was released with; install that bundle, or pin the new digest")
    try:
        manifest = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{mpath} is not valid JSON ({str(exc)[:120]}); copy the bundle again") from None
    validate_manifest(manifest, str(mpath))
    stored = folder.read(DIGEST_FILE, 256, missing_ok=True)
    if stored is not None and stored.decode("ascii", "replace").strip() != digest:
        raise BundleError(f"{path / DIGEST_FILE} says {stored.decode('ascii', 'replace').strip()[:80]}, but "
                          f"{MANIFEST} hashes to {digest}: the manifest was edited; export the bundle again")
    if public_key is not None:
        _check_signature(folder, raw, public_key)
    files = manifest["files"]
    names = used_files(manifest) if keep is None else (keep(manifest) if callable(keep) else list(keep))
    for name in names:
        if name not in files:
            raise BundleError(f"{mpath} lists no checksum for {name!r}, which the bundle needs; export the bundle "
                              "again")
    kept = {name: folder.read_verified(name, files[name]) for name in dict.fromkeys(names)}
    if all_files:
        for name, meta in files.items():
            if name not in kept:
                folder.read_verified(name, meta)
    return VerifiedBundle(path, manifest, raw, digest, kept)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def verify_bundle(bundle_dir: str | os.PathLike) -> dict:
    """Bundle folder → its manifest, after checking the schema and every listed file's size and sha256."""
    return open_bundle(bundle_dir, all_files=True).manifest


def sha256_file(path: str | os.PathLike) -> str:
    """File → its sha256 hex digest, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- signatures (optional; the cryptography package is imported only when a signature is required) -------------


def _check_signature(folder: _Folder, manifest_bytes: bytes, public_key) -> None:
    """Ed25519: ``manifest.sig`` (base64) must be a signature of the manifest's bytes by ``public_key``."""
    key = load_public_key(public_key)
    from cryptography.exceptions import InvalidSignature

    raw = folder.read(SIGNATURE_FILE, 4096, missing_ok=True)
    if raw is None:
        raise BundleError(f"{folder.path} is not signed ({SIGNATURE_FILE} is missing), and the app requires a "
                          "signature: sign it with `edgequant sign BUNDLE --key KEY`")
    try:
        signature = base64.b64decode(raw.strip(), validate=True)
        key.verify(signature, manifest_bytes)
    except (ValueError, InvalidSignature):
        raise BundleError(f"{folder.path / SIGNATURE_FILE} is not a valid signature of {MANIFEST} by the app's "
                          "public key: the bundle was changed or signed with another key") from None


def load_public_key(key):
    """An Ed25519 public key: the cryptography object, 32 raw bytes, PEM text/bytes, or a path to a PEM file."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        raise RuntimeAdapterError("checking a bundle signature needs the cryptography package: pip install "
                                  "cryptography") from None
    if isinstance(key, Ed25519PublicKey):
        return key
    data = key
    if isinstance(key, (str, os.PathLike)) and "-----BEGIN" not in str(key):
        try:
            data = Path(key).read_bytes()
        except OSError as exc:
            raise RuntimeAdapterError(f"public key {key}: cannot read it ({exc.strerror})") from None
    data = data.encode() if isinstance(data, str) else bytes(data)
    try:
        loaded = Ed25519PublicKey.from_public_bytes(data) if len(data) == 32 else \
            serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise RuntimeAdapterError(f"public key {str(key)[:80]!r} is not an Ed25519 public key ({exc})") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise RuntimeAdapterError(f"public key {str(key)[:80]!r} is a {type(loaded).__name__}, not Ed25519")
    return loaded


# --- PNG frames without extra packages ------------------------------------------------------------------------

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type → samples per pixel


def read_png(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """8-bit non-interlaced PNG file → uint8 array (H, W) for grey, (H, W, 3|4) for colour (palette expanded).

    A frame of more than ``max_pixels`` (default :data:`MAX_PIXELS`) is refused from its header, before any
    pixel is decompressed, and the decompressor never produces more than the header's size: a small file that
    inflates to gigabytes is an :class:`InputError`, not a stall.
    """
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror})") from None
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise InputError(f"{path} is not a PNG file")
    pos, idat, palette, header = 8, [], None, None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR" and len(body) == 13:
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise InputError(f"{path}: PNG without IHDR header")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or interlace != 0 or colour not in _PNG_CHANNELS:
        raise InputError(f"{path}: only 8-bit non-interlaced PNGs are read (this one: bit depth {depth}, "
                         f"interlace {interlace}); save the frame as 8-bit PNG or .npy")
    bpp = _PNG_CHANNELS[colour]
    if width == 0 or height == 0 or width * height > limit:
        raise InputError(f"{path}: a {width}x{height} frame ({width * height} pixels) is beyond the limit of {limit} "
                         "pixels; resize the frame, or raise max_pixels (--max-pixels)")
    stride = width * bpp
    expected = height * (stride + 1)
    try:
        inflate = zlib.decompressobj()
        raw = inflate.decompress(b"".join(idat), expected + 1)
    except zlib.error as exc:
        raise InputError(f"{path}: damaged PNG data ({exc})") from None
    raw = np.frombuffer(raw, dtype=np.uint8)
    if raw.size != expected:
        got = f"more than {expected}" if raw.size > expected else str(raw.size)
        raise InputError(f"{path}: PNG data has {got} bytes, expected {expected}: the file is damaged or not what "
                         "its header says")
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.int32)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: running sum per channel
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) & 0xFF
        elif kind == 2:  # Up
            cur = (line + prev) & 0xFF
        elif kind in (3, 4):  # Average, Paeth: depend on the reconstructed left pixel
            cur = line.copy()
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b = prev[x]
                if kind == 3:
                    cur[x] = (cur[x] + (a + b) // 2) & 0xFF
                else:
                    c = prev[x - bpp] if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                    cur[x] = (cur[x] + pred) & 0xFF
        else:
            raise InputError(f"{path}: unknown PNG filter type {kind} in row {y}")
        out[y], prev = cur, cur
    img = out.astype(np.uint8).reshape(height, width, bpp)
    if colour == 3:
        if palette is None:
            raise InputError(f"{path}: palette PNG without PLTE chunk")
        return palette[img[:, :, 0]]
    if colour == 4:  # grey + alpha: drop alpha
        return img[:, :, 0]
    return img[:, :, 0] if bpp == 1 else img


# --- the CPU this runs on -------------------------------------------------------------------------------------
# Which int8 arithmetic a CPU computes depends on a few instruction-set extensions. On x86-64, ONNX Runtime's
# fused u8*s8 kernels use VPMADDUBSW (16-bit pair sums that saturate with full-range 8-bit weights) unless the
# CPU has AVX-512 VNNI or AVX-VNNI (VPDPBUSD, exact 32-bit sums). On aarch64, every int8 kernel accumulates in
# 32 bits (SDOT/UDOT with asimddp, SMMLA with i8mm, widening multiplies otherwise), so nothing saturates.
# x86 flags come from numpy's own dispatch table, which numpy fills from the CPUID instruction at import: a program
# that an emulator runs on a smaller CPU (qemu -cpu Haswell), or whose CPUID answers are masked, sees the smaller
# CPU there, while /proc/cpuinfo still lists the host's flags. So /proc/cpuinfo is the fallback without the table,
# and otherwise gives only the flags the table has no entry for (avx_vnni, amx_int8 in numpy 2.4), and only where
# it describes the CPU numpy sees (the two agree on every flag both report). aarch64 flags come from the kernel's
# AT_HWCAP words (which qemu serves for the CPU it emulates), then /proc/cpuinfo. No code is generated or run here.

X86_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # either one gives exact 32-bit u8*s8 dot products

# /proc/cpuinfo flag → the names numpy's table has used for it (numpy 1.x and 2.x), for X86_FLAGS and for the
# flags that tell an emulated or masked CPU from the one the kernel describes
_NUMPY_NAMES = {"avx2": ("AVX2",), "avx512f": ("AVX512F",), "avx512bw": ("AVX512BW",),
                "avx512_vnni": ("AVX512VNNI", "AVX512_VNNI"), "avx_vnni": ("AVXVNNI", "AVX_VNNI"),
                "amx_int8": ("AMX_INT8", "AMXINT8"), "avx": ("AVX",), "fma": ("FMA3",), "f16c": ("F16C",),
                "bmi2": ("BMI2",), "avx512vl": ("AVX512VL",), "avx512dq": ("AVX512DQ",), "gfni": ("GFNI",),
                "vaes": ("VAES",), "vpclmulqdq": ("VPCLMULQDQ",), "avx512_fp16": ("AVX512FP16",),
                "avx512_bf16": ("AVX512BF16",)}
# bit of AT_HWCAP (16) / AT_HWCAP2 (26) for each ARM flag (Linux arch/arm64/include/uapi/asm/hwcap.h)
_HWCAP_BITS = {"asimd": (16, 1), "asimddp": (16, 20), "sve": (16, 22), "i8mm": (26, 13)}


def _numpy_cpu_table() -> dict | None:
    """numpy's CPU dispatch table {"AVX2": True, ...} (read through CPUID when numpy was imported), or None."""
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            table = getattr(importlib.import_module(module), "__cpu_features__", None)
        except ImportError:
            continue
        if isinstance(table, dict) and table:
            return table
    return None


def _numpy_flags(table: dict, names) -> dict[str, bool]:
    """numpy's table → {flag: present} for the ``names`` it has an entry for."""
    seen = {}
    for name in names:
        key = next((k for k in _NUMPY_NAMES.get(name, ()) if k in table), None)
        if key is not None:
            seen[name] = bool(table[key])
    return seen


def _x86_flags() -> tuple[set[str] | None, str]:
    """x86-64 → (the X86_FLAGS this CPU has, where they were read), from numpy's table and /proc/cpuinfo."""
    listed = _proc_cpuinfo_flags(tuple(_NUMPY_NAMES))
    table = _numpy_cpu_table()
    if table is None:
        return (None if listed is None else listed & set(X86_FLAGS)), "/proc/cpuinfo"
    seen = _numpy_flags(table, _NUMPY_NAMES)
    flags = {n for n in X86_FLAGS if seen.get(n)}
    same_cpu = listed is not None and all(present == (n in listed) for n, present in seen.items())
    if same_cpu:  # the kernel describes the CPU numpy sees: it fills in the flags numpy has no entry for
        flags |= {n for n in X86_FLAGS if n not in seen and n in listed}
    return flags, "cpuid"


def _hwcap_flags() -> set[str] | None:
    """Linux aarch64 → the ARM_FLAGS in this process's AT_HWCAP/AT_HWCAP2 (getauxval), or None without them."""
    import ctypes

    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return None
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    words = {at: getauxval(at) for at in (16, 26)}
    if not words[16]:
        return None
    return {name for name, (at, bit) in _HWCAP_BITS.items() if words[at] >> bit & 1}


def _proc_cpuinfo_flags(names: tuple[str, ...]) -> set[str] | None:
    """The ``names`` that /proc/cpuinfo's flags (x86) or Features (ARM) line lists, or None without the file."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    listed: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            listed.update(value.split())
    return {n for n in names if n in listed}


def cpu_features() -> dict:
    """This CPU → {"arch": "x86_64" | "aarch64" | ..., "flags": sorted int8-relevant flags, "source": where
    they were read}. x86 flags come from numpy's CPUID-based table (then /proc/cpuinfo), aarch64 flags from
    AT_HWCAP (then /proc/cpuinfo)."""
    import platform

    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    flags, source = None, "unknown"
    if arch == "x86_64":
        flags, source = _x86_flags()
    elif arch == "aarch64":
        flags, source = (_hwcap_flags(), "auxv") if sys.platform.startswith("linux") else (None, "")
        if flags is None:
            flags, source = _proc_cpuinfo_flags(ARM_FLAGS), "/proc/cpuinfo"
        if flags is None and sys.platform == "darwin":  # Apple silicon: dot product and i8mm from M2 on
            flags, source = {"asimd", "asimddp"}, "platform"
    return {"arch": arch, "flags": sorted(flags or ()), "source": source if flags is not None else "unknown"}


def int8_saturates(features: dict) -> bool:
    """True on an x86-64 CPU without VNNI, where ONNX Runtime's fused u8*s8 kernels sum pairs of products in
    16 bits and saturate with full-range 8-bit weights (7-bit weights are safe); False everywhere else."""
    return features.get("arch") == "x86_64" and not set(VNNI_FLAGS) & set(features.get("flags", ()))


def describe_cpu(features: dict) -> str:
    """{"arch", "flags"} → a short label, e.g. "x86_64 AVX2, no VNNI" or "aarch64 asimd asimddp"."""
    flags = set(features.get("flags", ()))
    arch = features.get("arch", "?")
    if arch == "x86_64":
        isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
        vnni = [f for f in VNNI_FLAGS if f in flags]
        return f"x86_64 {isa}, " + (f"VNNI ({' '.join(vnni)})" if vnni else "no VNNI")
    return f"{arch} {' '.join(sorted(flags)) or '(no int8 flags read)'}"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_GREY_MODES = ("1", "L", "LA", "I", "I;16")


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """Image file → uint8 array (H, W) for grey, (H, W, 3) for colour (alpha dropped, palette expanded).
    An image of more than ``max_pixels`` (default :data:`MAX_PIXELS`) is refused from its header, before decoding.

    Through Pillow when it is installed (JPEG, PNG, BMP, ...), else through :func:`read_png`, so a board with
    only numpy and onnxruntime still reads 8-bit PNG frames. The exporter reads calibration images with this
    same function, so a frame becomes the tensor the ranges were measured on.
    """
    path = Path(path)
    try:
        from PIL import Image
    except ImportError:
        if path.suffix.lower() != ".png":
            raise InputError(f"{path}: reading {path.suffix or 'this'} images needs Pillow here (pip install pillow); "
                             "without it only 8-bit PNG frames are read") from None
        img = read_png(path, max_pixels=max_pixels)
        return img[:, :, :3] if img.ndim == 3 and img.shape[2] == 4 else img
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(path) as im:  # reads the header only; pixels are decoded by convert()
            if im.width * im.height > limit:
                raise InputError(f"{path}: a {im.width}x{im.height} image ({im.width * im.height} pixels) is beyond "
                                 f"the limit of {limit} pixels; resize it, or raise max_pixels (--max-pixels)")
            im = im.convert("L") if im.mode in _GREY_MODES else im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from None


def expected_input(manifest: dict, name: str, shape: list, dtype: np.dtype) -> str:
    """What a bundle's input takes, in words for an error message: an image when the manifest records image
    pre-processing for it, else a .npy array of the model input's shape and dtype."""
    pre = manifest.get("preprocess")
    dims = ", ".join(str(d) if isinstance(d, int) else "N" for d in shape)
    array = f"a .npy of shape ({dims}) {dtype} (batch axis optional), pre-processed as at calibration"
    if pre and pre.get("input") in (None, name):
        return f"an image (.png, .jpg) that it pre-processes itself ({pre.get('channel_order', 'rgb')}), or {array}"
    return array


# --- the session ----------------------------------------------------------------------------------------------

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}
_NP = {"float": "float32", "double": "float64", "float16": "float16", "int64": "int64", "int32": "int32",
       "int8": "int8", "uint8": "uint8", "bool": "bool"}


def _ort_dtype(ort_type: str) -> np.dtype:
    inner = ort_type[len("tensor("):-1] if ort_type.startswith("tensor(") else ort_type
    return np.dtype(_NP.get(inner, inner))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- input and output guards ----------------------------------------------------------------------------------
# A sensor fault (NaN, Inf) must never become a confident answer: int8 Q/DQ turns NaN into a valid integer, so
# the quantized model answers where the float model would have said NaN.


def _nonfinite(arr: np.ndarray) -> tuple[int, int]:
    """Float array → (NaN count, infinite count); one summation pass when all values are finite."""
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return 0, 0
    with np.errstate(all="ignore"):
        total = arr.sum(dtype=np.float64) if arr.dtype.itemsize < 8 else arr.sum()
    if np.isfinite(total):  # a NaN or Inf anywhere makes the sum non-finite; finite sums need no second pass
        return 0, 0
    nan = int(np.count_nonzero(np.isnan(arr)))
    return nan, int(np.count_nonzero(np.isinf(arr)))


def _available_memory() -> int | None:
    """Bytes this machine can still give (Linux MemAvailable, else free physical pages), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_max_batch(model_bytes: int, sample_bytes: int, available: int | None) -> int:
    """Largest batch allowed when the manifest sets no ``runtime.max_batch``: half the available memory, less
    twice the model (weights and onnxruntime's prepacked copy), over 64 × one sample's inputs and outputs (a
    rough bound on the activations a sample keeps alive), clamped to 1..65536."""
    if available is None:
        return 1024
    budget = available // 2 - 2 * model_bytes
    return int(min(65536, max(1, budget // max(64 * sample_bytes, 1))))


class Session:
    """An edgequant bundle loaded on this machine's onnxruntime with the bundle's provider chain.

    ``providers``: "auto" (the manifest's chain) or a list of provider names (options still come from the
    manifest when it names the provider). ``allow_fallback``: run anyway when a provider is missing or nodes
    land outside the chain, and log what runs where; otherwise that is a :class:`ProviderError`.
    ``reference``: open the bundle's fp32 reference model instead of the int8 one (to check int8 on the device).
    ``expect_digest``: the ``sha256:...`` digest the app pins; any other bundle is a :class:`BundleError`.
    ``public_key``: an Ed25519 key (object, PEM, 32 raw bytes or a PEM file) whose signature the bundle must carry.
    ``cache_dir``: the folder for provider caches (TensorRT engines); default ``~/.cache/edgequant/<digest>``.
    ``check_finite``: refuse NaN/Inf in float inputs and NaN in outputs (False: run and return them).
    ``max_batch``: the largest batch accepted (default: the manifest's ``runtime.max_batch``, else
    :func:`default_max_batch`).
    ``allow_saturating_cpu``: run a bundle whose int8 arithmetic this CPU cannot compute (full-range weights on
    x86 without VNNI) instead of raising a :class:`ProviderError`; the outputs then differ from the report.
    """

    def __init__(self, bundle_dir: str | os.PathLike, providers: str | list[str] = "auto", *,
                 allow_fallback: bool = False, reference: bool = False, expect_digest: str | None = None,
                 public_key=None, cache_dir: str | os.PathLike | None = None, check_finite: bool = True,
                 max_batch: int | None = None, allow_saturating_cpu: bool = False) -> None:
        import onnxruntime as ort

        self.path = Path(bundle_dir)
        self._text = None
        self._generator = None
        self.check_finite = check_finite
        self.max_pixels = MAX_PIXELS
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        manifest = open_bundle(self.path, expect_digest=expect_digest, public_key=public_key,
                               keep=lambda m: used_files(m, reference=reference))
        self.manifest, self.digest = manifest.manifest, manifest.digest
        self.cpu = cpu_features()
        entry = self.manifest.get("reference_model") if reference else self.manifest["model"]
        if not entry:
            raise BundleError(f"{self.path} has no fp32 reference model; run the int8 model (no reference=True / "
                              "--reference)")
        model_bytes = manifest.files.pop(entry["file"])
        self._verified = manifest.files  # the tokenizer and text adapter, as they were checked
        runtime = self.manifest["runtime"]
        declared = {p["name"]: dict(p.get("options") or {}) for p in runtime["providers"]}
        names = list(declared) if providers == "auto" else list(providers)
        if not names:
            raise ProviderError("no execution provider requested: pass providers='auto' or a list of names")
        available = ort.get_available_providers()
        missing = [n for n in names if n not in available]
        chain = [n for n in names if n in available]
        target = (self.manifest.get("target") or {}).get("name", "?")
        if missing and not allow_fallback:
            rest = ", ".join(chain) or CPU
            raise ProviderError(f"{self.path}: target {target} asks for {', '.join(missing)}, which this onnxruntime "
                                f"{ort.__version__} lacks (it has {', '.join(available)}); install an onnxruntime "
                                f"build with it, or pass allow_fallback=True (--allow-fallback) to run on {rest}")
        if not chain:
            chain = [CPU]
        self.requested, self.missing, self.providers = names, missing, chain
        options = [self.resolve_options(declared.get(n, {})) for n in chain]
        so = self._session_options(ort, runtime, strict=not allow_fallback and CPU not in chain)
        where = self.path / entry["file"]
        with tempfile.TemporaryDirectory(prefix="edgequant-rt-") as tmp:
            # profiled for one run on zeros, which names the provider of every kernel; end_profiling() then
            # switches the profiler off for the runs that follow
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, "placement")
            try:  # the verified bytes themselves: onnxruntime never opens the file again
                self._session = ort.InferenceSession(model_bytes, so, providers=list(zip(chain, options)))
            except Exception as exc:  # ORT raises its own exception types
                raise ProviderError(f"{where}: onnxruntime could not place the model on {', '.join(chain)}: "
                                    f"{_first_line(exc)}") from None
            self.placement = self._placement()
        outside = {p: n for p, n in self.placement.items() if p not in chain}
        if outside and not allow_fallback:
            raise ProviderError(f"{self.path}: onnxruntime placed {self._where(outside)} outside the requested chain "
                                f"{', '.join(chain)}; add that provider to the chain or pass allow_fallback=True")
        idle = chain[0] if len(chain) > 1 and chain[0] not in self.placement else None
        if idle and not allow_fallback:  # the preferred provider took nothing: everything fell down the chain
            raise ProviderError(f"{self.path}: {idle} is available but onnxruntime gave it none of the nodes "
                                f"({self._where(self.placement)}); check the bundle's target, or pass "
                                "allow_fallback=True")
        if missing or outside or idle:
            log.warning("%s", self.describe())
        # the CPU's int8 arithmetic matters only where the CPU provider runs the model's int8 kernels (a bundle
        # placed on TensorRT or CUDA is computed there), so this comes after the provider checks
        if not reference and any(_int8_kernel(op) for op in self.placement.get(CPU, ())):
            degraded = check_cpu(self.manifest, self.cpu, allow=allow_saturating_cpu, where=f"{self.path}: ")
            if degraded:
                log.warning("%s", degraded)
        self.inputs = {i.name: i for i in self._session.get_inputs()}
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._pre = self.manifest.get("preprocess")
        self.max_batch = max_batch or runtime.get("max_batch") or default_max_batch(
            len(model_bytes), self._sample_bytes(), _available_memory())

    def bundle_file(self, name: str) -> bytes:
        """A file this session read and verified at open (the names :func:`used_files` lists, the model aside) →
        its bytes as they were checked. Anything the adapter acts on is read this way, never again by path."""
        if name not in self._verified:
            raise BundleError(f"{self.path}: {name!r} was not read when the session opened; add it to used_files()")
        return self._verified[name]

    def _sample_bytes(self) -> int:
        """Bytes of one sample's inputs and outputs (symbolic dimensions other than the batch counted as 1)."""
        total = 0
        for values in (self._session.get_inputs(), self._session.get_outputs()):
            for v in values:
                dims = [d if isinstance(d, int) and d > 0 else 1 for d in v.shape[1:]]
                total += int(np.prod(dims, dtype=np.int64)) * _ort_dtype(v.type).itemsize
        return total

    def cache_dir(self) -> Path:
        """The folder for provider caches: the app's ``cache_dir``, else one per bundle digest under
        ``$XDG_CACHE_HOME/edgequant`` (``~/.cache/edgequant``), created on first use."""
        if self._cache_dir is None:
            base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            self._cache_dir = Path(base) / "edgequant" / self.digest.split(":")[1][:16]
        try:
            self._cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeAdapterError(f"cannot create the provider cache folder {self._cache_dir} ({exc.strerror}); "
                                      "pass cache_dir= (--cache-dir) a writable folder") from None
        return self._cache_dir

    def resolve_options(self, options: dict) -> dict:
        """Provider options; a cache location (a key with "cache" ending in _path or _dir, e.g. the TensorRT
        engine and timing caches) is a sub-folder of :meth:`cache_dir`, never a path the manifest invents (the
        schema already refuses any option value with a path in it)."""
        out = {}
        for key, value in options.items():
            if "cache" in key and key.endswith(("_path", "_dir")) and value:
                folder = self.cache_dir() / value
                folder.mkdir(exist_ok=True)
                value = str(folder)
            out[key] = value
        return out

    @staticmethod
    def _session_options(ort, runtime: dict, *, strict: bool):
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                              _LEVELS[runtime.get("graph_optimization_level", "all")])
        if runtime.get("intra_op_num_threads"):
            so.intra_op_num_threads = int(runtime["intra_op_num_threads"])
        for key, value in (runtime.get("session_config") or {}).items():
            so.add_session_config_entry(str(key), str(value))
        if strict:  # ORT itself refuses to create the session if any node would need the CPU provider
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        so.log_severity_level = 4  # failures are raised as one line below; ORT's own log would repeat them
        return so

    def _placement(self) -> dict[str, list[str]]:
        """{provider: [op types of the nodes it ran]} from ONNX Runtime's profiler, one run on zeros."""
        feed = {}
        cache = {c["input"]: c["shape"] for c in (self.manifest.get("generation") or {}).get("cache", [])}
        for i in self._session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
            if i.name in cache:  # a decoder's key/value cache: empty, so the mask covers one position
                shape = [int(d) for d in cache[i.name]]
            feed[i.name] = np.zeros(shape, dtype=_ort_dtype(i.type))
        self._session.run(None, feed)
        with open(self._session.end_profiling(), encoding="utf-8") as fh:
            events = json.load(fh)
        out: dict[str, list[str]] = {}
        for e in events:
            args = e.get("args") or {}
            if e.get("cat") == "Node" and "provider" in args and e.get("name", "").endswith("_kernel_time"):
                out.setdefault(args["provider"], []).append(args.get("op_name", "?"))
        return out

    @staticmethod
    def _where(placement: dict[str, list[str]]) -> str:
        parts = []
        for provider, ops in placement.items():
            counts: dict[str, int] = {}
            for op in ops:
                counts[op] = counts.get(op, 0) + 1
            listed = ", ".join(f"{op} {n}" for op, n in sorted(counts.items()))
            parts.append(f"{len(ops)} nodes on {provider} ({listed})")
        return "; ".join(parts)

    def describe(self) -> str:
        """One line: what was requested, what is missing, and which provider runs which nodes."""
        missing = f"missing here: {', '.join(self.missing)}; " if self.missing else ""
        return (f"requested {' > '.join(self.requested)}; {missing}running on {' > '.join(self.providers)}: "
                f"{self._where(self.placement)}")

    def _prepare(self, name: str, value) -> np.ndarray:
        meta = self.inputs[name]
        want = _ort_dtype(meta.type)
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise InputError(f"input {name!r} is an array of Python objects, not numbers: pass a numeric array")
        pre = self._pre if self._pre and self._pre.get("input") == name else None
        if pre is not None and arr.dtype == np.uint8 and arr.ndim in (2, 3) and len(meta.shape) == 4:
            try:
                arr = preprocess_image(arr, pre)[None]
            except ValueError as exc:
                raise InputError(f"input {name!r}: camera frame {arr.shape} cannot be pre-processed: {exc}") from None
        if arr.dtype != want:
            if arr.dtype == np.uint8 and pre is None and want != np.uint8:
                raise InputError(f"input {name!r} got a uint8 image {list(arr.shape)}, but this bundle has no image "
                                 f"pre-processing: it takes {expected_input(self.manifest, name, meta.shape, want)}")
            raise InputError(f"input {name!r} is {arr.dtype}, the model takes {want}: convert it (x.astype(np.{want}))"
                             + (" or pass a uint8 (H, W[, C]) frame" if pre else ""))
        shape = [d if isinstance(d, int) else (d or "?") for d in meta.shape]
        ok = arr.ndim == len(shape) and all(not isinstance(d, int) or d == s for d, s in zip(shape, arr.shape))
        if not ok:
            also = "; this bundle also takes a uint8 (H, W[, C]) frame or an image file" if pre else ""
            raise InputError(f"input {name!r} has shape {list(arr.shape)}, the model takes {shape} (batch axis "
                             f"first){also}")
        if shape and not isinstance(shape[0], int) and arr.shape[0] > self.max_batch:
            raise InputError(f"input {name!r} has a batch of {arr.shape[0]}, more than this session takes "
                             f"({self.max_batch}); run it in smaller batches, or raise max_batch (--max-batch, the "
                             "manifest's runtime.max_batch)")
        if self.check_finite:
            nan, inf = _nonfinite(arr)
            if nan or inf:
                raise InputError(f"input {name!r} has {nan} NaN and {inf} infinite values of {arr.size}: the model "
                                 "would still answer, meaninglessly; fix the sensor or pre-processing, or pass "
                                 "check_finite=False (--allow-nonfinite) to run it anyway")
        return np.ascontiguousarray(arr)

    def run(self, inputs) -> dict[str, np.ndarray]:
        """{input name: array} (or one array for a single-input model; a uint8 (H, W[, C]) frame when the
        manifest has image pre-processing) → {output name: array}."""
        if not isinstance(inputs, dict):
            if len(self.inputs) != 1:
                raise InputError(f"the model has inputs {', '.join(self.inputs)}: pass a dict {{name: array}}")
            inputs = {next(iter(self.inputs)): inputs}
        unknown = sorted(map(str, set(inputs) - set(self.inputs)))
        missing = sorted(set(self.inputs) - set(inputs))
        if unknown or missing:
            raise InputError(f"inputs {', '.join(unknown) or '-'} are not the model's and {', '.join(missing) or '-'} "
                             f"are missing; the model takes {', '.join(self.inputs)}")
        feed = {n: self._prepare(n, v) for n, v in inputs.items()}
        try:
            outputs = dict(zip(self.output_names, self._session.run(self.output_names, feed)))
        except Exception as exc:  # ORT raises its own exception types (out of memory, a shape the graph refuses)
            raise InputError(f"onnxruntime could not run these inputs: {_first_line(exc)}") from None
        if self.check_finite:
            for name, value in outputs.items():
                nan, _ = _nonfinite(value)
                if nan:
                    raise OutputError(f"output {name!r} has {nan} NaN values of {value.size}: the result must not "
                                      "be used; check the inputs, or pass check_finite=False (--allow-nonfinite)")
        return outputs

    def selftest(self) -> SelfTest:
        """Runs the bundle's golden samples (held out from the exporter's data) here → a :class:`SelfTest` whose
        ``passed`` says whether every output is within the manifest's tolerance, in output steps."""
        return run_selftest(self)

    def run_text(self, texts) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """One text or a list (bundles with a ``tokenizer``) → (embeddings (batch, dim) float32 pooled per the
        manifest's ``pooling``, or None when it records none; {output name: array})."""
        text = self._text_inputs()
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch or not all(isinstance(t, str) for t in batch):
            raise InputError("run_text takes a string or a non-empty list of strings")
        feeds = text.encode(batch)
        outputs = self.run(feeds)
        pooling = text.pooling
        return (text.pool(outputs[pooling["output"]], feeds) if pooling else None), outputs

    def _text_inputs(self):
        """The bundle's own edgequant_text.py, run from the bytes that were verified (not imported by path), with
        its tokenizer loaded from the verified bytes of tokenizer.file."""
        if self._text is not None:
            return self._text
        if not self.manifest.get("tokenizer"):
            how = "generate() (--generate)" if self.manifest.get("generation") else "run() (--input)"
            raise InputError(f"{self.path} takes no text to embed: its manifest has no tokenizer entry; use {how}")
        module = self._bundle_module(TEXT_ADAPTER)
        tok = self.manifest["tokenizer"]
        try:
            self._text = module.TextInputs(str(self.path), self.manifest,
                                           tokenizer_json=self.bundle_file(tok["file"]))
        except ImportError as exc:
            if exc.name != "tokenizers":
                raise
            raise RuntimeAdapterError(f"{self.path} takes text, which needs the tokenizers package here: pip "
                                      "install tokenizers") from None
        except Exception as exc:  # the tokenizers package raises its own exception types
            raise BundleError(f"{self.path / tok['file']}: the tokenizers package cannot load it "
                              f"({_first_line(exc)}); install a newer tokenizers") from None
        return self._text

    def _bundle_module(self, filename: str):
        """A device module that travels in the bundle, compiled from the bytes verified at open (never imported
        by path, so the file cannot be swapped after the check), once per content."""
        source = self.bundle_file(filename)
        name = f"_edgequant_{Path(filename).stem}_" + hashlib.sha256(source).hexdigest()[:16]
        module = sys.modules.get(name)
        if module is None:
            module = types.ModuleType(name)
            module.__file__ = str(self.path / filename)
            sys.modules[name] = module  # before running it: dataclasses look their module up there
            try:
                exec(compile(source, module.__file__, "exec"), module.__dict__)
            except BaseException:
                del sys.modules[name]
                raise
        return module

    def generate(self, prompt, max_new_tokens: int | None = None, **options):
        """A prompt (text or token ids) → ``GenerationResult`` (text, token ids, finish reason, prompt and
        decode times), decoding token by token with the key/value cache (decoder bundles). Options: do_sample,
        temperature, top_k, top_p, seed, stop (strings), stop_ids, truncate, on_text (a callback for streamed
        text); see the bundle's edgequant_generate.py."""
        if self._generator is None:
            if not self.manifest.get("generation"):
                raise InputError(f"{self.path} is not a text generation bundle (its manifest has no generation "
                                 "entry); export a decoder model (--task text-generation-with-past)")
            module = self._bundle_module(GENERATE_ADAPTER)
            try:
                from tokenizers import Tokenizer  # built from the verified bytes, not opened by path

                tokenizer = Tokenizer.from_str(self.bundle_file(self.manifest["generation"]["tokenizer"]).decode())
                tokenizer.no_padding()
                tokenizer.no_truncation()
                self._generator = module.Generator(self._session, str(self.path), self.manifest, tokenizer=tokenizer)
            except ImportError as exc:
                if exc.name != "tokenizers":
                    raise
                raise RuntimeAdapterError(f"{self.path} generates text, which needs the tokenizers package here: "
                                          "pip install tokenizers") from None
            self._generation_error = module.GenerationError
        try:
            return self._generator.generate(prompt, max_new_tokens, **options)
        except self._generation_error as exc:
            raise InputError(str(exc)) from None


# --- what the bundle needs from the CPU, and the self-test ----------------------------------------------------
# manifest "requires_cpu": {"x86_64_one_of": [flags]}: bundles whose int8 kernels saturate on x86 CPUs without
# one of these (full-range 8-bit weights through ONNX Runtime's fused u8*s8 kernels). manifest "selftest":
# golden inputs and the outputs the target computes for them, compared in output quantization steps.


# ONNX Runtime's quantized compute kernels (QLinearConv, QGemm, MatMulInteger, DynamicQuantizeMatMul, ...):
# the nodes whose arithmetic on x86 depends on VNNI
_INT8_KERNEL_PREFIXES = ("QLinear", "QGemm", "QAttention", "QOrdered", "QEmbed", "DynamicQuantize", "MatMulNBits")


def _int8_kernel(op_type: str) -> bool:
    """An op type from the placement → True for a quantized compute kernel."""
    return op_type.startswith(_INT8_KERNEL_PREFIXES) or "Integer" in op_type


def check_cpu(manifest: dict, features: dict, *, allow: bool = False, where: str = "") -> str | None:
    """Manifest + cpu_features() → None when this CPU computes the bundle's arithmetic; otherwise the reason,
    raised as a ProviderError unless ``allow`` (then returned, for the caller to log)."""
    need = (manifest.get("requires_cpu") or {}).get("x86_64_one_of") or []
    if not need or features.get("arch") != "x86_64" or set(need) & set(features.get("flags", ())):
        return None
    target = (manifest.get("target") or {}).get("name", "?")
    reason = (f"{where}{target} bundle has full-range 8-bit weights, which this CPU ({describe_cpu(features)}) "
              f"sums in saturating 16-bit pairs: its outputs would differ from the report (needs one of "
              f"{', '.join(need)})")
    if not allow:
        raise ProviderError(f"{reason}; export the model with --target generic-cpu (or x86-avx2) for this CPU, or "
                            "pass allow_saturating_cpu=True (--allow-saturating-cpu) to run it anyway")
    return reason


class SelfTest:
    """The result of running a bundle's golden samples: one PASS/FAIL line via :meth:`line`."""

    def __init__(self, samples: int, agreement: float | None, max_steps: float, tolerance: float,
                 providers: list[str], cpu: dict, worst: str) -> None:
        self.samples, self.argmax_agreement, self.max_diff_steps = samples, agreement, max_steps
        self.tolerance_steps, self.providers, self.cpu, self.worst_output = tolerance, providers, cpu, worst

    @property
    def passed(self) -> bool:
        return self.max_diff_steps <= self.tolerance_steps

    def to_dict(self) -> dict:
        return {"passed": self.passed, "samples": self.samples, "argmax_agreement": self.argmax_agreement,
                "max_diff_steps": self.max_diff_steps, "tolerance_steps": self.tolerance_steps,
                "worst_output": self.worst_output, "providers": self.providers, "cpu": self.cpu}

    def line(self) -> str:
        agree = f"argmax agreement {100 * self.argmax_agreement:.2f}%, " if self.argmax_agreement is not None else ""
        return (f"selftest {'PASS' if self.passed else 'FAIL'}: {self.samples} samples, {agree}max |diff| "
                f"{self.max_diff_steps:.2f} output steps (tolerance {self.tolerance_steps:g}, worst output "
                f"{self.worst_output}); providers {' > '.join(self.providers)}; CPU {describe_cpu(self.cpu)}")


def _load_golden(root: Path, spec: dict, data: bytes, inputs: dict, outputs: list[str]) -> list[tuple[dict, dict]]:
    """The golden file's verified bytes → [(inputs, expected outputs)] per sample; BundleError when it does not
    fit."""
    path = root / str(spec.get("file", ""))
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: the self-test data cannot be read ({exc}); copy the bundle again") from None
    n = spec.get("entries", spec.get("samples"))
    if not isinstance(n, int) or n < 1:
        raise BundleError(f"{path}: manifest selftest.entries must be a positive integer, not {n!r}")
    cases = []
    for i in range(n):
        feed = {k: arrays.get(f"input.{i}.{k}") for k in inputs}
        want = {k: arrays.get(f"output.{i}.{k}") for k in outputs}
        gone = [f"input.{i}.{k}" for k, v in feed.items() if v is None] + \
               [f"output.{i}.{k}" for k, v in want.items() if v is None]
        if gone:
            raise BundleError(f"{path} lacks {', '.join(gone)} for this model's inputs/outputs; export the bundle "
                              "again")
        for k, v in feed.items():
            dims = inputs[k].shape
            fits = v.ndim == len(dims) and all(not isinstance(d, int) or d == s for d, s in zip(dims, v.shape))
            if not fits:
                shape = [d if isinstance(d, int) else "?" for d in dims]
                raise BundleError(f"{path}: golden input {k!r} #{i} has shape {list(v.shape)}, the model takes "
                                  f"{shape}; the self-test data does not belong to this model, export it again")
        cases.append((feed, want))
    return cases


def run_selftest(sess: "Session") -> SelfTest:
    """A loaded Session → its bundle's golden samples run here and compared in output steps."""
    spec = sess.manifest.get("selftest")
    if not spec:
        raise BundleError(f"{sess.path} has no self-test data (golden.npz): it was exported by an older edgequant; "
                          "export it again to get one")
    steps = spec.get("output_steps") or {}
    tolerance = float(spec.get("tolerance_steps", 1.0))
    cases = _load_golden(sess.path, spec, sess.bundle_file(spec["file"]), sess.inputs, sess.output_names)
    worst, worst_name, same, total, samples = 0.0, sess.output_names[0], 0, 0, 0
    for feed, want in cases:
        samples += next(iter(feed.values())).shape[0] if feed else 1
        got = sess.run(feed)
        for name, expected in want.items():
            out = got[name]
            if out.shape != expected.shape:
                raise BundleError(f"{sess.path}: output {name!r} has shape {list(out.shape)} here, the self-test "
                                  f"data {list(expected.shape)}; export the bundle again")
            step = float(steps.get(name) or 1.0)
            diff = float(np.max(np.abs(out.astype(np.float64) - expected.astype(np.float64)), initial=0.0)) / step
            if diff > worst or not np.isfinite(diff):
                worst, worst_name = diff if np.isfinite(diff) else float("inf"), name
            if name == sess.output_names[0] and expected.ndim == 2 and expected.shape[1] > 1:
                same += int(np.sum(np.argmax(out, axis=1) == np.argmax(expected, axis=1)))
                total += expected.shape[0]
    return SelfTest(samples, same / total if total else None, round(worst, 4), tolerance,
                    list(sess.providers), sess.cpu, worst_name)


# --- command line ---------------------------------------------------------------------------------------------


def _npy_header(fh, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """An open .npy stream → (shape, dtype) from its header alone, so nothing is allocated before it is checked."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        shape, _, dtype = (fmt.read_array_header_1_0(fh) if version == (1, 0) else fmt.read_array_header_2_0(fh))
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise InputError(f"{where} is not a readable .npy array ({_first_line(exc)}); save it with numpy.save") \
            from None
    if dtype.hasobject:
        raise InputError(f"{where} holds Python objects (dtype {dtype}), not numbers: save a numeric array")
    return shape, dtype


def _load_npy(fh, where: str, size: int, sess: Session) -> np.ndarray:
    shape, dtype = _npy_header(fh, where)
    if shape and shape[0] > max(sess.max_batch, 1) and len(shape) > 1:
        raise InputError(f"{where} holds a batch of {shape[0]}, more than this session takes ({sess.max_batch}); "
                         "split it, or raise --max-batch")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > size - fh.tell():
        raise InputError(f"{where}: the header promises {nbytes} bytes of data, the file has {size}: it is "
                         "truncated; save it again")
    fh.seek(0)
    try:
        return np.load(fh, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{where} is not a readable .npy array ({_first_line(exc)}); save it with numpy.save") \
            from None


def _read_input(path: str, sess: Session) -> dict[str, np.ndarray]:
    """A .npy, .npz or .png file → {input name: array}; anything unreadable is one InputError line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file {p} not found")
    suffix = p.suffix.lower()
    name = next(iter(sess.inputs))
    meta = sess.inputs[name]
    wants = expected_input(sess.manifest, name, meta.shape, _ort_dtype(meta.type))
    if suffix in IMAGE_SUFFIXES:
        if not sess.manifest.get("preprocess"):
            raise InputError(f"{p}: this bundle has no image pre-processing, so it does not take images; it takes "
                             f"{wants}")
        return {name: read_image(p, max_pixels=sess.max_pixels)}
    try:
        if suffix == ".npz":
            with zipfile.ZipFile(p) as z:
                arrays = {}
                for info in z.infolist():
                    key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                    with z.open(info) as fh:
                        arrays[key] = _load_npy(io.BufferedReader(fh), f"{p}:{info.filename}", info.file_size, sess)
        elif suffix == ".npy":
            with open(p, "rb") as fh:
                arrays = {name: _load_npy(fh, str(p), p.stat().st_size, sess)}
        else:
            raise InputError(f"{p}: not a file this bundle takes; it takes {wants}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{p} cannot be read as {suffix[1:]} ({_first_line(exc)}); save it with numpy.save/savez") \
            from None
    for name, arr in arrays.items():  # a single sample without batch axis gets one
        meta = sess.inputs.get(name)
        if meta is not None and arr.ndim == len(meta.shape) - 1 and arr.dtype != np.uint8:
            arrays[name] = arr[None]
    return arrays


def _print_embeddings(embeddings: np.ndarray | None, pooling: dict | None) -> None:
    if embeddings is None:
        print("embeddings: none, the manifest records no pooling (the outputs above are per token)")
        return
    how = f"{pooling['output']}, {pooling['mode']} pooling{', normalized' if pooling.get('normalize') else ''}"
    print(f"embeddings: shape {list(embeddings.shape)} {embeddings.dtype} ({how})")
    e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            print(f"cosine text {i + 1} ~ text {j + 1}: {float(e[i] @ e[j]):.4f}")


def _save(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Arrays → an .npz at ``path``, written beside it and renamed into place (never half a file); a device or
    pipe (``/dev/stdout``) is written to directly, never replaced."""
    target = Path(path)
    if target.exists() and not target.is_file():
        with open(target, "wb") as fh:
            np.savez(fh, **arrays)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgequant_runtime.py", description="Run an edgequant bundle.")
    parser.add_argument("bundle", help="bundle folder (with manifest.json)")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", help=".npy / .npz (one array per input) / .png or .jpg frame (image bundles)")
    given.add_argument("--text", action="append", help="a text, for bundles with a tokenizer (repeat for more)")
    given.add_argument("--selftest", action="store_true", help="run the bundle's golden samples and print PASS or "
                       "FAIL (exit 1 on FAIL): the first thing to run after copying a bundle to a device")
    given.add_argument("--generate", metavar="PROMPT", help="decoder bundles: continue this prompt")
    gen = parser.add_argument_group("generation (with --generate)")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="at most this many new tokens")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (the same seed, the same text)")
    gen.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    gen.add_argument("--truncate", action="store_true", help="drop the start of a prompt too long for the context")
    parser.add_argument("--providers", default="auto", help="comma-separated provider names (default: the manifest's)")
    parser.add_argument("--allow-fallback", action="store_true", help="run even if a provider is missing; say where")
    parser.add_argument("--bench", action="store_true", help="time 50 runs after 5 warm-up runs")
    parser.add_argument("--save", metavar="OUT.npz", help="save the outputs (and text embeddings) here")
    parser.add_argument("--reference", action="store_true", help="run the fp32 reference model, not the int8 one")
    parser.add_argument("--expect-digest", metavar="sha256:HEX", help="refuse any bundle but the one with this digest")
    parser.add_argument("--public-key", metavar="KEY.pem", help="refuse a bundle not signed by this Ed25519 key")
    parser.add_argument("--cache-dir", metavar="DIR", help="folder for provider caches (TensorRT engines)")
    parser.add_argument("--allow-nonfinite", action="store_true", help="run NaN/Inf inputs and return NaN outputs")
    parser.add_argument("--max-batch", type=int, metavar="N", help="largest batch to accept")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N", help="largest PNG frame, pixels")
    parser.add_argument("--allow-saturating-cpu", action="store_true", help="run a full-range int8 bundle on an x86 "
                        "CPU without VNNI, whose outputs then differ from the report")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    saved = False
    try:
        providers = "auto" if args.providers == "auto" else [p.strip() for p in args.providers.split(",") if p.strip()]
        sess = Session(args.bundle, providers, allow_fallback=args.allow_fallback, reference=args.reference,
                       expect_digest=args.expect_digest, public_key=args.public_key, cache_dir=args.cache_dir,
                       check_finite=not args.allow_nonfinite, max_batch=args.max_batch,
                       allow_saturating_cpu=args.allow_saturating_cpu)
        sess.max_pixels = args.max_pixels
        if args.selftest:
            result = sess.selftest()
            print(result.line())
            return 0 if result.passed else 1
        if args.generate is not None:
            return _generate(sess, args)
        if args.text:
            def step():  # tokenization is part of what a text bundle costs
                return sess.run_text(args.text)
        else:
            feed = _read_input(args.input, sess)

            def step():
                return None, sess.run(feed)
        embeddings, outputs = step()
        if args.bench:
            for _ in range(5):
                step()
            times = []
            for _ in range(50):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        print(f"bundle {sess.digest}")
        print(sess.describe())
        for name, value in outputs.items():
            line = f"{name}: shape {list(value.shape)} {value.dtype}"
            if value.ndim == 2 and value.shape[1] > 1:
                line += f"  argmax {np.argmax(value, axis=1).tolist()}"
            print(line)
        if args.text:
            _print_embeddings(embeddings, sess.manifest.get("pooling"))
        if args.save:
            _save(args.save, {**outputs, **({"embeddings": embeddings} if embeddings is not None else {})})
            saved = True
        if args.bench:
            ms = np.sort(np.array(times)) * 1e3
            print(f"latency over {len(ms)} runs: median {np.median(ms):.3f} ms, p90 {ms[int(0.9 * len(ms))]:.3f} ms")
        return 0
    except KeyboardInterrupt:
        print(f"interrupted: {'outputs were saved to ' + args.save if saved else 'nothing was written'}",
              file=sys.stderr)
        return 130
    except RuntimeAdapterError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a folder that is not writable
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}{'; nothing was written' if not saved else ''}", file=sys.stderr)
        return 1
    except Exception as exc:  # a defect of this adapter: one line, the traceback with --debug
        if args.debug:
            raise
        print(f"error: internal error {type(exc).__name__}: {_first_line(exc)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _generate(sess: Session, args) -> int:
    """--generate: stream the continuation to stdout, then one line of figures on stderr."""
    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    options = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "seed") if getattr(args, k) is not None}
    result = sess.generate(args.generate, args.max_new_tokens, do_sample=True if args.sample else None,
                           stop=args.stop, truncate=args.truncate, on_text=show, **options)
    sys.stdout.write("\n")
    dropped = f", {result.truncated_tokens} prompt tokens dropped" if result.truncated_tokens else ""
    print(f"{result.prompt_tokens} prompt tokens in {1e3 * result.prompt_s:.1f} ms{dropped}; {len(result.token_ids)} "
          f"new tokens ({result.finish_reason}), {result.tokens_per_s:.1f} tokens/s after the first", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
