"""edgequant device runtime: load an edgequant bundle and run it with ONNX Runtime.

Imports only the standard library, numpy and onnxruntime, so this one file can be copied next to a bundle
and run on a Raspberry Pi, a Jetson or any machine with onnxruntime. The bundle format is documented in
``runtimes/README.md``.

    sess = Session("path/to/bundle")              # verifies every file's sha256, builds the provider chain
    outputs = sess.run({"x": x})                   # or sess.run(x), or sess.run(camera_frame_uint8_hwc)
    embeddings, outputs = sess.run_text(["a robot arm", "a gripper"])   # bundles with a tokenizer
    print(sess.placement)                          # {provider: nodes it runs}

    python edgequant_runtime.py BUNDLE --input x.npy|x.npz|frame.png [--bench] [--allow-fallback] [--save o.npz]
    python edgequant_runtime.py BUNDLE --text "a robot arm" --text "a gripper" [--reference (the fp32 model)]

Text goes through the bundle's own ``edgequant_text.py`` (which needs the ``tokenizers`` package), imported
only when text is used, so array and image bundles need nothing beyond numpy and onnxruntime.

No silent fallback: a provider of the chain that this onnxruntime lacks, nodes that ONNX Runtime placed on a
provider outside the chain, or a first (preferred) provider that got no node at all, are an error unless
``allow_fallback=True``, which logs exactly what runs where.
ONNX Runtime itself only warns. Node placement is read from ONNX Runtime's profiler (one run on zeros).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

__all__ = ["BundleError", "IMAGE_SUFFIXES", "InputError", "ProviderError", "RuntimeAdapterError", "SCHEMA_VERSION",
           "Session", "expected_input", "preprocess_image", "read_image", "read_png", "resize_bilinear", "sha256_file", "to_channels",
           "verify_bundle"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TEXT_ADAPTER = "edgequant_text.py"
CPU = "CPUExecutionProvider"

log = logging.getLogger("edgequant_runtime")


class RuntimeAdapterError(Exception):
    """A problem with the bundle, the input or the machine, reported as one line."""


class BundleError(RuntimeAdapterError):
    """The bundle is missing a file, was changed or truncated, or is from a newer schema."""


class InputError(RuntimeAdapterError):
    """An input has the wrong name, shape or dtype, or cannot be read."""


class ProviderError(RuntimeAdapterError):
    """A requested execution provider is missing, or ONNX Runtime placed nodes elsewhere."""

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


# --- the bundle -----------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """File → its sha256 hex digest, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_bundle(bundle_dir: str | os.PathLike) -> dict:
    """Bundle folder → its manifest, after checking the schema and every listed file's size and sha256."""
    root = Path(bundle_dir)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not an edgequant bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath} is not valid JSON ({exc}); copy the bundle again") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("schema") != "edgequant.bundle" or not isinstance(version, int):
        raise BundleError(f"{mpath} is not an edgequant bundle manifest (no schema 'edgequant.bundle' with an "
                          "integer schema_version)")
    if version > SCHEMA_VERSION:
        raise BundleError(f"{mpath} has schema_version {version}, newer than this runtime reads ({SCHEMA_VERSION}): "
                          "use the edgequant_runtime.py shipped inside that bundle")
    files = manifest.get("files") or {}
    needed = [(manifest.get("model") or {}).get("file")]
    if manifest.get("tokenizer"):  # a text bundle: its tokenizer and text adapter are verified like the model
        tok = manifest["tokenizer"]
        needed += [tok.get("file"), *tok.get("files", []), TEXT_ADAPTER]
    for name in needed:
        if name not in files:
            raise BundleError(f"{mpath} lists no checksum for {name!r}, which the bundle needs; export the bundle "
                              "again")
    for name, meta in files.items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle; copy the whole bundle folder")
        size = path.stat().st_size
        if "bytes" in meta and size != meta["bytes"]:
            raise BundleError(f"{path} has {size} bytes, the manifest says {meta['bytes']}: the file is truncated or "
                              "changed; copy the bundle again")
        if sha256_file(path) != meta.get("sha256"):
            raise BundleError(f"{path} does not match its sha256 in {MANIFEST}: the file was changed; copy the "
                              "bundle again")
    return manifest


