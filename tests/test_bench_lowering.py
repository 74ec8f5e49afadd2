"""The lowering tuner (benchmarks/cpu_conv.py tune): the Conv2D shapes it finds in a model,
and the table it writes and shows (its timing replaced: the plumbing, not speed)."""

from __future__ import annotations

from benchmarks import cpu_conv as T
from unet_jax.layers import lowering as L
from unet_jax.models import UNet


def test_conv_shapes_of_a_unet():
    model = UNet(features=4, depth=1, convs_per_block=1, in_channels=3)
    shapes = T.conv_shapes(model, (2, 8, 8, 3))
    assert [(s["shape"], s["features"], s["kernel"]) for s in shapes] == [
        ((2, 8, 8, 3), 4, (3, 3)),
        ((2, 4, 4, 4), 8, (3, 3)),
        ((2, 8, 8, 8), 4, (3, 3)),
        ((2, 8, 8, 4), 1, (1, 1)),
    ]


def test_tune_writes_the_table_and_show_prints_it(tmp_path, monkeypatch, capsys):
    # The timing itself is replaced: this checks the plumbing (shapes, keys, file), not speed.
    path = tmp_path / "cache" / "lowering.json"
    monkeypatch.setenv(L.TABLE_ENV, str(path))
    fake = {"lax": 3.0, "direct": 4.0, "stem": 4.5, "im2col": 5.0, "winograd2": 2.0, "winograd4": 1.0}
    calls = []

    def time_lowering(name, shape, c_out, mode, pads, windows, calls_per_window, input_gradient):
        calls.append((shape[3], mode, input_gradient))
        return fake[name] + (mode == "train")

    monkeypatch.setattr(T, "time_lowering", time_lowering)
    argv = ["tune", "--preset", "seed", "--size", "32", "--batch", "2", "--modes", "infer", "train"]
    assert T.main(argv) == 0
    table = L.load_table()
    assert table["preset"] == "seed" and len(table["entries"]) == 28  # the seed's 14 distinct 3x3 shapes, 2 modes
    assert {e["best"] for e in table["entries"].values()} == {"winograd4"}
    first = table["entries"][L.table_key(32, 32, 3, 16, 2, "infer")]["ms"]
    assert "direct" in first and "stem" in first
    assert not {"direct", "stem"} & set(table["entries"][L.table_key(32, 32, 16, 16, 2, "infer")]["ms"])
    # Only the layer that reads the image is timed without its input gradient.
    assert {c_in for c_in, mode, input_gradient in calls if not input_gradient} == {3}
    assert all(input_gradient for _, mode, input_gradient in calls if mode == "infer")
    assert table["entries"][L.table_key(32, 32, 3, 16, 2, "train")]["input_gradient"] is False
    assert "input_gradient" not in table["entries"][L.table_key(32, 32, 16, 16, 2, "train")]
    assert L.choose_lowering(32, 32, 16, 16, batch=2) == "winograd4"
    capsys.readouterr()
    assert T.main(["show"]) == 0
    assert "32x32:3->16:b2:infer" in capsys.readouterr().out


def test_time_lowering_kernel_gradient_alone_runs():
    # The real timer, tiny: both train variants compile and return a positive time.
    for input_gradient in (True, False):
        ms = T.time_lowering("stem", (1, 6, 6, 1), 2, "train", windows=1, calls=1, input_gradient=input_gradient)
        assert ms > 0


def test_tune_merges_into_this_machines_table_and_times_only_the_lowerings_asked(tmp_path, monkeypatch):
    path = tmp_path / "lowering.json"
    timed = []

    def time_lowering(name, shape, c_out, mode, *rest):
        timed.append((shape[3], name))
        return {"lax": 2.0, "direct": 1.0, "stem": 1.5}[name]

    monkeypatch.setattr(T, "time_lowering", time_lowering)
    T.tune("seed", 32, 2, ("infer",), lowerings=("lax", "direct", "stem"), out=path)
    assert {c_in for c_in, name in timed} == {3}  # elsewhere lax is the only one asked: not timed
    assert {name for c_in, name in timed} == {"lax", "direct", "stem"}
    first = L.table_key(32, 32, 3, 16, 2, "infer")
    assert L.load_table(path)["entries"][first]["best"] == "direct"
    T.tune("padded", 32, 2, ("infer",), lowerings=("lax", "direct"), out=path, model={"features": 8})
    table = L.load_table(path)
    assert {first, L.table_key(32, 32, 1, 8, 2, "infer")} <= set(table["entries"])  # seed's entry kept
    assert all(int(k.split(":")[1].split("->")[0]) <= L.DIRECT_MAX_CHANNELS for k in table["entries"])
    assert [t["preset"] for t in table["tuned"]] == ["seed", "padded"]
