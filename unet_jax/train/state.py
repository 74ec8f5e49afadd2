"""Training state (the model's, the loop's) and optimiser construction."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from unet_jax.config import TrainConfig
from unet_jax.models import init_variables, needs_box_prompts

__all__ = ["TrainState", "LoopState", "make_optimizer", "make_schedule", "create_train_state"]


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the batch-norm running statistics (empty without norm) and,
    with ``ema_decay > 0``, an exponential moving average of both (``ema``:
    ``{"params", "batch_stats"}``; None without it).

    Static (not saved, rebuilt from the config): ``box_prompts``, whether the model takes
    box prompts (SAM); ``frozen``, the top-level parameter groups that get no gradient;
    ``ema_decay``.
    """

    batch_stats: Any = None
    ema: Any = None
    box_prompts: bool = struct.field(pytree_node=False, default=False)
    frozen: tuple[str, ...] = struct.field(pytree_node=False, default=())
    ema_decay: float = struct.field(pytree_node=False, default=0.0)

    def deployed(self) -> TrainState:
        """The state whose weights are evaluated, early-stopped on and deployed: the
        moving average when there is one, else the state itself."""
        if self.ema is None:
            return self
        return self.replace(params=self.ema["params"], batch_stats=self.ema["batch_stats"])

    def update_ema(self) -> TrainState:
        """The moving average after the step just taken (``self.step`` counts it):
        ``ema <- d * ema + (1 - d) * new`` with ``d = min(ema_decay, (1 + t) / (10 + t))``,
        ``t`` the number of steps before this one."""
        if self.ema is None:
            return self
        t = jnp.asarray(self.step, jnp.float32) - 1.0
        decay = jnp.minimum(self.ema_decay, (1.0 + t) / (10.0 + t))
        new = {"params": self.params, "batch_stats": self.batch_stats}
        ema = jax.tree.map(lambda e, x: (decay * e + (1.0 - decay) * x).astype(e.dtype), self.ema, new)
        return self.replace(ema=ema)

    def with_variables(self, variables: dict[str, Any]) -> TrainState:
        """``variables`` (``{"params", "batch_stats"}``) as the weights, the moving
        average (if any) restarted from them."""
        ema = None if self.ema is None else jax.tree.map(jnp.copy, variables)
        return self.replace(params=variables["params"], batch_stats=variables["batch_stats"], ema=ema)


@dataclasses.dataclass(frozen=True)
class LoopState:
    """The loop's counters and history (the early-stopping bookkeeping): plain data, saved
    in every checkpoint's meta as ``loop`` (:meth:`to_dict`), so a resumed run goes on
    where it stopped."""

    epoch: int = 0
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    history: tuple[dict[str, Any], ...] = ()
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "history": list(self.history)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopState:
        """The state saved by :meth:`to_dict` (keys it does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        loop = cls(**{k: v for k, v in values.items() if k in known})
        return dataclasses.replace(loop, history=tuple(loop.history))


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


def _base_optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    if config.optimizer == "adam":
        tx = optax.adam(schedule, eps=1e-7)
    elif config.optimizer == "sgd":
        tx = optax.sgd(schedule, momentum=config.momentum or None)
    else:
        tx = optax.adamw(schedule, eps=1e-7, weight_decay=config.weight_decay)
    return tx


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (the notebook: Keras Adam, learning rate 1e-3, epsilon 1e-7), AdamW, or SGD
    with momentum. With ``encoder_lr_scale != 1`` the top-level group ``encoder`` gets its
    own copy at the scaled learning rate (discriminative fine-tuning: a pretrained encoder
    moves less than a new decoder); ``freeze`` groups get no update at all."""
    schedule = make_schedule(config, steps_per_epoch)
    tx = _base_optimizer(config, schedule)
    if config.encoder_lr_scale != 1.0:
        scale = config.encoder_lr_scale
        encoder_tx = _base_optimizer(config, lambda step: scale * schedule(step))
        tx = optax.multi_transform(
            {"train": tx, "encoder": encoder_tx},
            lambda params: {k: ("encoder" if k == "encoder" else "train") for k in params},
        )
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    if config.freeze:
        # Frozen groups get no update at all: no weight decay, no optimiser state.
        frozen = set(config.freeze)
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()},
            lambda params: {k: ("frozen" if k in frozen else "train") for k in params},
        )
    return tx


def create_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    key: jax.Array,
    input_shape: tuple[int, ...],
    frozen: tuple[str, ...] = (),
    ema_decay: float = 0.0,
    encoder_lr_scale: float = 1.0,
) -> TrainState:
    """Initialise parameters for inputs of ``input_shape`` (N, H, W, C).

    ``frozen``: top-level parameter groups to keep fixed (they must exist); ``ema_decay``
    > 0 keeps a moving average of the weights (:meth:`TrainState.update_ema`);
    ``encoder_lr_scale != 1`` needs a group ``encoder`` (:func:`make_optimizer`).
    """
    variables = init_variables(model, key, input_shape)
    if encoder_lr_scale != 1.0 and "encoder" not in variables["params"]:
        raise ValueError(
            f"encoder_lr_scale {encoder_lr_scale}: {type(model).__name__} has no parameter group 'encoder'; "
            f"expected a pretrained-encoder model (groups {sorted(variables['params'])})"
        )
    unknown = sorted(set(frozen) - set(variables["params"]))
    if unknown:
        raise ValueError(
            f"freeze {unknown}: no such parameter group in {type(model).__name__}; "
            f"expected some of {sorted(variables['params'])}"
        )
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
        ema=(
            jax.tree.map(jnp.copy, {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})})
            if ema_decay > 0
            else None
        ),
        box_prompts=needs_box_prompts(model),
        frozen=tuple(frozen),
        ema_decay=float(ema_decay),
    )
