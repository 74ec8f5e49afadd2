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
    fake = {"lax": 3.0, "direct": 4.0, "im2col": 5.0, "winograd2": 2.0, "winograd4": 1.0}
    monkeypatch.setattr(T, "time_lowering", lambda name, shape, c_out, mode, *a: fake[name] + (mode == "train"))
    assert T.main(["tune", "--preset", "seed", "--size", "32", "--batch", "2", "--modes", "infer"]) == 0
    table = L.load_table()
    assert table["preset"] == "seed" and len(table["entries"]) == 14  # the seed's distinct 3x3 shapes
    assert {e["best"] for e in table["entries"].values()} == {"winograd4"}
    assert "direct" in table["entries"][L.table_key(32, 32, 3, 16, 2, "infer")]["ms"]
    assert "direct" not in table["entries"][L.table_key(32, 32, 16, 16, 2, "infer")]["ms"]
    assert L.choose_lowering(32, 32, 16, 16, batch=2) == "winograd4"
    capsys.readouterr()
    assert T.main(["show"]) == 0
    assert "32x32:3->16:b2:infer" in capsys.readouterr().out
