"""Exported models: one folder a user can copy, load and predict with, no Orbax needed.

Layout (``format`` ``unet_jax.exported/1``)::

    model.json         config, member files, inference recipe, storage dtype, provenance
    member_0.msgpack   flax.serialization bytes of {"params", "batch_stats"} (float16 by
    member_1.msgpack   default: half the size, outputs within ~1e-3 of float32); one file
    ...                per ensemble member (same architecture), probabilities averaged
    MODEL_CARD.md      optional

The bundled model (``unet_jax/bundled/``) is such a folder inside the package: it is what
``unet-jax predict`` and ``unet-jax evaluate`` use when no ``--checkpoint`` is given.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from unet_jax._io import new_temp_dir, swap_in
from unet_jax.checkpoint import LoadedModel, check_same_structure
from unet_jax.config import config_from_dict, config_to_dict
from unet_jax.inference import InferenceRecipe
from unet_jax.models import build_model, init_variables

__all__ = ["FORMAT", "MODEL_FILE", "is_exported", "export_model", "load_exported", "bundled_path", "load_bundled"]

FORMAT = "unet_jax.exported/1"
MODEL_FILE = "model.json"
_FP16_MAX = 60000.0  # below float16's largest finite value (65504), with margin


def is_exported(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_FILE).is_file()


def _storage(tree: Any, dtype: str) -> Any:
    def cast(x: Any) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if dtype == "float16" and np.all(np.abs(x) < _FP16_MAX):
            return x.astype(np.float16)
        return x  # a leaf float16 cannot hold stays float32

    return jax.tree.map(cast, tree)


def export_model(members: Sequence[Any], out: str | os.PathLike, *, recipe: InferenceRecipe | None = None,
                 dtype: str = "float16", card: str | None = None, provenance: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``members`` (LoadedModel objects of one architecture; several = an ensemble)
    as an exported folder ``out``. The recipe defaults to the first member's.

    Written into a temporary sibling folder and renamed, so a failure leaves no
    half-written model behind.
    """
    if not members:
        raise ValueError("export_model needs at least one model")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"export dtype {dtype!r}: expected 'float16' or 'float32'")
    first = members[0]
    key = lambda m: (m.config.preset, m.config.model, m.config.image_size, m.config.channels)  # noqa: E731
    for m in members[1:]:
        if key(m) != key(first):
            raise ValueError(f"ensemble members differ: {m.step_dir} is {key(m)}, {first.step_dir} is {key(first)}; "
                             f"expected one architecture, image size and channel count")
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise ValueError(f"export folder {str(out)!r} exists; expected a new folder (or overwrite=True)")
    tmp = new_temp_dir(out)
    try:
        files = []
        for i, m in enumerate(members):
            variables = {"params": m.variables["params"], "batch_stats": m.variables.get("batch_stats", {})}
            name = f"member_{i}.msgpack"
            (tmp / name).write_bytes(serialization.to_bytes(_storage(jax.device_get(variables), dtype)))
            files.append(name)
        info = {"format": FORMAT, "config": json.loads(json.dumps(config_to_dict(first.config))),
                "members": files, "storage_dtype": dtype,
                "inference": (recipe or first.recipe).to_dict(),
                "sources": [str(m.step_dir) for m in members], **({"provenance": provenance} if provenance else {})}
        (tmp / MODEL_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if card is not None:
            (tmp / "MODEL_CARD.md").write_text(card)
        swap_in(tmp, out)  # an existing folder is replaced only once the new one is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_exported(path: str | os.PathLike) -> Any:
    """A LoadedModel (unet_jax.evaluate) from an exported folder, parameters in float32."""

    path = Path(path).absolute()
    source = path / MODEL_FILE
    try:
        info = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"exported model {str(source)!r} could not be read ({err}); expected the JSON written "
                         f"by `unet-jax export`") from err
    if info.get("format") != FORMAT:
        raise ValueError(f"exported model {str(source)!r} has format {info.get('format')!r}; expected {FORMAT!r}")
    config = config_from_dict(info["config"], source=str(source))
    model = build_model(config)
    shape = (1, config.image_size, config.image_size, config.channels)
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), shape))
    template = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    members = []
    for name in info["members"]:
        file = path / name
        try:
            raw = serialization.msgpack_restore(file.read_bytes())
        except Exception as err:  # missing, truncated or corrupt msgpack
            raise ValueError(f"exported model member {str(file)!r} could not be read ({type(err).__name__}: "
                             f"{str(err)[:200]}); expected the file written by `unet-jax export`") from err
        raw = {"params": raw.get("params", {}), "batch_stats": raw.get("batch_stats", {})}
        check_same_structure(raw, template, file)
        members.append(jax.tree.map(lambda x: np.asarray(x, np.float32), raw))
    recipe = InferenceRecipe.from_dict(info.get("inference", {}), source=str(source))
    return LoadedModel(model, members[0], config, path, recipe, tuple(members[1:]))


def bundled_path() -> Path:
    """The folder of the model shipped inside the package."""
    return Path(str(resources.files("unet_jax") / "bundled"))


def load_bundled() -> Any:
    """The bundled model (see unet_jax/bundled/MODEL_CARD.md)."""
    path = bundled_path()
    if not is_exported(path):
        raise ValueError(f"no bundled model in {str(path)!r}; expected {MODEL_FILE} there (reinstall the "
                         f"package, or pass --checkpoint)")
    return load_exported(path)
