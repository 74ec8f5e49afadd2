"""Exported models: one folder a user can copy, load and predict with, no Orbax needed.

Layout (``format`` ``unet_jax.exported/1``)::

    model.json         config, member files and their SHA-256 (``member_sha256``, verified on
                       load; absent from exports written before it), inference recipe
                       (``inference_tuned``: false when it is only the raw output), storage
                       dtype, provenance
    member_0.msgpack   flax.serialization bytes of {"params", "batch_stats"} (float16 by
    member_1.msgpack   default: half the size, outputs within ~1e-3 of float32; or int8
    ...                kernels with per-channel scales, unet_jax.inference.storage); one file
                       per ensemble member (same architecture), probabilities averaged
    MODEL_CARD.md      optional
    model.onnx         optional (``export --onnx``): the network for ONNX Runtime, described by
                       model.json's ``onnx`` entry (unet_jax.inference.onnx_export)

The bundled model (``unet_jax/bundled/``) is such a folder inside the package: it is what
``unet-jax predict`` and ``unet-jax evaluate`` use when no ``--checkpoint`` is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import serialization

from unet_jax._io import check_target, new_temp_dir, swap_in
from unet_jax.config import config_to_dict
from unet_jax.inference.model import FORMAT, MODEL_FILE
from unet_jax.inference.recipe import InferenceRecipe
from unet_jax.inference.storage import STORAGE_DTYPES, as_stored

__all__ = ["export_model", "ONNX_FILE"]

ONNX_FILE = "model.onnx"  # the network as ONNX (unet_jax.inference.onnx_export), when exported with it


def export_model(
    members: Sequence[Any],
    out: str | os.PathLike,
    *,
    recipe: InferenceRecipe | None = None,
    dtype: str = "float16",
    card: str | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    onnx: tuple[bytes, dict[str, Any]] | None = None,
) -> Path:
    """Write ``members`` (LoadedModel objects of one architecture; several = an ensemble)
    as an exported folder ``out``. The recipe defaults to the first member's. ``onnx``:
    ``(model.onnx bytes, description)`` from :func:`unet_jax.inference.onnx_export.onnx_export`,
    written beside model.json, whose ``onnx`` entry is the description and the SHA-256.

    Written into a temporary sibling folder and renamed, so a failure leaves no
    half-written model behind. ``overwrite`` replaces only an existing export folder (its
    model.json of this format) holding nothing but an export's own files, or an empty one;
    never a folder that is or holds one of the members' sources, nor one to which a user
    added a file or a subfolder (refused, naming them: the replacement would delete them).
    """
    _check_members(members, dtype)
    first = members[0]
    out = Path(out)
    _check_export_target(out, [Path(m.step_dir) for m in members], overwrite)
    tmp = new_temp_dir(out)
    try:
        files, digests = [], {}
        # Every member's variables, an exported ensemble's own members included.
        for i, variables in enumerate(v for m in members for v in m.all_variables):
            name = f"member_{i}.msgpack"
            data = _member_bytes(variables, dtype)
            (tmp / name).write_bytes(data)
            files.append(name)
            digests[name] = hashlib.sha256(data).hexdigest()
        info = {
            "format": FORMAT,
            "config": json.loads(json.dumps(config_to_dict(first.config))),
            "members": files,
            "member_sha256": digests,
            "storage_dtype": dtype,
            "inference": (recipe or first.recipe).to_dict(),
            "inference_tuned": recipe is not None or first.recipe_tuned,
            "sources": [str(m.step_dir) for m in members],
            **({"provenance": provenance} if provenance else {}),
        }
        if onnx is not None:
            (tmp / ONNX_FILE).write_bytes(onnx[0])
            info["onnx"] = {**onnx[1], "sha256": hashlib.sha256(onnx[0]).hexdigest()}
        (tmp / MODEL_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if card is not None:
            (tmp / "MODEL_CARD.md").write_text(card)
        swap_in(tmp, out)  # an existing folder is replaced only once the new one is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_members(members: Sequence[Any], dtype: str) -> None:
    """At least one member, all of one architecture, image size and channel count."""
    if not members:
        raise ValueError("export_model needs at least one model")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: expected one of {list(STORAGE_DTYPES)}")
    first = members[0]
    key = lambda m: (m.config.preset, m.config.model, m.config.image_size, m.config.channels)  # noqa: E731
    for m in members[1:]:
        if key(m) != key(first):
            raise ValueError(
                f"ensemble members differ: {m.step_dir} is {key(m)}, {first.step_dir} is {key(first)}; "
                f"expected one architecture, image size and channel count"
            )


def _member_bytes(member_variables: dict[str, Any], dtype: str) -> bytes:
    """One member's parameters and batch statistics, stored as ``dtype`` (msgpack)."""
    variables = {"params": member_variables["params"], "batch_stats": member_variables.get("batch_stats", {})}
    return serialization.to_bytes(as_stored(jax.device_get(variables), dtype))


def _is_export(path: Path) -> bool:
    try:
        return json.loads((path / MODEL_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _own_names(out: Path) -> set[str]:
    """The names an export writes in ``out``: model.json, its members (those its model.json
    lists, and ``member_N.msgpack``), MODEL_CARD.md, model.onnx."""
    try:
        listed = json.loads((out / MODEL_FILE).read_text()).get("members", [])
    except (OSError, ValueError, AttributeError):
        listed = []
    return {MODEL_FILE, "MODEL_CARD.md", ONNX_FILE, *(str(m) for m in listed if isinstance(m, str))}


def _check_export_target(out: Path, sources: Sequence[Path], overwrite: bool) -> None:
    """Refuse an ``out`` that is, or holds, a source of the export, then anything
    :func:`unet_jax._io.check_target` refuses (an existing folder that is not an export),
    then an export folder holding files an export did not write."""
    target = Path(os.path.realpath(out))
    for source in sources:
        real = Path(os.path.realpath(source))
        if target == real or target in real.parents:
            raise ValueError(
                f"refusing to write the export to {str(out)!r}: it is or holds {str(source)!r}, a "
                f"checkpoint being exported; choose another output folder"
            )
    own = _own_names(out)

    def is_own(rel: Path, is_dir: bool) -> bool:
        return not is_dir and (rel.name in own or re.fullmatch(r"member_\d+\.msgpack", rel.name) is not None)

    what = f"model folder of `unet-jax export` ({MODEL_FILE} of format {FORMAT!r})"
    check_target(out, overwrite, _is_export, what, is_own)
