"""Pure, jittable train and eval steps, and their multi-step, data-parallel wrappers.

Metrics are accumulated on the device as ``{name: (sum, count)}`` and reach the host only
when logged (:func:`metrics_to_host`), where the loop checks them for NaN.

Data parallelism: a 1-D mesh with axis ``batch`` over every device; the state is
replicated and every batch is sharded along its leading axis, so XLA (GSPMD) inserts the
gradient all-reduce, and batch-norm statistics are those of the global batch: the same
numbers on 1 device as on many.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unet_jax.data.augment import Batch, DeviceData
from unet_jax.losses import batch_confusion
from unet_jax.metrics import scores_from_confusion
from unet_jax.train.state import TrainState

__all__ = [
    "Metrics",
    "LossFn",
    "make_mesh",
    "batch_metrics",
    "train_step",
    "eval_step",
    "train_steps",
    "evaluate_device_data",
    "metrics_to_host",
    "add_metrics",
    "default_steps_per_dispatch",
]

Metrics = dict[str, tuple[jax.Array, jax.Array]]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
BATCH_AXIS = "batch"


def make_mesh(devices: list[Any] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def _shard_batch(tree: Any, mesh: Mesh | None) -> Any:
    if mesh is None or mesh.devices.size == 1:
        # A no-op on one device, but XLA:CPU then compiles the step ~10x slower.
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec(BATCH_AXIS)))


def batch_metrics(logits: jax.Array, masks: jax.Array, per_image_loss: jax.Array,
                  threshold: float, weights: jax.Array | None = None) -> Metrics:
    """Sums and counts of loss, Dice, IoU and pixel accuracy over a batch.

    logits, masks: (B, H, W, 1); per_image_loss, weights: (B,). Dice and IoU are per image
    (an empty prediction of an empty mask scores 1, see unet_jax.metrics); pixel accuracy
    counts pixels, as Keras' "accuracy" did.
    """
    weights = jnp.ones(logits.shape[:1], jnp.float32) if weights is None else weights
    scores = scores_from_confusion(*batch_confusion(logits, masks, threshold))
    count = jnp.sum(weights)
    metrics = {"loss": (jnp.sum(per_image_loss * weights), count)}
    for name in ("dice", "iou", "pixel_accuracy"):
        metrics[name] = (jnp.sum(scores[name] * weights), count)
    return metrics


def _per_image(loss_fn: LossFn, logits: jax.Array, masks: jax.Array) -> jax.Array:
    # Each image's own loss; their mean equals the batch loss for equal-size images.
    return jax.vmap(lambda l, m: loss_fn(l[None], m[None]))(logits, masks)


def train_step(state: TrainState, batch: Batch, dropout_key: jax.Array, *, loss_fn: LossFn,
               threshold: float = 0.5) -> tuple[TrainState, Metrics]:
    """One optimiser step on ``batch`` (images (B, H, W, C), masks (B, H, W, 1)).

    Dropout draws from ``fold_in(dropout_key, state.step)``, so a resumed run repeats it.
    """
    key = jax.random.fold_in(dropout_key, state.step)

    def objective(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch.images,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        return loss_fn(logits, batch.masks), (logits, updates)

    (_, (logits, updates)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    per_image = _per_image(loss_fn, jax.lax.stop_gradient(logits), batch.masks)
    return state, batch_metrics(logits, batch.masks, per_image, threshold)


def eval_step(state: TrainState, images: jax.Array, masks: jax.Array, weights: jax.Array, *,
              loss_fn: LossFn, threshold: float = 0.5) -> Metrics:
    """Metrics of the model in inference mode (running batch-norm statistics, no dropout).

    weights (B,): 1 for real examples, 0 for padding that fills the last batch.
    """
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)
    per_image = _per_image(loss_fn, logits, masks)
    return batch_metrics(logits, masks, per_image, threshold, weights)


def add_metrics(a: Metrics, b: Metrics) -> Metrics:
    return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


@functools.partial(jax.jit, static_argnames=("num_steps", "sample", "loss_fn", "threshold", "mesh"),
                   donate_argnames=("state",))
def train_steps(state: TrainState, data: DeviceData, data_key: jax.Array, dropout_key: jax.Array,
                start_step: jax.Array, *, num_steps: int, sample: Callable[..., Batch], loss_fn: LossFn,
                threshold: float, mesh: Mesh | None) -> tuple[TrainState, Metrics]:
    """``num_steps`` training steps in one dispatch (a ``lax.scan``), batches drawn on device.

    ``sample(data, data_key, step) -> Batch`` (unet_jax.data.make_sampler) makes each batch
    a pure function of the step, so nothing crosses to the host inside an epoch.
    """

    def body(carry: tuple[TrainState, Metrics], step: jax.Array) -> tuple[tuple[TrainState, Metrics], None]:
        state, totals = carry
        batch = _shard_batch(sample(data, data_key, step), mesh)
        state, metrics = train_step(state, batch, dropout_key, loss_fn=loss_fn, threshold=threshold)
        return (state, add_metrics(totals, metrics)), None

    if num_steps == 1:
        # No loop: XLA:CPU runs convolutions inside a while loop several times slower.
        batch = _shard_batch(sample(data, data_key, start_step), mesh)
        return train_step(state, batch, dropout_key, loss_fn=loss_fn, threshold=threshold)
    steps = start_step + jnp.arange(num_steps, dtype=jnp.int32)
    zero = jax.eval_shape(lambda: train_step(state, sample(data, data_key, 0), dropout_key,
                                             loss_fn=loss_fn, threshold=threshold)[1])
    totals = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
    (state, totals), _ = jax.lax.scan(body, (state, totals), steps)
    return state, totals


def default_steps_per_dispatch(steps_per_epoch: int) -> int:
    """A whole epoch per dispatch on accelerators (no host round trip inside an epoch);
    one step per dispatch on CPU, where looping on the device is slower than dispatching."""
    return 1 if jax.default_backend() == "cpu" else steps_per_epoch


@functools.partial(jax.jit, static_argnames=("batch_size", "loss_fn", "threshold", "mesh"))
def evaluate_device_data(state: TrainState, data: DeviceData, *, batch_size: int, loss_fn: LossFn,
                         threshold: float, mesh: Mesh | None) -> Metrics:
    """Metrics over a whole device-resident split, in fixed-size batches (one dispatch).

    The split is padded to a multiple of ``batch_size`` with zero-weight copies of its
    first example, so every split size compiles to one program per size.
    """
    n = data.images.shape[0]
    batches = -(-n // batch_size)
    index = jnp.arange(batches * batch_size)
    weights = (index < n).astype(jnp.float32).reshape(batches, batch_size)
    index = jnp.where(index < n, index, 0).reshape(batches, batch_size)

    def body(totals: Metrics, xs: tuple[jax.Array, jax.Array]) -> tuple[Metrics, None]:
        idx, w = xs
        images = data.images[idx].astype(jnp.float32) / 255.0
        masks = data.masks[idx].astype(jnp.float32)
        images, masks, w = _shard_batch((images, masks, w), mesh)
        metrics = eval_step(state, images, masks, w, loss_fn=loss_fn, threshold=threshold)
        return add_metrics(totals, metrics), None

    shape = jax.eval_shape(lambda: body(_empty_metrics(), (index[0], weights[0]))[0])
    totals = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
    totals, _ = jax.lax.scan(body, totals, (index, weights))
    return totals


def _empty_metrics() -> Metrics:
    zero = jnp.zeros((), jnp.float32)
    return {k: (zero, zero) for k in ("loss", "dice", "iou", "pixel_accuracy")}


def metrics_to_host(metrics: Metrics, prefix: str = "") -> dict[str, float]:
    """Means on the host: ``{prefix + name: sum / count}`` (one device-to-host transfer)."""
    host = jax.device_get(metrics)
    return {f"{prefix}{k}": float(s) / max(float(c), 1e-12) for k, (s, c) in host.items()}
