"""Analytic FLOPs of a Flax model, from the layers it actually calls.

XLA's cost analysis does not see the work inside cuDNN convolutions (custom calls), so the
benchmark counts FLOPs from the architecture: :func:`count_flops` traces the model once
abstractly (``jax.eval_shape``, nothing is computed) with a Flax method interceptor that
records every convolution-like layer's input and output shapes, then applies

* convolution (``unet_jax.layers.Conv2D``, ``flax.linen.Conv``):
  ``2 * kh * kw * (c_in / groups) * c_out * H_out * W_out`` per image,
* transposed convolution (``unet_jax.layers.ConvTranspose2D``, ``flax.linen.ConvTranspose``):
  counted on the **input grid**, ``2 * kh * kw * c_in * c_out * H_in * W_in`` per image:
  the useful multiply-adds (each input pixel scatters one k x k x c_out kernel copy),
  what cuDNN's backward-data kernel and ``torch.utils.flop_counter`` count. The
  zero-insertion view (an ordinary convolution over the ``s``-dilated input, on the output
  grid) does ``s_h * s_w`` times more multiply-adds, most of them on inserted zeros; it is
  reported separately as ``transpose_flops_zero_insertion``,
* dense layers (``flax.linen.Dense``): ``2 * in * out`` per output row.

Batch norm, ReLU, pooling, dropout, the loss and the optimiser are not counted (they are
memory traffic, not matrix work). One training step is taken as 3x the forward pass
(forward, gradient w.r.t. activations, gradient w.r.t. weights); this slightly overcounts,
since the input gradient of the first layer is never needed.

Both U-Net presets at 256x256 (input-grid convention): ``seed`` 9.118 GFLOP forward,
27.36 per training image; ``padded`` 96.18 forward, 288.6 per training image.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from unet_jax.layers import Conv2D, ConvTranspose2D

__all__ = ["LayerFlops", "FlopCount", "count_flops", "conv_flops", "conv_transpose_flops", "TRAIN_FACTOR"]

TRAIN_FACTOR = 3  # forward + activation gradient + weight gradient


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def conv_flops(kernel: tuple[int, int], c_in: int, c_out: int, out_hw: tuple[int, int], groups: int = 1) -> int:
    """FLOPs of one image through a convolution: 2 multiply-add FLOPs per kernel tap."""
    return 2 * kernel[0] * kernel[1] * (c_in // groups) * c_out * out_hw[0] * out_hw[1]


def conv_transpose_flops(kernel: tuple[int, int], c_in: int, c_out: int, in_hw: tuple[int, int]) -> int:
    """FLOPs of one image through a transposed convolution, on the input grid."""
    return 2 * kernel[0] * kernel[1] * c_in * c_out * in_hw[0] * in_hw[1]


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """One matrix-work layer: its path, kind and FLOPs per image (forward)."""

    path: str
    kind: str  # "conv", "conv_transpose" or "dense"
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel: tuple[int, int]
    flops: int
    flops_zero_insertion: int  # == flops except for transposed convolutions


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs per image of a model's forward pass, and the layers they come from."""

    layers: tuple[LayerFlops, ...]

    @property
    def forward(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def train(self) -> int:
        return TRAIN_FACTOR * self.forward

    @property
    def forward_zero_insertion(self) -> int:
        return sum(layer.flops_zero_insertion for layer in self.layers)

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers:
            out[layer.kind] = out.get(layer.kind, 0) + layer.flops
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary (FLOPs per image)."""
        return {
            "forward_flops_per_image": self.forward,
            "train_flops_per_image": self.train,
            "train_factor": TRAIN_FACTOR,
            "forward_flops_by_kind": self.by_kind(),
            "transpose_convention": "input grid (2*k*k*cin*cout*H_in*W_in); zero-insertion view reported separately",
            "forward_flops_zero_insertion_per_image": self.forward_zero_insertion,
            "layers": len(self.layers),
        }


def _record(module: nn.Module, x: Any, y: Any) -> LayerFlops | None:
    path = "/".join(str(p) for p in module.path) or type(module).__name__
    if isinstance(module, (Conv2D, nn.Conv)) and not isinstance(module, nn.ConvTranspose):
        if x.ndim != 4:
            raise NotImplementedError(f"{path}: only 2-D NHWC convolutions are counted, got input rank {x.ndim}")
        kernel = _pair(module.kernel_size)
        groups = getattr(module, "feature_group_count", 1)
        f = conv_flops(kernel, x.shape[-1], y.shape[-1], y.shape[1:3], groups)
        return LayerFlops(path, "conv", tuple(x.shape), tuple(y.shape), kernel, f, f)
    if isinstance(module, (ConvTranspose2D, nn.ConvTranspose)):
        if x.ndim != 4:
            raise NotImplementedError(
                f"{path}: only 2-D NHWC transposed convolutions are counted, got input rank {x.ndim}"
            )
        kernel = _pair(module.kernel_size)
        f = conv_transpose_flops(kernel, x.shape[-1], y.shape[-1], x.shape[1:3])
        zi = conv_flops(kernel, x.shape[-1], y.shape[-1], y.shape[1:3])
        return LayerFlops(path, "conv_transpose", tuple(x.shape), tuple(y.shape), kernel, f, zi)
    if isinstance(module, nn.Dense):
        rows = math.prod(x.shape[1:-1]) if x.ndim > 1 else 1
        f = 2 * x.shape[-1] * y.shape[-1] * rows
        return LayerFlops(path, "dense", tuple(x.shape), tuple(y.shape), (1, 1), f, f)
    return None


def count_flops(model: nn.Module, input_shape: tuple[int, ...], **call_kwargs: Any) -> FlopCount:
    """FLOPs per image of ``model.init(key, zeros(input_shape), **call_kwargs)``'s forward pass.

    ``input_shape`` includes the batch axis (its size does not matter: counts are per
    image). Nothing is computed: the model is traced with ``jax.eval_shape``.
    """
    layers: list[LayerFlops] = []
    batch = input_shape[0]

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and args:
            rec = _record(context.module, args[0], out)
            if rec is not None:
                if rec.in_shape[0] != batch:
                    raise ValueError(f"{rec.path}: batch axis {rec.in_shape[0]} != {batch}")
                layers.append(rec)
        return out

    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **call_kwargs), x)
    return FlopCount(tuple(layers))


def preset_flops(preset: str, size: int, **overrides: Any) -> FlopCount:
    """FLOPs per image of a :func:`unet_jax.models.create_unet` preset at ``size`` x ``size``."""
    from unet_jax.models import create_unet

    model = create_unet(preset, **overrides)
    return count_flops(model, (1, size, size, model.in_channels), train=False)


if __name__ == "__main__":  # python -m benchmarks.flops [size]
    import sys

    size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    for name in ("seed", "padded"):
        fc = preset_flops(name, size)
        print(
            f"{name} @ {size}: forward {fc.forward / 1e9:.3f} GFLOP/image, training "
            f"{fc.train / 1e9:.2f}, by kind { ({k: round(v / 1e9, 3) for k, v in fc.by_kind().items()}) }, "
            f"zero-insertion forward {fc.forward_zero_insertion / 1e9:.3f}"
        )
