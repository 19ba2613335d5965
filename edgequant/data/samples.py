"""Calibration data: a folder or file (or an in-memory iterable) → :class:`Samples`, a lazy sequence of
``{input name: array}`` dicts without the batch axis.

Files are opened one at a time as calibration asks for them, so memory does not grow with the number of
samples. Shapes and dtypes are checked up front from the file headers; NaN/Inf is checked as samples are read.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._runtime.edgequant_runtime import preprocess_image, read_image
from ..errors import DataError, device_errors, spelled

__all__ = ["ImagePreprocess", "Sample", "Samples", "channel_fix", "image_mismatch", "load_samples"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_SINGLE = ""  # key of a sample from a .npy source, before it is bound to the model's only input


@dataclass(frozen=True)
class ImagePreprocess:
    """How an image file becomes a model input; recorded in the manifest so the device does the same."""

    resize: tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channel_order: str = "rgb"
    layout: str = "nchw"

    def __post_init__(self) -> None:
        if self.channel_order not in ("rgb", "bgr", "gray"):
            raise DataError(f"channel order must be rgb, bgr or gray, not {self.channel_order!r}")
        if self.layout not in ("nchw", "nhwc"):
            raise DataError(f"layout must be nchw or nhwc, not {self.layout!r}")
        if any(s == 0 for s in self.std):
            raise DataError("std must not contain 0")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise DataError(f"resize must be HEIGHTxWIDTH with positive sizes, not {self.resize!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["resize"] = list(self.resize) if self.resize else None
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["kind"] = "image"
        return d


class Sample(dict):
    """One sample, {input name: array}, that knows how it batches: ``batch_axes`` as :class:`Samples` has them
    (they travel with each sample, so a list of samples batches the same way)."""

    batch_axes: Mapping[str, int | None] = {}


class Samples(Sequence):
    """A lazy, indexable sequence of samples; each is a dict {input name: array without batch axis}.

    ``batch_axes``: {input: the axis of the graph input that batches stack along, or None for an input without
    one (recurrent state, a sample rate), which is fed as given}; empty until :meth:`with_batch_axes` binds the
    samples to a graph (then an input not named batches along axis 0)."""

    def __init__(self, loaders: Sequence, labels: Sequence[str], source: str,
                 preprocess: ImagePreprocess | None = None):
        self._loaders = list(loaders)
        self._labels = list(labels)
        self.source = source
        self.preprocess = preprocess
        self._rename: dict[str, str] = {}
        self.batch_axes: dict[str, int | None] = {}

    def __len__(self) -> int:
        return len(self._loaders)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        sample = self._loaders[index]()
        out = Sample()
        out.batch_axes = self.batch_axes
        for key, value in sample.items():
            arr = np.asarray(value)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = "NaN" if np.isnan(arr).any() else "Inf"
                raise DataError(f"{self._labels[index]}: contains {bad}; remove or fix this sample")
            out[self._rename.get(key, key)] = arr
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    def label(self, index: int) -> str:
        return self._labels[index]

    def subset(self, indices: Iterable[int]) -> Samples:
        idx = list(indices)
        sub = Samples([self._loaders[i] for i in idx], [self._labels[i] for i in idx], self.source, self.preprocess)
        sub._rename = dict(self._rename)
        sub.batch_axes = dict(self.batch_axes)
        return sub

    def with_batch_axes(self, axes: Mapping[str, int | None]) -> Samples:
        """The same samples, batched along ``axes`` ({input: axis, or None: fed as given}; see the class)."""
        bound = self.subset(range(len(self)))
        bound.batch_axes = dict(axes)
        return bound

    @property
    def keys(self) -> tuple[str, ...]:
        first = self._loaders[0]()
        return tuple(self._rename.get(k, k) for k in first)

    def bind(self, input_names: Sequence[str]) -> Samples:
        """Map the samples' keys onto the model's inputs; a bare array feeds a single-input model."""
        keys = self.keys
        if keys == (_SINGLE,):
            if len(input_names) != 1:
                raise DataError(f"{self.source}: the model has {len(input_names)} inputs ({', '.join(input_names)}) "
                                "but the data holds one array per sample; use .npz files keyed by input name")
            bound = self.subset(range(len(self)))
            bound._rename = {_SINGLE: input_names[0]}
            return bound
        missing = [n for n in input_names if n not in keys]
        extra = [k for k in keys if k not in input_names]
        if missing or extra:
            raise DataError(f"{self.source}: sample keys {list(keys)} do not match the model inputs "
                            f"{list(input_names)}; name the arrays in each .npz after the inputs")
        return self


def channel_fix(preprocess: ImagePreprocess, got: int, want: int) -> str | None:
    """Images read with ``preprocess`` give ``got`` channels where the model takes ``want`` → the image option
    that fixes it, in the caller's words (``--channels gray`` or ``ImagePreprocess(channel_order="gray")``)."""
    order = {1: "gray", 3: "rgb"}.get(want)
    if order is None or got == want:
        return None
    options = {"channel_order": order, **({"layout": preprocess.layout} if preprocess.layout != "nchw" else {})}
    python = ", ".join(f'{k}="{v}"' for k, v in options.items())
    return spelled(cli=f"--channels {order}", python=f"preprocess=ImagePreprocess({python})")