# --- PNG frames without extra packages ------------------------------------------------------------------------

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type → samples per pixel


def read_png(path: str | os.PathLike) -> np.ndarray:
    """8-bit non-interlaced PNG file → uint8 array (H, W) for grey, (H, W, 3|4) for colour (palette expanded)."""
    data = Path(path).read_bytes()
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
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    except zlib.error as exc:
        raise InputError(f"{path}: damaged PNG data ({exc})") from None
    stride = width * bpp
    if raw.size != height * (stride + 1):
        raise InputError(f"{path}: PNG data has {raw.size} bytes, expected {height * (stride + 1)}")
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_GREY_MODES = ("1", "L", "LA", "I", "I;16")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Image file → uint8 array (H, W) for grey, (H, W, 3) for colour (alpha dropped, palette expanded).

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
        img = read_png(path)
        return img[:, :, :3] if img.ndim == 3 and img.shape[2] == 4 else img
    try:
        with Image.open(path) as im:
            im = im.convert("L") if im.mode in _GREY_MODES else im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as exc:
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


class Session:
    """An edgequant bundle loaded on this machine's onnxruntime with the bundle's provider chain.

    ``providers``: "auto" (the manifest's chain) or a list of provider names (options still come from the
    manifest when it names the provider). ``allow_fallback``: run anyway when a provider is missing or nodes
    land outside the chain, and log what runs where; otherwise that is a :class:`ProviderError`.
    ``reference``: open the bundle's fp32 reference model instead of the int8 one (to check int8 on the device).
    """

    def __init__(self, bundle_dir: str | os.PathLike, providers: str | list[str] = "auto", *,
                 allow_fallback: bool = False, reference: bool = False) -> None:
        import onnxruntime as ort

        self.path = Path(bundle_dir)
        self.manifest = verify_bundle(self.path)
        self._text = None
        entry = self.manifest.get("reference_model") if reference else self.manifest["model"]
        if not entry or entry.get("file") not in self.manifest["files"]:
            raise BundleError(f"{self.path} has no fp32 reference model; run the int8 model (no reference=True / "
                              "--reference)")
        runtime = self.manifest.get("runtime") or {}
        declared = {p["name"]: dict(p.get("options") or {}) for p in runtime.get("providers") or []}
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
        options = [self._options(declared.get(n, {})) for n in chain]
        so = self._session_options(ort, runtime, strict=not allow_fallback and CPU not in chain)
        model = str(self.path / entry["file"])
        with tempfile.TemporaryDirectory(prefix="edgequant-rt-") as tmp:
            # profiled for one run on zeros, which names the provider of every kernel; end_profiling() then
            # switches the profiler off for the runs that follow
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, "placement")
            try:
                self._session = ort.InferenceSession(model, so, providers=list(zip(chain, options)))
            except Exception as exc:  # ORT raises its own exception types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ProviderError(f"{model}: onnxruntime could not place the model on {', '.join(chain)}: "
                                    f"{first}") from None
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
        self.inputs = {i.name: i for i in self._session.get_inputs()}
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._pre = self.manifest.get("preprocess")

    def _options(self, options: dict) -> dict:
        """Provider options; relative cache paths (keys ending in _path) are taken inside the bundle folder."""
        out = {}
        for key, value in options.items():
            if key.endswith("_path") and value and not os.path.isabs(value):
                value = str(self.path / value)
                os.makedirs(value, exist_ok=True)
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
        for i in self._session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
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
            raise InputError(f"input {name!r} has shape {list(arr.shape)}, the model takes {shape} (batch axis first)")
        return np.ascontiguousarray(arr)

    def run(self, inputs) -> dict[str, np.ndarray]:
        """{input name: array} (or one array for a single-input model; a uint8 (H, W[, C]) frame when the
        manifest has image pre-processing) → {output name: array}."""
        if not isinstance(inputs, dict):
            if len(self.inputs) != 1:
                raise InputError(f"the model has inputs {', '.join(self.inputs)}: pass a dict {{name: array}}")
            inputs = {next(iter(self.inputs)): inputs}
        unknown = sorted(set(inputs) - set(self.inputs))
        missing = sorted(set(self.inputs) - set(inputs))
        if unknown or missing:
            raise InputError(f"inputs {', '.join(unknown) or '-'} are not the model's and {', '.join(missing) or '-'} "
                             f"are missing; the model takes {', '.join(self.inputs)}")
        feed = {n: self._prepare(n, v) for n, v in inputs.items()}
        return dict(zip(self.output_names, self._session.run(self.output_names, feed)))

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
        """The bundle's own (verified) edgequant_text.py, imported on first use, with its tokenizer loaded."""
        if self._text is not None:
            return self._text
        if not self.manifest.get("tokenizer"):
            raise InputError(f"{self.path} takes arrays, not text: its manifest has no tokenizer; pass arrays to "
                             "run() (--input)")
        name = "_edgequant_text_" + self.manifest["files"][TEXT_ADAPTER]["sha256"][:16]
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, self.path / TEXT_ADAPTER)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
        try:
            self._text = module.TextInputs(str(self.path), self.manifest)
        except ImportError as exc:
            if exc.name != "tokenizers":
                raise
            raise RuntimeAdapterError(f"{self.path} takes text, which needs the tokenizers package here: pip "
                                      "install tokenizers") from None
        except Exception as exc:  # the tokenizers package raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{self.path / self.manifest['tokenizer']['file']}: the tokenizers package cannot load "
                              f"it ({first}); install a newer tokenizers") from None
        return self._text


