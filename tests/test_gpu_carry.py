"""benchmarks/gpu_carry.py: the folder carried to the device packs the RGB cache as a small
residual over the grayscale one and rebuilds it there bit for bit."""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pytest
from _data_helpers import make_cache_pair

gpu_carry = importlib.import_module("benchmarks.gpu_carry")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return make_cache_pair(tmp_path_factory.mktemp("carry"))


def _arrays(folder):
    with np.load(folder / "arrays.npz") as z:
        return {k: z[k] for k in z.files}


def test_pack_then_unpack_rebuilds_the_rgb_cache_bit_for_bit(caches, tmp_path):
    gray, rgb = caches
    info = gpu_carry.pack(gray, rgb, tmp_path / ".gpu", wheels=False)
    assert info["wheels"] == [] and info["bytes"] > 0
    carried = tmp_path / ".gpu"
    assert sorted(p.name for p in carried.iterdir()) == sorted(
        [gpu_carry.GRAY, gpu_carry.RESIDUAL, gpu_carry.RGB_INDEX]
    )
    with np.load(carried / gpu_carry.RESIDUAL) as z:
        residual = z["images_delta"]
    # The red square is the only colour: the residual is zero but there.
    assert 0 < np.count_nonzero(residual) < residual.size // 20
    rebuilt = gpu_carry.unpack(carried)
    want, got = _arrays(rgb), _arrays(rebuilt)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert (rebuilt / "index.json").read_bytes() == (rgb / "index.json").read_bytes()
    # Unpacking again replaces the folder; no temporary is left beside it.
    gpu_carry.unpack(carried)
    assert sorted(p.name for p in carried.iterdir()) == sorted(
        [gpu_carry.GRAY, gpu_carry.RESIDUAL, gpu_carry.RGB_INDEX, gpu_carry.RGB]
    )
    # Packing again replaces an earlier pack; nothing else stays beside it.
    gpu_carry.pack(gray, rgb, carried, wheels=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gpu"]


def test_pack_refuses_caches_that_do_not_pair(caches, tmp_path):
    gray, rgb = caches
    with pytest.raises(ValueError, match=r"options.channels is 1; expected 3"):
        gpu_carry.pack(gray, gray, tmp_path / "a", wheels=False)
    other = tmp_path / "other_rgb"
    shutil.copytree(rgb, other)
    index = json.loads((other / "index.json").read_text())
    index["shape"] = [index["shape"][0], 8, 8, 3]
    (other / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shape differs from .*gray"):
        gpu_carry.pack(gray, other, tmp_path / "b", wheels=False)
    with pytest.raises(ValueError, match=r"is not a data cache"):
        gpu_carry.pack(tmp_path, rgb, tmp_path / "c", wheels=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other_rgb"]  # nothing half-written


def test_pack_never_replaces_a_folder_it_did_not_write(caches, tmp_path):
    gray, rgb = caches
    before = {p.name: p.read_bytes() for p in rgb.iterdir()}
    with pytest.raises(ValueError, match=r"refusing to replace .*rgb.*not a gpu_carry pack"):
        gpu_carry.pack(gray, rgb, rgb, wheels=False)  # --out mistyped as the RGB cache
    assert {p.name: p.read_bytes() for p in rgb.iterdir()} == before


def test_the_wheels_are_this_machines_versions_of_what_the_device_lacks(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(gpu_carry.subprocess, "run", lambda cmd, check: calls.append(cmd))
    specs = gpu_carry.download_wheels(tmp_path)
    from importlib import metadata

    assert specs == [f"{n}=={metadata.version(n)}" for n in ("pydicom", "highdicom", "pyjpegls", "tensorboardX")]
    (cmd,) = calls
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "--no-deps" in cmd and cmd[-4:] == specs
    assert "manylinux2014_x86_64" in cmd and "--only-binary=:all:" in cmd


def test_main_reports_a_bad_folder_and_exits_2(tmp_path, capsys):
    assert gpu_carry.main(["unpack", str(tmp_path)]) == 2
    assert "is not a data cache" in capsys.readouterr().err
