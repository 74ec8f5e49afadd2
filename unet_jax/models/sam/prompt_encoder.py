"""SAM's prompt encoder: points, boxes and masks -> sparse and dense embeddings.

Port of ``segment_anything.modeling.prompt_encoder`` (Kirillov et al. 2023, "Segment
Anything", section 3 and appendix A). Points and box corners are encoded with random
Fourier features (Tancik et al. 2020) plus learned per-type embeddings; a low-resolution
mask is downscaled by a small conv stack; without a mask the learned ``no_mask_embed`` is
broadcast. NHWC throughout; names mirror the PyTorch attributes (``point_embeddings.2``
-> ``point_embeddings_2``, ``mask_downscaling.3`` -> ``mask_downscaling_3``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from unet_jax.layers import Conv2D
from unet_jax.models.sam.image_encoder import LayerNorm2d, gelu

__all__ = ["PositionEmbeddingRandom", "PromptEncoder"]

_normal = nn.initializers.normal(1.0)


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies.

    The ``(2, num_pos_feats)`` Gaussian matrix ``positional_encoding_gaussian_matrix``
    (a buffer in PyTorch) lives in the params tree so that it is converted and saved
    with the weights; it is fixed in spirit, freeze it when training. Encodings have
    ``2 * num_pos_feats`` channels: ``[sin(2 pi (2c - 1) G), cos(...)]``.
    """

    num_pos_feats: int = 64
    scale: float = 1.0

    def setup(self) -> None:
        scale = self.scale if self.scale > 0 else 1.0
        self.positional_encoding_gaussian_matrix = self.param(
            "positional_encoding_gaussian_matrix",
            lambda key, shape: scale * jax.random.normal(key, shape),
            (2, self.num_pos_feats),
        )

    def _pe_encoding(self, coords: jax.Array) -> jax.Array:
        """``(..., 2)`` coordinates in ``[0, 1]`` (x, y) -> ``(..., 2 * num_pos_feats)``."""
        coords = 2 * coords - 1
        coords = jnp.matmul(coords, self.positional_encoding_gaussian_matrix, precision="highest")
        coords = 2 * math.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def __call__(self, size: tuple[int, int]) -> jax.Array:
        """Encoding of the pixel centres of an ``(h, w)`` grid: ``(h, w, 2 * num_pos_feats)``."""
        h, w = size
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        return self._pe_encoding(grid)

    def forward_with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """Encode ``(B, N, 2)`` pixel coordinates (x, y) of an ``image_size = (H, W)``
        image: ``(B, N, 2 * num_pos_feats)``."""
        coords = coords.astype(jnp.float32)
        norm = jnp.array([1.0 / image_size[1], 1.0 / image_size[0]], jnp.float32)
        return self._pe_encoding(coords * norm.reshape(1, 1, 2))


