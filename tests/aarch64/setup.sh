#!/usr/bin/env bash
# Build an emulated aarch64 (ARM64) Python 3.11 + numpy + onnxruntime environment on an x86-64 Debian host,
# so ONNX Runtime's ARM64 kernels (the int8 ones above all) can be run and checked against x86 here.
#
#   tests/aarch64/setup.sh ROOT_DIR      (.ci/run: ~/.cache/edgequant/aarch64, kept between runs)
#   ROOT_DIR/python -c 'import platform, onnxruntime; print(platform.machine(), onnxruntime.__version__)'
#
# Layout of ROOT_DIR:
#   rootfs/  arm64 Debian bookworm sysroot: debootstrap's first stage plus the python3.11 packages
#   wheels/  the aarch64 wheels pip downloaded
#   site/    those wheels unpacked (put on PYTHONPATH by the wrapper)
#   python   wrapper: qemu-aarch64-static -L rootfs rootfs/usr/bin/python3.11 ...
#
# Idempotent: every step leaves a marker in ROOT_DIR/.done/ and is skipped on the next run. Delete a marker
# (or ROOT_DIR) to redo a step. Environment overrides:
#   ORT_VERSION, NUMPY_VERSION  wheel pins (default: the project's .ci/constraints.txt, so x86 and aarch64 match)
#   DEBIAN_MIRROR               mirror for debootstrap (default: debootstrap's own default)
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 ROOT_DIR" >&2
    exit 2
fi

START=$SECONDS
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
mkdir -p "$1"
ROOT=$(cd "$1" && pwd)
ROOTFS=$ROOT/rootfs
DONE=$ROOT/.done
mkdir -p "$DONE"

log() { printf '[aarch64-setup %4ss] %s\n' "$((SECONDS - START))" "$*"; }

# The CI pins, so that a difference between x86 and aarch64 outputs is the architecture's, not a version's.
pin() {  # pin PACKAGE FALLBACK
    local v=""
    if [ -f "$REPO/.ci/constraints.txt" ]; then
        v=$(sed -n "s/^$1==\([^ ;#]*\).*/\1/p" "$REPO/.ci/constraints.txt" | head -n1)
    fi
    echo "${v:-$2}"
}
ORT_VERSION=${ORT_VERSION:-$(pin onnxruntime 1.32.0)}
NUMPY_VERSION=${NUMPY_VERSION:-$(pin numpy 2.4.6)}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    # debootstrap needs root (it creates device nodes and sets ownership) and so does apt-get.
    command -v sudo >/dev/null || { echo "run as root (or install sudo)" >&2; exit 1; }
    SUDO=sudo
fi

# --- 1. host tools -------------------------------------------------------------------------------------------
# qemu-user-static is bookworm's qemu 7.2. No binfmt_misc registration is needed (or used): the wrapper calls
# qemu-aarch64-static explicitly, which also works inside containers where binfmt_misc is not mounted.
if command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null; then
    log "host tools: qemu-aarch64-static and debootstrap present"
else
    log "host tools: apt-get install qemu-user-static debootstrap"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-user-static debootstrap >/dev/null
fi

# --- 2. arm64 sysroot: debootstrap first stage ---------------------------------------------------------------
# Only the first stage (--foreign): it downloads and unpacks without running any arm64 binary, so no chroot and
# no binfmt are needed. minbase keeps it small; python3.11-minimal + libpython3.11-stdlib (and their deps:
# libssl3, libffi8, libexpat1, libsqlite3-0, ...) are downloaded to var/cache/apt/archives but not unpacked.
# libstdc++6 and libgcc-s1 (needed by onnxruntime) are already in minbase's required set; naming them keeps
# that explicit should the set ever change.
if [ -f "$DONE/debootstrap" ]; then
    log "rootfs: debootstrap first stage already done"