def image_mismatch(samples: Samples, reason: str) -> DataError | None:
    """A model that refused image samples (PyTorch's "expected input[...] to have 1 channels, but got 3") → a
    DataError naming the image option that fixes it, or None when the reason is not a channel count."""
    import re

    m = re.search(r"to have (\d+) channels, but got (\d+) channels", reason)
    if samples.preprocess is None or m is None:
        return None
    want, got = int(m.group(1)), int(m.group(2))
    fix = channel_fix(samples.preprocess, got, want)
    if fix is None:
        return None
    pre = samples.preprocess
    return DataError(f"{samples.source}: the images become {got}-channel inputs ({pre.channel_order}, {pre.layout}), "
                     f"but the model takes {want} channel{'s' if want > 1 else ''}: pass {fix}")


def load_samples(data: Any, *, preprocess: ImagePreprocess | None = None) -> Samples:
    """A path (folder of .npy/.npz/images, or one stacked .npy/.npz), or an iterable of arrays or dicts →
    :class:`Samples`, checked for consistent shapes and dtypes."""
    if isinstance(data, Samples):
        return data
    if isinstance(data, (str, Path)):
        samples = _from_path(Path(data), preprocess)
    elif isinstance(data, np.ndarray):
        samples = _stacked({_SINGLE: data}, "array", "sample")
    elif isinstance(data, Mapping):
        samples = _stacked(dict(data), "arrays", "sample")
    elif isinstance(data, Iterable):
        items = list(data)
        if not items:
            raise DataError("calibration data is empty: pass at least one sample")
        loaders = [(lambda it=it: it if isinstance(it, Mapping) else {_SINGLE: it}) for it in items]
        samples = Samples(loaders, [f"sample {i}" for i in range(len(items))], "calibration samples")
    else:
        raise DataError(f"cannot read calibration data from a {type(data).__name__}: pass a folder, a .npy/.npz file "
                        "or a list of arrays")
    _check_consistent(samples)
    return samples


