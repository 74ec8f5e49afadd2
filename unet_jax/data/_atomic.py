"""Folder outputs written atomically, and replaced only when they are ours.

Every folder this package writes (a data cache, a phantom dataset) is built in a hidden
sibling and renamed into place, so a reader never sees a half-written folder and a failure
leaves nothing behind. ``overwrite`` replaces only an empty folder or one that the same
writer produced (recognised by ``is_ours``): a mistyped ``--out`` must not delete a dataset,
a home directory or anything else.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["check_target", "new_temp_dir", "swap_in"]


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
    """An empty hidden sibling of ``out`` (same file system, so the final rename is atomic).

    Created with ``mkdir`` rather than ``tempfile.mkdtemp`` so that it gets the usual
    permissions (0777 minus the umask), not mkdtemp's private 0700, once renamed into place.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
