"""read_torch_checkpoint: PyTorch zip checkpoints read back without PyTorch.

torch (a test peer, from the ``test`` extra) writes the files; the reader must give back
exactly the values torch holds, and refuse everything that is not a state dict."""

from __future__ import annotations

import collections
import datetime
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from unet_jax.convert import pth
from unet_jax.convert.pth import TorchCheckpointError, read_torch_checkpoint

ZIP_PHRASE = "expected a zip archive written by torch.save"


def _save(obj, path: Path, **kwargs) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _assert_same(got: np.ndarray, t: torch.Tensor) -> None:
    """``got`` equals tensor ``t`` exactly: shape, dtype and bits (bfloat16 as float32)."""
    want = (t.float() if t.dtype == torch.bfloat16 else t).detach().contiguous().numpy()
    assert got.shape == want.shape
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.flags.c_contiguous and got.flags.writeable
    assert got.dtype.byteorder in ("=", "|")
    assert got.tobytes() == want.tobytes()  # bitwise, NaN payloads and -0.0 included


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy zip ``src`` to ``dst``, entry by entry through ``edit(name, data) -> data|None``
    (None drops the entry)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(TorchCheckpointError) as exc:
        read_torch_checkpoint(path, **kwargs)
    assert isinstance(exc.value, ValueError)
    msg = str(exc.value)
    assert path.name in msg
    return msg


# ----------------------------------------------------------------------------- values


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g) * 100
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 3.0e38, -1.5, 65504.0, 1e-7])
    return {
        "f32": x,
        "f64": x.double() / 3,
        "f16": x.half(),
        "bf16": x.bfloat16(),
        "bf16_special": special.bfloat16(),
        "f16_special": special.half(),
        "f32_special": special,
        "i64": torch.randint(-(2**62), 2**62, (7,), generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (2, 3), generator=g, dtype=torch.int32),
        "i16": torch.randint(-(2**15), 2**15 - 1, (5,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (4, 1), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "bool": torch.rand(6, generator=g) > 0.5,
        "c64": torch.randn(3, dtype=torch.complex64, generator=g),
        "u16": torch.arange(0, 65535, 4097).to(torch.uint16),  # _rebuild_tensor_v3
    }


def test_dtypes_round_trip_exactly(tmp_path):
    sd = _all_dtypes()
    got = read_torch_checkpoint(_save(sd, tmp_path / "dtypes.pth"))
    assert list(got) == list(sd)
    for k, t in sd.items():
        _assert_same(got[k], t)
    assert got["bf16"].dtype == np.float32 and got["f16"].dtype == np.float16
    assert got["u16"].dtype == np.uint16


def test_bfloat16_is_the_upper_half_of_float32(tmp_path):
    t = torch.randn(1000, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = read_torch_checkpoint(_save({"w": t}, tmp_path / "bf16.pth"))["w"]
    bits16 = t.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got.view(np.uint32), bits16.astype(np.uint32) << 16)
    np.testing.assert_array_equal(got.view(np.uint32), t.float().numpy().view(np.uint32))


def test_zero_d_and_empty_tensors(tmp_path):
    sd = {
        "scalar": torch.tensor(3.5),
        "int_scalar": torch.tensor(7),
        "bf16_scalar": torch.tensor(-2.25, dtype=torch.bfloat16),
        "empty": torch.zeros(0),
        "empty_2d": torch.zeros(0, 3),
        "empty_mid": torch.ones(2, 0, 4, dtype=torch.int64),
        "empty_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
    }
    got = read_torch_checkpoint(_save(sd, tmp_path / "shapes.pth"))
    for k, t in sd.items():
        _assert_same(got[k], t)
    assert got["scalar"].shape == () and got["scalar"][()] == 3.5
    assert got["empty_mid"].shape == (2, 0, 4)


def test_views_sharing_one_storage_are_read_once(tmp_path, monkeypatch):
    t = torch.arange(20.0).reshape(4, 5)
    sd = {
        "a": t[1:, 2:],  # storage offset 7, strides (5, 1)
        "b": t.t(),  # transposed
        "c": t[::2, 1::3],  # stepped
        "d": t[2],  # row view, offset 10
        "e": t[0, 0:0],  # empty view
        "f": t[3, 4],  # 0-d view at the last element
        "g": torch.arange(3.0).expand(4, 3),  # stride 0
    }
    path = _save(sd, tmp_path / "views.pth")
    with zipfile.ZipFile(path) as zf:  # torch wrote t's storage once, g's once
        assert sum("/data/" in n for n in zf.namelist()) == 2

    reads: list[str] = []
    real = pth._read_entry

    def spy(zf, entry, name, nbytes=None):
        reads.append(entry)
        return real(zf, entry, name, nbytes)

    monkeypatch.setattr(pth, "_read_entry", spy)
    got = read_torch_checkpoint(path)
    storage_reads = [r for r in reads if "/data/" in r]
    assert len(storage_reads) == len(set(storage_reads)) == 2
    for k, v in sd.items():
        _assert_same(got[k], v)
    got["a"][0, 0] = -1.0  # independent copies, not views of one another
    assert got["b"][2, 1] == 7.0


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 2),
    )
    net.train()
    net(torch.randn(2, 3, 5, 5))  # running stats and num_batches_tracked move
    return net


