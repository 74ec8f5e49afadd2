"""A training run's folder: opening and locking it, the checks a resumed run must pass
(same configuration, same process count, same data), reading the run's data and recording
its split, and the final stage (:func:`finish_run`: the inference recipe, the test reports,
the plots, ``results.json``).

A run is a folder: ``config.json``, ``split.json`` (the manifest), ``environment.json``
(versions, devices, wall time), ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/{latest,
best}``, ``predictions/``, ``plots/``, ``results.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import flax
import jax
import numpy as np
import optax
from jax.sharding import Mesh
from PIL import Image

from unet_jax import metrics as M
from unet_jax._io import FolderLock, write_json
from unet_jax.config import TrainConfig, config_to_dict
from unet_jax.data import (
    BusiDataset,
    ReadOptions,
    Split,
    fingerprint_changes,
    image_fingerprints,
    load_busi,
    load_cache,
    make_split,
    manifest_fingerprints,
    read_manifest,
    write_manifest,
    write_phantom,
)
from unet_jax.evaluate import evaluate_classification, evaluate_dataset, evaluation_report
from unet_jax.inference import (
    LATEST,
    RAW,
    LoadedModel,
    find_checkpoint,
    finished_steps,
    load,
    predict_outputs,
    predict_probabilities,
    prompt_boxes,
    read_meta,
    recipe_mask,
    save_recipe,
    tune_inference,
)
from unet_jax.models import build_model, model_heads, needs_box_prompts
from unet_jax.plots import plot_training_curves, prediction_grid
from unet_jax.train import distributed
from unet_jax.train.state import LoopState

__all__ = [
    "LOCK_FILE",
    "open_run_folder",
    "lock_run_folder",
    "check_resume",
    "check_resumed_meta",
    "check_resumable",
    "check_same_data",
    "load_run_data",
    "split_for_lesions_only",
    "start_run_data",
    "write_run_json",
    "environment",
    "finish_run",
    "finish_run_again",
]

Progress = Callable[[dict[str, Any]], None]
LOCK_FILE = "train.lock"


# --------------------------------------------------------------------------------------
# Start: the folder, its lock, the resume checks, the data and its split
# --------------------------------------------------------------------------------------
def open_run_folder(run_dir: str | os.PathLike) -> Path:
    """The run folder, resolved and created; a file of that name is refused."""
    run_dir = Path(run_dir).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run folder {str(run_dir)!r} is a file; expected a folder (created if missing)")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def lock_run_folder(run_dir: str | os.PathLike) -> FolderLock | contextlib.nullcontext:
    """The run folder (created here) locked while this process trains in it (process 0
    of several): a second `unet-jax train --out` on it is refused naming this PID."""
    run_dir = Path(run_dir).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run folder {str(run_dir)!r} is a file; expected a folder (created if missing)")
    if not distributed.is_primary():
        return contextlib.nullcontext()
    run_dir.mkdir(parents=True, exist_ok=True)
    return FolderLock(run_dir / LOCK_FILE, "run folder")


def check_resume(config: TrainConfig, run_dir: Path) -> None:
    """Refuse, before any work, to resume a run folder with another configuration."""
    # Only complete checkpoints: a run killed during its first save leaves nothing but
    # orbax's temporary folder there, and starts again from scratch.
    steps = finished_steps(run_dir / "checkpoints" / LATEST)
    if steps:
        meta = read_meta(steps[-1])
        if "config" not in meta:
            raise ValueError(
                f"checkpoint {str(steps[-1])!r} has no saved config; expected one written by `unet-jax train`"
            )
        check_resumed_meta(meta, config, run_dir)


def check_resumed_meta(meta: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    """A checkpoint's ``meta`` resumable by ``config``: the same configuration and the same
    process count."""
    check_resumable(meta["config"], config, run_dir)
    _check_processes(meta, run_dir)


def _check_processes(meta: dict[str, Any], run_dir: Path) -> None:
    """A run resumes with the process count it was saved with: its data shards, its batch
    placement and its checkpoint's layout depend on it."""
    saved, now = meta.get("processes", 1), jax.process_count()
    if saved != now:
        raise ValueError(
            f"run folder {str(run_dir)!r} was trained as {saved} process(es); this launch has {now}; "
            f"resume with {saved} process(es), or choose a new --out folder"
        )


