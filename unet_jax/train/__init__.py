"""Training: state, pure jitted steps, the loop, checkpoints and logs."""

from unet_jax.train.loop import RunResult, TrainingDiverged, train
from unet_jax.train.state import TrainState, create_train_state, make_optimizer
from unet_jax.train.steps import eval_step, train_step

__all__ = [
    "RunResult",
    "TrainingDiverged",
    "train",
    "TrainState",
    "create_train_state",
    "make_optimizer",
    "eval_step",
    "train_step",
]
