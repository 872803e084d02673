"""Atomic, checksummed files for the trainer's EM state and the aggregated policy.

Every file is written to a temporary name in its folder, flushed to disk, then renamed over
the target (``os.replace``), so a reader sees the old file or the new one, never half of one.
Array files carry a SHA-256 of their contents; a file whose checksum does not match (a
truncated copy, a flipped bit) is refused with a ValueError naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np

_CHECKSUM_KEY = "__sha256__"
_META_KEY = "__meta__"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then
    rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(arrays: dict, meta_bytes: bytes) -> str:
    h = hashlib.sha256(meta_bytes)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_arrays(path: str, arrays: dict, meta: dict) -> None:
    """NumPy arrays plus a JSON-able ``meta`` dict in one checksummed ``.npz`` file."""
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    payload = {name: np.asarray(a) for name, a in arrays.items()}
    payload[_META_KEY] = np.frombuffer(meta_bytes, dtype=np.uint8)
    payload[_CHECKSUM_KEY] = np.frombuffer(_digest(arrays, meta_bytes).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **payload)
    atomic_write_bytes(path, buf.getvalue())


def load_arrays(path: str):
    """(arrays, meta) from :func:`save_arrays`; ValueError naming the file when it is missing
    pieces, unreadable or its checksum does not match."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            payload = {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: damaged or not an emdpo-core state file ({e})") from None
    if _CHECKSUM_KEY not in payload or _META_KEY not in payload:
        raise ValueError(f"{path}: not an emdpo-core state file (no checksum or metadata)")
    expected = payload.pop(_CHECKSUM_KEY).tobytes().decode(errors="replace")
    meta_bytes = payload.pop(_META_KEY).tobytes()
    if _digest(payload, meta_bytes) != expected:
        raise ValueError(f"{path}: checksum mismatch, the file is damaged; refusing to load it")
    return payload, json.loads(meta_bytes)


def replace_dir(tmp_dir: str, target: str) -> None:
    """Move a finished folder ``tmp_dir`` to ``target``, replacing an existing one: the old
    folder is renamed aside first, so ``target`` is always either complete or absent."""
    target = os.path.abspath(target)
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(target))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(tmp_dir, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
