"""The training run's Orbax store: ``latest`` (to resume) and ``best`` (by the monitored
validation metric).

Each checkpoint holds the training state (step, parameters, batch statistics, optimiser
state) and a JSON ``meta`` item (the run's config, the loop's counters and history), so a
checkpoint folder is enough to rebuild the model for evaluation or prediction
(:func:`unet_jax.inference.load`, which also reads these folders). Orbax writes to a
temporary folder and renames it when complete: a run killed while saving leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp

from unet_jax.inference.model import BEST, LATEST, check_readable, quiet_missing_metadata, unreadable_checkpoint

if TYPE_CHECKING:
    from unet_jax.train.state import TrainState

__all__ = ["CheckpointStore"]

_TMP_MARK = ".orbax-checkpoint-tmp-"


def _state_tree(state: TrainState) -> dict[str, Any]:
    tree = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}
    if state.ema is not None:
        # The moving average, the weights inference loads (unet_jax.inference.restore_variables).
        tree["ema"] = state.ema
    return tree


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
            with quiet_missing_metadata():
                restored = manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
                )
        except Exception as err:  # orbax/tensorstore raise several types for damaged files
            raise unreadable_checkpoint(Path(manager.directory) / str(step), err) from err
        tree = restored["state"]
        state = state.replace(
            step=tree["step"],
            params=tree["params"],
            batch_stats=tree["batch_stats"],
            opt_state=tree["opt_state"],
            ema=tree.get("ema"),
        )
        return state, dict(restored["meta"])

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
