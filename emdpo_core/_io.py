"""Atomic file writes: every file the package writes goes through :func:`atomic_write`.

A reader never sees a half-written file and concurrent writers never collide: the content
goes to a fresh temporary file in the destination's folder (unique name, so two writers never
share it), is flushed and fsynced, and then renamed over the destination in one step
(``os.replace`` is atomic on POSIX and Windows within one file system). If anything fails
before the rename, the temporary file is removed and the destination keeps its old content.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_write", "check_writable"]

# The process's umask, read once at import (reading it means setting it, which is not
# thread safe, so it is not done per write): new files get 0o666 & ~umask, as open() gives.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", *, encoding: str = "utf-8", newline=None):
    """Open a temporary file next to ``path`` for writing; on a clean exit it replaces
    ``path`` atomically, on an exception it is removed and ``path`` is untouched.

    ``mode`` is "wb" or "w" (text, with ``encoding`` and ``newline``). The new file gets the
    permissions a plain ``open(path, "w")`` would give (umask applied), not mkstemp's 0600.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode: expected 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        kw = {} if mode == "wb" else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, mode, **kw) as f:
            fd = -1                      # owned by f now
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_writable(path, what: str) -> None:
    """Fail now (ValueError naming ``what`` and the path) when ``path`` cannot be written:
    its folder is missing and cannot be made, is not a folder, or refuses a new file. Used
    before long runs so that they do not end in an error after the work is done."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path}: is a folder; expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot be written ({e.strerror or e})") from None
