"""torchvision ResNet and smp ``Unet("resnet34")`` state dicts -> Flax variables of
:mod:`unet_jax.models.resnet`.

The state dict maps PyTorch module names to arrays (NumPy, or CPU tensors: the
torch-free :func:`unet_jax.convert.pth.read_torch_checkpoint` gives the former). Kernels go
from OIHW to HWIO, linear weights from ``(out, in)`` to ``(in, out)``; batch norm's
``weight``/``bias`` become the ``scale``/``bias`` params and its running statistics the
``mean``/``var`` batch stats; ``num_batches_tracked`` is dropped (inference never reads it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from unet_jax._keys import key_problems
from unet_jax.models.resnet import DEFAULT_WIDTHS, ResNetUNet

__all__ = ["resnet_params_from_torchvision", "resnet_unet_params_from_torch"]

# A row: (torch module name, kind, Flax module path, torch weight shape).
_Row = tuple[str, str, tuple[str, ...], tuple[int, ...]]
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _encoder_rows(stage_sizes: Sequence[int], widths: Sequence[int], prefix: str, path: tuple[str, ...]) -> list[_Row]:
    w0 = widths[0]
    rows: list[_Row] = [
        (f"{prefix}conv1", "stem", (*path, "conv1"), (w0, 3, 7, 7)),
        (f"{prefix}bn1", "bn", (*path, "bn1"), (w0,)),
    ]
    c_in = w0
    for stage, (blocks, width) in enumerate(zip(stage_sizes, widths), start=1):
        for block in range(blocks):
            t, f = f"{prefix}layer{stage}.{block}", (*path, f"layer{stage}_{block}")
            rows += [
                (f"{t}.conv1", "conv", (*f, "conv1"), (width, c_in, 3, 3)),
                (f"{t}.bn1", "bn", (*f, "bn1"), (width,)),
                (f"{t}.conv2", "conv", (*f, "conv2"), (width, width, 3, 3)),
                (f"{t}.bn2", "bn", (*f, "bn2"), (width,)),
            ]
            if block == 0 and (stage > 1 or c_in != width):
                rows += [
                    (f"{t}.downsample.0", "conv", (*f, "downsample_conv"), (width, c_in, 1, 1)),
                    (f"{t}.downsample.1", "bn", (*f, "downsample_bn"), (width,)),
                ]
            c_in = width
    return rows


def _infer_stage_sizes(state_dict: Mapping[str, Any], prefix: str) -> tuple[int, ...]:
    """Blocks per stage from the ``layer{L}.{b}.`` keys (stages counted from 1 until absent)."""
    sizes = []
    while True:
        head = f"{prefix}layer{len(sizes) + 1}."
        blocks = {k[len(head) :].split(".", 1)[0] for k in state_dict if k.startswith(head)}
        blocks = {int(b) for b in blocks if b.isdigit()}
        if not blocks:
            return tuple(sizes)
        sizes.append(max(blocks) + 1)


def _adapt_stem(weight: np.ndarray, in_channels: int) -> np.ndarray:
    """smp's ``patch_first_conv`` on an RGB ``(O, 3, kh, kw)`` stem.

    One channel: the sum over RGB, so a grayscale image ``g`` gives exactly what the RGB
    network gives on ``(g, g, g)``. Otherwise channel ``i`` takes RGB channel ``i % 3``,
    scaled by ``3 / in_channels``.
    """
    if in_channels == weight.shape[1]:
        return weight
    if in_channels == 1:
        return weight.sum(axis=1, keepdims=True)
    picked = weight[:, [i % weight.shape[1] for i in range(in_channels)]]
    return picked * (weight.shape[1] / in_channels)


_Expected = dict[str, tuple[str, tuple[str, ...], tuple[int, ...], str]]


def _expected_keys(rows: list[_Row]) -> _Expected:
    """``state_dict key -> (kind, Flax path, shape, field)`` of every tensor ``rows`` need."""
    expected: _Expected = {}
    for name, kind, path, shape in rows:
        if kind == "bn":
            for key in _BN_KEYS:
                expected[f"{name}.{key}"] = (kind, path, shape, key)
        else:
            expected[f"{name}.weight"] = (kind, path, shape, "weight")
            if kind in ("linear", "conv_bias"):
                expected[f"{name}.bias"] = (kind, path, (shape[0],), "bias")
    return expected


def _checked_arrays(
    state_dict: Mapping[str, Any], expected: _Expected, in_channels: int, ignore: Callable[[str], bool]
) -> dict[str, np.ndarray]:
    """The expected tensors as float32 arrays; one ValueError lists every missing,
    unexpected or mis-shaped key."""
    want = {key: shape for key, (_, _, shape, _) in expected.items()}
    found = {key: tuple(np.shape(value)) for key, value in state_dict.items()}

    def fits(key: str, shape: tuple, wanted: tuple) -> bool:
        if expected[key][0] == "stem":  # an RGB stem adapts to any in_channels; a matching one as is
            return shape in {wanted, (wanted[0], in_channels, *wanted[2:])}
        return shape == wanted

    problems = key_problems(
        found,
        want,
        ignore=lambda k: k.endswith(".num_batches_tracked") or ignore(k),
        fits=fits,
        limit=len(found) + len(want),
    )
    if problems:
        raise ValueError("cannot convert the PyTorch state dict: " + "; ".join(problems))
    arrays = {key: np.asarray(state_dict[key], dtype=np.float32) for key in expected}
    return arrays


def _convert(
    state_dict: Mapping[str, Any], rows: list[_Row], *, in_channels: int, ignore: Callable[[str], bool]
) -> dict[str, dict[str, Any]]:
    """Fill Flax ``params``/``batch_stats`` from ``rows``; one error lists every problem."""
    expected = _expected_keys(rows)
    arrays = _checked_arrays(state_dict, expected, in_channels, ignore)

    variables: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}

    def put(collection: str, path: tuple[str, ...], leaf: str, value: np.ndarray) -> None:
        node = variables[collection]
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value)

    for key, (kind, path, _, field) in expected.items():
        value = arrays[key]
        if kind == "bn":
            collection, leaf = {
                "weight": ("params", "scale"),
                "bias": ("params", "bias"),
                "running_mean": ("batch_stats", "mean"),
                "running_var": ("batch_stats", "var"),
            }[field]
            put(collection, path, leaf, value)
        elif field == "bias":
            put("params", path, "bias", value)
        elif kind == "linear":
            put("params", path, "kernel", value.T)  # (out, in) -> (in, out)
        else:
            if kind == "stem":
                value = _adapt_stem(value, in_channels)
            put("params", path, "kernel", value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    return variables


def resnet_params_from_torchvision(
    state_dict: Mapping[str, Any],
    *,
    stage_sizes: Sequence[int] | None = None,
    in_channels: int = 3,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    classifier: bool = False,
    prefix: str = "",
) -> dict[str, dict[str, Any]]:
    """Flax variables ``{"params", "batch_stats"}`` from a torchvision ResNet-18/34 state dict.

    ``state_dict`` maps torchvision names (``conv1.weight``, ``bn1.{weight, bias,
    running_mean, running_var}``, ``layer{L}.{b}.{conv1, bn1, conv2, bn2, downsample.0,
    downsample.1}...``, ``fc.{weight, bias}``) to arrays (NumPy, or CPU tensors). Kernels
    go from OIHW to HWIO, the linear weight from ``(out, in)`` to ``(in, out)``; batch-norm
    ``weight/bias`` become ``scale/bias`` params and the running statistics ``mean/var``
    batch stats; ``num_batches_tracked`` is ignored.

    Returns the variables of a :class:`ResNetEncoder` (``fc`` keys, if any, are ignored),
    or with ``classifier=True`` those of a :class:`ResNetClassifier` (``encoder`` + ``fc``;
    ``fc`` is then required).

    ``stage_sizes`` defaults to what the keys hold; pass it to require a given depth. An RGB
    stem for ``in_channels != 3`` is converted as smp does: for one channel the kernel is
    summed over RGB (a grayscale image then gives exactly the RGB network's output on the
    image repeated three times); otherwise channel ``i`` copies RGB channel ``i % 3``,
    scaled by ``3 / in_channels``. A stem already of ``in_channels`` is taken as is.
    ``prefix`` is prepended to every key (``"encoder."`` for smp's models).

    Raises:
      ValueError: listing missing and unexpected keys and shape mismatches (expected vs
        found, in PyTorch's layout).
    """
    sizes = tuple(stage_sizes) if stage_sizes is not None else _infer_stage_sizes(state_dict, prefix)
    path: tuple[str, ...] = ("encoder",) if classifier else ()
    rows = _encoder_rows(sizes, tuple(widths), prefix, path)
    if classifier:
        fc = state_dict.get(f"{prefix}fc.weight")
        num_classes = np.shape(fc)[0] if fc is not None else 0
        rows.append((f"{prefix}fc", "linear", ("fc",), (num_classes, widths[-1])))
    return _convert(
        state_dict,
        rows,
        in_channels=in_channels,
        ignore=lambda k: not classifier and k.startswith(f"{prefix}fc."),
    )


def resnet_unet_params_from_torch(state_dict: Mapping[str, Any], model: ResNetUNet) -> dict[str, dict[str, Any]]:
    """Flax variables of ``model`` from the state dict of smp's ``Unet(encoder_name="resnet34")``.

    smp's names (versions 0.3-0.4): ``encoder.<torchvision ResNet without fc>``,
    ``decoder.blocks.{i}.conv{1,2}.0`` (convolution) and ``.1`` (batch norm),
    ``segmentation_head.0`` and, for ``aux_params`` (``model.class_head > 0``),
    ``classification_head.3``. The encoder part is :func:`resnet_params_from_torchvision`
    (including its ``in_channels`` stem rule: a 3-channel stem loads into a 1-channel
    model summed over RGB). Raises ``ValueError`` as that function.
    """
    stages, widths = tuple(model.stage_sizes), tuple(model.widths)
    rows = _encoder_rows(stages, widths, "encoder.", ("encoder",))
    # Channels of the encoder maps, deepest first: the decoder's input, then its skips.
    maps = [widths[0], *widths][::-1]
    c_in = maps[0]
    skip_channels = [*maps[1:], *[0] * (len(model.decoder_channels) - len(maps) + 1)]
    conv = "conv" if model.decoder_use_batchnorm else "conv_bias"
    for i, (out, skip) in enumerate(zip(model.decoder_channels, skip_channels)):
        t, f = f"decoder.blocks.{i}", f"decoder_block{i}"
        for j, c in ((1, c_in + skip), (2, out)):
            rows.append((f"{t}.conv{j}.0", conv, (f, f"conv{j}"), (out, c, 3, 3)))
            if model.decoder_use_batchnorm:
                rows.append((f"{t}.conv{j}.1", "bn", (f, f"bn{j}"), (out,)))
        c_in = out
    rows.append(("segmentation_head.0", "conv_bias", ("segmentation_head",), (model.num_classes, c_in, 3, 3)))
    if model.class_head > 0:
        rows.append(("classification_head.3", "linear", ("class_head",), (model.class_head, widths[-1])))
    return _convert(state_dict, rows, in_channels=model.in_channels, ignore=lambda k: False)
