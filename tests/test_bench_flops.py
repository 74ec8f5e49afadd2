"""The benchmark's analytic FLOP count (benchmarks/flops.py) and its result helpers.

Torch-free: the PyTorch peer's parameter-count equality is checked inside
benchmarks/throughput.py before anything is timed (and by `python -m benchmarks.torch_peer`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from flax import linen as nn

from unet_jax.layers import Conv2D, ConvTranspose2D
from unet_jax.models import PRESETS, create_unet

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    return importlib.import_module(f"benchmarks.{name}")  # the repository root is on sys.path (pytest's pythonpath)


flops = _load("flops")


class Single(nn.Module):
    layer: nn.Module

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.layer(x)


def test_single_conv_by_hand():
    # 3x3 'SAME', 3 -> 4 channels on 8x8: 2 FLOPs x 9 taps x 3 x 4 x 64 output pixels.
    fc = flops.count_flops(Single(Conv2D(4, 3)), (2, 8, 8, 3))
    assert [layer.kind for layer in fc.layers] == ["conv"]
    assert fc.forward == 2 * 9 * 3 * 4 * 64 == 13_824
    assert fc.train == 3 * fc.forward
    assert fc.forward_zero_insertion == fc.forward


def test_strided_and_flax_conv_count_the_output_grid():
    fc = flops.count_flops(Single(Conv2D(5, 3, strides=2)), (1, 8, 8, 2))
    assert fc.forward == 2 * 9 * 2 * 5 * 4 * 4
    fc = flops.count_flops(Single(nn.Conv(6, (1, 1))), (1, 4, 4, 3))
    assert fc.forward == 2 * 3 * 6 * 16


def test_transposed_conv_on_the_input_grid():
    # 3x3 stride-2 'SAME', 4 -> 2 channels, 5x5 -> 10x10: useful MACs are per input pixel;
    # the zero-insertion view does s*s = 4 times as many (on the 10x10 output grid).
    fc = flops.count_flops(Single(ConvTranspose2D(2, 3, strides=2, padding="SAME")), (1, 5, 5, 4))
    (layer,) = fc.layers
    assert layer.kind == "conv_transpose" and layer.out_shape == (1, 10, 10, 2)
    assert fc.forward == 2 * 9 * 4 * 2 * 25 == 3_600
    assert fc.forward_zero_insertion == 4 * fc.forward
    fc = flops.count_flops(Single(nn.ConvTranspose(3, (2, 2), strides=(2, 2))), (1, 4, 4, 8))
    assert fc.forward == 2 * 4 * 8 * 3 * 16


def test_dense():
    fc = flops.count_flops(Single(nn.Dense(7)), (3, 5))
    assert fc.forward == 2 * 5 * 7


def closed_form_unet(features, depth, convs_per_block, kernel_size, up_kernel, in_channels, num_classes, size, **_):
    """Forward FLOPs per image of a 'SAME' U-Net from its fields alone."""
    k2, total, c, n = kernel_size**2, 0, in_channels, size
    widths = [features * 2**level for level in range(depth + 1)]
    for level in range(depth + 1):  # encoder blocks and the bottleneck
        for i in range(convs_per_block):
            total += 2 * k2 * (c if i == 0 else widths[level]) * widths[level] * n * n
        c = widths[level]
        if level < depth:
            n //= 2
    for level in range(depth - 1, -1, -1):
        total += 2 * up_kernel**2 * c * widths[level] * n * n  # up-conv on its input grid
        n *= 2
        for i in range(convs_per_block):
            total += 2 * k2 * (2 * widths[level] if i == 0 else widths[level]) * widths[level] * n * n
        c = widths[level]
    return total + 2 * c * num_classes * n * n  # 1x1 head


@pytest.mark.parametrize(
    "preset, forward",
    [
        # Equal to torch.utils.flop_counter on the PyTorch peer (benchmarks/torch_peer.py).
        ("seed", 9_118_416_896),
        ("padded", 96_183_779_328),
    ],
)
def test_presets_at_256(preset, forward):
    fc = flops.preset_flops(preset, 256)
    assert fc.forward == forward == closed_form_unet(**PRESETS[preset], size=256)
    # The figures: about 27 and 289 GFLOP per training image.
    assert round(fc.train / 1e9) == {"seed": 27, "padded": 289}[preset]
    kinds = fc.by_kind()
    assert set(kinds) == {"conv", "conv_transpose"}
    assert (
        len(fc.layers)
        == 1
        + 2 * PRESETS[preset]["depth"] * (PRESETS[preset]["convs_per_block"])
        + PRESETS[preset]["convs_per_block"]
        + PRESETS[preset]["depth"]
    )
    summary = fc.summary()
    assert summary["train_flops_per_image"] == 3 * forward


def test_counts_per_image_whatever_the_batch():
    model = create_unet("seed", features=4)
    one = flops.count_flops(model, (1, 32, 32, 3), train=False).forward
    assert flops.count_flops(model, (3, 32, 32, 3), train=False).forward == one
    assert one == closed_form_unet(**{**PRESETS["seed"], "features": 4}, size=32)


def test_throughput_helpers():
    tp = _load("throughput")
    s = tp.stats([1.0, 2.0, 0.5], steps=4, batch=8, flops_per_image=1e12, peak_tflops=100.0)
    assert s["images_per_s"] == 32.0 and s["images_per_s_min"] == 16.0
    assert s["tflops"] == 32.0 and s["share_of_bf16_peak"] == 0.32
    row = {
        "preset": "seed",
        "batch": 8,
        "dtype": "bfloat16",
        "jax": {
            "train_single": {"images_per_s": 10.0},
            "train_scan": {"images_per_s": 30.0},
            "infer": {"images_per_s": 50.0},
        },
        "torch": {"train": {"images_per_s": 20.0}, "infer": {"images_per_s": 25.0}},
    }
    d = tp.derive(row, "gpu")
    assert d["jax_train_headline"] == "train_scan" and d["ratio_train"] == 1.5
    assert d["ratio_train_single"] == 0.5 and d["ratio_infer"] == 2.0
    assert tp.derive(row, "cpu")["ratio_train"] == 0.5
    row["derived"] = d
    text = tp.table([row, {"preset": "padded", "batch": 8, "dtype": "float32", "skipped": "time budget"}])
    assert "1.50x" in text and "skipped: time budget" in text
