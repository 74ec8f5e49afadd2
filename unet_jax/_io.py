"""Files and folders that a reader never sees half-written, with one temporary-name scheme.

Everything this package writes is built under a hidden sibling name and renamed into place
(``os.replace``: atomic on one file system), so a killed process leaves either the old
output or the new one, never a mix; on an error the temporary is removed. A temporary is
named ``.NAME.PID-RANDOM.tmp`` beside its target (``.NAME.PID-RANDOM.old`` for a folder
being replaced): hidden, unique per writer, and recognisable by its ``.tmp`` suffix.

Files: :func:`atomic_write` (any writer given a path), :func:`write_bytes`,
:func:`write_text`, :func:`write_json`.

Folders (a data cache, a phantom dataset, an export): :func:`check_target`, then
:func:`new_temp_dir` (which first removes the temporaries of killed writers), fill it, then
:func:`swap_in`. ``overwrite`` replaces only an empty folder or one that the
same writer produced (recognised by ``is_ours``) and holding nothing but its own files
(``is_own``): a mistyped ``--out`` must not delete a dataset, a home directory or anything
else, nor an ``--overwrite`` the files a user added to an earlier output.

A folder one process at a time works in (a run folder): :class:`FolderLock`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "FolderLock",
    "atomic_write",
    "check_target",
    "foreign_entries",
    "new_temp_dir",
    "pid_alive",
    "remove_stale_temps",
    "swap_in",
    "write_bytes",
    "write_json",
    "write_text",
]


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
def check_target(
    out: Path,
    overwrite: bool,
    is_ours: Callable[[Path], bool],
    what: str,
    is_own: Callable[[Path, bool], bool] | None = None,
) -> None:
    """Raise ValueError unless ``out`` may be written: it does not exist, or ``overwrite``
    is set and ``out`` is an empty folder or a ``what`` (``is_ours(out)``) holding nothing
    but the writer's own files: ``is_own(relative path, is a folder)`` for every entry (a
    user's file added to an earlier output would be deleted with it; see
    :func:`foreign_entries`)."""
    if not out.exists() and not out.is_symlink():
        parent = next(p for p in out.absolute().parents if p.exists())
        if not parent.is_dir():
            raise ValueError(f"cannot write {str(out)!r}: {str(parent)!r} is not a directory")
        return
    if not overwrite:
        raise ValueError(f"output {str(out)!r} exists; pass overwrite=True (--overwrite) to replace it")
    if out.is_symlink() or not out.is_dir():
        raise ValueError(
            f"refusing to replace {str(out)!r}: it is not a directory; expected an empty folder or a {what}"
        )
    if any(out.iterdir()) and not is_ours(out):
        raise ValueError(
            f"refusing to replace {str(out)!r}: it is not empty and not a {what}; choose another output folder"
        )
    foreign = [] if is_own is None else foreign_entries(out, is_own)
    if foreign:
        shown = ", ".join(repr(name) for name in foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise ValueError(
            f"refusing to replace {str(out)!r}: it holds {shown}, not part of a {what} (--overwrite would "
            f"delete it with the old folder); move it or choose another output folder"
        )


def foreign_entries(out: Path, is_own: Callable[[Path, bool], bool]) -> list[str]:
    """The entries of the folder ``out`` (paths relative to it, the outermost of each
    branch) that ``is_own(relative path, is a folder)`` does not claim; a symbolic link is
    never one's own. The folders it claims are searched in turn."""
    found: list[str] = []

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            rel = entry.relative_to(out)
            is_dir = entry.is_dir() and not entry.is_symlink()
            if entry.is_symlink() or not is_own(rel, is_dir):
                found.append(str(rel))
            elif is_dir:
                walk(entry)

    walk(out)
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temporaries of ``out`` (``.NAME.PID-RANDOM.tmp``, or an older writer's
    ``.NAME.PID.tmp``) left by writers that died (their PID runs no more); returns what was
    removed. A ``.old`` folder is removed only when ``out`` exists: without it, the ``.old``
    folder may be the only copy left."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(\d+)(?:-[0-9a-f]{{8}})?\.(tmp|old)$")
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        m = pattern.match(entry.name)
        if m is None or pid_alive(int(m[1])) or (m[2] == "old" and not out.exists()):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def new_temp_dir(out: Path) -> Path:
    """An empty hidden sibling of ``out``, to fill and then :func:`swap_in`; the stale
    temporaries of ``out`` left by killed writers are removed first (:func:`remove_stale_temps`).

    Created with ``mkdir`` rather than ``tempfile.mkdtemp`` so that it gets the usual
    permissions (0777 minus the umask), not mkdtemp's private 0700, once renamed into place.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
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


# --------------------------------------------------------------------------------------
# A folder used by one process at a time
# --------------------------------------------------------------------------------------
class FolderLock:
    """A lock file (``O_CREAT | O_EXCL``) holding the owner's PID and host: while it exists,
    another process asking for it gets a ValueError naming that PID. A lock left by a
    process of this host that runs no more (killed), or that names this very process (a PID
    reused after a restart), is taken over; one of another host cannot be checked, so it is
    refused with the file to delete.

    Use as ``with FolderLock(folder / "train.lock", "run folder"): ...``.
    """

    def __init__(self, path: str | os.PathLike, what: str = "folder"):
        self.path, self.what = Path(path), what
        self._held = False

    def _owner(self) -> tuple[int | None, str]:
        try:
            info = json.loads(self.path.read_text())
            return int(info["pid"]), str(info.get("host", ""))
        except (OSError, ValueError, KeyError, TypeError):
            return None, ""  # being written this instant, or garbage: treated as stale below

    def acquire(self) -> FolderLock:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host = self._owner()
                if pid is not None and host and host != me["host"]:
                    raise ValueError(
                        f"{self.what} {str(self.path.parent)!r} is in use by process {pid} on host "
                        f"{host!r} (lock file {str(self.path)!r}); wait for it to finish, or delete the "
                        f"lock file if that process is gone"
                    ) from None
                if pid is not None and pid != me["pid"] and pid_alive(pid):
                    raise ValueError(
                        f"{self.what} {str(self.path.parent)!r} is in use by process {pid} (lock file "
                        f"{str(self.path)!r}); wait for it to finish, or choose another folder"
                    ) from None
                # stale: its process is gone (or had this PID before a restart: this process
                # holds no lock it did not release)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise ValueError(
            f"{self.what} {str(self.path.parent)!r}: could not take the lock file {str(self.path)!r} "
            f"(other processes keep replacing it)"
        )

    def release(self) -> None:
        if self._held:
            self._held = False
            if self._owner()[0] == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