def test_module_state_dict(tmp_path):
    sd = _small_net().state_dict()
    got = read_torch_checkpoint(_save(sd, tmp_path / "net.pth"))
    assert list(got) == list(sd)
    for k, t in sd.items():
        _assert_same(got[k], t)
    assert got["1.num_batches_tracked"].dtype == np.int64
    assert got["1.num_batches_tracked"].shape == () and got["1.num_batches_tracked"] == 1
    assert got["0.weight"].shape == (4, 3, 3, 3)


def test_parameters_and_ordered_dict(tmp_path):
    p = torch.nn.Parameter(torch.randn(2, 3))
    sd = collections.OrderedDict(w=p, b=torch.nn.Parameter(torch.zeros(3), requires_grad=False))
    got = read_torch_checkpoint(_save(sd, tmp_path / "params.pth"))
    _assert_same(got["w"], p)
    _assert_same(got["b"], sd["b"])
    q = torch.nn.Parameter(torch.randn(4))
    q.note = "python attributes pickle via _rebuild_parameter_with_state"
    path = _save({"q": q}, tmp_path / "stateful.pth")
    with zipfile.ZipFile(path) as zf:
        assert b"_rebuild_parameter_with_state" in zf.read("stateful/data.pkl")
    _assert_same(read_torch_checkpoint(path)["q"], q)


def test_wrapped_checkpoint_and_key_selection(tmp_path):
    sd = _small_net().state_dict()
    opt = {"state": {0: {"step": 3}}, "param_groups": [{"lr": 0.1}]}
    path = _save({"model": sd, "epoch": 3, "optimizer": opt, "note": "hi"}, tmp_path / "wrapped.pth")
    for got in (read_torch_checkpoint(path), read_torch_checkpoint(path, key="model")):
        assert list(got) == list(sd)
        for k, t in sd.items():
            _assert_same(got[k], t)

    msg = _error(path, key="epoch")
    assert "'epoch'" in msg and "expected a state dict" in msg
    msg = _error(path, key="missing")
    assert "'missing'" in msg and "'model'" in msg and "'epoch'" in msg
    msg = _error(path, key="optimizer")  # a dict, but not of tensors
    assert "expected a tensor" in msg


def test_state_dict_and_params_wrappers_and_nesting(tmp_path):
    w = torch.randn(2, 2)
    got = read_torch_checkpoint(_save({"state_dict": {"w": w}, "step": 1}, tmp_path / "a.pth"))
    _assert_same(got["w"], w)
    got = read_torch_checkpoint(_save({"params": {"enc": {"w": w}, "b": w[0]}}, tmp_path / "b.pth"))
    assert sorted(got) == ["b", "enc.w"]
    _assert_same(got["enc.w"], w)
    got = read_torch_checkpoint(_save({"model": {"w": w}}, tmp_path / "only.pth"))
    assert list(got) == ["w"]  # a lone wrapper is unwrapped, not flattened to "model.w"
    got = read_torch_checkpoint(_save({"enc": {"conv": {"w": w}}}, tmp_path / "c.pth"))
    assert list(got) == ["enc.conv.w"]
    path = _save({"ema": {"model": {"w": w}}, "epoch": 2}, tmp_path / "d.pth")
    _assert_same(read_torch_checkpoint(path, key="ema.model")["w"], w)


def test_no_identifiable_state_dict_lists_the_keys(tmp_path):
    w = torch.randn(2)
    path = _save({"model": {"w": w}, "state_dict": {"w": w}, "epoch": 1}, tmp_path / "two.pth")
    msg = _error(path)
    assert "several candidate state dicts" in msg and "'epoch'" in msg
    path = _save({"weights": {"w": w}, "epoch": 1}, tmp_path / "none.pth")
    msg = _error(path)
    assert "top-level keys: ['weights', 'epoch']" in msg and "expected a tensor" in msg
    path = _save({"model": {"w": w, "step": 5}}, tmp_path / "leaf.pth")
    msg = _error(path, key="model")
    assert "'step'" in msg and "expected a tensor" in msg
    path = _save([w], tmp_path / "list.pth")
    assert "expected a state dict" in _error(path)


