"""Files and folders that a reader never sees half-written, with one temporary-name scheme.

Everything this package writes is built under a hidden sibling name and renamed into place
(``os.replace``: atomic on one file system), so a killed process leaves either the old
output or the new one, never a mix; on an error the temporary is removed. A temporary is
named ``.NAME.PID-RANDOM.tmp`` beside its target (``.NAME.PID-RANDOM.old`` for a folder
being replaced): hidden, unique per writer, and recognisable by its ``.tmp`` suffix.

Files: :func:`atomic_write` (any writer given a path), :func:`write_bytes`,
:func:`write_text`, :func:`write_json`.

Folders (a data cache, a phantom dataset): :func:`check_target`, then :func:`new_temp_dir`,
fill it, then :func:`swap_in`. ``overwrite`` replaces only an empty folder or one that the
same writer produced (recognised by ``is_ours``): a mistyped ``--out`` must not delete a
dataset, a home directory or anything else.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "check_target", "new_temp_dir", "swap_in", "write_bytes", "write_json", "write_text"]


def _sibling(path: Path, kind: str) -> Path:
    """A hidden, unused name beside ``path`` (same folder, hence same file system)."""
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}"


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary name beside ``path``, then move it onto
    ``path``. On any error the temporary file is removed and ``path`` is left as it was.

    The temporary file is created by ``write`` itself, so the result gets the usual
    permissions (0666 minus the umask), not a private 0600 as with ``tempfile.mkstemp``.
    """
    path = Path(path)
    if path.is_dir():  # else os.replace would fail naming the temporary file, not ``path``
        raise IsADirectoryError(errno.EISDIR, "is a folder; expected a file path", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` as the whole content of ``path``, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) as the whole content of ``path``, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> Path:
    """``value`` as JSON (a final newline; values JSON cannot hold, such as a Path, as
    their ``str``), atomically. The text is built before the file is touched, so a value
    that cannot be encoded leaves ``path`` as it was."""
    return write_text(path, json.dumps(value, indent=indent, default=str) + "\n")


# --------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------
def check_target(out: Path, overwrite: bool, is_ours: Callable[[Path], bool],
                 what: str) -> None:
    """Raise ValueError unless ``out`` may be written: it does not exist, or ``overwrite``
    is set and ``out`` is an empty folder or a ``what`` (``is_ours(out)``)."""
    if not out.exists() and not out.is_symlink():
        parent = next(p for p in out.absolute().parents if p.exists())
        if not parent.is_dir():
            raise ValueError(f"cannot write {str(out)!r}: {str(parent)!r} is not a directory")
        return
    if not overwrite:
        raise ValueError(f"output {str(out)!r} exists; pass overwrite=True (--overwrite) to "
                         f"replace it")
    if out.is_symlink() or not out.is_dir():
        raise ValueError(f"refusing to replace {str(out)!r}: it is not a directory; expected "
                         f"an empty folder or a {what}")
    if any(out.iterdir()) and not is_ours(out):
        raise ValueError(f"refusing to replace {str(out)!r}: it is not empty and not a "
                         f"{what}; choose another output folder")


def new_temp_dir(out: Path) -> Path:
    """An empty hidden sibling of ``out``, to fill and then :func:`swap_in`.

    Created with ``mkdir`` rather than ``tempfile.mkdtemp`` so that it gets the usual
    permissions (0777 minus the umask), not mkdtemp's private 0700, once renamed into place.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()
    return tmp


def swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, replacing an existing ``out`` folder.

    The old folder is first renamed aside and deleted only after the new one is in place;
    if the second rename fails the old one is put back.
    """
    if not out.exists():
        os.replace(tmp, out)
        return
    old = _sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