else
    log "rootfs: debootstrap --foreign --arch=arm64 --variant=minbase bookworm (downloads ~40 MB)"
    # A half-finished first stage cannot be resumed, and the later steps' markers describe the old rootfs.
    $SUDO rm -rf "$ROOTFS"
    rm -f "$DONE/python-debs" "$DONE/cpuinfo"
    # shellcheck disable=SC2086  # DEBIAN_MIRROR is optional: unset means debootstrap's default mirror
    $SUDO debootstrap --foreign --arch=arm64 --variant=minbase \
        --include=python3.11-minimal,libpython3.11-stdlib,libstdc++6,libgcc-s1 \
        bookworm "$ROOTFS" ${DEBIAN_MIRROR:-} >"$ROOT/debootstrap.log" 2>&1 \
        || { tail -n 20 "$ROOT/debootstrap.log" >&2; exit 1; }
    touch "$DONE/debootstrap"
fi

# --- 3. unpack the packages the first stage only downloaded --------------------------------------------------
# rootfs/debootstrap/base lists them, debpaths maps each to its .deb. Not `dpkg -x`: it replaces bookworm's
# merged-/usr symlinks (bin, lib, sbin -> usr/...) with real directories, which splits the libraries over two
# trees; tar --keep-directory-symlink writes through the symlinks as dpkg itself would.
if [ -f "$DONE/python-debs" ]; then
    log "rootfs: python3.11 packages already unpacked"
else
    log "rootfs: unpacking $(wc -w <"$ROOTFS/debootstrap/base") packages (python3.11 and its libraries)"
    # shellcheck disable=SC2013  # the file is one line of space-separated package names
    for pkg in $(cat "$ROOTFS/debootstrap/base"); do
        deb=$(awk -v p="$pkg" '$1 == p { print $2 }' "$ROOTFS/debootstrap/debpaths")
        [ -n "$deb" ] || { echo "no .deb for $pkg in debootstrap/debpaths" >&2; exit 1; }
        dpkg-deb --fsys-tarfile "$ROOTFS$deb" | $SUDO tar -xf - -C "$ROOTFS" --keep-directory-symlink
    done
    [ -x "$ROOTFS/usr/bin/python3.11" ] || { echo "python3.11 missing after unpacking" >&2; exit 1; }
    touch "$DONE/python-debs"
fi

# --- 4. the emulated CPU and its /proc/cpuinfo ---------------------------------------------------------------
# qemu 7.2 does not emulate /proc/cpuinfo for aarch64 guests, so the guest reads the host's x86 one. ONNX
# Runtime >= 1.28 parses it with pytorch/cpuinfo at import, finds no ARM core and dereferences NULL ("qemu:
# uncaught target signal 11" at `import onnxruntime`). qemu -L serves any absolute path from the sysroot first
# when the file exists there, so rootfs/proc/cpuinfo fixes it. (debootstrap made rootfs/proc a symlink to the
# host's /proc; as a plain directory, every other /proc path still falls through to the host.)
# The file has to describe the CPU that -cpu emulates (make_cpuinfo.py reads it from the guest), which is why the
# CPU is chosen here and baked into the wrapper, not per run. cortex-a76 is a Raspberry Pi 5's core (SDOT int8
# GEMM, no i8mm/SVE); cortex-a72 = Pi 4 (no dot-product), cortex-a53 = Pi 3 / Zero 2, neoverse-n1, and max
# (i8mm, SVE, SME) pick other MLAS kernel paths. AARCH64_CPU=NAME switches an existing ROOT_DIR in seconds.
PREVIOUS_CPU=$(cut -d' ' -f1 "$DONE/cpuinfo" 2>/dev/null || true)
AARCH64_CPU=${AARCH64_CPU:-${PREVIOUS_CPU:-cortex-a76}}
NPROC=$(getconf _NPROCESSORS_CONF)  # one entry per host CPU, matching the host /sys the guest also reads
if [ -f "$DONE/cpuinfo" ] && [ "$(cat "$DONE/cpuinfo")" = "$AARCH64_CPU $NPROC" ]; then
    log "rootfs: /proc/cpuinfo for -cpu $AARCH64_CPU already written"