# --- command line ---------------------------------------------------------------------------------------------


def _read_input(path: str, sess: Session) -> dict[str, np.ndarray]:
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
        return {name: read_image(p)}
    if suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    elif suffix == ".npy":
        arrays = {next(iter(sess.inputs)): np.load(p, allow_pickle=False)}
    else:
        raise InputError(f"{p}: not a file this bundle takes; it takes {wants}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgequant_runtime.py", description="Run an edgequant bundle.")
    parser.add_argument("bundle", help="bundle folder (with manifest.json)")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", help=".npy / .npz (one array per input) / .png or .jpg frame (image bundles)")
    given.add_argument("--text", action="append", help="a text, for bundles with a tokenizer (repeat for more)")
    parser.add_argument("--providers", default="auto", help="comma-separated provider names (default: the manifest's)")
    parser.add_argument("--allow-fallback", action="store_true", help="run even if a provider is missing; say where")
    parser.add_argument("--bench", action="store_true", help="time 50 runs after 5 warm-up runs")
    parser.add_argument("--save", metavar="OUT.npz", help="save the outputs (and text embeddings) here")
    parser.add_argument("--reference", action="store_true", help="run the fp32 reference model, not the int8 one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        providers = "auto" if args.providers == "auto" else [p.strip() for p in args.providers.split(",") if p.strip()]
        sess = Session(args.bundle, providers, allow_fallback=args.allow_fallback, reference=args.reference)
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
    except RuntimeAdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(sess.describe())
    for name, value in outputs.items():
        line = f"{name}: shape {list(value.shape)} {value.dtype}"
        if value.ndim == 2 and value.shape[1] > 1:
            line += f"  argmax {np.argmax(value, axis=1).tolist()}"
        print(line)
    if args.text:
        _print_embeddings(embeddings, sess.manifest.get("pooling"))
    if args.save:
        np.savez(args.save, **outputs, **({"embeddings": embeddings} if embeddings is not None else {}))
    if args.bench:
        ms = np.sort(np.array(times)) * 1e3
        print(f"latency over {len(ms)} runs: median {np.median(ms):.3f} ms, p90 {ms[int(0.9 * len(ms))]:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
