"""Dropout whose random bits cost a quarter (issue 31): one 32-bit draw per four elements.

JAX's dropout (``flax.linen.Dropout``) draws one 32-bit number per element, and the default
generator (threefry2x32) spends about 20 rounds of integer arithmetic per 32 bits.
:class:`Dropout8` draws ``ceil(n / 4)`` 32-bit words, reads each as four
bytes and keeps an element when its byte is at least ``t = round(256 * rate)``: the rate
becomes ``t / 256`` (0.2 -> 51/256 = 0.1992), and the kept elements are scaled by
``256 / (256 - t)`` so that the expectation is exact (``UNet.dropout_bits=8``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

__all__ = ["Dropout8", "keep_mask_8bit"]


def keep_mask_8bit(key: jax.Array, shape: tuple[int, ...], rate: float) -> tuple[jax.Array, float]:
    """A boolean keep mask of ``shape`` from 8 bits per element, and its keep probability
    ``1 - round(256 * rate) / 256``."""
    threshold = round(256 * rate)
    n = math.prod(shape)
    words = jax.random.bits(key, (-(-n // 4),), jnp.uint32)
    octets = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[:n].reshape(shape)
    return octets >= threshold, 1.0 - threshold / 256


class Dropout8(nn.Module):
    """Inverted dropout (zero with probability ``round(256 rate) / 256``, the rest scaled up)
    from 8 random bits per element (module docstring); randomness from the ``'dropout'`` RNG
    stream, as ``flax.linen.Dropout``'s."""

    rate: float
    deterministic: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        keep, keep_prob = keep_mask_8bit(self.make_rng("dropout"), x.shape, self.rate)
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))
