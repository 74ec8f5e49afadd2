"""A Keras-style ``model.summary()`` for the U-Net presets: every layer, its output shape
and parameter count, the number of convolutional layers and the totals.

Shapes are traced abstractly (``jax.eval_shape``): no FLOPs, no memory for activations,
so even the 572x572 original network summarises instantly on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unet_jax.layers import Conv2D, ConvTranspose2D
from unet_jax.models import PRESET_SIZES, create_model, needs_box_prompts

__all__ = ["LayerRow", "ModelSummary", "summarize", "summarize_module", "format_summary"]

_CONV_TYPES = (Conv2D.__name__, ConvTranspose2D.__name__)


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One leaf layer: its path (``enc1/conv1``), type, output shape and parameters."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    trainable_params: int
    non_trainable_params: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    preset: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    layers: tuple[LayerRow, ...]
    conv_layers: int
    trainable_params: int
    non_trainable_params: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "conv_layers": self.conv_layers,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
            "total_params": self.trainable_params + self.non_trainable_params,
            "layers": [
                {
                    "name": row.name,
                    "type": row.kind,
                    "output_shape": list(row.output_shape),
                    "trainable_params": row.trainable_params,
                    "non_trainable_params": row.non_trainable_params,
                }
                for row in self.layers
            ],
        }


def _count(tree: Any) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return {}
        tree = tree[key]
    return tree


def summarize_module(model: nn.Module, input_shape: tuple[int, ...], name: str = "") -> ModelSummary:
    """Summarise any linen module taking one NHWC input and ``train`` keyword-only.

    Leaf layers (modules without submodules) are listed in call order.
    """
    kinds: dict[tuple[str, ...], str] = {}

    def record(module: nn.Module, method_name: str) -> bool:
        # capture_intermediates' filter sees every module call: keep the type per path.
        kinds[tuple(module.scope.path)] = type(module).__name__
        return method_name == "__call__"

    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    # Box-prompted models (SAM) take a (N, 4) box per image as their second input.
    extra = (jax.ShapeDtypeStruct((input_shape[0], 4), jnp.float32),) if needs_box_prompts(model) else ()
    variables = jax.eval_shape(lambda x, *e: model.init(jax.random.key(0), x, *e, train=False), x, *extra)
    out, state = jax.eval_shape(
        lambda v, x, *e: model.apply(v, x, *e, train=False, capture_intermediates=record, mutable=["intermediates"]),
        variables,
        x,
        *extra,
    )
    if isinstance(out, dict):  # a mask head and a class head: the mask's shape
        out = out["mask"]
    params = variables.get("params", {})
    stats = {k: v for k, v in variables.items() if k != "params"}

    rows = []
    paths = [p for p in kinds if p]  # dict preserves first-call order
    for path in paths:
        if any(other[: len(path)] == path and other != path for other in paths):
            continue  # a container (block): its leaves are listed instead
        calls = _subtree(state["intermediates"], path).get("__call__")
        if calls is None:
            continue  # only its other methods ran (e.g. SAM's positional encoding): no output to show
        output = calls[0]
        rows.append(
            LayerRow(
                name="/".join(path),
                kind=kinds[path],
                output_shape=tuple(output.shape),
                trainable_params=_count(_subtree(params, path)),
                non_trainable_params=sum(_count(_subtree(c, path)) for c in stats.values()),
            )
        )
    return ModelSummary(
        preset=name,
        input_shape=tuple(input_shape),
        output_shape=tuple(out.shape),
        layers=tuple(rows),
        conv_layers=sum(row.kind in _CONV_TYPES for row in rows),
        trainable_params=_count(params),
        non_trainable_params=_count(stats),
    )


def summarize(preset: str, size: tuple[int, int] | None = None, batch: int = 1, **overrides: Any) -> ModelSummary:
    """Summary of a named preset (any family) at ``size`` (default: the preset's canonical
    size: its PRESET_SIZES entry, SAM's encoder size, else 256)."""
    model = create_model(preset, **overrides)
    if size is None:
        side = PRESET_SIZES.get(preset) or getattr(model, "image_size", None) or 256
        size = (side, side)
    return summarize_module(model, (batch, *size, model.in_channels), name=preset)


def format_summary(summary: ModelSummary) -> str:
    """The summary as a fixed-width text table, like Keras' ``model.summary()``."""
    header = ("Layer (type)", "Output Shape", "Param #", "Non-trainable")
    lines = [
        (f"{r.name} ({r.kind})", str(r.output_shape), f"{r.trainable_params:,}", f"{r.non_trainable_params:,}")
        for r in summary.layers
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    rule = "-" * (sum(widths) + 3 * (len(widths) - 1))

    def fmt(cols: tuple[str, ...]) -> str:
        return "   ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))

    total = summary.trainable_params + summary.non_trainable_params
    return "\n".join(
        [
            f'Model: "{summary.preset}"  input {summary.input_shape}',
            rule,
            fmt(header),
            "=" * len(rule),
            *(fmt(line) for line in lines),
            "=" * len(rule),
            f"Output shape: {summary.output_shape}",
            f"Convolutional layers: {summary.conv_layers}",
            f"Total params: {total:,}",
            f"Trainable params: {summary.trainable_params:,}",
            f"Non-trainable params: {summary.non_trainable_params:,}",
        ]
    )
