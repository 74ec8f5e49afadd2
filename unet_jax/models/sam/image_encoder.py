"""SAM's image encoder: a ViTDet-style ViT with windowed and global attention.

Port of ``segment_anything.modeling.image_encoder`` (Kirillov et al. 2023, "Segment
Anything", ICCV; the backbone follows Li et al. 2022, "Exploring Plain Vision Transformer
Backbones for Object Detection", with the decomposed relative position embeddings of
MViTv2, Li et al. 2022). Everything is NHWC; submodule and parameter names mirror the
PyTorch attribute names so that :mod:`unet_jax.convert.sam` is a mechanical map:
``blocks.3.attn.qkv`` -> ``blocks_3/attn/qkv``, ``neck.0`` -> ``neck_0``.

Parameters are stored in ``param_dtype`` (float32); ``dtype`` is the computation dtype
(``None``: promoted from input and parameters). Attention logits are always soft-maxed
in float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unet_jax.layers import Conv2D

__all__ = [
    "MLPBlock",
    "LayerNorm2d",
    "ViTAttention",
    "ViTBlock",
    "ImageEncoderViT",
    "PatchEmbed",
    "window_partition",
    "window_unpartition",
    "get_rel_pos",
    "add_decomposed_rel_pos",
    "gelu",
]


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's ``nn.GELU()`` default (``jax.nn.gelu`` defaults to
    the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


def LayerNorm2d(name: str | None = None, eps: float = 1e-6, dtype: Any = None) -> nn.LayerNorm:
    """SAM's ``LayerNorm2d`` (normalisation over channels of an NCHW map) for NHWC maps:
    a LayerNorm over the last axis with eps ``1e-6`` and the two-pass variance
    ``mean((x - mean)^2)`` that the reference computes."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class MLPBlock(nn.Module):
    """``lin2(act(lin1(x)))``: ``(..., C) -> (..., C)`` with a ``mlp_dim`` hidden layer.

    ``activation`` is ``"gelu"`` (exact; the image encoder) or ``"relu"`` (the two-way
    transformer).
    """

    mlp_dim: int
    activation: str = "gelu"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = {"gelu": gelu, "relu": jax.nn.relu}[self.activation]
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="lin1")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="lin2")(act(y))


# --------------------------------------------------------------------------------------
# Windows and relative positions
# --------------------------------------------------------------------------------------
def window_partition(x: jax.Array, window_size: int) -> tuple[jax.Array, tuple[int, int]]:
    """Split ``(B, H, W, C)`` into ``(B * nWh * nWw, ws, ws, C)`` windows.

    The map is zero-padded at the bottom/right to multiples of ``window_size`` first;
    returns the windows and the padded size ``(Hp, Wp)``. Windows are ordered row-major
    (window row, then window column) within each image, as the reference.
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(windows: jax.Array, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> jax.Array:
    """Inverse of :func:`window_partition`: ``(B * nW, ws, ws, C) -> (B, H, W, C)``,
    dropping the padding."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


