"""The prepared cache (round trip, atomic writes), the phantom generator and the data CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _data_helpers import COUNTS, make_phantom

from unet_jax.cli import main
from unet_jax.data import ReadOptions, load_busi
from unet_jax.data import cache as cache_mod
from unet_jax.data.cache import load_cache, prepare, save_cache
from unet_jax.data.phantom import write_phantom


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return make_phantom(tmp_path_factory.mktemp("cache") / "phantom")


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_phantom_is_deterministic(tmp_path):
    a = write_phantom(tmp_path / "a", {"benign": 3, "malignant": 3, "normal": 1}, size=(32, 32), seed=5, duplicates=1)
    b = write_phantom(tmp_path / "b", {"benign": 3, "malignant": 3, "normal": 1}, size=(32, 32), seed=5, duplicates=1)
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*.png"))
    assert files == sorted(p.relative_to(b.root) for p in b.root.rglob("*.png"))
    assert all((a.root / f).read_bytes() == (b.root / f).read_bytes() for f in files)
    with pytest.raises(ValueError, match="exists"):
        write_phantom(tmp_path / "a")
    assert _entries(tmp_path) == ["a", "b"]


def test_cache_round_trip(phantom, tmp_path):
    ds = load_busi(phantom.root, ReadOptions(size=(32, 40), channels=3))
    save_cache(ds, tmp_path / "c")
    assert _entries(tmp_path / "c") == ["arrays.npz", "index.json"]
    got = load_cache(tmp_path / "c")
    for field in ("images_u8", "masks", "labels", "original_sizes", "hashes"):
        np.testing.assert_array_equal(getattr(got, field), getattr(ds, field))
        assert getattr(got, field).dtype == getattr(ds, field).dtype
    assert got.ids == ds.ids and got.mask_files == ds.mask_files
    assert all((a == b).all() for a, b in zip(got.original_masks, ds.original_masks))
    assert len(got.original_masks) == len(ds)
    assert load_cache(tmp_path / "c", original_masks=False).original_masks == ()
    assert _entries(tmp_path) == ["c"]


def test_prepare_is_atomic(phantom, tmp_path, monkeypatch):
    out = tmp_path / "c"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cache_mod.np, "savez_compressed", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(phantom.root, out, ReadOptions(size=(16, 16)))
    assert _entries(tmp_path) == []  # neither the cache nor a temp folder
    monkeypatch.undo()
    prepare(phantom.root, out, ReadOptions(size=(16, 16)))
    before = (out / "arrays.npz").read_bytes()
    monkeypatch.setattr(cache_mod.np, "savez_compressed", boom)
    with pytest.raises(RuntimeError):
        prepare(phantom.root, out, ReadOptions(size=(24, 24)), overwrite=True)
    assert _entries(tmp_path) == ["c"] and (out / "arrays.npz").read_bytes() == before
    monkeypatch.undo()
    prepare(phantom.root, out, ReadOptions(size=(24, 24)), overwrite=True)
    assert load_cache(out).images_u8.shape[1:3] == (24, 24) and _entries(tmp_path) == ["c"]
    with pytest.raises(ValueError, match="exists"):
        prepare(phantom.root, out)


def test_bad_cache_is_a_clear_error(tmp_path):
    (tmp_path / "index.json").write_text("{}")
    with pytest.raises(ValueError, match="not a readable data cache"):
        load_cache(tmp_path)


def test_cli_check_json(phantom, capsys):
    assert main(["data", "check", str(phantom.root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["images"] == COUNTS and doc["problems"] == []
    assert set(doc["merged_masks"]) == set(phantom.multi_mask)
    assert len(doc["duplicate_groups"]) >= 1


def test_cli_check_text_and_problems(phantom, tmp_path, capsys):
    assert main(["data", "check", str(phantom.root)]) == 0
    out = capsys.readouterr().out
    assert "problems: 0" in out and "benign" in out
    bad = tmp_path / "bad"
    write_phantom(bad, {"benign": 2, "malignant": 1, "normal": 1}, size=(16, 16))
    (bad / "benign" / "benign (1)_mask.png").unlink()
    assert main(["data", "check", str(bad), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["problems"]) == 1 and "missing mask" in doc["problems"][0]["reason"]


def test_cli_prepare_phantom_split(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "phantom",
                "--out",
                str(tmp_path / "p"),
                "--size",
                "32",
                "--counts",
                "4",
                "3",
                "2",
                "--duplicates",
                "1",
            ]
        )
        == 0
    )
    assert main(["data", "prepare", str(tmp_path / "p"), "--out", str(tmp_path / "c"), "--size", "16", "24"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_cache(tmp_path / "c").images_u8.shape == (9, 16, 24, 1)
    assert main(["data", "prepare", str(tmp_path / "p"), "--out", str(tmp_path / "c")]) == 2
    assert "exists" in capsys.readouterr().err
    assert (
        main(
            ["data", "split", str(tmp_path / "c"), "--out", str(tmp_path / "s.json"), "--protocol", "kfold", "--k", "3"]
        )
        == 0
    )
    doc = json.loads((tmp_path / "s.json").read_text())
    assert sorted(doc["partitions"]) == ["fold_0", "fold_1", "fold_2"]
    (tmp_path / "p" / "normal" / "normal (1).png").write_bytes(b"")
    assert main(["data", "prepare", str(tmp_path / "p"), "--out", str(tmp_path / "d")]) == 2
    assert "normal (1).png" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert main(["data", "prepare", str(tmp_path / "p"), "--out", str(tmp_path / "d"), "--skip-bad"]) == 0
    assert "skipped" in capsys.readouterr().out


# ---- outputs never destroy data, and are never half-written -------------------------------
def test_prepare_refuses_an_output_in_or_around_the_dataset(tmp_path):
    src = write_phantom(tmp_path / "src", {"benign": 2, "malignant": 1, "normal": 1}, size=(16, 16)).root
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    for out in (src, src / "benign", src / "cache", tmp_path):
        with pytest.raises(ValueError, match="lies inside the dataset folder"):
            prepare(src, out, ReadOptions(size=(8, 8)), overwrite=True)
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


def test_overwrite_replaces_only_a_cache_or_an_empty_folder(phantom, tmp_path):
    ds = load_busi(phantom.root, ReadOptions(size=(8, 8), keep_original=False))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not empty and not a data cache"):
        save_cache(ds, precious, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        save_cache(ds, tmp_path / "file", overwrite=True)
    with pytest.raises(ValueError, match="'.*file' is not a directory"):
        save_cache(ds, tmp_path / "file" / "c")
    (tmp_path / "empty").mkdir()
    save_cache(ds, tmp_path / "empty", overwrite=True)
    save_cache(ds, tmp_path / "empty", overwrite=True)  # a cache replaces a cache
    assert load_cache(tmp_path / "empty").ids == ds.ids
    assert _entries(tmp_path) == ["empty", "file", "precious"]  # no temp folders left


def test_outputs_get_the_usual_permissions(phantom, tmp_path):
    # tempfile.mkdtemp would leave the renamed folder private (0700)
    umask = os.umask(0)
    os.umask(umask)
    ds = load_busi(phantom.root, ReadOptions(size=(8, 8), keep_original=False))
    for out in (
        save_cache(ds, tmp_path / "c"),
        write_phantom(tmp_path / "p", {"benign": 1, "malignant": 1, "normal": 1}, size=(8, 8)).root,
    ):
        assert out.stat().st_mode & 0o777 == 0o777 & ~umask, out


def test_damaged_cache_index_is_a_clear_error(phantom, tmp_path):
    ds = load_busi(phantom.root, ReadOptions(size=(8, 8), keep_original=False))
    save_cache(ds, tmp_path / "c")
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    del index["labels"]
    (tmp_path / "c" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"damaged data cache \(KeyError: 'labels'\)"):
        load_cache(tmp_path / "c")
    (tmp_path / "c" / "index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a readable data cache"):
        load_cache(tmp_path / "c")


# ---- the phantom generator refuses what would make an invalid or silently wrong dataset ---
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"counts": {"benign": 2, "malignant": 1, "normal": 0}}, r"counts\['normal'\] must be"),
        ({"counts": {"benign": -1, "malignant": 1, "normal": 1}}, r"counts\['benign'\] must be"),
        ({"counts": {"benign": 1, "malignant": 1, "normal": 1, "cyst": 1}}, "unknown class"),
        ({"size": (4, 64)}, r"both >= 8 .*got \(4, 64\)"),
        ({"duplicates": -1}, "duplicates must be >= 0"),
        ({"duplicates": 50}, "duplicates=50 is more than these counts allow"),
        ({"multi_mask_fraction": 1.5}, r"multi_mask_fraction must be in \[0, 1\]"),
    ],
)
def test_phantom_refuses_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_phantom(tmp_path / "p", **{"size": (16, 16), **kwargs})
    assert _entries(tmp_path) == []


def test_overwrite_never_deletes_a_file_added_to_a_cache_or_a_phantom(phantom, tmp_path):
    ds = load_busi(phantom.root, ReadOptions(size=(8, 8), keep_original=False))
    cache = save_cache(ds, tmp_path / "cache")
    (cache / "notes.txt").write_text("a user's file")
    with pytest.raises(ValueError, match=r"it holds 'notes.txt', not part of a data cache"):
        save_cache(ds, cache, overwrite=True)
    assert (cache / "notes.txt").read_text() == "a user's file"
    counts = {"benign": 2, "malignant": 1, "normal": 1}
    root = write_phantom(tmp_path / "p", counts, size=(8, 8), seed=1).root
    (root / "benign" / "my scan.png").write_bytes(b"a user's image")
    (root / "extra").mkdir()
    with pytest.raises(ValueError, match=r"it holds 'benign/my scan.png', 'extra', not part of a phantom dataset"):
        write_phantom(root, counts, size=(8, 8), seed=2, overwrite=True)
    assert (root / "benign" / "my scan.png").read_bytes() == b"a user's image"
    (root / "benign" / "my scan.png").unlink()
    (root / "extra").rmdir()
    write_phantom(root, {"benign": 3, "malignant": 1, "normal": 1}, size=(8, 8), seed=2, overwrite=True)
    assert save_cache(ds, tmp_path / "cache2") and save_cache(ds, tmp_path / "cache2", overwrite=True)


def test_phantom_overwrite_replaces_only_a_phantom(tmp_path):
    counts = {"benign": 2, "malignant": 1, "normal": 1}
    write_phantom(tmp_path / "p", counts, size=(8, 8), seed=1)
    info = write_phantom(tmp_path / "p", counts, size=(8, 8), seed=2, overwrite=True)
    assert json.loads((info.root / "phantom.json").read_text())["seed"] == 2
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes").write_text("keep")
    with pytest.raises(ValueError, match="not empty and not a phantom dataset"):
        write_phantom(tmp_path / "home", counts, size=(8, 8), overwrite=True)
    assert (tmp_path / "home" / "notes").read_text() == "keep"
    assert _entries(tmp_path) == ["home", "p"]


def test_smallest_phantom_still_has_a_lesion_in_every_lesion_image(tmp_path):
    info = write_phantom(
        tmp_path / "p", {"benign": 12, "malignant": 12, "normal": 2}, size=(8, 8), multi_mask_fraction=0.5
    )
    ds = load_busi(info.root, ReadOptions(size=(8, 8)))
    for i, cls in enumerate(ds.class_names):
        assert ds.original_masks[i].any() == (cls != "normal"), ds.ids[i]


def test_cli_reports_file_system_errors_in_one_line(phantom, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["data", "split", str(phantom.root), "--out", str(tmp_path / "file" / "s.json")]) == 2
    err = capsys.readouterr().err
    *progress, last = err.splitlines()  # the reading progress, then the error on its own line
    assert all(line.startswith("reading images ") for line in progress)
    assert last.startswith("unet-jax data: error: ") and "file" in last
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["phantom", "prepare", "split"])
def test_cli_outputs_are_replaced_only_with_overwrite(phantom, tmp_path, capsys, command):
    # `data split` used to overwrite a manifest silently, and to name its temporary file
    # when --out was a folder; the three commands now behave alike.
    out = tmp_path / ("s.json" if command == "split" else "out")
    argv = {
        "phantom": ["data", "phantom", "--counts", "2", "1", "1", "--size", "16"],
        "prepare": ["data", "prepare", str(phantom.root), "--size", "16"],
        "split": ["data", "split", str(phantom.root)],
    }[command] + ["--out", str(out)]
    assert main(argv) == 0
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*")} if out.is_dir() else out.read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    expected = f"unet-jax data: error: output {str(out)!r} exists; pass overwrite=True (--overwrite)"
    assert expected in capsys.readouterr().err
    assert written == ({p: p.stat().st_mtime_ns for p in out.rglob("*")} if out.is_dir() else out.read_bytes())
    assert main(argv + ["--overwrite"]) == 0
    capsys.readouterr()
    # Never someone else's file or folder, and the error names the user's path.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    target = other / "keep.txt" if command == "split" else other
    assert main(argv[:-1] + [str(target), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unet-jax data: error: refusing to replace {str(target)!r}: it is not"), err
    assert (other / "keep.txt").read_text() == "keep" and _entries(other) == ["keep.txt"]


def test_cli_split_into_a_folder_names_the_folder(phantom, tmp_path, capsys):
    assert main(["data", "split", str(phantom.root), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unet-jax data: error: output {str(tmp_path)!r} is a folder; expected a file path"), err
    assert ".tmp" not in err and _entries(tmp_path) == []
