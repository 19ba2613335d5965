"""Atomic bundle folders: a reader of OUT sees the whole old bundle or the whole new one, never a mix or nothing.

How (Linux): the new bundle is written into a sibling folder ``.OUT.partial-XXXX``; every file and the folder
are fsynced; then ``renameat2(RENAME_EXCHANGE)`` swaps the two folders in one step (OUT always exists), the
parent folder is fsynced, and the old bundle, now under the partial name, is removed. We chose the exchange
over versioned folders behind a symlink because OUT stays a plain folder (``cp -r``, ``rsync`` and OTA packers
copy it as is) and needs no garbage collection of versions. A reader that opened OUT just before the swap
keeps reading the old folder through its handle; if the old files are removed under it, it opens OUT again
(``edgequant_runtime.open_bundle`` does this) and gets the whole new bundle.

Where the exchange is not available (not Linux, or a file system without it) OUT is renamed aside and the new
folder renamed in: there is a moment in which OUT does not exist, which a reader sees as "no bundle".

A writer holds an exclusive ``flock`` on its partial folder while it works; folders of a run that was killed
(``.OUT.partial-*`` that nobody holds) are removed by the next write into the same parent. Folders are
created with mode 0777 and files 0666, less the umask, like any other file the user writes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so leftovers are not cleaned automatically
    fcntl = None

__all__ = ["Interrupted", "Staging", "committed_writes", "exchange", "remove_leftovers", "write_file_atomic"]

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "armv7l": 382, "armv8l": 382, "riscv64": 276, "ppc64le": 357}


committed_writes: list[Path] = []  # every folder this process made visible, in order (the CLI's Ctrl-C message)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a write; ``written`` is the folder that holds the complete new bundle, or None when the
    output was left as it was."""

    def __init__(self, written: Path | None):
        super().__init__()
        self.written = written


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where the
    system or file system cannot (the caller falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    args = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if fn is not None:  # glibc >= 2.28, musl >= 1.2.3
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        result = fn(*args)
    else:
        number = _SYS_RENAMEAT2.get(os.uname().machine)
        if number is None:
            return False
        libc.syscall.restype = ctypes.c_long
        result = libc.syscall(ctypes.c_long(number), ctypes.c_int(args[0]), ctypes.c_char_p(args[1]),
                              ctypes.c_int(args[2]), ctypes.c_char_p(args[3]), ctypes.c_uint(args[4]))
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that the names in it (a new file, a rename) survive a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync folders
        pass
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def remove_leftovers(parent: Path, name: str) -> list[Path]:
    """Remove ``.NAME.partial-*`` (and ``.NAME.old-*``, an older layout) folders in ``parent`` that no running
    writer holds → the folders removed."""
    removed = []
    if fcntl is None:
        return removed
    for entry in parent.glob(f".{name}.*-*"):
        if not entry.name.startswith((f".{name}.partial-", f".{name}.old-")) or entry.is_symlink() \
                or not entry.is_dir():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            continue
        try:
            if _try_lock(fd):  # nobody holds it: the run that made it is gone
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d folder(s) left by interrupted exports: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def write_file_atomic(path: Path, data: bytes) -> None:
    """Bytes → ``path`` via a sibling temporary file, fsynced and renamed over it (never half a file)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _sigint_deferred():
    """Hold SIGINT back (main thread, POSIX) for the few system calls that must not be split."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class Staging:
    """A partial folder beside ``out`` that becomes ``out`` in one step: ``with Staging(out) as s: s.write(name,
    data); ...; s.commit()``. Leaving the block without ``commit`` removes the folder; ``out`` is untouched."""

    def __init__(self, out: Path):
        self.out = out
        self.parent = out.parent
        self.folder: Path | None = None
        self._fd: int | None = None
        self.committed = False

    def __enter__(self) -> Staging:
        self.parent.mkdir(parents=True, exist_ok=True)
        parent_fd = os.open(self.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            if fcntl is not None:  # one writer at a time cleans and creates, so nobody removes a folder being made
                fcntl.flock(parent_fd, fcntl.LOCK_EX)
            remove_leftovers(self.parent, self.out.name)
            self.folder = self.parent / f".{self.out.name}.partial-{secrets.token_hex(6)}"
            os.mkdir(self.folder, 0o777)
            self._fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            _try_lock(self._fd)
        finally:
            os.close(parent_fd)  # closing releases the parent's lock
        return self

    def write(self, name: str, data: bytes) -> None:
        """A file of the bundle, written and fsynced."""
        _write(self.folder / name, data)

    def commit(self) -> None:
        """Make the folder ``out`` (fsync it, swap it in, fsync the parent), then remove the old bundle."""
        fsync_dir(self.folder)
        with _sigint_deferred():  # a Ctrl-C here is taken after ``committed`` says what is on disk
            self._swap()

    def _swap(self) -> None:
        if self.out.exists() or self.out.is_symlink():
            if not exchange(self.folder, self.out):
                aside = self.parent / f".{self.out.name}.old-{secrets.token_hex(6)}"
                os.replace(self.out, aside)
                try:
                    os.replace(self.folder, self.out)
                except BaseException:
                    os.replace(aside, self.out)
                    raise
                self.folder = aside
        else:
            os.replace(self.folder, self.out)
            self.folder = None
        self.committed = True
        committed_writes.append(self.out)
        fsync_dir(self.parent)

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if self.folder is not None and self.folder.is_symlink():  # OUT was a link, swapped out
                self.folder.unlink()
            elif self.folder is not None:  # the unfinished new bundle, or after a commit the old one
                shutil.rmtree(self.folder, ignore_errors=True)
        except KeyboardInterrupt:  # a second Ctrl-C while cleaning: the next run removes the rest
            pass
        finally:
            if self._fd is not None:
                os.close(self._fd)
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
            raise Interrupted(self.out if self.committed else None) from None
