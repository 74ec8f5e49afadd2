"""The prepared cache (round trip, atomic writes), the phantom generator and the data CLI."""

from __future__ import annotations

import json

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
    a = write_phantom(tmp_path / "a", {"benign": 3, "malignant": 3, "normal": 1}, size=(32, 32),
                      seed=5, duplicates=1)
    b = write_phantom(tmp_path / "b", {"benign": 3, "malignant": 3, "normal": 1}, size=(32, 32),
                      seed=5, duplicates=1)
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
    assert main(["data", "phantom", "--out", str(tmp_path / "p"), "--size", "32",
                 "--counts", "4", "3", "2", "--duplicates", "1"]) == 0
    assert main(["data", "prepare", str(tmp_path / "p"), "--out", str(tmp_path / "c"),
                 "--size", "16", "24"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_cache(tmp_path / "c").images_u8.shape == (9, 16, 24, 1)
    assert main(["data", "prepare", str(tmp_path / "p"), "--out", str(tmp_path / "c")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["data", "split", str(tmp_path / "c"), "--out", str(tmp_path / "s.json"),
                 "--protocol", "kfold", "--k", "3"]) == 0
    doc = json.loads((tmp_path / "s.json").read_text())
    assert sorted(doc["partitions"]) == ["fold_0", "fold_1", "fold_2"]
    (tmp_path / "p" / "normal" / "normal (1).png").write_bytes(b"")
    assert main(["data", "prepare", str(tmp_path / "p"), "--out", str(tmp_path / "d")]) == 2
    assert "normal (1).png" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert main(["data", "prepare", str(tmp_path / "p"), "--out", str(tmp_path / "d"),
                 "--skip-bad"]) == 0
    assert "skipped" in capsys.readouterr().out
