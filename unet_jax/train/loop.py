"""The training loop: data on the device, epochs of scanned steps, validation, early
stopping, checkpoints and logs; nothing else (the run folder, its checks and the final
stage are :mod:`unet_jax.train.run`).

Running the same command on the same folder resumes from ``checkpoints/latest``; batches,
augmentation and dropout are pure functions of the run seed and the step, so the resumed
run is the same run (bitwise on CPU).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unet_jax.config import TrainConfig, config_to_dict
from unet_jax.data import CLASSES, AugmentConfig, BusiDataset, DeviceData, Split, make_sampler
from unet_jax.inference import BEST, LATEST
from unet_jax.losses import get_loss
from unet_jax.models import build_model, model_heads
from unet_jax.train import distributed
from unet_jax.train.checkpoint import CheckpointStore
from unet_jax.train.init_from import load_initial_variables
from unet_jax.train.logs import MetricsLog
from unet_jax.train.run import (
    check_resume,
    check_resumed_meta,
    environment,
    finish_run,
    lock_run_folder,
    open_run_folder,
    start_run_data,
    write_run_json,
)
from unet_jax.train.state import (
    LoopState,
    TrainState,
    create_train_state,
    make_optimizer,
    make_schedule,
)
from unet_jax.train.steps import (
    BATCH_AXIS,
    default_steps_per_dispatch,
    evaluate_device_data,
    make_mesh,
    metrics_to_host,
    run_keys,
    train_steps,
)

__all__ = ["TrainingDiverged", "RunResult", "train", "check_model_config", "augment_config", "repeat_normals"]

Progress = Callable[[dict[str, Any]], None]


class TrainingDiverged(RuntimeError):
    """The loss, a metric or the training state became NaN or infinite; the message says
    which checkpoints (all finite) are kept, or that none was saved."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    run_dir: Path
    history: list[dict[str, Any]]
    best_epoch: int | None
    stopped_early: bool
    test: dict[str, float]
    wall_time_s: float


# --------------------------------------------------------------------------------------
# Pieces a run is made of (also used by evaluation and prediction)
# --------------------------------------------------------------------------------------
def check_model_config(config: TrainConfig, heads: tuple[bool, bool]) -> None:
    """Refuse configurations whose monitor or loss the model's heads cannot give."""
    has_mask, has_class = heads
    if not has_mask and config.monitor in ("val/dice", "val/iou"):
        raise ValueError(
            f"config monitor = {config.monitor!r} with preset {config.preset!r}, a classifier "
            f"(no mask head); expected monitor = 'val/loss' or 'val/accuracy'"
        )
    if not has_class and config.monitor == "val/accuracy":
        raise ValueError(
            f"config monitor = 'val/accuracy' with preset {config.preset!r}, which has no class "
            f"head; expected 'val/loss', 'val/dice' or 'val/iou' (or model.class_head=3)"
        )
    if has_mask and has_class and config.class_weight == 0:
        raise ValueError(
            f"preset {config.preset!r} with a class head and class_weight = 0: the head would never "
            f"be trained; expected class_weight > 0 (e.g. 0.1)"
        )


def augment_config(config: TrainConfig) -> AugmentConfig | None:
    if not config.augment:
        return None
    return AugmentConfig(
        hflip=config.hflip,
        vflip=0.0,
        max_rotation_deg=config.max_rotation_deg,
        scale=(config.scale_min, config.scale_max),
        brightness=config.brightness,
        contrast=(config.contrast_min, config.contrast_max),
        gamma=(config.gamma_min, config.gamma_max),
    )


def _replicate(tree: Any, mesh: Mesh) -> Any:
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    # Multi-host: every process holds the same (small) arrays; build global ones from them.
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: np.asarray(x)[i]), tree)


def repeat_normals(ids: Sequence[str], dataset: BusiDataset, repeats: int) -> tuple[str, ...]:
    """``ids`` followed by ``repeats - 1`` more copies of its normal images (hard negatives:
    ``TrainConfig.normal_repeats``), in split order; ``ids`` itself when ``repeats`` is 1."""
    if repeats == 1:
        return tuple(ids)
    normal = CLASSES.index("normal")
    labels = dataset.labels[dataset.index_of(tuple(ids))]
    normals = tuple(i for i, label in zip(ids, labels) if label == normal)
    return (*ids, *normals * (repeats - 1))


def _device_data(dataset: BusiDataset, ids: tuple[str, ...], mesh: Mesh) -> DeviceData:
    idx = dataset.index_of(ids)
    host = DeviceData(
        images=dataset.images_u8[idx],
        masks=dataset.masks[idx].astype(np.uint8),
        labels=dataset.labels[idx].astype(np.int32),
    )
    return _replicate(host, mesh)