class PromptEncoder(nn.Module):
    """Encodes prompts for SAM's mask decoder.

    Attributes:
      embed_dim: prompt embedding channels (256 in SAM).
      image_embedding_size: ``(h, w)`` of the image embedding (64x64 in SAM).
      input_image_size: ``(H, W)`` of the padded encoder input (1024x1024 in SAM); point
        and box coordinates are pixels of this frame.
      mask_in_chans: hidden channels of the mask downscaling stack (16 in SAM).
    """

    embed_dim: int = 256
    image_embedding_size: tuple[int, int] = (64, 64)
    input_image_size: tuple[int, int] = (1024, 1024)
    mask_in_chans: int = 16
    dtype: Any = None

    num_point_embeddings = 4  # positive/negative point + 2 box corners (class constant)

    def setup(self) -> None:
        self.pe_layer = PositionEmbeddingRandom(self.embed_dim // 2)
        self.point_embeddings = [
            nn.Embed(1, self.embed_dim, embedding_init=_normal) for i in range(self.num_point_embeddings)
        ]
        self.not_a_point_embed = nn.Embed(1, self.embed_dim, embedding_init=_normal)
        self.no_mask_embed = nn.Embed(1, self.embed_dim, embedding_init=_normal)
        c4 = self.mask_in_chans // 4
        self.mask_downscaling_0 = Conv2D(c4, 2, strides=2, padding="VALID", dtype=self.dtype)
        self.mask_downscaling_1 = LayerNorm2d(dtype=self.dtype)
        self.mask_downscaling_3 = Conv2D(self.mask_in_chans, 2, strides=2, padding="VALID", dtype=self.dtype)
        self.mask_downscaling_4 = LayerNorm2d(dtype=self.dtype)
        self.mask_downscaling_6 = Conv2D(self.embed_dim, 1, padding="VALID", dtype=self.dtype)

    @property
    def mask_input_size(self) -> tuple[int, int]:
        """``(4 h, 4 w)``: the size of mask prompts (256x256 in SAM)."""
        return 4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1]

    def get_dense_pe(self) -> jax.Array:
        """Positional encoding of the image-embedding grid: ``(1, h, w, embed_dim)``."""
        return self.pe_layer(self.image_embedding_size)[None]

    def _embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        """``(B, N, 2)`` points, ``(B, N)`` labels (1 foreground, 0 background, -1 not a
        point) -> ``(B, N (+1 if pad), embed_dim)``."""
        points = points.astype(jnp.float32) + 0.5  # pixel centres
        labels = labels.astype(jnp.int32)
        if pad:
            b = points.shape[0]
            points = jnp.concatenate([points, jnp.zeros((b, 1, 2), points.dtype)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((b, 1), labels.dtype)], axis=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[:, :, None]

        def table(e: nn.Embed) -> jax.Array:
            return e.embedding.reshape(1, 1, -1)

        emb = jnp.where(lab == -1, 0.0, emb)
        emb = emb + jnp.where(lab == -1, table(self.not_a_point_embed), 0.0)
        emb = emb + jnp.where(lab == 0, table(self.point_embeddings[0]), 0.0)
        return emb + jnp.where(lab == 1, table(self.point_embeddings[1]), 0.0)

    def _embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """``(B, 4)`` boxes (x0, y0, x1, y1) -> ``(B, 2, embed_dim)`` corner embeddings."""
        coords = (boxes.astype(jnp.float32) + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        corners = jnp.concatenate([self.point_embeddings[2].embedding, self.point_embeddings[3].embedding], axis=0)
        return emb + corners[None]

    def _embed_masks(self, masks: jax.Array) -> jax.Array:
        """``(B, 4h, 4w, 1)`` mask logits -> ``(B, h, w, embed_dim)``."""
        x = gelu(self.mask_downscaling_1(self.mask_downscaling_0(masks)))
        x = gelu(self.mask_downscaling_4(self.mask_downscaling_3(x)))
        return self.mask_downscaling_6(x)

    def __call__(
        self,
        points: tuple[jax.Array, jax.Array] | None = None,
        boxes: jax.Array | None = None,
        masks: jax.Array | None = None,
        *,
        batch_size: int | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Embed any subset of prompts.

        Args:
          points: ``(coords (B, N, 2), labels (B, N))`` in ``input_image_size`` pixels
            (x, y). Without boxes a padding "not a point" is appended, as the reference.
          boxes: ``(B, 4)`` xyxy in ``input_image_size`` pixels.
          masks: ``(B, 4h, 4w, 1)`` low-resolution mask logits.
          batch_size: batch size when no prompt is given (the reference uses 1).

        Returns:
          sparse ``(B, N_sparse, embed_dim)`` (points, then 2 box corners) and dense
          ``(B, h, w, embed_dim)`` embeddings.
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1 if batch_size is None else batch_size
        # Touch every embedding so that one init creates the whole tree.
        no_mask = self.no_mask_embed.embedding
        parts = [jnp.zeros((bs, 0, self.embed_dim), jnp.float32)]
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        sparse = jnp.concatenate(parts, axis=1)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = jnp.broadcast_to(no_mask.reshape(1, 1, 1, -1), (bs, h, w, self.embed_dim))
        return sparse, dense
