"""Batch norm folded into the convolutions (unet_jax.models.fold_batch_norm): a random
U-Net's folded output equals the unfolded one within 1e-5. (Not on the prediction path:
measured no faster there, RESULTS.md "The CPU at or past PyTorch".)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.models import create_unet, fold_batch_norm


def _random_unet(preset: str, **fields):
    """A U-Net with random weights and random batch-norm parameters and running statistics
    (initial ones are 0 and 1, which would hide a misplaced mean or variance)."""
    model = create_unet(preset, in_channels=1, features=8, depth=2, **fields)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
    variables = model.init(jax.random.key(1), x, train=False)
    keys = iter(jax.random.split(jax.random.key(2), 4096))

    def randomise(path, leaf):
        name = jax.tree_util.keystr(path)
        if "'mean'" in name or ("'bn" in name and "'bias'" in name):
            return 0.3 * jax.random.normal(next(keys), leaf.shape)
        if "'var'" in name or ("'bn" in name and "'scale'" in name):
            return jax.random.uniform(next(keys), leaf.shape, minval=0.5, maxval=2.0)
        return leaf

    return model, jax.tree_util.tree_map_with_path(randomise, variables), x


@pytest.mark.parametrize("preset, fields", [("seed", {}), ("padded", {}), ("padded", {"class_head": 3})])
def test_folded_random_unet_equals_the_unfolded_within_1e_5(preset, fields):
    model, variables, x = _random_unet(preset, **fields)
    folded_model, folded = fold_batch_norm(model, variables)
    assert folded_model.norm == "none" and "batch_stats" not in folded
    a = jax.tree.leaves(model.apply(variables, x, train=False))
    b = jax.tree.leaves(folded_model.apply(folded, x, train=False))
    for u, w in zip(a, b):
        assert float(jnp.max(jnp.abs(u))) > 1e-2  # a real output, not a vanishing one
        np.testing.assert_allclose(w, u, rtol=1e-5, atol=1e-5)
