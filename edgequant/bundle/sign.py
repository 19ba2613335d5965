"""Ed25519 signatures of a bundle, for fleets: ``manifest.sig`` holds the base64 signature of manifest.json's
bytes; the manifest lists every file's sha256, so the signature covers the whole bundle. The device checks it
with ``Session(bundle, public_key=...)`` (``--public-key``). Uses the ``cryptography`` package (the ``sign``
extra): Ed25519 is what it and OpenSSL provide, and we do not write our own."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from .._runtime import edgequant_runtime as device
from ..errors import BundleError
from .atomic import write_file_atomic

__all__ = ["sign_bundle"]


def sign_bundle(bundle: str | Path, key: str | Path) -> tuple[str, str]:
    """Bundle folder + Ed25519 private key (PEM file) → (bundle digest, public key fingerprint); writes
    ``manifest.sig`` into the bundle (atomically; the manifest and the digest do not change)."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        raise BundleError("signing needs the cryptography package: pip install 'edgequant[sign]'") from None
    bundle, key = Path(bundle), Path(key)
    try:
        read = device.open_bundle(bundle, keep=[], all_files=True)
    except device.BundleError as exc:
        raise BundleError(str(exc)) from None
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except OSError as exc:
        raise BundleError(f"key {key}: cannot read it ({exc.strerror})") from None
    except (ValueError, TypeError) as exc:
        raise BundleError(f"key {key} is not an unencrypted PEM private key ({exc}); make one with `openssl genpkey "
                          "-algorithm ed25519 -out KEY.pem`") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise BundleError(f"key {key} is a {type(private).__name__}, not Ed25519; make one with `openssl genpkey "
                          "-algorithm ed25519 -out KEY.pem`")
    signature = private.sign(read.manifest_bytes)
    write_file_atomic(bundle / device.SIGNATURE_FILE, base64.b64encode(signature) + b"\n")
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return read.digest, "sha256:" + hashlib.sha256(public).hexdigest()[:16]