def test_big_endian_byteorder_is_honoured(tmp_path):
    sd = {
        "f": torch.randn(3, 4),
        "bf": torch.randn(5).bfloat16(),
        "i": torch.arange(6),
        "u8": torch.arange(4, dtype=torch.uint8),
        "t": torch.randn(3, 2).t(),
    }
    src = _save(sd, tmp_path / "little.pth")
    with zipfile.ZipFile(src) as zf:
        # persistent ids in key order: f, bf, i, u8, t -> itemsizes
        sizes = {
            n.rsplit("/", 1)[1]: s
            for n, s in zip(
                sorted((n for n in zf.namelist() if "/data/" in n), key=lambda n: int(n.rsplit("/", 1)[1])),
                (4, 2, 8, 1, 4),
            )
        }

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            itemsize = sizes[name.rsplit("/", 1)[1]]
            return np.frombuffer(data, f"<u{itemsize}").astype(f">u{itemsize}").tobytes()
        return data

    got = read_torch_checkpoint(_rewrite(src, tmp_path / "big.pth", to_big))
    for k, t in sd.items():
        _assert_same(got[k], t)


def test_reader_never_imports_torch(tmp_path):
    path = _save({"w": torch.randn(2, 3).bfloat16()}, tmp_path / "no_torch.pth")
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from unet_jax.convert.pth import read_torch_checkpoint\n"
        f"w = read_torch_checkpoint({str(path)!r})['w']\n"
        "assert w.shape == (2, 3) and str(w.dtype) == 'float32'\n"
        "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    msg = _error(tmp_path / "nope.pth")
    assert "no such file" in msg and "torch.save" in msg