# Keys that do not change what is computed: a resumed run may set them differently.
_FREE_ON_RESUME = frozenset(
    {
        "plots",
        "eval_batch_size",
        "steps_per_dispatch",
        "cpu_devices",
        "checkpoint_every",
        "distributed",
        "tune_inference",
        "max_lesion_empty",
        "max_train_minutes",
    }
)


def check_resumable(saved: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    current = json.loads(json.dumps(config_to_dict(config)))  # tuples as the saved JSON lists
    # A key added to TrainConfig after the run was saved counts as its default.
    saved = {**config_to_dict(TrainConfig()), **saved}
    differ = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k] and k not in _FREE_ON_RESUME}
    if differ:
        details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ValueError(
            f"run folder {str(run_dir)!r} holds a checkpoint of a different configuration ({details}); "
            f"resume with the same config, or choose a new --out folder"
        )


def check_same_data(run_dir: Path, fingerprints: dict[str, list]) -> None:
    """A run resumes on the images it was split and trained on: its split.json records
    each image's fingerprint (``data.image_fingerprints``); other data (images added,
    removed, resized or edited, other masks) would re-split silently. A split.json without
    fingerprints (written before they were recorded) is not checked."""
    if not finished_steps(run_dir / "checkpoints" / LATEST):
        return
    saved = manifest_fingerprints(run_dir / "split.json")
    changes = [] if saved is None else fingerprint_changes(saved, fingerprints)
    if changes:
        raise ValueError(
            f"run folder {str(run_dir)!r} was trained on other data than this resume reads: "
            f"{'; '.join(changes)} (compared with {str(run_dir / 'split.json')!r}); resume with the "
            f"data it was trained on, or choose a new --out folder"
        )


def load_run_data(config: TrainConfig, run_dir: Path, progress: Progress | None = None) -> BusiDataset:
    """The dataset at the training size: a prepared cache, a BUSI folder, or phantom data."""
    size = (config.image_size, config.image_size)
    if config.cache is not None:
        dataset = load_cache(config.cache)
        shape = dataset.images_u8.shape[1:]
        if tuple(shape) != (*size, config.channels):
            raise ValueError(
                f"cache {config.cache!r} holds images of shape {tuple(shape)}; the config expects "
                f"{(*size, config.channels)} (image_size={config.image_size}, channels={config.channels})"
            )
        return dataset
    source = config.data
    if source is None:
        source = run_dir / "phantom"
        # Process 0 writes it; the others read it from a shared run folder, or write their
        # own copy (the same seeded images) where the folder is not shared.
        for writer in (True, False):
            if distributed.is_primary() == writer and not source.exists():
                n = config.phantom_images
                counts = {"benign": n // 2, "malignant": n // 3, "normal": n - n // 2 - n // 3}
                write_phantom(source, counts=counts, size=size, seed=config.seed)
            if writer:
                distributed.sync("phantom written")
    elif not Path(source).exists():
        raise ValueError(f"data folder {source!r} does not exist; expected a folder in the BUSI layout")
    on_progress = None
    if progress is not None:

        def on_progress(done: int, total: int) -> None:
            progress({"kind": "read", "done": done, "total": total})

    return load_busi(source, ReadOptions(size=size, channels=config.channels), on_progress)


def split_for_lesions_only(config: TrainConfig) -> bool:
    """Box-prompted models (SAM) are prompted from the ground truth: they train and are
    evaluated on lesion images only (a normal image has no box to give)."""
    return needs_box_prompts(build_model(config))


def start_run_data(
    config: TrainConfig, run_dir: Path, model: Any, progress: Progress | None
) -> tuple[BusiDataset, Split]:
    """The run's data and split (a box-prompted ``model`` gets lesion images only), checked
    against a resumed run's images, and recorded: ``split.json`` (with the images'
    fingerprints) and ``config.json``."""
    dataset = load_run_data(config, run_dir, progress)
    split = make_split(config, dataset, lesions_only=needs_box_prompts(model))
    fingerprints = image_fingerprints(dataset, [i for part in split.partitions.values() for i in part])
    check_same_data(run_dir, fingerprints)
    if distributed.is_primary():
        labels = dict(zip(dataset.ids, map(int, dataset.labels)))
        write_manifest(split, run_dir / "split.json", labels, fingerprints=fingerprints)
    write_run_json(run_dir / "config.json", config_to_dict(config))
    return dataset, split


def write_run_json(path: Path, value: Any) -> None:
    """The run folder's JSON files, written by process 0 only."""
    if distributed.is_primary():
        write_json(path, value)


def environment(mesh: Mesh) -> dict[str, Any]:
    devices = mesh.devices.flatten().tolist()
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in devices],
        "num_devices": len(devices),
        "process_count": jax.process_count(),
        "host": platform.node(),
        # The XLA flags the backend started with (unet-jax train adds its measured CPU
        # flags, unet_jax.train.cpu.XLA_CPU_FLAGS): they change speed and rounding.
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


