"""A PyTorch checkpoint file of any preset's family -> Flax variables, in memory or on disk.

The family of the target preset chooses the conversion: ``sam`` (the official Segment
Anything checkpoints and LiteMedSAM's, :mod:`unet_jax.convert.sam`), ``resnet`` (a
torchvision ResNet, :mod:`unet_jax.convert.resnet`) or ``efficientnet`` (EfficientNet-Lite0's
released weights, :mod:`unet_jax.convert.efficientnet`). The file is read without PyTorch
(:mod:`unet_jax.convert.pth`).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from unet_jax._io import atomic_write
from unet_jax.convert.pth import read_torch_checkpoint
from unet_jax.models import model_family

__all__ = ["read_pth_variables", "convert_checkpoint"]


def _port(family: str) -> Any:
    # The SAM and ResNet conversions import their model definitions (the SAM port is
    # large), so each is imported when a file of its family is first converted: a training
    # run that never reads a .pth stays light.
    return importlib.import_module(f"unet_jax.convert.{family}")


def read_pth_variables(path: str | os.PathLike, preset: str, channels: int = 3) -> dict[str, Any]:
    """Flax variables ``{"params": ...[, "batch_stats": ...]}`` of preset ``preset`` read
    from the PyTorch checkpoint ``path``: a SAM/LiteMedSAM state dict for the ``sam_*`` and
    ``litemedsam`` presets (LiteMedSAM's BatchNorm statistics included), a torchvision
    ResNet's for the ``resnet*`` presets and EfficientNet-Lite0's for the ``effnet_*``
    presets (the encoder; ``channels`` is the input channels of the model it will
    initialise: an RGB stem is summed over RGB for 1).

    Raises:
      TorchCheckpointError: not a readable PyTorch checkpoint.
      SamCheckpointError, ValueError: the state dict does not fit the preset's family, or
        the family (``unet``) has no PyTorch counterpart.
    """
    family = model_family(preset)
    if family not in ("sam", "resnet", "efficientnet"):
        raise ValueError(
            f"{os.fspath(path)!r}: a PyTorch checkpoint cannot initialise preset {preset!r}; "
            f"expected a sam_*, resnet* or effnet_* preset"
        )
    state_dict = read_torch_checkpoint(path)
    if family == "sam":
        return dict(_port("sam").sam_variables_from_state_dict(state_dict, preset, source=os.fspath(path)))
    if family == "efficientnet":
        return dict(_port("efficientnet").lite0_params_from_state_dict(state_dict, in_channels=channels))
    return dict(_port("resnet").resnet_params_from_torchvision(state_dict, in_channels=channels))


def _is_variables_file(path: Path) -> bool:
    """Whether ``path`` is a msgpack file of Flax variables (what this function writes)."""
    try:
        return isinstance(serialization.msgpack_restore(path.read_bytes()), dict)
    except Exception:  # noqa: BLE001 - msgpack raises several unrelated types for other bytes
        return False


def _check_out(out: Path, overwrite: bool) -> None:
    if out.suffix != ".msgpack":
        raise ValueError(f"--out {str(out)!r}: expected a file name ending in .msgpack")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ValueError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
    if out.is_symlink() or not out.is_file() or not _is_variables_file(out):
        raise ValueError(
            f"refusing to replace {str(out)!r}: it is not a msgpack file of Flax variables "
            f"(an earlier `unet-jax convert` output); choose another --out"
        )


def convert_checkpoint(
    pth: str | os.PathLike,
    out: str | os.PathLike,
    preset: str | None = None,
    channels: int = 3,
    overwrite: bool = False,
) -> tuple[Path, str, int]:
    """An official PyTorch checkpoint written as Flax variables to ``out`` (``.msgpack``),
    atomically (nothing half-written). ``preset`` None: a SAM checkpoint whose preset is
    inferred from its shapes; SAM files hold its params (as
    :func:`unet_jax.convert.sam.convert_sam_checkpoint` writes them), ResNet files
    ``{"params", "batch_stats"}``. ``channels``: the input channels of the runs that will
    start from it (a ResNet's RGB stem is summed for 1).
    Returns (path written, preset, number of parameters).

    Raises:
      ValueError: ``out`` does not end in ``.msgpack``, or exists (see above); or as
        :func:`read_pth_variables`.
    """
    out = Path(out)
    _check_out(out, overwrite)
    if preset is None or model_family(preset) == "sam":
        params, preset = _port("sam").read_sam_checkpoint(pth, preset)
        tree: dict[str, Any] = params
    else:
        tree = read_pth_variables(pth, preset, channels)
        params = tree["params"]
    data = serialization.msgpack_serialize(jax.tree.map(np.asarray, tree))
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    return out, preset, int(sum(np.size(x) for x in jax.tree.leaves(params)))
