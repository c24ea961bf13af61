"""Output locations: checked with a real write before any compute; files replaced atomically.

A work directory or output folder that cannot be written (read-only mount, a path under a regular
file, no permission, a full disk) should fail in seconds with the path named, not after data
loading and compilation, and not as a traceback from deep inside a checkpoint writer.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import shutil
import tempfile
from collections.abc import Callable
from typing import IO


class StorageError(ValueError):
    """An output location that cannot be written; the message names it and says why."""


def require_writable(directory: str | pathlib.Path, what: str) -> pathlib.Path:
    """Create ``directory`` (and its parents) if needed, then create, write, flush and remove a
    tiny probe file in it. Returns the resolved path; raises StorageError naming ``what`` (e.g.
    "--workdir") and the path. Permission bits alone say nothing for root or on a read-only mount,
    so this writes instead of asking ``os.access``."""
    path = pathlib.Path(directory).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        try:
            os.write(fd, b"fwi_jax write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        failed = pathlib.Path(e.filename) if e.filename else path
        where = "" if failed == path or path in failed.parents else f" ({failed})"  # a parent
        raise StorageError(f"{what} {path} is not writable: {reason}{where}") from None
    return path.resolve()


def free_bytes(directory: str | pathlib.Path) -> int:
    """Bytes free for this user on the file system holding ``directory``."""
    return shutil.disk_usage(directory).free


def write_atomic(path: str | pathlib.Path, content: str | bytes | Callable[[IO[bytes]], None]):
    """Write ``path`` so that a concurrent reader (another process of the run, a resumed job)
    sees the old file or the whole new one, never a truncated one: a temporary file in the same
    folder, then ``os.replace``. ``content``: text (UTF-8), bytes, or a function that writes to
    the open binary file (``np.savez``). The temporary file is removed on any failure."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with 0o666 rather than tempfile.mkstemp (0o600): the file gets the permissions a
    # plain write would give under the user's umask, so colleagues can still read a run's files
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