def _sharded_device_data(dataset: BusiDataset, ids: tuple[str, ...], mesh: Mesh) -> DeviceData:
    """The split's examples as rows sharded over the mesh, each process providing only the
    rows of its own devices; padded with zero rows to a multiple of the device count (the
    sampler never draws them: ``make_sampler(..., num_rows=)``)."""
    n_dev = mesh.devices.size
    rows = -(-len(ids) // n_dev) * n_dev
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    owned = [s[0] for s in sharding.addressable_devices_indices_map((rows,)).values()]
    start, stop = min(s.start or 0 for s in owned), max(rows if s.stop is None else s.stop for s in owned)
    mine = dataset.index_of(ids[start : min(stop, len(ids))])
    pad = (stop - start) - len(mine)

    def local(array: np.ndarray, dtype: Any) -> np.ndarray:
        part = array[mine].astype(dtype)
        return np.concatenate([part, np.zeros((pad, *part.shape[1:]), dtype)]) if pad else part

    host = DeviceData(
        images=local(dataset.images_u8, np.uint8),
        masks=local(dataset.masks, np.uint8),
        labels=local(dataset.labels, np.int32),
    )
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a, (rows, *a.shape[1:])), host)


# --------------------------------------------------------------------------------------
# Early stopping bookkeeping (plain data, saved in every checkpoint)
# --------------------------------------------------------------------------------------
def _improved(config: TrainConfig, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if config.monitor == "val/loss" else value > best


def _check_finite(
    record: dict[str, Any], state: TrainState, store: CheckpointStore, steps_per_epoch: int, run_dir: Path
) -> None:
    """Stop before saving an epoch whose metrics or state (parameters, batch statistics,
    optimiser state) hold NaN or inf: finite metrics do not make a finite state (a batch
    norm variance can overflow while the loss still looks fine)."""
    bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    arrays = _non_finite_arrays(state)
    if not bad and not arrays:
        return
    details = [str(bad)] if bad else []
    if arrays:
        details.append(f"non-finite values in {len(arrays)} array(s) of the training state, e.g. {arrays[0]}")
    kept = [
        f"{which} (epoch {step // steps_per_epoch})"
        for which in (LATEST, BEST)
        if (step := store.latest_step(which)) is not None
    ]
    saved = (
        f"nothing of that epoch was saved; kept in {run_dir / 'checkpoints'}: {', '.join(kept)}"
        if kept
        else "no checkpoint was saved (no epoch of this run ended with finite values)"
    )
    raise TrainingDiverged(
        f"training diverged at epoch {record['epoch']}: {'; '.join(details)}; {saved} "
        f"(try a lower learning_rate or grad_clip_norm=1.0)"
    )


@jax.jit
def _finite_flags(tree: Any) -> list[jax.Array]:
    return [
        jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
        for x in jax.tree.leaves(tree)
    ]


def _non_finite_arrays(state: TrainState) -> list[str]:
    """Paths (``batch_stats/.../var``) of the state's arrays holding NaN or inf: the arrays
    a checkpoint saves."""
    tree = {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state, "ema": state.ema}
    paths = [
        jax.tree_util.keystr(path, simple=True, separator="/")
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]
    return [path for path, ok in zip(paths, distributed.to_host(_finite_flags(tree))) if not ok]


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    """What every stage of a run shares, made once by :func:`_start_run`."""

    config: TrainConfig
    run_dir: Path
    mesh: Mesh
    model: Any
    heads: tuple[bool, bool]
    dataset: BusiDataset
    split: Split
    steps_per_epoch: int
    steps_per_call: int
    loss_fn: Callable[..., jax.Array]
    tx: Any
    schedule: Callable[[int], Any]
    data_key: jax.Array
    dropout_key: jax.Array
    store: CheckpointStore
    train_data: DeviceData
    val_data: DeviceData
    sample: Callable[..., Any]
    emit: Progress
    live_progress: bool

    def evaluate(
        self,
        state: TrainState,
        data: DeviceData,
        prefix: str = "val/",
        loss_fn: Callable[..., jax.Array] | None = None,
        class_weight: float | None = None,
    ) -> dict[str, float]:
        """Metrics of ``state`` over a device-resident split, means on the host (the run's
        loss unless ``loss_fn`` and ``class_weight`` say otherwise)."""
        totals = evaluate_device_data(
            state.deployed(),
            data,
            batch_size=self.config.eval_batch_size,
            loss_fn=loss_fn or self.loss_fn,
            threshold=self.config.threshold,
            mesh=self.mesh,
            class_weight=self.config.class_weight if class_weight is None else class_weight,
        )
        return metrics_to_host(totals, prefix)

    def meta(self, loop: LoopState) -> dict[str, Any]:
        """What a checkpoint saves beside the state."""
        return {"config": config_to_dict(self.config), "loop": loop.to_dict(), "processes": jax.process_count()}


def train(
    config: TrainConfig, run_dir: str | os.PathLike, progress: Progress | None = None, mesh: Mesh | None = None
) -> RunResult:
    """Train, validate, early-stop, checkpoint and evaluate on the test split.

    Resumes from ``run_dir/checkpoints/latest`` when it exists (same config and process
    count required). ``progress`` receives plain dicts (``kind``: read, start, step, epoch,
    finishing, done); the library never prints.
    """
    started = time.time()
    if config.distributed:
        distributed.initialize(distributed.launch_from())
    with lock_run_folder(run_dir):
        return _train(config, run_dir, progress, mesh, started)


def _train(
    config: TrainConfig, run_dir: str | os.PathLike, progress: Progress | None, mesh: Mesh | None, started: float
) -> RunResult:
    run = _start_run(config, run_dir, progress, mesh)
    state, loop = _initial_state(run)
    run.emit(
        {
            "kind": "start",
            "epochs": config.epochs,
            "steps_per_epoch": run.steps_per_epoch,
            "resumed_epoch": loop.epoch,
            "train": len(run.split["train"]),
            "val": len(run.split["val"]),
            "test": len(run.split.partitions.get("test", ())),
            "devices": run.mesh.devices.size,
        }
    )
    state, loop, capped = _train_epochs(run, state, loop, started)
    state = _final_state(run, state, loop)
    test = _test_metrics(run, state)
    run.store.close()
    run.emit({"kind": "finishing"})
    if distributed.is_primary():
        finish_run(config, run.model, state, run.dataset, run.split, loop, test, run.run_dir, capped)
    distributed.sync("run finished")  # the others wait for process 0's final report
    wall = time.time() - started
    write_run_json(run.run_dir / "environment.json", {**environment(run.mesh), "wall_time_s": wall})
    run.emit(
        {
            "kind": "done",
            "best_epoch": loop.best_epoch,
            "stopped_early": loop.stopped_early,
            **test,
            "wall_time_s": wall,
        }
    )
    return RunResult(run.run_dir, list(loop.history), loop.best_epoch, loop.stopped_early, test, wall)


def _start_run(config: TrainConfig, run_dir: str | os.PathLike, progress: Progress | None, mesh: Mesh | None) -> _Run:
    """Checks, the model, the data and its split (written to the run folder), the
    optimiser's pieces and the device-resident training and validation splits."""
    run_dir = open_run_folder(run_dir)
    emit = progress or (lambda event: None)
    mesh = mesh or make_mesh()
    n_dev = mesh.devices.size
    if config.batch_size % n_dev:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {n_dev} devices; expected a multiple of {n_dev}"
        )
    check_resume(config, run_dir)
    model = build_model(config)
    heads = model_heads(model, config)
    check_model_config(config, heads)
    dataset, split = start_run_data(config, run_dir, model, emit)
    train_ids = repeat_normals(split["train"], dataset, config.normal_repeats)
    n_train = len(train_ids)
    if n_train < config.batch_size:
        raise ValueError(
            f"the training split has {n_train} images, fewer than batch_size "
            f"{config.batch_size}; expected batch_size <= {n_train}"
        )
    steps_per_epoch = n_train // config.batch_size
    per_call = min(config.steps_per_dispatch or default_steps_per_dispatch(steps_per_epoch), steps_per_epoch)
    data_key, dropout_key = run_keys(config.seed, config.dropout_prng)
    if jax.process_count() > 1:
        train_data = _sharded_device_data(dataset, train_ids, mesh)
    else:
        train_data = _device_data(dataset, train_ids, mesh)
    return _Run(
        config=config,
        run_dir=run_dir,
        mesh=mesh,
        model=model,
        heads=heads,
        dataset=dataset,
        split=split,
        steps_per_epoch=steps_per_epoch,
        steps_per_call=per_call,
        loss_fn=get_loss(config.loss, **_loss_kwargs(config)),
        tx=make_optimizer(config, steps_per_epoch),
        schedule=make_schedule(config, steps_per_epoch),  # the optimiser's, logged as "lr"
        data_key=data_key,
        dropout_key=dropout_key,
        store=CheckpointStore(run_dir),
        train_data=train_data,
        val_data=_device_data(dataset, split["val"], mesh),
        sample=make_sampler(config.batch_size, n_train, augment_config(config), num_rows=train_data.images.shape[0]),
        emit=emit,
        live_progress=progress is not None,
    )