# --------------------------------------------------------------------------------------
# Finish: the recipe, the test reports, the plots, results.json (process 0)
# --------------------------------------------------------------------------------------
def finish_run(
    config: TrainConfig,
    model: Any,
    state: Any,
    dataset: BusiDataset,
    split: Split,
    loop: LoopState,
    test: dict[str, float],
    run_dir: Path,
    capped: bool = False,
) -> None:
    """results.json (the report's columns beside Dice and IoU, native-resolution test
    metrics), per-image test rows, and the plots. ``state``: the evaluated parameters and
    batch statistics; ``capped``: the run stopped at its time cap."""
    has_mask, has_class = model_heads(model, config)
    loaded = _trained_model(config, model, state, run_dir)
    results = _results_of_training(config, model, state, loop, test, capped)
    loaded = _tune_recipe(config, loaded, dataset, split, run_dir, results)
    test_ids = list(split.partitions.get("test", ()))
    if test_ids and has_class:
        results["test_classification"] = evaluate_classification(loaded, dataset.subset(test_ids))
    if test_ids and has_mask:
        _test_reports(config, loaded, dataset.subset(test_ids), run_dir, results)
    if config.plots and loop.history:
        (run_dir / "plots").mkdir(exist_ok=True)
        plot_training_curves(
            loop.history,
            run_dir / "plots" / "training_curves.png",
            title=config.preset,
            best_epoch=loop.best_epoch,
            monitor=config.monitor,
        )
    write_run_json(run_dir / "results.json", results)


def _trained_model(config: TrainConfig, model: Any, state: Any, run_dir: Path) -> LoadedModel:
    """The evaluated state as a LoadedModel, its step folder the checkpoint it is saved in
    (where its recipe goes)."""
    state = state.deployed()
    variables = distributed.to_host({"params": state.params, "batch_stats": state.batch_stats})
    try:
        step_dir = find_checkpoint(run_dir if config.restore_best else run_dir / "checkpoints" / LATEST)
    except ValueError:
        step_dir = run_dir
    return LoadedModel(model, variables, config, step_dir)


def _results_of_training(
    config: TrainConfig, model: Any, state: Any, loop: LoopState, test: dict[str, float], capped: bool
) -> dict[str, Any]:
    """results.json's account of training: model, parameter counts, epochs, the best
    epoch's metrics, the test split at the training resolution."""
    best = loop.history[loop.best_epoch - 1] if loop.best_epoch else {}
    count = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))  # noqa: E731
    return {
        "model": config.preset,
        "parameters": {
            "trainable": count(state.params),
            "non_trainable": count(state.batch_stats),
            "frozen": count({k: v for k, v in state.params.items() if k in config.freeze}),
        },
        "init_from": config.init_from,
        "prompted": ("boxes from the ground-truth masks (lesion images only)" if needs_box_prompts(model) else None),
        "best_epoch": loop.best_epoch,
        "epochs_run": loop.epoch,
        "stopped_early": loop.stopped_early,
        "stopped_by_time_cap": capped,
        "monitor": config.monitor,
        "train_at_best_epoch": {k: v for k, v in best.items() if k.startswith("train/")},
        "val_at_best_epoch": {k: v for k, v in best.items() if k.startswith("val/")},
        "test_training_resolution": test,
    }


def _tune_recipe(
    config: TrainConfig, loaded: LoadedModel, dataset: BusiDataset, split: Split, run_dir: Path, results: dict
) -> LoadedModel:
    """The inference recipe chosen on the validation split (``tune_inference``), saved beside
    the checkpoint and into ``results``; ``loaded`` with it (unchanged when not tuned)."""
    val_ids = split.partitions.get("val", ())
    has_mask = model_heads(loaded.model, config)[0]
    if not (config.tune_inference and has_mask and val_ids and not needs_box_prompts(loaded.model)):
        return loaded
    recipe, tuning = tune_inference(
        loaded,
        dataset.subset(list(val_ids)),
        max_lesion_empty=config.max_lesion_empty,
        tuned_on=f"validation split ({len(val_ids)} images)",
    )
    save_recipe(loaded, recipe, tuning, run_dir)
    results["inference"] = {"recipe": recipe.to_dict(), "description": recipe.describe(), "validation": tuning}
    return dataclasses.replace(loaded, recipe=recipe)


