"""The bundle: a folder with the int8 model, the fp32 reference, ``manifest.json`` (the contract with the
device, documented in ``runtimes/README.md``), ``report.json`` and the device runtime adapter.

Bundles are written atomically: everything goes into a temporary sibling folder that is renamed into place
only when complete, so an interrupted or failed run leaves the output folder as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .._runtime.edgequant_runtime import sha256_file  # one implementation, shared with the device
from ..errors import BundleError, option

__all__ = ["MANIFEST", "REPORT", "SCHEMA_VERSION", "Bundle", "load_bundle", "sha256_file", "write_bundle"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
RUNTIME = "edgequant_runtime.py"


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk: its folder, parsed manifest and report."""

    path: Path
    manifest: dict[str, Any]
    report: dict[str, Any]

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
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BundleError(f"output folder {out} is not empty: choose another folder or pass {option('force', True)} "
                          "to replace it")


def write_bundle(out: str | Path, files: dict[str, bytes], manifest: dict[str, Any], report: dict[str, Any], *,
                 force: bool = False) -> Bundle:
    """File contents + manifest + report → a complete bundle folder at ``out`` (atomically replaced)."""
    out = Path(out)
    check_out_dir(out, force)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as exc:
        raise BundleError(f"cannot create the output folder next to {out}: {exc.strerror}") from None
    try:
        runtime = resources.files("edgequant._runtime").joinpath(RUNTIME).read_bytes()
        all_files = dict(files)
        all_files[RUNTIME] = runtime
        for name, data in all_files.items():
            (tmp / name).write_bytes(data)
        manifest = dict(manifest)
        manifest["files"] = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                             for name in sorted(all_files)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, manifest, report)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=tmp.parent))
        os.rmdir(old)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """A bundle folder → :class:`Bundle`; with ``verify``, every file's sha256 must match the manifest."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path} is not an edgequant bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc}); the bundle is damaged, export it again") from None
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise BundleError(f"{mpath}: schema_version {version!r} is newer than this edgequant reads "
                          f"({SCHEMA_VERSION}); upgrade edgequant")
    if verify:
        # The device adapter's check is the contract (sizes, sha256, the files a bundle must list); use it here too.
        from .._runtime import edgequant_runtime as device

        try:
            device.verify_bundle(path)
        except device.BundleError as exc:
            raise BundleError(str(exc)) from None
    rpath = path / REPORT
    report = json.loads(rpath.read_text(encoding="utf-8")) if rpath.is_file() else {}
    return Bundle(path, manifest, report)