def _initial_state(run: _Run) -> tuple[TrainState, LoopState]:
    """A fresh (or ``init_from``) state and empty loop counters, or both from the latest
    checkpoint of a run being resumed."""
    config = run.config
    # Parameters from XLA's RngBitGenerator: compiling threefry for every parameter shape
    # takes ~6x longer (14 s vs 2.4 s on 2 CPU cores). Its bits may differ between
    # backends; a run is reproducible on the same kind of device.
    init_key = jax.random.key(config.seed, impl="rbg")
    state = create_train_state(
        run.model,
        run.tx,
        init_key,
        (1, config.image_size, config.image_size, config.channels),
        frozen=config.freeze,
        ema_decay=config.ema_decay,
        encoder_lr_scale=config.encoder_lr_scale,
    )
    resuming = run.store.latest_step() is not None
    if config.init_from is not None and not resuming:
        variables, copied = load_initial_variables(config, {"params": state.params, "batch_stats": state.batch_stats})
        state = state.with_variables(variables).replace(opt_state=run.tx.init(variables["params"]))
        run.emit({"kind": "init_from", "path": config.init_from, "parameters_copied": copied})
    state = _replicate(state, run.mesh)
    loop = LoopState()
    if resuming:
        state, meta = run.store.restore(LATEST, state)
        if bad := _non_finite_arrays(state):  # training saves only finite states: the files are damaged
            run.store.close()
            raise ValueError(
                f"checkpoint {str(run.run_dir / 'checkpoints' / LATEST)!r} holds non-finite values "
                f"(NaN or inf) in {len(bad)} array(s), e.g. {bad[0]}; expected finite weights: the "
                f"files are damaged (delete that checkpoint to resume from scratch, or use a new --out)"
            )
        check_resumed_meta(meta, config, run.run_dir)
        loop = LoopState.from_dict(meta["loop"])
    return state, loop