def _linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of PyTorch's 1-D ``F.interpolate(mode="linear",
    align_corners=False)`` (source index ``(i + 0.5) * n_in / n_out - 0.5``, clamped)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m.astype(np.float32)


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative position embeddings ``(q_size, k_size, C)`` for one axis.

    ``rel_pos`` is ``(L, C)``; if ``L != 2 max(q_size, k_size) - 1`` it is first resized
    linearly (as the reference's ``F.interpolate``). Coordinates of the shorter side are
    scaled as in the reference (computed in float32 and truncated, like ``.long()``).
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        m = jnp.asarray(_linear_resize_matrix(rel_pos.shape[0], max_rel_dist))
        rel_pos = jnp.matmul(m.astype(rel_pos.dtype), rel_pos, precision="highest")
    f32 = np.float32
    q_coords = np.arange(q_size, dtype=f32)[:, None] * f32(max(k_size / q_size, 1.0))
    k_coords = np.arange(k_size, dtype=f32)[None, :] * f32(max(q_size / k_size, 1.0))
    relative = (q_coords - k_coords) + f32((k_size - 1) * max(q_size / k_size, 1.0))
    return rel_pos[relative.astype(np.int64)]


def add_decomposed_rel_pos(
    attn: jax.Array,
    q: jax.Array,
    rel_pos_h: jax.Array,
    rel_pos_w: jax.Array,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> jax.Array:
    """Add MViTv2's decomposed relative position terms to attention logits.

    Args:
      attn: ``(B, q_h * q_w, k_h * k_w)`` logits.
      q: ``(B, q_h * q_w, C)`` queries (unscaled, as the reference).
      rel_pos_h, rel_pos_w: ``(L_h, C)`` and ``(L_w, C)`` tables.

    Returns: ``attn + rel_h[..., :, None] + rel_w[..., None, :]``, same shape as ``attn``.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    rh = get_rel_pos(q_h, k_h, rel_pos_h)
    rw = get_rel_pos(q_w, k_w, rel_pos_w)
    b, _, dim = q.shape
    r_q = q.reshape(b, q_h, q_w, dim)
    rel_h = jnp.einsum("bhwc,hkc->bhwk", r_q, rh.astype(r_q.dtype))
    rel_w = jnp.einsum("bhwc,wkc->bhwk", r_q, rw.astype(r_q.dtype))
    attn = (
        attn.reshape(b, q_h, q_w, k_h, k_w)
        + rel_h[:, :, :, :, None].astype(attn.dtype)
        + rel_w[:, :, :, None, :].astype(attn.dtype)
    )
    return attn.reshape(b, q_h * q_w, k_h * k_w)


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------
class ViTAttention(nn.Module):
    """Multi-head self-attention with optional decomposed relative positions.

    ``(B, H, W, dim) -> (B, H, W, dim)``. With ``use_rel_pos`` the tables ``rel_pos_h``
    ``(2 input_size[0] - 1, head_dim)`` and ``rel_pos_w`` are parameters (zero-initialised
    as the reference's default ``rel_pos_zero_init``); ``input_size`` is the (window)
    size the tables were made for, other ``H, W`` use the interpolation of
    :func:`get_rel_pos`.
    """

    dim: int
    num_heads: int = 8
    qkv_bias: bool = True
    use_rel_pos: bool = False
    input_size: tuple[int, int] | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        head_dim = self.dim // self.num_heads
        scale = head_dim**-0.5
        qkv = nn.Dense(3 * self.dim, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
        # (B, HW, 3, heads, hd) -> (3, B * heads, HW, hd)
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, head_dim)

        attn = jnp.einsum("bqc,bkc->bqk", q * scale, k).astype(jnp.float32)
        if self.use_rel_pos:
            if self.input_size is None:
                raise ValueError("ViTAttention: input_size is required with use_rel_pos=True")
            zeros = nn.initializers.zeros
            rel_h = self.param("rel_pos_h", zeros, (2 * self.input_size[0] - 1, head_dim))
            rel_w = self.param("rel_pos_w", zeros, (2 * self.input_size[1] - 1, head_dim))
            attn = add_decomposed_rel_pos(attn, q.astype(jnp.float32), rel_h, rel_w, (h, w), (h, w))
        attn = jax.nn.softmax(attn, axis=-1).astype(v.dtype)
        y = jnp.einsum("bqk,bkc->bqc", attn, v)
        y = y.reshape(b, self.num_heads, h, w, head_dim).transpose(0, 2, 3, 1, 4)
        y = y.reshape(b, h, w, self.dim)
        return nn.Dense(self.dim, dtype=self.dtype, name="proj")(y)


class ViTBlock(nn.Module):
    """Pre-norm transformer block, windowed (``window_size > 0``) or global.

    ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; ``(B, H, W, dim) -> same``.
    ``input_size`` is the full token grid (used for global blocks' position tables).
    """

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_rel_pos: bool = False
    window_size: int = 0
    input_size: tuple[int, int] | None = None
    norm_eps: float = 1e-6
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        x = nn.LayerNorm(epsilon=self.norm_eps, use_fast_variance=False, dtype=self.dtype, name="norm1")(x)
        h, w = x.shape[1], x.shape[2]
        if self.window_size > 0:
            x, pad_hw = window_partition(x, self.window_size)
        attn_size = self.input_size if self.window_size == 0 else (self.window_size,) * 2
        x = ViTAttention(
            self.dim,
            num_heads=self.num_heads,
            qkv_bias=self.qkv_bias,
            use_rel_pos=self.use_rel_pos,
            input_size=attn_size,
            dtype=self.dtype,
            name="attn",
        )(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + x
        y = nn.LayerNorm(epsilon=self.norm_eps, use_fast_variance=False, dtype=self.dtype, name="norm2")(x)
        return x + MLPBlock(int(self.dim * self.mlp_ratio), "gelu", dtype=self.dtype, name="mlp")(y)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` x ``patch_size`` convolution ``proj``:
    ``(B, H, W, C) -> (B, H / p, W / p, embed_dim)``."""

    embed_dim: int
    patch_size: int = 16
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv2D(
            self.embed_dim, self.patch_size, strides=self.patch_size, padding="VALID", dtype=self.dtype, name="proj"
        )(x)


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder: ``(B, img_size, img_size, in_chans) -> (B, img_size /
    patch_size, img_size / patch_size, out_chans)``.

    The input is the normalised, padded image (see :meth:`Sam.preprocess`); its size must
    be exactly ``img_size`` (the absolute position embedding is ``(1, img_size /
    patch_size, img_size / patch_size, embed_dim)``). Patch embedding (conv
    ``patch_size`` / ``patch_size``), ``depth`` blocks (global attention at
    ``global_attn_indexes``, ``window_size`` windows elsewhere), then the neck: conv 1x1
    (no bias), LayerNorm2d, conv 3x3 (no bias), LayerNorm2d. Field names follow the
    reference's constructor; ``norm_eps`` is ``1e-6`` as ``build_sam`` uses.
    """

    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11)
    norm_eps: float = 1e-6
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ValueError(f"ImageEncoderViT: expected (B, H, W, {self.in_chans}) images, got shape {tuple(x.shape)}")
        grid = self.img_size // self.patch_size
        if self.use_abs_pos and x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(
                f"ImageEncoderViT: images must be {self.img_size}x{self.img_size} "
                f"(the absolute position embedding's size), got {x.shape[1]}x{x.shape[2]}"
            )
        x = PatchEmbed(self.embed_dim, self.patch_size, dtype=self.dtype, name="patch_embed")(x)
        if self.use_abs_pos:
            pos = self.param("pos_embed", nn.initializers.zeros, (1, grid, grid, self.embed_dim))
            x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = ViTBlock(
                self.embed_dim,
                self.num_heads,
                mlp_ratio=self.mlp_ratio,
                qkv_bias=self.qkv_bias,
                use_rel_pos=self.use_rel_pos,
                window_size=0 if i in tuple(self.global_attn_indexes) else self.window_size,
                input_size=(grid, grid),
                norm_eps=self.norm_eps,
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(x)
        x = Conv2D(self.out_chans, 1, padding="VALID", use_bias=False, dtype=self.dtype, name="neck_0")(x)
        x = LayerNorm2d("neck_1", dtype=self.dtype)(x)
        x = Conv2D(self.out_chans, 3, padding=1, use_bias=False, dtype=self.dtype, name="neck_2")(x)
        return LayerNorm2d("neck_3", dtype=self.dtype)(x)
