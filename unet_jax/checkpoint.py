"""Orbax checkpoints: ``latest`` (to resume) and ``best`` (by the monitored validation metric).

Each checkpoint holds the training state (step, parameters, batch statistics, optimiser
state) and a JSON ``meta`` item (the run's config, the loop's counters and history), so a
checkpoint folder is enough to rebuild the model for evaluation or prediction. Orbax
writes to a temporary folder and renames it when complete: a run killed while saving leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from unet_jax.config import TrainConfig
from unet_jax.inference import RAW, InferenceRecipe

if TYPE_CHECKING:
    from unet_jax.train.state import TrainState

__all__ = ["LATEST", "BEST", "CheckpointStore", "LoadedModel", "check_finite", "check_readable", "check_same_structure",
           "find_checkpoint", "finished_steps", "read_meta", "restore_variables"]

LATEST, BEST = "latest", "best"
_TMP_MARK = ".orbax-checkpoint-tmp-"


class _NoMissingMetadataWarning(logging.Filter):
    """Drops Orbax's "Metadata file does not exist" warning: a step's ``state`` item has no
    ``_CHECKPOINT_METADATA`` of its own (the step folder has it), so every restore logged
    it, though nothing is wrong. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and str(record.msg).startswith("Metadata file does not exist"))


@contextlib.contextmanager
def _quiet_missing_metadata() -> Iterator[None]:
    """While restoring: Orbax's harmless missing-metadata warning silenced (absl logs
    through Python's ``absl`` logger), nothing else."""
    logger, quiet = logging.getLogger("absl"), _NoMissingMetadataWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _state_tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}