def _train_epochs(run: _Run, state: TrainState, loop: LoopState, started: float) -> tuple[TrainState, LoopState, bool]:
    """Epochs until ``epochs``, early stopping or the time cap (``capped``, not saved: a
    resumed run goes on); each logged, checked for NaN and checkpointed."""
    config = run.config
    log = (
        MetricsLog(run.run_dir, resume_epochs=loop.epoch, resume_step=loop.epoch * run.steps_per_epoch)
        if distributed.is_primary()
        else None
    )
    capped = False
    try:
        while loop.epoch < config.epochs and not loop.stopped_early and not capped:
            state, record = _run_epoch(run, state, loop.epoch + 1)
            _check_finite(record, state, run.store, run.steps_per_epoch, run.run_dir)
            loop, improved = _early_stopping(config, loop, record)
            capped = distributed.agree(
                config.max_train_minutes is not None
                and record["epoch"] < config.epochs
                and not loop.stopped_early
                and time.time() - started >= 60 * config.max_train_minutes
            )
            if log is not None:
                log.write(record, record["step"])
                if config.plots:
                    _log_images(
                        run, log, state, loop, last=loop.stopped_early or capped or record["epoch"] == config.epochs
                    )
            if improved:
                run.store.save(BEST, state, run.meta(loop))
            if (
                record["epoch"] % config.checkpoint_every == 0
                or loop.stopped_early
                or capped
                or record["epoch"] == config.epochs
            ):
                run.store.save(LATEST, state, run.meta(loop))
            run.emit({"kind": "epoch", **record, "best_epoch": loop.best_epoch, "improved": improved})
    except BaseException as err:
        run.store.close()  # Orbax's threads are not left running behind a stopped run
        if isinstance(err, Exception) and distributed.is_peer_failure(err):
            raise distributed.PeerLost(
                f"process {jax.process_index()} of {jax.process_count()}: another process of this run stopped "
                f"during epoch {loop.epoch + 1} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                f"checkpoints up to epoch {loop.epoch} are kept in {run.run_dir / 'checkpoints'}; rerun the "
                f"same command on every process to resume"
            ) from err
        raise
    finally:
        if log is not None:
            log.close()
    return state, loop, capped


