"""Atomic file writes and one wording for write failures.

A file grass writes is either the old version or the complete new one, never half
of each: the text goes to a temporary sibling, is flushed to disk, and renamed over
the target (a rename within a folder is atomic on POSIX filesystems). A failed
write removes its temporary file, so a full disk leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any


def write_atomic_bytes(path: Path, data: bytes) -> None:
    # a unique temporary name: two processes writing the same shared file (a cache
    # entry) never write into one temporary file
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_atomic_text(path: Path, text: str) -> None:
    write_atomic_bytes(path, text.encode("utf-8"))


def write_atomic_json(path: Path, data: Any) -> None:
    write_atomic_text(path, json.dumps(data, indent=2) + "\n")


_OS_ERROR = re.compile(r"os error (\d+)")


def describe_write_error(e: BaseException, path: Path | None = None) -> str:
    """'disk full', 'file size limit reached' or 'cannot write (...)', for an OSError
    or for the I/O errors safetensors raises as its own exception type. A short write
    reported without an errno (numpy's `tofile`: "N requested and M written") is
    explained from `path`, the file being written, where given."""
    code = getattr(e, "errno", None)
    if code is None:
        m = _OS_ERROR.search(str(e))
        code = int(m.group(1)) if m else None
    if code is None and path is not None:
        code = _short_write_cause(path)
    if code == errno.ENOSPC:
        return "disk full"
    if code == errno.EDQUOT:
        return "disk quota exceeded"
    if code == errno.EFBIG:
        return "file size limit reached"
    reason = getattr(e, "strerror", None) or (os.strerror(code) if code else str(e))
    return f"cannot write ({reason})"


def _short_write_cause(path: Path) -> int | None:
    """EFBIG when the file reached this process's file size limit, ENOSPC when its
    filesystem is full, else None: why a write stopped short."""
    import resource
    import shutil

    try:
        size = path.stat().st_size
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY and size >= soft:
            return errno.EFBIG
        if shutil.disk_usage(path.parent).free < (1 << 20):
            return errno.ENOSPC
    except OSError:
        return None
    return None
