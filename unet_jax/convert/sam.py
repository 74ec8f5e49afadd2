"""Official Segment Anything and LiteMedSAM checkpoints (PyTorch state dicts) -> Flax
variables of :mod:`unet_jax.models.sam`, and back to disk.

The Flax modules mirror the PyTorch attribute names, so every Flax parameter path maps to
one state-dict key by a fixed rule:

* module ``name_N`` (a ``ModuleList``/``Sequential`` element) -> ``name.N``
  (``image_encoder/blocks_3/attn/qkv`` -> ``image_encoder.blocks.3.attn.qkv``);
* ``Dense`` ``kernel`` ``(in, out)`` <- ``weight`` ``(out, in)`` transposed;
* ``Conv2D`` ``kernel`` ``(kh, kw, in, out)`` <- ``weight`` ``(out, in, kh, kw)`` (OIHW ->
  HWIO);
* ``ConvTranspose2D`` ``kernel`` ``(kh, kw, in, out)`` <- ``weight`` ``(in, out, kh, kw)``
  (``mask_decoder.output_upscaling.*``; :class:`unet_jax.layers.ConvTranspose2D` scatters
  ``x[i] * kernel[u]`` to ``y[s i + u]`` exactly as PyTorch, so no flip);
* ``LayerNorm`` ``scale`` <- ``weight``; ``Embed`` ``embedding`` <- ``weight``;
* ``BatchNorm`` (LiteMedSAM's TinyViT encoder) ``scale`` <- ``weight``, ``bias``, and in
  the ``batch_stats`` collection ``mean`` <- ``running_mean``, ``var`` <- ``running_var``;
  the state dict's ``num_batches_tracked`` counters are dropped (inference never reads
  them);
* ``bias``, ``pos_embed``, ``rel_pos_h``/``rel_pos_w``, ``attention_biases`` and
  ``positional_encoding_gaussian_matrix`` keep their names and layouts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization, traverse_util

from unet_jax._io import atomic_write
from unet_jax._keys import key_problems
from unet_jax.convert.pth import read_torch_checkpoint
from unet_jax.models.sam.sam import SAM_PRESETS, Sam, _SamBase, sam_init_variables

__all__ = [
    "SamCheckpointError",
    "sam_params_from_state_dict",
    "sam_variables_from_state_dict",
    "infer_sam_preset",
    "read_sam_checkpoint",
    "convert_sam_checkpoint",
    "load_sam_params",
    "flax_path_to_torch_key",
]

_TOP = ("image_encoder", "prompt_encoder", "mask_decoder")


class SamCheckpointError(ValueError):
    """A SAM state dict or converted params file that does not fit the expected model."""


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, if the caller passes one
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def flax_path_to_torch_key(path: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """``(state-dict key, layout)`` of one Flax parameter path; layout is one of
    ``"linear"``, ``"conv"``, ``"conv_transpose"``, ``"same"``."""
    *mods, leaf = path
    segs: list[str] = []
    for m in mods:
        match = re.fullmatch(r"(.+)_(\d+)", m)
        segs.extend([match[1], match[2]] if match else [m])
    if leaf == "kernel":
        if ndim == 2:
            kind = "linear"
        elif any(m.startswith("output_upscaling") for m in mods):
            kind = "conv_transpose"
        else:
            kind = "conv"
        leaf_name = "weight"
    elif leaf in ("scale", "embedding"):
        kind, leaf_name = "same", "weight"
    elif leaf in ("mean", "var"):  # BatchNorm statistics (the batch_stats collection)
        kind, leaf_name = "same", f"running_{leaf}"
    else:
        kind, leaf_name = "same", leaf
    return ".".join([*segs, leaf_name]), kind


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "linear":
        return (shape[1], shape[0])
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "conv_transpose":
        return (shape[2], shape[3], shape[0], shape[1])
    return tuple(shape)


def _to_flax(kind: str, arr: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return arr.T
    if kind == "conv":
        return arr.transpose(2, 3, 1, 0)
    if kind == "conv_transpose":
        return arr.transpose(2, 3, 0, 1)
    return arr


def _resolve(preset_or_module: Any) -> tuple[_SamBase, str]:
    if isinstance(preset_or_module, _SamBase):
        return preset_or_module, type(preset_or_module).__name__
    if isinstance(preset_or_module, str):
        if preset_or_module not in SAM_PRESETS:
            raise ValueError(f"unknown SAM preset {preset_or_module!r}; expected one of {sorted(SAM_PRESETS)}")
        return Sam(**SAM_PRESETS[preset_or_module]), f"preset {preset_or_module!r}"
    if isinstance(preset_or_module, Mapping):
        return Sam(**dict(preset_or_module)), "the given settings"
    raise TypeError(
        f"preset_or_module must be a SAM preset name, a settings dict or a Sam/SamSegmenter, "
        f"got {type(preset_or_module).__name__}"
    )


def infer_sam_preset(state_dict: Mapping[str, Any], source: str = "<state_dict>") -> str:
    """The :data:`SAM_PRESETS` name whose image encoder (embed dim, depth, patch size)
    matches the state dict's shapes (e.g. embed dim 1024, 24 blocks -> ``sam_vit_l``).

    Raises:
      SamCheckpointError: not a SAM state dict, or no preset has these shapes.
    """
    if "image_encoder.patch_embed.seq.0.c.weight" in state_dict:
        return "litemedsam"  # the TinyViT encoder (the only one with a Conv2d_BN patch embedding)
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state_dict:
        raise SamCheckpointError(
            f"{source}: not a SAM state dict: no {key!r} (found {len(state_dict)} keys, e.g. "
            f"{', '.join(sorted(state_dict)[:5])})"
        )
    shape = tuple(_to_numpy(state_dict[key]).shape)
    embed, patch = shape[0], shape[-1]
    blocks = {k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")}
    depth = len(blocks)
    for name, spec in SAM_PRESETS.items():
        if spec.get("encoder_type", "vit") != "vit":
            continue
        if (spec["encoder_embed_dim"], spec["encoder_depth"], spec["patch_size"]) == (embed, depth, patch):
            return name
    known = ", ".join(
        f"{n} (embed dim {s['encoder_embed_dim']}, depth {s['encoder_depth']}, patch {s['patch_size']})"
        for n, s in SAM_PRESETS.items()
        if s.get("encoder_type", "vit") == "vit"
    )
    raise SamCheckpointError(
        f"{source}: no SAM preset matches the checkpoint's image encoder (embed dim {embed}, "
        f"depth {depth}, patch {patch}); known presets: {known}"
    )


def _expected(module: _SamBase) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """state-dict key -> ``((collection, *path), layout, flax shape)``."""
    shapes = jax.eval_shape(lambda: sam_init_variables(module))
    flat = traverse_util.flatten_dict(dict(shapes))
    out = {}
    for path, leaf in flat.items():
        key, kind = flax_path_to_torch_key(path[1:], len(leaf.shape))
        out[key] = (path, kind, tuple(leaf.shape))
    return out


def _dropped(key: str) -> bool:
    """State-dict entries with no Flax counterpart: BatchNorm's step counters."""
    return key.endswith(".num_batches_tracked")