def _log_images(run: _Run, log: MetricsLog, state: TrainState, loop: LoopState, last: bool) -> None:
    """TensorBoard images: 4 validation predictions every epoch, the curves after the last."""
    step = loop.epoch * run.steps_per_epoch
    state = state.deployed()
    if jax.process_count() > 1:  # only process 0 logs: a copy of the model on its own device
        local = distributed.to_host({"params": state.params, "batch_stats": state.batch_stats})
        state = state.replace(opt_state=None, **local)
    log.predictions(step, state, run.dataset.subset(list(run.split["val"][:4])), run.config.threshold)
    if last:
        log.training_curves(step, loop.history, run.config.preset, loop.best_epoch, run.config.monitor)


def _run_epoch(run: _Run, state: TrainState, epoch: int) -> tuple[TrainState, dict[str, Any]]:
    """One epoch of training steps (``steps_per_call`` per dispatch), then validation:
    the new state and the epoch's record (train/ and val/ means, lr, wall time)."""
    epoch_start = time.time()
    totals = None
    done = 0
    while done < run.steps_per_epoch:
        n = min(run.steps_per_call, run.steps_per_epoch - done)
        start = jnp.asarray((epoch - 1) * run.steps_per_epoch + done, jnp.int32)
        state, metrics = train_steps(
            state,
            run.train_data,
            run.data_key,
            run.dropout_key,
            start,
            num_steps=n,
            sample=run.sample,
            loss_fn=run.loss_fn,
            threshold=run.config.threshold,
            mesh=run.mesh,
            class_weight=run.config.class_weight,
            box_jitter=run.config.box_jitter,
        )
        totals = metrics if totals is None else jax.tree.map(lambda a, b: a + b, totals, metrics)
        done += n
        if run.live_progress and done < run.steps_per_epoch:
            run.emit(
                {
                    "kind": "step",
                    "epoch": epoch,
                    "step": done,
                    "steps_per_epoch": run.steps_per_epoch,
                    **metrics_to_host(totals, "train/"),
                }
            )
    step = epoch * run.steps_per_epoch
    record = {"epoch": epoch, "step": step, **metrics_to_host(totals, "train/"), **run.evaluate(state, run.val_data)}
    record["lr"] = float(run.schedule(step))
    record["epoch_time_s"] = time.time() - epoch_start
    return state, record


def _early_stopping(config: TrainConfig, loop: LoopState, record: dict[str, Any]) -> tuple[LoopState, bool]:
    """The loop's counters after ``record``'s epoch, and whether the monitor improved."""
    value = record[config.monitor]
    improved = _improved(config, value, loop.best_value)
    loop = dataclasses.replace(loop, epoch=record["epoch"], history=(*loop.history, record))
    if improved:
        loop = dataclasses.replace(loop, best_value=value, best_epoch=record["epoch"], bad_epochs=0)
    else:
        loop = dataclasses.replace(loop, bad_epochs=loop.bad_epochs + 1)
    if config.patience is not None and loop.bad_epochs >= config.patience:
        loop = dataclasses.replace(loop, stopped_early=True)
    return loop, improved


def _final_state(run: _Run, state: TrainState, loop: LoopState) -> TrainState:
    """The state the run is evaluated with: the best epoch's (``restore_best``) or the last;
    a run of zero epochs (e.g. SAM as released) saves its initial state as its checkpoint."""
    config = run.config
    if config.epochs == 0 and run.store.latest_step() is None:
        if bad := _non_finite_arrays(state):
            run.store.close()
            raise ValueError(
                f"init_from {config.init_from!r} holds non-finite values in {len(bad)} array(s), "
                f"e.g. {bad[0]}; expected finite parameters"
            )
        run.store.save(LATEST, state, run.meta(loop))
    if config.restore_best and run.store.latest_step(BEST) is not None:
        state, _ = run.store.restore(BEST, state)
    return state


def _test_metrics(run: _Run, state: TrainState) -> dict[str, float]:
    """The test split's means at the training resolution (``test/...``), with the pixel
    BCE the report's loss column shows whatever loss the run trained with."""
    if not run.split.partitions.get("test"):
        return {}
    test_data = _device_data(run.dataset, run.split["test"], run.mesh)
    test = run.evaluate(state, test_data, prefix="test/")
    if "test/dice" in test:
        test["test/bce"] = run.evaluate(state, test_data, prefix="", loss_fn=get_loss("bce"), class_weight=0.0)["loss"]
    return test


def _loss_kwargs(config: TrainConfig) -> dict[str, Any]:
    if config.loss == "bce":
        return {"pos_weight": config.pos_weight}
    if config.loss == "bce_dice":
        return {"pos_weight": config.pos_weight, "bce_weight": config.bce_weight, "dice_weight": config.dice_weight}
    return {}
