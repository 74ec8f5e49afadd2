"""Training state and optimiser construction."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from unet_jax.config import TrainConfig

__all__ = ["TrainState", "make_optimizer", "make_schedule", "create_train_state"]


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the batch-norm running statistics (empty without norm)."""

    batch_stats: Any = None


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Constant, or cosine decay to 0 over the whole run after a linear warm-up."""
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    total = config.epochs * steps_per_epoch
    if config.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(config.learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, config.learning_rate, warmup), optax.constant_schedule(config.learning_rate)],
            [warmup],
        )
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, max(total, warmup + 1), 0.0)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (the notebook: Keras Adam, learning rate 1e-3, epsilon 1e-7) or AdamW."""
    schedule = make_schedule(config, steps_per_epoch)
    if config.optimizer == "adam":
        tx = optax.adam(schedule, eps=1e-7)
    else:
        tx = optax.adamw(schedule, eps=1e-7, weight_decay=config.weight_decay)
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx


def create_train_state(model: Any, tx: optax.GradientTransformation, key: jax.Array,
                       input_shape: tuple[int, ...]) -> TrainState:
    """Initialise parameters for inputs of ``input_shape`` (N, H, W, C)."""
    # Jitted: one compiled program instead of hundreds of eagerly dispatched operations.
    init = jax.jit(lambda key: model.init(key, jnp.zeros(input_shape, jnp.float32), train=False))
    variables = init(key)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
    )