def sam_params_from_state_dict(
    state_dict: Mapping[str, Any], preset_or_module: Any, *, source: str = "<state_dict>"
) -> dict[str, Any]:
    """The ``params`` of :func:`sam_variables_from_state_dict` (the whole model for the
    ViT presets).

    Raises:
      SamCheckpointError: as :func:`sam_variables_from_state_dict`, or the model also has
        BatchNorm statistics (LiteMedSAM), which params alone would lose.
    """
    variables = sam_variables_from_state_dict(state_dict, preset_or_module, source=source)
    if set(variables) != {"params"}:
        raise SamCheckpointError(
            f"{source}: this model also has {sorted(set(variables) - {'params'})} (BatchNorm "
            f"statistics); use sam_variables_from_state_dict (or read_litemedsam_checkpoint)"
        )
    return variables["params"]


def sam_variables_from_state_dict(
    state_dict: Mapping[str, Any], preset_or_module: Any, *, source: str = "<state_dict>"
) -> dict[str, Any]:
    """Convert an official SAM or LiteMedSAM state dict (``model.state_dict()`` or the
    released ``.pth`` contents, as numpy arrays) to Flax variables
    ``{'params': ..., ['batch_stats': ...]}``.

    Args:
      state_dict: key -> array (torch tensors are accepted too).
      preset_or_module: a :data:`SAM_PRESETS` name, a settings dict, or a
        :class:`Sam`/:class:`SamSegmenter` whose tree to fill.
      source: name of the file it came from, for error messages.

    Returns:
      ``{'params': {'image_encoder', 'prompt_encoder', 'mask_decoder'}}`` of float32 numpy
      arrays, plus ``'batch_stats'`` (``{'image_encoder': ...}``) for LiteMedSAM.

    Raises:
      SamCheckpointError: missing keys, unexpected keys or shape mismatches (all listed,
        with expected vs found shapes, and the preset the checkpoint's shapes suggest).
    """
    module, label = _resolve(preset_or_module)
    expected = _expected(module)
    want = {key: _torch_shape(kind, shape) for key, (path, kind, shape) in expected.items()}
    found = {key: tuple(np.shape(value)) for key, value in state_dict.items()}
    problems = key_problems(found, want, ignore=_dropped)
    converted: dict[tuple[str, ...], np.ndarray] = {}
    if not problems:
        for key, (path, kind, _) in expected.items():
            converted[path] = np.ascontiguousarray(_to_flax(kind, _to_numpy(state_dict[key])), dtype=np.float32)
    if problems:
        hint = ""
        try:
            guess = infer_sam_preset(state_dict, source)
        except SamCheckpointError:
            guess = None
        if guess is not None and f"preset {guess!r}" != label:
            spec = SAM_PRESETS[guess]
            if spec.get("encoder_type", "vit") == "tiny_vit":
                hint = f"; the checkpoint's shapes match preset {guess!r} (TinyViT image encoder)"
            else:
                hint = (
                    f"; the checkpoint's shapes match preset {guess!r} (image encoder embed dim "
                    f"{spec['encoder_embed_dim']}, depth {spec['encoder_depth']})"
                )
        raise SamCheckpointError(f"{source}: state dict does not fit SAM {label}: " + "; ".join(problems) + hint)
    return traverse_util.unflatten_dict(converted)


