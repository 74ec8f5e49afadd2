"""SAM's mask decoder and its two-way transformer.

Port of ``segment_anything.modeling.mask_decoder`` and ``.transformer`` (Kirillov et al.
2023, "Segment Anything", section 3 and appendix A, figure 14): output tokens (one IoU
token, ``num_multimask_outputs + 1`` mask tokens) and the sparse prompt tokens attend to
the image embedding and back through a :class:`TwoWayTransformer`; the image embedding is
upscaled 4x by two transposed convolutions and each mask token's hypernetwork MLP gives
the weights of a per-pixel dot product; an MLP head on the IoU token predicts mask
quality. NHWC throughout; names mirror the PyTorch attributes (``layers.0`` ->
``layers_0``, ``output_upscaling.3`` -> ``output_upscaling_3``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from unet_jax.layers import ConvTranspose2D
from unet_jax.models.sam.image_encoder import LayerNorm2d, MLPBlock, gelu

__all__ = ["Attention", "TwoWayAttentionBlock", "TwoWayTransformer", "MLP", "MaskDecoder"]

_normal = nn.initializers.normal(1.0)


def _ln(name: str, dtype: Any) -> nn.LayerNorm:
    # torch.nn.LayerNorm defaults (eps 1e-5), two-pass variance as PyTorch.
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype, name=name)


class Attention(nn.Module):
    """Multi-head attention whose projections may downscale the channels.

    ``q (B, Nq, C), k (B, Nk, C), v (B, Nk, C) -> (B, Nq, C)``; the internal width is
    ``C / downsample_rate`` and must be divisible by ``num_heads``. Logits are scaled by
    ``1 / sqrt(head_dim)`` and soft-maxed in float32.
    """

    embedding_dim: int
    num_heads: int
    downsample_rate: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        internal = self.embedding_dim // self.downsample_rate
        if internal % self.num_heads:
            raise ValueError(f"Attention: num_heads {self.num_heads} must divide the internal dim {internal}")
        q = nn.Dense(internal, dtype=self.dtype, name="q_proj")(q)
        k = nn.Dense(internal, dtype=self.dtype, name="k_proj")(k)
        v = nn.Dense(internal, dtype=self.dtype, name="v_proj")(v)

        def heads(x: jax.Array) -> jax.Array:  # (B, N, C) -> (B, heads, N, C / heads)
            b, n, c = x.shape
            return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(0, 2, 1, 3)

        q, k, v = heads(q), heads(k), heads(v)
        attn = jnp.einsum("bhqc,bhkc->bhqk", q, k).astype(jnp.float32)
        attn = jax.nn.softmax(attn / math.sqrt(q.shape[-1]), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkc->bhqc", attn, v)
        b, h, n, c = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(b, n, h * c)
        return nn.Dense(self.embedding_dim, dtype=self.dtype, name="out_proj")(out)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image cross-attention, token MLP (ReLU),
    image-to-token cross-attention; each followed by a residual add and LayerNorm.

    ``(queries (B, Nq, C), keys (B, Nk, C), query_pe, key_pe) -> (queries, keys)``.
    The first block skips the positional encoding in its self-attention
    (``skip_first_layer_pe``), whose output then replaces the queries (no residual).
    """

    embedding_dim: int
    num_heads: int
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    skip_first_layer_pe: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(
        self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array, key_pe: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        dim, heads, rate, dt = self.embedding_dim, self.num_heads, self.attention_downsample_rate, self.dtype
        self_attn = Attention(dim, heads, dtype=dt, name="self_attn")
        if self.skip_first_layer_pe:
            queries = self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self_attn(q, q, queries)
        queries = _ln("norm1", dt)(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = queries + Attention(dim, heads, rate, dtype=dt, name="cross_attn_token_to_image")(q, k, keys)
        queries = _ln("norm2", dt)(queries)

        queries = queries + MLPBlock(self.mlp_dim, "relu", dtype=dt, name="mlp")(queries)
        queries = _ln("norm3", dt)(queries)

        q, k = queries + query_pe, keys + key_pe
        keys = keys + Attention(dim, heads, rate, dtype=dt, name="cross_attn_image_to_token")(k, q, queries)
        keys = _ln("norm4", dt)(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``depth`` :class:`TwoWayAttentionBlock` s and a final token-to-image attention.

    Args (call):
      image_embedding: ``(B, h, w, C)``.
      image_pe: ``(B, h, w, C)`` positional encoding (same shape).
      point_embedding: ``(B, N, C)`` tokens.

    Returns: processed tokens ``(B, N, C)`` and image tokens ``(B, h * w, C)``
    (row-major, as PyTorch's ``flatten(2)`` of NCHW).
    """

    depth: int = 2
    embedding_dim: int = 256
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    dtype: Any = None

    @nn.compact
    def __call__(
        self, image_embedding: jax.Array, image_pe: jax.Array, point_embedding: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        b, h, w, c = image_embedding.shape
        keys = image_embedding.reshape(b, h * w, c)
        key_pe = image_pe.reshape(image_pe.shape[0], h * w, c)
        queries = point_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.embedding_dim,
                self.num_heads,
                mlp_dim=self.mlp_dim,
                attention_downsample_rate=self.attention_downsample_rate,
                skip_first_layer_pe=i == 0,
                dtype=self.dtype,
                name=f"layers_{i}",
            )(queries, keys, point_embedding, key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        queries = queries + Attention(
            self.embedding_dim,
            self.num_heads,
            self.attention_downsample_rate,
            dtype=self.dtype,
            name="final_attn_token_to_image",
        )(q, k, keys)
        return _ln("norm_final_attn", self.dtype)(queries), keys


class MLP(nn.Module):
    """``num_layers`` Dense layers (``layers_i``) with ReLU between them:
    ``(..., input) -> (..., output_dim)``."""

    hidden_dim: int
    output_dim: int
    num_layers: int
    sigmoid_output: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(self.output_dim if last else self.hidden_dim, dtype=self.dtype, name=f"layers_{i}")(x)
            if not last:
                x = jax.nn.relu(x)
        return jax.nn.sigmoid(x) if self.sigmoid_output else x


def _decoder_inputs(
    output_tokens: jax.Array, image_embeddings: jax.Array, image_pe: jax.Array, sparse: jax.Array, dense: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The transformer's inputs for a prompt batch ``B``: the output tokens followed by the
    sparse prompt tokens ``(B, T + N, C)``, the image embeddings plus the dense prompts
    ``(B, h, w, C)``, and the positional encoding ``(B, h, w, C)``."""
    bsz = sparse.shape[0]
    output_tokens = jnp.broadcast_to(output_tokens[None], (bsz, *output_tokens.shape))
    tokens = jnp.concatenate([output_tokens.astype(sparse.dtype), sparse], axis=1)
    src = jnp.broadcast_to(image_embeddings, (bsz, *image_embeddings.shape[1:])) + dense
    pos_src = jnp.broadcast_to(image_pe, (bsz, *image_pe.shape[1:]))
    return tokens, src, pos_src


class MaskDecoder(nn.Module):
    """Predicts masks and their quality from image and prompt embeddings.

    Attributes mirror the reference constructor (``transformer_dim``,
    ``num_multimask_outputs``, ``iou_head_depth``, ``iou_head_hidden_dim``) plus the
    :class:`TwoWayTransformer` settings (``transformer_depth``, ``transformer_mlp_dim``,
    ``transformer_num_heads``, ``attention_downsample_rate``).

    Call ``(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
    multimask_output)``:
      image_embeddings: ``(1 or B, h, w, C)``; a batch of 1 is shared by all ``B``
        prompt sets (the reference's per-image use), a batch of ``B`` pairs image
        ``i`` with prompt set ``i``.
      image_pe: ``(1, h, w, C)`` dense positional encoding.
      sparse_prompt_embeddings: ``(B, N, C)``.
      dense_prompt_embeddings: ``(B, h, w, C)``.
      multimask_output: static; ``True`` returns the ``num_multimask_outputs``
        disambiguating masks, ``False`` the single-mask output (token 0).

    Returns masks ``(B, 4h, 4w, M)`` logits and ``iou_pred`` ``(B, M)``, with
    ``M = num_multimask_outputs`` or 1.
    """

    transformer_dim: int = 256
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_num_heads: int = 8
    attention_downsample_rate: int = 2
    dtype: Any = None

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1

    @nn.compact
    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        multimask_output: bool,
    ) -> tuple[jax.Array, jax.Array]:
        """Decode masks (arguments and outputs: the class docstring)."""
        dim, dt = self.transformer_dim, self.dtype
        bsz = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, bsz):
            raise ValueError(
                f"MaskDecoder: image embeddings batch {image_embeddings.shape[0]} must be 1 or the prompt batch {bsz}"
            )
        iou_token = nn.Embed(1, dim, embedding_init=_normal, name="iou_token").embedding
        mask_tokens = nn.Embed(self.num_mask_tokens, dim, embedding_init=_normal, name="mask_tokens").embedding
        tokens, src, pos_src = _decoder_inputs(
            jnp.concatenate([iou_token, mask_tokens], axis=0),
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
        )
        b, h, w, c = src.shape

        hs, src = TwoWayTransformer(
            self.transformer_depth,
            dim,
            self.transformer_num_heads,
            self.transformer_mlp_dim,
            self.attention_downsample_rate,
            dtype=dt,
            name="transformer",
        )(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        src = src.reshape(b, h, w, c)
        x = ConvTranspose2D(dim // 4, 2, strides=2, padding="VALID", dtype=dt, name="output_upscaling_0")(src)
        x = gelu(LayerNorm2d("output_upscaling_1", dtype=dt)(x))
        x = ConvTranspose2D(dim // 8, 2, strides=2, padding="VALID", dtype=dt, name="output_upscaling_3")(x)
        upscaled = gelu(x)  # (B, 4h, 4w, C / 8)
        hyper_in = jnp.stack(
            [
                MLP(dim, dim // 8, 3, dtype=dt, name=f"output_hypernetworks_mlps_{i}")(mask_tokens_out[:, i, :])
                for i in range(self.num_mask_tokens)
            ],
            axis=1,
        )  # (B, num_mask_tokens, C / 8)
        masks = jnp.einsum("bmc,bhwc->bhwm", hyper_in, upscaled)
        iou_pred = MLP(
            self.iou_head_hidden_dim, self.num_mask_tokens, self.iou_head_depth, dtype=dt, name="iou_prediction_head"
        )(iou_token_out)

        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[..., sl], iou_pred[:, sl]
