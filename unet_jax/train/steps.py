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
from unet_jax.data.prompts import boxes_from_masks
from unet_jax.losses import batch_confusion, softmax_cross_entropy
from unet_jax.metrics import scores_from_confusion
from unet_jax.models.build import Outputs, run_model_with_aux
from unet_jax.train.distributed import to_host
from unet_jax.train.state import TrainState

__all__ = [
    "BATCH_AXIS",
    "Metrics",
    "LossFn",
    "apply_model",
    "deep_supervision_loss",
    "downsample_masks",
    "make_mesh",
    "batch_metrics",
    "train_step",
    "eval_step",
    "train_steps",
    "train_steps_undonated",
    "get_train_steps",
    "evaluate_device_data",
    "metrics_to_host",
    "run_keys",
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


def apply_model(
    state: TrainState,
    params: Any,
    images: jax.Array,
    masks: jax.Array,
    *,
    train: bool,
    key: jax.Array | None = None,
    box_jitter: float = 0.0,
) -> tuple[Outputs, Any]:
    """The model on a batch: ``((mask_logits, class_logits), batch-norm updates)``.

    Box-prompted models (``state.box_prompts``) get boxes from ``masks`` (jittered in
    training, see unet_jax.data.prompts); ``key`` drives dropout and the jitter.
    """
    outputs, _, updates = _apply_with_aux(state, params, images, masks, train=train, key=key, box_jitter=box_jitter)
    return outputs, updates


def _apply_with_aux(
    state: TrainState,
    params: Any,
    images: jax.Array,
    masks: jax.Array,
    *,
    train: bool,
    key: jax.Array | None = None,
    box_jitter: float = 0.0,
) -> tuple[Outputs, tuple[jax.Array, ...], Any]:
    """:func:`apply_model` plus the model's deep-supervision logits (``()`` without)."""
    variables = {"params": params, "batch_stats": state.batch_stats}
    boxes = None
    if state.box_prompts:
        jitter_key = None if key is None else jax.random.fold_in(key, 1)
        boxes = boxes_from_masks(masks, jitter=box_jitter if train else 0.0, key=jitter_key)
    rngs = {"dropout": key} if train else None
    return run_model_with_aux(state.apply_fn, variables, images, boxes, train=train, rngs=rngs)


def downsample_masks(masks: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Masks (B, H, W, K) averaged over blocks to (B, h, w, K), ``H = f * h`` and
    ``W = f * w``: each block's lesion fraction, the soft target of a deep-supervision
    head at that scale."""
    b, h, w, k = masks.shape
    fh, fw = h // size[0], w // size[1]
    if (fh * size[0], fw * size[1]) != (h, w):
        raise ValueError(f"deep supervision: masks of size {(h, w)} do not divide into logits of size {size}")
    return jnp.mean(masks.reshape(b, size[0], fh, size[1], fw, k), axis=(2, 4))


def deep_supervision_loss(main: jax.Array, aux: tuple[jax.Array, ...], masks: jax.Array, loss_fn: LossFn) -> jax.Array:
    """nnU-Net's deep-supervision objective (Isensee et al. 2021): the main loss and each
    coarser head's loss against the block-averaged masks, weighted 1, 1/2, 1/4, ... and
    normalised to sum to 1. ``main``: the full-resolution loss; ``aux``: logits at 1/2,
    1/4, ... of the mask size."""
    weights = [0.5 ** (i + 1) for i in range(len(aux))]
    total = main
    for weight, logits in zip(weights, aux):
        total = total + weight * loss_fn(logits, downsample_masks(masks, logits.shape[1:3]))
    return total / (1.0 + sum(weights))


def batch_metrics(
    outputs: Outputs,
    masks: jax.Array,
    labels: jax.Array,
    per_image_loss: jax.Array,
    threshold: float,
    weights: jax.Array | None = None,
) -> Metrics:
    """Sums and counts of the loss and of what the model's heads allow: Dice, IoU and
    pixel accuracy of mask logits, accuracy of class logits.

    outputs: (mask logits (B, H, W, 1) or None, class logits (B, K) or None); masks (B, H,
    W, 1); labels, per_image_loss, weights: (B,). Dice and IoU are per image (an empty
    prediction of an empty mask scores 1, see unet_jax.metrics); pixel accuracy counts
    pixels, as Keras' "accuracy" did.
    """
    mask_logits, class_logits = outputs
    weights = jnp.ones(per_image_loss.shape, jnp.float32) if weights is None else weights
    count = jnp.sum(weights)
    metrics = {"loss": (jnp.sum(per_image_loss * weights), count)}
    if mask_logits is not None:
        scores = scores_from_confusion(*batch_confusion(mask_logits, masks, threshold))
        for name in ("dice", "iou", "pixel_accuracy"):
            metrics[name] = (jnp.sum(scores[name] * weights), count)
    if class_logits is not None:
        correct = (jnp.argmax(class_logits, axis=-1) == labels).astype(jnp.float32)
        metrics["accuracy"] = (jnp.sum(correct * weights), count)
        ce = softmax_cross_entropy(class_logits, labels)
        metrics["class_loss"] = (jnp.sum(ce * weights), count)
    return metrics


def _per_image(loss_fn: LossFn, logits: jax.Array, masks: jax.Array) -> jax.Array:
    # Each image's own loss; their mean equals the batch loss for equal-size images.
    return jax.vmap(lambda x, m: loss_fn(x[None], m[None]))(logits, masks)


def _class_term(outputs: Outputs, class_weight: float) -> float:
    """The weight of the cross-entropy: 1 for a classifier, class_weight beside a mask head."""
    mask_logits, class_logits = outputs
    if class_logits is None:
        return 0.0
    return 1.0 if mask_logits is None else class_weight


def _total_loss(
    outputs: Outputs,
    masks: jax.Array,
    labels: jax.Array,
    loss_fn: LossFn,
    class_weight: float,
    per_image: bool,
    aux: tuple[jax.Array, ...] = (),
) -> jax.Array:
    """The training objective: the segmentation loss (batch value, or per image; with the
    deep-supervision logits ``aux``, :func:`deep_supervision_loss` of the batch) plus the
    weighted cross-entropy of the class head."""
    mask_logits, class_logits = outputs
    batch = masks.shape[0]
    total = jnp.zeros((batch,) if per_image else (), jnp.float32)
    if mask_logits is not None:
        if per_image:
            total = total + _per_image(loss_fn, mask_logits, masks)
        else:
            main = loss_fn(mask_logits, masks)
            total = total + (deep_supervision_loss(main, aux, masks, loss_fn) if aux else main)
    weight = _class_term(outputs, class_weight)
    if weight:
        ce = softmax_cross_entropy(class_logits, labels)
        total = total + weight * (ce if per_image else jnp.mean(ce))
    return total


def _frozen_stopped(state: TrainState, params: Any) -> Any:
    # stop_gradient, not only a zero update: XLA then skips the frozen groups' backward pass.
    return {k: (jax.lax.stop_gradient(v) if k in state.frozen else v) for k, v in params.items()}


def train_step(
    state: TrainState,
    batch: Batch,
    dropout_key: jax.Array,
    *,
    loss_fn: LossFn,
    threshold: float = 0.5,
    class_weight: float = 0.0,
    box_jitter: float = 0.0,
) -> tuple[TrainState, Metrics]:
    """One optimiser step on ``batch`` (images (B, H, W, C), masks (B, H, W, 1), labels (B,)).

    Dropout (and box jitter) draw from ``fold_in(dropout_key, state.step)``, so a resumed
    run repeats them. ``class_weight`` weighs the cross-entropy of a second (class) head.
    """
    key = jax.random.fold_in(dropout_key, state.step)

    def objective(params: Any) -> tuple[jax.Array, tuple[Outputs, Any]]:
        outputs, aux, updates = _apply_with_aux(
            state, _frozen_stopped(state, params), batch.images, batch.masks, train=True, key=key, box_jitter=box_jitter
        )
        loss = _total_loss(outputs, batch.masks, batch.labels, loss_fn, class_weight, False, aux)
        return loss, (outputs, updates)

    (_, (outputs, updates)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    # optax is written for standard dtype promotion (Adam's bias correction raises a Python
    # float to the int32 step count), which strict promotion refuses. The project's own code
    # is checked under strict promotion (the test suite turns it on), so the optimiser,
    # third-party code, is the one place scoped back to standard; otherwise a no-op.
    with jax.numpy_dtype_promotion("standard"):
        state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    state = state.update_ema()
    outputs = jax.lax.stop_gradient(outputs)
    per_image = _total_loss(outputs, batch.masks, batch.labels, loss_fn, class_weight, True)
    return state, batch_metrics(outputs, batch.masks, batch.labels, per_image, threshold)


def eval_step(
    state: TrainState,
    images: jax.Array,
    masks: jax.Array,
    weights: jax.Array,
    labels: jax.Array | None = None,
    *,
    loss_fn: LossFn,
    threshold: float = 0.5,
    class_weight: float = 0.0,
) -> Metrics:
    """Metrics of the model in inference mode (running batch-norm statistics, no dropout,
    boxes without jitter).

    weights (B,): 1 for real examples, 0 for padding that fills the last batch; labels
    (B,) are needed by models with a class head.
    """
    outputs, _ = apply_model(state, state.params, images, masks, train=False)
    if labels is None:
        if outputs[1] is not None:
            raise ValueError("eval_step: the model has a class head; expected labels (B,)")
        labels = jnp.zeros(weights.shape, jnp.int32)
    per_image = _total_loss(outputs, masks, labels, loss_fn, class_weight, True)
    return batch_metrics(outputs, masks, labels, per_image, threshold, weights)


def add_metrics(a: Metrics, b: Metrics) -> Metrics:
    return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


_TRAIN_STEPS_STATIC = ("num_steps", "sample", "loss_fn", "threshold", "mesh", "class_weight", "box_jitter")


@functools.partial(jax.jit, static_argnames=_TRAIN_STEPS_STATIC, donate_argnames=("state",))
def train_steps(
    state: TrainState,
    data: DeviceData,
    data_key: jax.Array,
    dropout_key: jax.Array,
    start_step: jax.Array,
    *,
    num_steps: int,
    sample: Callable[..., Batch],
    loss_fn: LossFn,
    threshold: float,
    mesh: Mesh | None,
    class_weight: float = 0.0,
    box_jitter: float = 0.0,
) -> tuple[TrainState, Metrics]:
    """``num_steps`` training steps in one dispatch (a ``lax.scan``), batches drawn on device.

    ``sample(data, data_key, step) -> Batch`` (unet_jax.data.make_sampler) makes each batch
    a pure function of the step, so nothing crosses to the host inside an epoch.
    """

    options = {"class_weight": class_weight, "box_jitter": box_jitter}

    def body(carry: tuple[TrainState, Metrics], step: jax.Array) -> tuple[tuple[TrainState, Metrics], None]:
        state, totals = carry
        batch = _shard_batch(sample(data, data_key, step), mesh)
        state, metrics = train_step(state, batch, dropout_key, loss_fn=loss_fn, threshold=threshold, **options)
        return (state, add_metrics(totals, metrics)), None

    if num_steps == 1:
        # No loop for one step: nothing to amortise, and the program compiles faster.
        batch = _shard_batch(sample(data, data_key, start_step), mesh)
        return train_step(state, batch, dropout_key, loss_fn=loss_fn, threshold=threshold, **options)
    steps = start_step + jnp.arange(num_steps, dtype=jnp.int32)
    zero = jax.eval_shape(
        lambda: train_step(
            state, sample(data, data_key, 0), dropout_key, loss_fn=loss_fn, threshold=threshold, **options
        )[1]
    )
    totals = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
    (state, totals), _ = jax.lax.scan(body, (state, totals), steps)
    return state, totals


# The same steps without donating the state's buffers (a benchmark lever: with donation
# XLA updates parameters and optimiser moments in place).
train_steps_undonated = jax.jit(train_steps.__wrapped__, static_argnames=_TRAIN_STEPS_STATIC)


def get_train_steps(donate: bool = True) -> Callable[..., tuple[TrainState, Metrics]]:
    """:func:`train_steps`, or its twin that leaves the input state's buffers alive."""
    return train_steps if donate else train_steps_undonated


def run_keys(seed: int, dropout_prng: str = "threefry2x32") -> tuple[jax.Array, jax.Array]:
    """``(data_key, dropout_key)`` of a run with this seed: both split from a threefry2x32
    key, or, for another ``dropout_prng`` (``"rbg"``, ``"unsafe_rbg"``: XLA's
    RngBitGenerator), the dropout key is ``jax.random.key(seed, impl=dropout_prng)``. The
    data order and augmentation never change with it."""
    data_key, dropout_key = jax.random.split(jax.random.key(seed))
    if dropout_prng != "threefry2x32":
        dropout_key = jax.random.key(seed, impl=dropout_prng)
    return data_key, dropout_key


def default_steps_per_dispatch(steps_per_epoch: int) -> int:
    """A whole epoch per dispatch on every backend (no host round trip inside an epoch).

    The CPU used one step per dispatch while XLA:CPU ran convolution gradients inside a
    loop 25x slower; with unet_jax.layers.conv_grad's canonical gradients the scanned step is the
    faster one there too (padded 16-wide U-Net, 128x128, batch 16, 2 cores: 17.0 img/s
    scanned vs 14.3 one step per dispatch; ``python -m benchmarks.cpu_levers model``, RESULTS.md)."""
    return steps_per_epoch


@functools.partial(jax.jit, static_argnames=("batch_size", "loss_fn", "threshold", "mesh", "class_weight"))
def evaluate_device_data(
    state: TrainState,
    data: DeviceData,
    *,
    batch_size: int,
    loss_fn: LossFn,
    threshold: float,
    mesh: Mesh | None,
    class_weight: float = 0.0,
) -> Metrics:
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
        images, masks, labels, w = _shard_batch((images, masks, data.labels[idx], w), mesh)
        metrics = eval_step(
            state, images, masks, w, labels, loss_fn=loss_fn, threshold=threshold, class_weight=class_weight
        )
        return metrics if totals is None else add_metrics(totals, metrics), None

    shape = jax.eval_shape(lambda: body(None, (index[0], weights[0]))[0])
    totals = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
    totals, _ = jax.lax.scan(body, totals, (index, weights))
    return totals


def metrics_to_host(metrics: Metrics, prefix: str = "") -> dict[str, float]:
    """Means on the host: ``{prefix + name: sum / count}`` (one device-to-host transfer)."""
    host = to_host(metrics)
    return {f"{prefix}{k}": float(s) / max(float(c), 1e-12) for k, (s, c) in host.items()}
