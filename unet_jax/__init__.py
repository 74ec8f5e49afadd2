"""unet_jax: a from-scratch U-Net toolkit in JAX/Flax for breast-ultrasound segmentation.

The user API, importable from here: ``TrainConfig`` and ``train_model(config, run_dir)``
(``unet_jax.train.train``: the name ``train`` is the training subpackage);
``load(path)`` (a run, a checkpoint or an exported folder; the bundled model without a path;
also named ``load_checkpoint``), then
``evaluate_dataset``/``read_for_evaluation`` and ``predict_files``; the layers and models.
The training, evaluation and prediction names are imported on first use (PEP 562), so
``import unet_jax`` stays as light as the layers.
"""

import importlib
from typing import Any

from unet_jax.config import TrainConfig
from unet_jax.layers import (
    Conv2D,
    ConvTranspose2D,
    MaxPool2D,
    conv_output_size,
    conv_transpose_output_size,
    pool_output_size,
)
from unet_jax.models import DEFAULT_PRESET, PRESETS, UNet, create_model, create_unet, model_names

__version__ = "0.1.0"

# name -> (the module that defines it, its name there); imported when first used.
_LAZY = {
    "train_model": ("unet_jax.train.loop", "train"),
    "RunResult": ("unet_jax.train.loop", "RunResult"),
    "load": ("unet_jax.inference.model", "load"),
    "load_checkpoint": ("unet_jax.inference.model", "load"),  # the same loader, by its older name
    "evaluate_dataset": ("unet_jax.evaluate", "evaluate_dataset"),
    "read_for_evaluation": ("unet_jax.evaluate", "read_for_evaluation"),
    "predict_files": ("unet_jax.predict", "predict_files"),
    "LoadedModel": ("unet_jax.inference.model", "LoadedModel"),
}

__all__ = [
    "TrainConfig",
    *_LAZY,
    "Conv2D",
    "ConvTranspose2D",
    "MaxPool2D",
    "conv_output_size",
    "conv_transpose_output_size",
    "pool_output_size",
    "DEFAULT_PRESET",
    "PRESETS",
    "UNet",
    "create_unet",
    "create_model",
    "model_names",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unet_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