else
    log "rootfs: writing /proc/cpuinfo for -cpu $AARCH64_CPU"
    $SUDO rm -rf "$ROOTFS/proc"
    $SUDO mkdir -p "$ROOTFS/proc"
    qemu-aarch64-static -cpu "$AARCH64_CPU" -L "$ROOTFS" "$ROOTFS/usr/bin/python3.11" \
        "$HERE/make_cpuinfo.py" "$NPROC" | $SUDO tee "$ROOTFS/proc/cpuinfo" >/dev/null
    grep -q '^CPU part' "$ROOTFS/proc/cpuinfo" || { echo "make_cpuinfo.py failed" >&2; exit 1; }
    echo "$AARCH64_CPU $NPROC" >"$DONE/cpuinfo"
fi

# --- 5. aarch64 wheels ---------------------------------------------------------------------------------------
# Only numpy is needed besides onnxruntime itself: its other requirements (protobuf, flatbuffers, packaging,
# sympy, coloredlogs) are not imported by `import onnxruntime` / InferenceSession, hence --no-deps.
# Wheels are zips with no install-time logic, so unpacking them onto PYTHONPATH is a complete install; this
# avoids needing pip (and ensurepip, which Debian's python3.11-minimal lacks) inside the emulator.
WANT="onnxruntime==$ORT_VERSION numpy==$NUMPY_VERSION"
if [ -f "$DONE/wheels" ] && [ "$(cat "$DONE/wheels")" = "$WANT" ]; then
    log "wheels: $WANT already unpacked"
else
    log "wheels: pip download $WANT (aarch64, cp311)"
    rm -rf "$ROOT/wheels" "$ROOT/site"
    python3 -m pip download -q --no-deps --only-binary=:all: \
        --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 \
        --python-version 3.11 --implementation cp --abi cp311 \
        -d "$ROOT/wheels" "onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION"
    for whl in "$ROOT"/wheels/*.whl; do
        python3 -m zipfile -e "$whl" "$ROOT/site"
    done
    echo "$WANT" >"$DONE/wheels"
fi

# --- 6. wrapper ----------------------------------------------------------------------------------------------
# Python finds its stdlib from the executable's own location (rootfs/usr); -L lets the arm64 loader find
# rootfs/lib/ld-linux-aarch64.so.1 and the arm64 shared libraries. -cpu on the command line overrides any
# QEMU_CPU in the environment, which would no longer match rootfs/proc/cpuinfo.
log "wrapper: $ROOT/python (-cpu $AARCH64_CPU)"
cat >"$ROOT/python" <<EOF
#!/bin/sh
# aarch64 python3.11 under qemu user-mode emulation (-cpu $AARCH64_CPU); written by tests/aarch64/setup.sh.
# Absolute paths that also exist inside rootfs/ (e.g. /etc/...) resolve to the rootfs copy; others to the host.
HERE=\$(dirname "\$(readlink -f "\$0")")
unset PYTHONHOME
PYTHONPATH="\$HERE/site\${PYTHONPATH:+:\$PYTHONPATH}" exec qemu-aarch64-static -cpu $AARCH64_CPU \\
    -L "\$HERE/rootfs" "\$HERE/rootfs/usr/bin/python3.11" "\$@"
EOF
chmod +x "$ROOT/python"

# --- 7. smoke test -------------------------------------------------------------------------------------------
log "smoke test: import numpy, onnxruntime under emulation"
"$ROOT/python" -c '
import platform, numpy, onnxruntime as ort
assert platform.machine() == "aarch64", platform.machine()
print("  machine", platform.machine(), "| python", platform.python_version(), "| numpy", numpy.__version__,
      "| onnxruntime", ort.__version__, "|", ort.get_available_providers())
'
log "done: $ROOT/python"
