"""One way to write a file so that a reader never sees it half-written."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it onto
    ``path`` (``os.replace``: atomic on one file system). On any error the temporary file
    is removed and ``path`` is left as it was."""
    path = Path(path)
    if path.is_dir():  # else os.replace would fail naming the temporary file, not ``path``
        raise IsADirectoryError(errno.EISDIR, "is a folder; expected a file path", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
