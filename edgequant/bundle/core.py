"""The bundle: a folder with the int8 model, the fp32 reference, ``manifest.json`` (the contract with the
device, documented in ``runtimes/README.md``), ``report.json`` and the device runtime adapter.

Bundles are written atomically (``atomic.py``): a reader of the output folder sees the whole old bundle or the
whole new one, and an interrupted or failed run leaves the output folder as it was. The manifest is written in
one canonical form and checked against the device adapter's schema before it is written; the sha256 of its
bytes is the bundle digest (``manifest.sha256`` beside it, ``bundle_digest`` in report.json), which an app pins.
"""

from __future__ import annotations

import errno
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .._runtime import edgequant_runtime as device
from .._runtime.edgequant_runtime import sha256_file  # one implementation, shared with the device
from ..errors import BundleError, device_errors, option
from .atomic import Staging
from .manifest import SCHEMA_VERSION

__all__ = ["DIGEST_FILE", "MANIFEST", "REPORT", "SCHEMA_VERSION", "Bundle", "canonical_manifest", "load_bundle",
           "sha256_file", "write_bundle"]

MANIFEST = "manifest.json"
REPORT = "report.json"
RUNTIME = "edgequant_runtime.py"
DIGEST_FILE = device.DIGEST_FILE
SIGNATURE_FILE = device.SIGNATURE_FILE


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk: its folder, parsed manifest and report."""

    path: Path
    manifest: dict[str, Any]
    report: dict[str, Any]
    digest: str = ""

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest["model"]["file"]

    @property
    def fp32_model_path(self) -> Path | None:
        ref = self.manifest.get("reference_model")
        return self.path / ref["file"] if ref else None


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty output folder unless ``force``; refuse a file in its place."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"output {out} is a file: pass a folder path as {option('out')}")
    try:
        full = out.is_dir() and any(out.iterdir())
    except OSError as exc:
        raise BundleError(f"output folder {out} cannot be read ({exc.strerror}); choose another folder") from None
    if full and not force:
        raise BundleError(f"output folder {out} is not empty: choose another folder or pass {option('force', True)} "
                          "to replace it")


def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """Manifest → the bytes written (and hashed into the digest): UTF-8 JSON, keys sorted, 2-space indent,
    non-ASCII escaped, one trailing newline; the same manifest always gives the same bytes."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n").encode()


def write_bundle(out: str | Path, files: dict[str, bytes], manifest: dict[str, Any], report: dict[str, Any], *,
                 force: bool = False) -> Bundle:
    """File contents + manifest + report → a complete bundle folder at ``out`` (atomically replaced)."""
    out = Path(out)
    check_out_dir(out, force)
    all_files = dict(files)
    all_files[RUNTIME] = resources.files("edgequant._runtime").joinpath(RUNTIME).read_bytes()
    for name in all_files:
        if not device.plain_name(name) or name in (MANIFEST, REPORT, DIGEST_FILE, SIGNATURE_FILE):
            raise BundleError(f"bundle file name {name!r} is not a plain file name of its own (no folder, no '..')")
    manifest = dict(manifest)
    manifest["files"] = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                         for name, data in sorted(all_files.items())}
    try:
        raw = canonical_manifest(manifest)
        device.validate_manifest(json.loads(raw), MANIFEST)  # never write a manifest the device would refuse
    except (ValueError, device.BundleError) as exc:
        raise BundleError(f"the exporter built an invalid manifest: {exc}") from None
    digest = device.bundle_digest(raw)
    report = {**report, "bundle_digest": digest}
    try:
        with Staging(out.absolute()) as stage:
            for name, data in all_files.items():
                stage.write(name, data)
            stage.write(MANIFEST, raw)
            stage.write(DIGEST_FILE, f"{digest}\n".encode())
            stage.write(REPORT, (json.dumps(report, indent=2) + "\n").encode())
            stage.commit()
    except OSError as exc:
        why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        raise BundleError(f"cannot write the bundle to {out}: {why} ({exc.filename or out}); free space or choose "
                          f"another folder as {option('out')}; {out} is as it was") from None
    return Bundle(out, manifest, report, digest)


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """A bundle folder → :class:`Bundle`; with ``verify``, every file's size and sha256 must match the manifest
    (the device adapter's check, which is the contract)."""
    path = Path(path)
    with device_errors():
        read = device.open_bundle(path, keep=[], all_files=verify)
    rpath = path / REPORT
    try:
        report = json.loads(rpath.read_text(encoding="utf-8")) if rpath.is_file() else {}
    except (OSError, ValueError) as exc:
        raise BundleError(f"{rpath} cannot be read ({exc}); export the bundle again") from None
    return Bundle(path, read.manifest, report, read.digest)
