"""unet_jax._io: files and folders appear whole or not at all, under one temporary-name scheme."""

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from unet_jax._io import FolderLock, atomic_write, new_temp_dir, swap_in, write_bytes, write_json, write_text

TEMP = re.compile(r"^\.(?P<name>.+)\.\d+-[0-9a-f]{8}\.(tmp|old)$")


def test_a_file_is_written_under_a_hidden_sibling_then_renamed(tmp_path):
    seen = []

    def write(tmp):
        seen.append(Path(tmp))
        Path(tmp).write_text("new")
        assert not (tmp_path / "a.txt").exists()  # nothing at the final name yet

    assert atomic_write(tmp_path / "a.txt", write) == tmp_path / "a.txt"
    (tmp,) = seen
    assert tmp.parent == tmp_path and TEMP.match(tmp.name)["name"] == "a.txt" and tmp.name.endswith(".tmp")
    assert (tmp_path / "a.txt").read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    write_text(tmp_path / "a.txt", "old")

    def half_then_fail(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.txt", half_then_fail)
    assert (tmp_path / "a.txt").read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(ValueError, match="Circular reference"):  # encoded before the file is touched
        loop = []
        loop.append(loop)
        write_json(tmp_path / "a.txt", loop)
    assert (tmp_path / "a.txt").read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_files_get_the_usual_permissions_not_private_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_bytes(tmp_path / "sub" / "b.bin", b"\x00\x01")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_bytes() == b"\x00\x01"


def test_write_json_ends_with_a_newline_and_strings_what_json_cannot_hold(tmp_path):
    path = write_json(tmp_path / "r.json", {"run": tmp_path, "n": 1})
    assert path.read_text().endswith("}\n")
    assert json.loads(path.read_text()) == {"run": str(tmp_path), "n": 1}
    assert write_json(tmp_path / "s.json", [1], indent=None).read_text() == "[1]\n"


def test_a_path_that_is_a_folder_is_refused_by_its_name(tmp_path):
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        write_text(tmp_path, "x")


def test_folders_use_the_same_scheme_and_replace_the_old_one_whole(tmp_path):
    out = tmp_path / "cache"
    for content in ("first", "second"):
        tmp = new_temp_dir(out)
        assert TEMP.match(tmp.name)["name"] == "cache" and tmp.name.endswith(".tmp")
        (tmp / "data.txt").write_text(content)
        swap_in(tmp, out)
        assert (out / "data.txt").read_text() == content and os.listdir(tmp_path) == ["cache"]


def test_folder_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    path = tmp_path / "train.lock"
    with FolderLock(path, "run folder"):
        assert json.loads(path.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    assert not path.exists()
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))  # another machine's: cannot be checked
    with pytest.raises(ValueError, match=r"in use by process 1 on host 'elsewhere' .*delete the lock file"):
        FolderLock(path, "run folder").acquire()
    path.write_text("{half written")  # garbage: stale
    lock = FolderLock(path).acquire()
    path.write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))  # replaced by someone else
    lock.release()
    assert path.exists()  # not ours to delete
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with FolderLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