def read_sam_checkpoint(pth_path: str | os.PathLike, preset: str | None = None) -> tuple[dict[str, Any], str]:
    """``(params, preset)`` of an official ``.pth`` checkpoint, read without torch;
    ``preset`` ``None`` infers it from the shapes.

    Raises:
      TorchCheckpointError: the file is not a readable torch checkpoint.
      SamCheckpointError: it is not a SAM state dict of a known (or the given) preset.
    """
    source = str(pth_path)
    state_dict = read_torch_checkpoint(pth_path)
    preset = preset or infer_sam_preset(state_dict, source)
    return sam_params_from_state_dict(state_dict, preset, source=source), preset


def convert_sam_checkpoint(pth_path: str | os.PathLike, out_path: str | os.PathLike, preset: str | None = None) -> Path:
    """Convert an official ``.pth`` checkpoint (:func:`read_sam_checkpoint`) to a Flax
    ``.msgpack`` params file, written atomically (nothing half-written, an existing file
    untouched on error). Returns ``out_path``."""
    params, _ = read_sam_checkpoint(pth_path, preset)
    data = serialization.msgpack_serialize(params)
    return atomic_write(out_path, lambda tmp: Path(tmp).write_bytes(data))


def load_sam_params(path: str | os.PathLike) -> dict[str, Any]:
    """Read params written by :func:`convert_sam_checkpoint`.

    Raises:
      FileNotFoundError: no such file (the message names it).
      SamCheckpointError: the file is truncated, corrupt, or not SAM params.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM params file not found: {path}")
    data = path.read_bytes()
    try:
        params = serialization.msgpack_restore(data)
    except Exception as err:  # msgpack raises several unrelated types
        raise SamCheckpointError(
            f"{path}: not a readable SAM params file (truncated or corrupt msgpack: {err})"
        ) from err
    if not isinstance(params, dict) or set(params) != set(_TOP):
        found = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise SamCheckpointError(f"{path}: not SAM params: expected top-level keys {list(_TOP)}, found {found}")
    return params