def _from_path(path: Path, preprocess: ImagePreprocess | None) -> Samples:
    if not path.exists():
        raise DataError(f"calibration data {path} does not exist: pass a folder of .npy/.npz/image files or a "
                        ".npy/.npz file")
    if path.is_file():
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            return _stacked({_SINGLE: arr}, str(path), f"{path}")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            return _stacked(arrays, str(path), f"{path}")
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .npy, .npz or a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    kinds = {".npy": [], ".npz": [], "image": []}
    for p in files:
        suffix = p.suffix.lower()
        kinds["image" if suffix in IMAGE_SUFFIXES else suffix].append(p) if (
            suffix in IMAGE_SUFFIXES or suffix in kinds) else None
    present = [k for k, v in kinds.items() if v]
    if not present:
        raise DataError(f"calibration folder {path} has no .npy, .npz or image files: put one sample per file there")
    if len(present) > 1:
        raise DataError(f"calibration folder {path} mixes {' and '.join(present)} files: keep one kind per folder")
    kind = present[0]
    chosen = kinds[kind]
    if kind == ".npy":
        loaders = [(lambda p=p: {_SINGLE: np.load(p, allow_pickle=False)}) for p in chosen]
    elif kind == ".npz":
        loaders = [(lambda p=p: _read_npz(p)) for p in chosen]
    else:
        spec = (preprocess or ImagePreprocess()).to_dict()
        loaders = [(lambda p=p: {_SINGLE: preprocess_image(_read_image(p), spec)}) for p in chosen]
        return Samples(loaders, [str(p) for p in chosen], str(path), preprocess or ImagePreprocess())
    return Samples(loaders, [str(p) for p in chosen], str(path))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _read_image(path: Path) -> np.ndarray:
    """The device adapter's reader, so calibration and the device see the same pixels."""
    with device_errors():  # the device refuses frames over 16.7 MP before decoding; calibration photos may be larger
        return read_image(path, max_pixels=1 << 28)


def _stacked(arrays: dict[str, np.ndarray], source: str, label: str) -> Samples:
    """Arrays stacked along axis 0, one row per sample → Samples; a 0-d array (a sample rate, say) is the same
    in every sample."""
    lengths = {k: v.shape[0] for k, v in arrays.items() if v.ndim}
    if not lengths or any(n == 0 for n in lengths.values()):
        raise DataError(f"{source}: no samples (stack samples along axis 0)")
    if len(set(lengths.values())) != 1:
        raise DataError(f"{source}: arrays hold different numbers of samples {lengths}; stack each input along axis 0")
    n = next(iter(lengths.values()))
    loaders = [(lambda i=i: {k: np.asarray(v[i] if v.ndim else v) for k, v in arrays.items()}) for i in range(n)]
    return Samples(loaders, [f"{label}[{i}]" for i in range(n)], source)


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes from .npy/.npz headers without reading the data."""
    try:
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            return {_SINGLE: (tuple(arr.shape), arr.dtype)}
        out = {}
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                with zf.open(name) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(fh)
                out[name[:-4] if name.endswith(".npy") else name] = (tuple(shape), np.dtype(dtype))
        return out
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable {path.suffix} file ({exc})") from None


def _check_consistent(samples: Samples) -> None:
    if len(samples) == 0:
        raise DataError(f"{samples.source}: no samples")
    first = None
    for i in range(len(samples)):
        label = samples.label(i)
        path = Path(label)
        if path.suffix in (".npy", ".npz") and path.is_file():
            sig = {k: (s, d) for k, (s, d) in _header(path).items()}
        elif first is not None and i > 0 and samples.preprocess is not None:
            continue  # images are resized to one shape by pre-processing
        else:
            sample = samples._loaders[i]()
            sig = {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in sample.items()}
        for k, (_, dtype) in sig.items():
            if dtype.kind not in "fiub":
                raise DataError(f"{label}: array {k or 'data'!r} has dtype {dtype}; use float32 or integer arrays")
        if first is None:
            first, first_label = sig, label
        elif sig != first:
            raise DataError(f"{label}: {_describe(sig)} differs from {first_label}: {_describe(first)}; all samples "
                            "need the same keys, shapes (without batch axis) and dtypes")


def _describe(sig: dict) -> str:
    return ", ".join(f"{k or 'array'} {list(s)} {d}" for k, (s, d) in sorted(sig.items()))