def _test_reports(config: TrainConfig, loaded: LoadedModel, test_ds: BusiDataset, run_dir: Path, results: dict) -> None:
    """The test split scored (native resolution when the masks are there) with the recipe,
    and with the raw model output when the recipe differs from it; per-image rows in
    ``predictions/``; the test predictions' plot."""
    native = bool(test_ds.original_masks)
    aggregate, rows = evaluate_dataset(loaded, test_ds, native=native)
    report = evaluation_report(aggregate, rows, native=native, source="test split")
    report["recipe"] = loaded.recipe.describe()
    predictions = run_dir / "predictions"
    predictions.mkdir(exist_ok=True)
    write_run_json(predictions / "test_per_image.json", report.pop("per_image"))
    results["test"] = report
    if loaded.recipe != dataclasses.replace(RAW, threshold=config.threshold):
        # The model's own output beside the recipe's, so the recipe's effect is visible.
        aggregate, rows = evaluate_dataset(loaded, test_ds, native=native, raw=True)
        raw = evaluation_report(aggregate, rows, native=native, source="test split, raw model output")
        write_run_json(predictions / "test_per_image_raw.json", raw.pop("per_image"))
        results["test_raw"] = raw
    if config.plots:
        _plot_test_predictions(config, loaded, test_ds, native, run_dir)


def _plot_test_predictions(
    config: TrainConfig, loaded: LoadedModel, test_ds: BusiDataset, native: bool, run_dir: Path
) -> None:
    """plots/test_predictions.png: up to 16 test images, their masks and the predictions."""
    show = min(len(test_ds), 16)
    gts = [test_ds.original_masks[i] if native else test_ds.masks[i, :, :, 0] for i in range(show)]
    if needs_box_prompts(loaded.model):
        boxes = prompt_boxes(test_ds.subset(list(range(show))))
        probs = predict_probabilities(loaded, test_ds.images_u8[:show], config.eval_batch_size, boxes=boxes)
        preds = [M.resize_mask(p, g.shape, t=config.threshold) for p, g in zip(probs, gts)]
    else:
        probs, classes = predict_outputs(loaded, test_ds.images_u8[:show], loaded.recipe.flip_tta)
        preds = [
            recipe_mask(p, None if classes is None else classes[i], loaded.recipe, g.shape)
            for i, (p, g) in enumerate(zip(probs, gts))
        ]
    images = [_native_image(test_ds, i, g.shape) for i, g in enumerate(gts)]
    prediction_grid(
        images,
        gts,
        preds,
        run_dir / "plots" / "test_predictions.png",
        titles=[f"{i} ({c})" for i, c in zip(test_ds.ids[:show], test_ds.class_names[:show])],
    )


def finish_run_again(run_dir: str | os.PathLike, cache: str | None = None) -> Path:
    """Redo a finished run's final stage with the current code: choose its inference recipe
    on its validation split (saved with the best checkpoint) and rewrite results.json,
    the per-image test rows and the plots. Training is not repeated; ``cache`` reads the
    images from a `data prepare` cache instead of the run's own data source."""
    run_dir = Path(run_dir).resolve()
    loaded = load(run_dir)
    config = loaded.config if cache is None else dataclasses.replace(loaded.config, cache=cache)
    latest = read_meta(find_checkpoint(run_dir / "checkpoints" / LATEST))
    previous = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    dataset = load_run_data(config, run_dir)
    split = read_manifest(run_dir / "split.json")
    state = SimpleNamespace(params=loaded.variables["params"], batch_stats=loaded.variables.get("batch_stats", {}))
    loop = LoopState.from_dict(latest["loop"])
    finish_run(config, loaded.model, state, dataset, split, loop, previous.get("test_training_resolution", {}), run_dir)
    return run_dir


def _native_image(dataset: BusiDataset, i: int, shape: tuple[int, int]) -> np.ndarray:
    """The training-size image brought to ``shape`` for display (the native file may be gone)."""
    image = dataset.images_u8[i]
    if image.shape[:2] == tuple(shape):
        return image
    mode = "L" if image.shape[-1] == 1 else "RGB"
    pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode)
    return np.asarray(pil.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