def test_text_empty_and_random_files(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    msg = _error(text)
    assert "not a PyTorch zip checkpoint" in msg and ZIP_PHRASE in msg
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert "empty" in _error(empty)
    rand = tmp_path / "random.pth"
    rand.write_bytes(np.random.default_rng(0).bytes(4096).replace(b"PK", b"QK"))
    assert ZIP_PHRASE in _error(rand)
    lfs = tmp_path / "lfs.pth"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    assert "Git LFS pointer" in _error(lfs)


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_format_reads_back_exactly(tmp_path, protocol):
    # torch.save's pre-1.6 layout (pickles, then raw storages), as EfficientNet-Lite0's
    # released weights are saved; views of one storage and several dtypes included.
    base = torch.randn(4, 6)
    sd = collections.OrderedDict(
        w=base, t=base.t(), row=base[1], half=torch.randn(3).half(), n=torch.tensor(7), b=torch.tensor([True, False])
    )
    path = _save(sd, tmp_path / f"legacy{protocol}.pth", _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    got = read_torch_checkpoint(path)
    assert list(got) == list(sd)
    for key, tensor in sd.items():
        _assert_same(got[key], tensor)


def test_legacy_format_truncated_or_with_foreign_classes_is_refused(tmp_path):
    path = _save({"w": torch.randn(50, 50)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[:-100])
    assert "truncated legacy storage" in _error(cut)
    evil = _save(
        {"w": torch.randn(2), "when": datetime.date(2020, 1, 1)},
        tmp_path / "evil.pth",
        _use_new_zipfile_serialization=False,
    )
    assert "refusing to load class/function 'datetime.date'" in _error(evil)


def test_truncated_file(tmp_path):
    src = _save({"w": torch.randn(100, 100)}, tmp_path / "full.pth")
    data = src.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:-100])
    msg = _error(cut)
    assert "truncated or corrupt zip archive" in msg and ZIP_PHRASE in msg
    half = tmp_path / "half.pth"
    half.write_bytes(data[: len(data) // 2])  # cut mid-storage
    assert "truncated or corrupt" in _error(half)


def test_short_storage_record_is_refused(tmp_path):
    src = _save({"w": torch.randn(10, 10)}, tmp_path / "full.pth")
    short = _rewrite(src, tmp_path / "short.pth", lambda n, d: d[:-4] if "/data/" in n else d)
    msg = _error(short)
    assert "truncated storage record" in msg and "expected 100 x 4 = 400" in msg
    gone = _rewrite(src, tmp_path / "gone.pth", lambda n, d: None if "/data/" in n else d)
    assert "is missing" in _error(gone)


def test_corrupt_storage_bytes_fail_the_crc(tmp_path):
    src = _save({"w": torch.zeros(64)}, tmp_path / "full.pth")
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename)
    # the record's data follows its 30-byte local header, name and extra field
    h = info.header_offset
    name_len = int.from_bytes(data[h + 26 : h + 28], "little")
    extra_len = int.from_bytes(data[h + 28 : h + 30], "little")
    data[h + 30 + name_len + extra_len + 5] ^= 0xFF
    bad = tmp_path / "bitflip.pth"
    bad.write_bytes(bytes(data))
    assert "truncated or corrupt zip archive" in _error(bad)


def test_missing_data_pkl(tmp_path):
    src = _save({"w": torch.randn(3)}, tmp_path / "full.pth")
    path = _rewrite(src, tmp_path / "nopkl.pth", lambda n, d: None if n.endswith("data.pkl") else d)
    msg = _error(path)
    assert "'<archive>/data.pkl'" in msg and "expected a torch.save checkpoint" in msg
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("readme.txt", "hello")
    assert "data.pkl" in _error(plain)


class Opaque:
    """A user class: loading it would import (and could run) user code."""

    def __init__(self):
        self.x = 1


_CALLED: list[str] = []


def _side_effect(arg):
    _CALLED.append(arg)
    return arg


class Evil:
    def __init__(self, reduce):
        self._reduce = reduce

    def __reduce__(self):
        return self._reduce


@pytest.mark.parametrize(
    "value, refused",
    [
        (datetime.datetime(2024, 1, 2), "datetime.datetime"),
        (Opaque(), f"{__name__}.Opaque"),
        (Evil((_side_effect, ("ran",))), f"{__name__}._side_effect"),
        (np.float32(1.5), "numpy"),
        ({1, 2}, "set'"),  # builtins.set (pickled as __builtin__.set)
        (collections.defaultdict(int), "collections.defaultdict"),  # only OrderedDict is allowed
    ],
)
def test_disallowed_classes_are_refused(tmp_path, value, refused):
    path = _save({"w": torch.randn(2), "extra": value}, tmp_path / "bad_class.pth")
    msg = _error(path)
    assert refused in msg and "refusing to load" in msg
    assert "expected only tensors and plain containers" in msg
    assert _CALLED == []


def test_refused_code_is_never_run(tmp_path):
    target = tmp_path / "pwned"
    path = _save({"w": torch.randn(2), "x": Evil((os.mkdir, (str(target),)))}, tmp_path / "evil.pth")
    msg = _error(path)
    assert "mkdir" in msg and "refusing to load" in msg
    assert not target.exists()


def test_unknown_storage_dtype(tmp_path):
    path = _save({"w": torch.zeros(4, dtype=torch.float8_e4m3fn)}, tmp_path / "fp8.pth")
    msg = _error(path)
    assert "unknown storage dtype torch.float8_e4m3fn" in msg and "expected one of" in msg
    # a legacy storage class with no numpy dtype
    src = _save({"w": torch.zeros(4)}, tmp_path / "f32.pth")
    path = _rewrite(
        src,
        tmp_path / "qint.pth",
        lambda n, d: d.replace(b"torch\nFloatStorage", b"torch\nQInt8Storage") if n.endswith("data.pkl") else d,
    )
    msg = _error(path)
    assert "unknown storage dtype 'QInt8Storage'" in msg and "expected one of" in msg


def test_tensor_outside_its_storage_is_refused(tmp_path):
    src = _save({"w": torch.arange(6.0)}, tmp_path / "ok.pth")

    # shrink the declared storage to 2 elements (and its record with it): size 6 reaches past
    def shrink(name, data):
        if name.endswith("data.pkl"):
            assert data.count(b"cpuq\x06K\x06t") == 1  # ('storage', ..., 'cpu', numel=6)
            return data.replace(b"cpuq\x06K\x06t", b"cpuq\x06K\x02t")
        return data[:8] if "/data/" in name else data

    path = _rewrite(src, tmp_path / "oob.pth", shrink)
    msg = _error(path)
    assert "expected it to lie inside its storage" in msg

    # One element short: the last element (index 5) lies just outside a 5-element storage.
    def one_short(name, data):
        if name.endswith("data.pkl"):
            return data.replace(b"cpuq\x06K\x06t", b"cpuq\x06K\x05t")
        return data[:20] if "/data/" in name else data

    assert "expected it to lie inside its storage" in _error(_rewrite(src, tmp_path / "short1.pth", one_short))
