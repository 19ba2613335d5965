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
           "SelfTest", "Session", "check_cpu", "cpu_features", "describe_cpu", "expected_input", "int8_saturates",
           "preprocess_image", "read_image", "read_png", "resize_bilinear", "sha256_file", "to_channels",
           "verify_bundle"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TEXT_ADAPTER = "edgequant_text.py"
GENERATE_ADAPTER = "edgequant_generate.py"
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
    if manifest.get("selftest"):  # golden data is checked like the model: a changed file is a BundleError
        needed.append((manifest.get("selftest") or {}).get("file"))
    if manifest.get("generation"):  # a decoder bundle: its tokenizer and generation adapter, likewise
        needed += [manifest["generation"].get("tokenizer"), GENERATE_ADAPTER]
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


# --- the CPU this runs on -------------------------------------------------------------------------------------
# Which int8 arithmetic a CPU computes depends on a few instruction-set extensions. On x86-64, ONNX Runtime's
# fused u8*s8 kernels use VPMADDUBSW (16-bit pair sums that saturate with full-range 8-bit weights) unless the
# CPU has AVX-512 VNNI or AVX-VNNI (VPDPBUSD, exact 32-bit sums). On aarch64, every int8 kernel accumulates in
# 32 bits (SDOT/UDOT with asimddp, SMMLA with i8mm, widening multiplies otherwise), so nothing saturates.
# x86 flags come from the CPUID instruction itself (a 30-byte function run through ctypes): /proc/cpuinfo shows
# the host's flags even to a program that an emulator (qemu -cpu Haswell) runs on a smaller CPU.

X86_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # either one gives exact 32-bit u8*s8 dot products

# (leaf, subleaf, register index in (eax, ebx, ecx, edx), bit) of each flag in CPUID's answer.
_CPUID_BITS = {"avx2": (7, 0, 1, 5), "avx512f": (7, 0, 1, 16), "avx512bw": (7, 0, 1, 30),
               "avx512_vnni": (7, 0, 2, 11), "avx_vnni": (7, 1, 0, 4), "amx_int8": (7, 0, 3, 25)}
# void cpuid(uint32 leaf, uint32 subleaf, uint32 out[4]) for the System V x86-64 calling convention:
# push rbx; mov eax, edi; mov ecx, esi; mov r8, rdx; cpuid; mov [r8], eax; mov [r8+4], ebx; mov [r8+8], ecx;
# mov [r8+12], edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("5389f889f14989d00fa2418900418958044189480841895 00c5bc3".replace(" ", ""))


def _cpuid_flags() -> set[str] | None:
    """x86-64 Linux/macOS: the X86_FLAGS the CPUID instruction reports, or None where code cannot be run."""
    import ctypes
    import mmap

    if os.name != "posix":
        return None
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):  # W^X kernels refuse writable+executable pages
        return None
    try:
        buf.write(_CPUID_CODE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        func = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(addr)
        regs = (ctypes.c_uint32 * 4)()
        func(0, 0, regs)
        max_leaf, answers = regs[0], {}
        flags = set()
        for name, (leaf, sub, reg, bit) in _CPUID_BITS.items():
            if leaf > max_leaf:
                continue
            if (leaf, sub) not in answers:
                func(leaf, sub, regs)
                answers[(leaf, sub)] = tuple(regs)
            if answers[(leaf, sub)][reg] >> bit & 1:
                flags.add(name)
        del func, addr
        return flags
    finally:
        try:
            buf.close()
        except BufferError:  # a ctypes view still points into it; the page goes with the process
            pass


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
    they were read}. x86 flags come from CPUID (then /proc/cpuinfo), aarch64 flags from /proc/cpuinfo."""
    import platform

    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    flags, source = None, "unknown"
    if arch == "x86_64":
        flags, source = _cpuid_flags(), "cpuid"
        if flags is None:
            flags, source = _proc_cpuinfo_flags(X86_FLAGS), "/proc/cpuinfo"
    elif arch == "aarch64":
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
    ``allow_saturating_cpu``: run a bundle whose int8 arithmetic this CPU cannot compute (full-range weights on
    x86 without VNNI) instead of raising a :class:`ProviderError`; the outputs then differ from the report.
    """

    def __init__(self, bundle_dir: str | os.PathLike, providers: str | list[str] = "auto", *,
                 allow_fallback: bool = False, reference: bool = False, allow_saturating_cpu: bool = False) -> None:
        import onnxruntime as ort

        self.path = Path(bundle_dir)
        self.manifest = verify_bundle(self.path)
        self.cpu = cpu_features()
        if not reference:
            degraded = check_cpu(self.manifest, self.cpu, allow=allow_saturating_cpu, where=f"{self.path}: ")
            if degraded:
                log.warning("%s", degraded)
        self._text = None
        self._generator = None
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
        """The bundle's own (verified) edgequant_text.py, imported on first use, with its tokenizer loaded."""
        if self._text is not None:
            return self._text
        if not self.manifest.get("tokenizer"):
            if self.manifest.get("generation"):
                raise InputError(f"{self.path} generates text, it does not embed it: use generate() (--generate)")
            raise InputError(f"{self.path} takes arrays, not text: its manifest has no tokenizer; pass arrays to "
                             "run() (--input)")
        module = self._bundle_module(TEXT_ADAPTER)
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


    def _bundle_module(self, filename: str):
        """A device module that travels in the bundle (verified with the model), imported once per content."""
        name = f"_edgequant_{Path(filename).stem}_" + self.manifest["files"][filename]["sha256"][:16]
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, self.path / filename)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # before running it: dataclasses look their module up there
            try:
                spec.loader.exec_module(module)
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
                self._generator = module.Generator(self._session, str(self.path), self.manifest)
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


def _load_golden(root: Path, spec: dict, inputs: dict, outputs: list[str]) -> list[tuple[dict, dict]]:
    """The verified golden file → [(inputs, expected outputs)] per sample; BundleError when it does not fit."""
    path = root / str(spec.get("file", ""))
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
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
    cases = _load_golden(sess.path, spec, sess.inputs, sess.output_names)
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
    parser.add_argument("--allow-saturating-cpu", action="store_true", help="run a full-range int8 bundle on an x86 "
                        "CPU without VNNI, whose outputs then differ from the report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        providers = "auto" if args.providers == "auto" else [p.strip() for p in args.providers.split(",") if p.strip()]
        sess = Session(args.bundle, providers, allow_fallback=args.allow_fallback, reference=args.reference,
                       allow_saturating_cpu=args.allow_saturating_cpu)
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
    except RuntimeAdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
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