class CheckpointStore:
    """``run_dir/checkpoints/{latest,best}/<step>/{state,meta}``, one of each kept."""

    def __init__(self, run_dir: str | os.PathLike):
        root = Path(run_dir).resolve() / "checkpoints"
        # A run killed while saving leaves a half-written `<step>.orbax-checkpoint-tmp-*`
        # folder; remove it now (orbax's own cleanup option runs in a background thread).
        if jax.process_index() == 0:
            for tmp in root.glob(f"*/*{_TMP_MARK}*"):
                shutil.rmtree(tmp, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
        self._managers = {name: ocp.CheckpointManager(root / name, options=options) for name in (LATEST, BEST)}

    def save(self, which: str, state: TrainState, meta: dict[str, Any]) -> None:
        manager = self._managers[which]
        step = int(jax.device_get(state.step))
        if step in manager.all_steps():
            # A resumed run repeats the epochs after its `latest` checkpoint, and may reach
            # a step that `best` already holds (the run was killed between the two saves,
            # or checkpoint_every > 1): replace it rather than fail.
            manager.delete(step)
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_state_tree(state)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        manager.wait_until_finished()

    def latest_step(self, which: str = LATEST) -> int | None:
        return self._managers[which].latest_step()

    def restore(self, which: str, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Restore into the structure (and shardings) of ``state``; returns (state, meta)."""
        manager = self._managers[which]
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"no {which!r} checkpoint in {manager.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
        check_readable(Path(manager.directory) / str(step))
        try:
            with _quiet_missing_metadata():
                restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                         meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax/tensorstore raise several types for damaged files
            raise _unreadable(Path(manager.directory) / str(step), err) from err
        tree = restored["state"]
        state = state.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                              opt_state=tree["opt_state"])
        return state, dict(restored["meta"])

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint's saved config, with its variables."""

    model: Any
    variables: dict[str, Any]
    config: TrainConfig
    step_dir: Path
    # The inference recipe saved with the checkpoint (threshold, TTA, gate, components);
    # RAW when none was tuned. Further members of an ensemble (same architecture): their
    # probabilities are averaged with the first's.
    recipe: InferenceRecipe = RAW
    members: tuple[dict[str, Any], ...] = ()
    # The file the recipe was read from (an inference.json, an export's model.json); None
    # when none was found: then, unless ``recipe`` was given otherwise, evaluate and
    # predict show the raw model output and say so.
    recipe_source: str | None = None

    @property
    def recipe_tuned(self) -> bool:
        """Whether a tuned recipe came with the model (else RAW: the model's own output)."""
        return self.recipe_source is not None or self.recipe != RAW

    @property
    def input_size(self) -> tuple[int, int]:
        return self.config.image_size, self.config.image_size

    @property
    def all_variables(self) -> tuple[dict[str, Any], ...]:
        return (self.variables, *self.members)


def check_readable(step_dir: Path) -> None:
    """Read every stored value of the checkpoint's state (plain TensorStore reads, no event
    loop) before Orbax restores it; a damaged file is a ValueError naming the checkpoint.

    Orbax reads the arrays concurrently on an event loop that it closes at the first
    error: the reads still in flight then fail into the closed loop, and print
    "RuntimeError: Event loop is closed" tracebacks after the clean error. Found here, the
    damage stops the restore before any of those reads starts (the price: the state is
    read twice, the second time from the page cache).
    """
    state = step_dir / "state"
    if not (state / "manifest.ocdbt").is_file():
        return  # not an OCDBT checkpoint: Orbax reports what it finds
    import tensorstore as ts

    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": f"{state}/"}}).result()
        for read in [store.read(key) for key in store.list().result()]:
            read.result()
    except Exception as err:  # tensorstore raises ValueError, IndexError, ... for damaged files
        raise _unreadable(step_dir, err) from err


def _unreadable(step_dir: Path, err: Exception) -> ValueError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ValueError(
        f"checkpoint {str(step_dir)!r} could not be read ({type(err).__name__}: {first[:200]}); "
        f"expected a complete checkpoint written by `unet-jax train`: delete that folder to fall back "
        f"on another checkpoint, or train again into a new --out folder"
    )


def finished_steps(folder: str | os.PathLike) -> list[Path]:
    """The complete step folders of ``folder`` (``checkpoints/latest`` or ``best``), oldest
    first; orbax's temporary folders of an interrupted save are not among them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / "meta").is_dir()),
                  key=lambda p: int(p.name))


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The step folder for ``path``: a run folder (its best, else latest checkpoint), a
    ``checkpoints/{best,latest}`` folder, or a step folder itself."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist; expected a run folder or a checkpoint folder")
    path = path.absolute()  # Orbax refuses relative paths
    candidates = []
    if (path / "meta").is_dir():
        return path
    for base in (path / "checkpoints" / BEST, path / "checkpoints" / LATEST, path):
        steps = finished_steps(base)
        if steps:
            candidates.append(steps[-1])
            break
    if not candidates:
        raise ValueError(
            f"no checkpoint found in {str(path)!r}; expected a run folder with checkpoints/best or "
            f"checkpoints/latest, or a checkpoint step folder"
        )
    return candidates[0]


def read_meta(step_dir: Path) -> dict[str, Any]:
    files = [p for p in (step_dir / "meta").iterdir() if p.is_file() and not p.name.startswith(".")]
    for f in files:
        try:
            return json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    raise ValueError(f"checkpoint {str(step_dir)!r} has no readable meta JSON")


def restore_variables(step_dir: Path, abstract_variables: dict[str, Any]) -> dict[str, Any]:
    """Parameters and batch statistics of a checkpoint, checked against
    ``abstract_variables`` (the model's ``init`` shapes); a different architecture is a
    ``ValueError`` naming what differs."""
    check_readable(step_dir)
    try:
        with _quiet_missing_metadata(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            target = _local_target(step_dir)
            restored = checkpointer.restore(step_dir, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as err:  # orbax/tensorstore raise several types for damaged files
        raise _unreadable(step_dir, err) from err
    saved = {k: restored["state"].get(k) or {} for k in ("params", "batch_stats")}
    wanted = {k: abstract_variables.get(k, {}) for k in ("params", "batch_stats")}
    check_same_structure(saved, wanted, step_dir)
    check_finite(saved, step_dir)
    return saved


def check_finite(variables: Any, source: str | os.PathLike, what: str = "checkpoint") -> None:
    """Raise ValueError naming ``source`` and the first parameter path whose array holds
    NaN or inf: such weights predict nonsense (e.g. an empty mask everywhere) without any
    error of their own. ``variables`` is a tree of host or single-device arrays."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
            bad.append((jax.tree_util.keystr(path, simple=True, separator="/"),
                        int(arr.size - np.isfinite(arr).sum()), arr.size))
    if bad:
        name, count, size = bad[0]
        raise ValueError(f"{what} {str(source)!r} holds non-finite weights (NaN or inf) in {len(bad)} parameter "
                         f"array(s), e.g. {name} ({count} of {size} values); expected finite weights: the file is "
                         f"damaged, or was saved from a diverged run")


def _local_target(step_dir: Path) -> Any:
    """The saved state's shapes and dtypes, placed on this process's first device: a
    checkpoint written by a run on several devices or processes (another topology) is
    then read by one process alone."""
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(Path(step_dir) / "state")
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(m: Any) -> Any:
        if hasattr(m, "shape") and hasattr(m, "dtype"):
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)
        return m

    return jax.tree.map(leaf, tree)


def check_same_structure(saved: Any, wanted: Any, step_dir: Path) -> None:
    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}

    have, need = shapes(saved), shapes(wanted)
    if have == need:
        return
    missing = sorted(set(need) - set(have))
    extra = sorted(set(have) - set(need))
    differ = sorted(k for k in set(have) & set(need) if have[k] != need[k])
    details = []
    if missing:
        details.append(f"missing {missing[:3]}")
    if extra:
        details.append(f"unexpected {extra[:3]}")
    if differ:
        k = differ[0]
        details.append(f"{len(differ)} shape(s) differ, e.g. {k}: checkpoint {have[k]} vs model {need[k]}")
    raise ValueError(
        f"checkpoint {str(step_dir)!r} was saved from a different architecture: " + "; ".join(details)
    )
