"""ONNX export of a segmenter's network: ``model.onnx`` beside an exported folder's ``model.json``.

The graph (opset 18) computes what :func:`unet_jax.inference.predict_outputs` computes, for
a whole ensemble at once:

- input ``image``: float32 ``(N, H, W, C)`` (NHWC) in [0, 1] (uint8 pixels / 255) at the
  model's training size ``H = W = config.image_size``; any batch size ``N``;
- output ``probabilities``: float32 ``(N, H, W)``, the lesion probability (sigmoid),
  averaged over the ensemble's members and, when the recipe says ``flip_tta``, over the
  image and its mirror (the flip is inside the graph: the caller runs it once);
- output ``class_probabilities``: float32 ``(N, K)`` (softmax; benign, malignant, normal),
  averaged over the members, when the model has a class head.

The inference recipe (threshold, gate, components, holes) stays in ``model.json``: apply it
with :func:`unet_jax.inference.recipe_mask`, or, without this package, threshold the
probabilities resized to the image's size (the README's snippet).

Route: jax2onnx (the registry's converter) requires ``orbax-checkpoint<0.11.37`` while this
package needs ``>=0.12.8``, so the two cannot be installed together. The graph is written
here instead, from the network's jaxpr, with the ``onnx`` package only: the weights are
constants, every equation whose inputs are all constants is evaluated here (folded), and
the rest map one-to-one onto ONNX operators (:data:`_OPS`). The batch dimension is traced
as a symbolic size, so the graph takes any batch. A primitive outside that table is a
ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax.extend import core as jcore
from onnx import TensorProto, helper, numpy_helper

from unet_jax.inference.export import ONNX_FILE
from unet_jax.inference.model import MODEL_FILE, LoadedModel
from unet_jax.inference.run import network_probabilities
from unet_jax.inference.storage import as_stored, from_stored
from unet_jax.models import needs_box_prompts

__all__ = ["OPSET", "network_graph", "onnx_export"]

OPSET = 18
_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "remat", "checkpoint")


class _Graph:
    """The ONNX nodes and initialisers being built, and the value of every jaxpr variable:
    a NumPy array (a folded constant) or the name of an ONNX tensor."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._by_digest: dict[str, str] = {}
        self._ids = itertools.count()

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def const(self, value: np.ndarray) -> str:
        """The name of an initialiser holding ``value`` (identical arrays share one)."""
        value = np.ascontiguousarray(value)
        digest = hashlib.sha1(value.tobytes() + str((value.dtype, value.shape)).encode()).hexdigest()
        if digest not in self._by_digest:
            name = self.fresh("const")
            self.initializers[name] = numpy_helper.from_array(value, name)
            self._by_digest[digest] = name
        return self._by_digest[digest]

    def name(self, value: Any) -> str:
        return value if isinstance(value, str) else self.const(np.asarray(value))

    def op(self, op_type: str, inputs: Sequence[Any], **attrs: Any) -> str:
        out = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, [self.name(v) for v in inputs], [out], **attrs))
        return out


def _static(dims: Sequence[Any]) -> list[int | None]:
    """Shape entries as ints, None for the symbolic batch size."""
    return [d if isinstance(d, int) else None for d in dims]


def _elementwise(op_type: str) -> Callable:
    return lambda g, eqn, a, *rest: g.op(op_type, [a, *rest])


def _rsqrt(g: _Graph, eqn: Any, a: Any) -> str:
    return g.op("Reciprocal", [g.op("Sqrt", [a])])


def _integer_pow(g: _Graph, eqn: Any, a: Any) -> str:
    return g.op("Pow", [a, np.asarray(eqn.params["y"], np.float32)])


def _convert(g: _Graph, eqn: Any, a: Any) -> str:
    dtype = np.dtype(eqn.params["new_dtype"])
    if dtype != np.float32:
        raise ValueError(f"ONNX export: a cast to {dtype}; expected float32 throughout the network")
    return g.op("Identity", [a])


def _reduce(op_type: str) -> Callable:
    def convert(g: _Graph, eqn: Any, a: Any) -> str:
        return g.op(op_type, [a, np.asarray(eqn.params["axes"], np.int64)], keepdims=0)

    return convert


def _reshape(g: _Graph, eqn: Any, a: Any) -> str:
    sizes = _static(eqn.params["new_sizes"])
    if sizes.count(None) > 1:
        raise ValueError(f"ONNX export: reshape to {eqn.params['new_sizes']}; expected at most one symbolic size")
    return g.op("Reshape", [a, np.asarray([-1 if s is None else s for s in sizes], np.int64)])


def _broadcast_in_dim(g: _Graph, eqn: Any, a: Any) -> str:
    # Insert the new axes, then expand the static ones; a symbolic (batch) axis of size 1
    # in the operand stays 1 and is broadcast by the elementwise operator that uses it.
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    new_axes = [i for i in range(len(shape)) if i not in dims]
    x = g.op("Unsqueeze", [a, np.asarray(new_axes, np.int64)]) if new_axes else a
    target = [1 if s is None else s for s in _static(shape)]
    return g.op("Expand", [x, np.asarray(target, np.int64)])


def _squeeze(g: _Graph, eqn: Any, a: Any) -> str:
    return g.op("Squeeze", [a, np.asarray(eqn.params["dimensions"], np.int64)])


def _expand_dims(g: _Graph, eqn: Any, a: Any) -> str:
    return g.op("Unsqueeze", [a, np.asarray(eqn.params["dimensions"], np.int64)])


def _transpose(g: _Graph, eqn: Any, a: Any) -> str:
    return g.op("Transpose", [a], perm=list(eqn.params["permutation"]))


def _slice(g: _Graph, eqn: Any, a: Any) -> str:
    shape = _static(eqn.invars[0].aval.shape)
    starts, ends, axes, steps = [], [], [], []
    strides = eqn.params["strides"] or (1,) * len(shape)
    for axis, (lo, hi, step, n) in enumerate(
        zip(eqn.params["start_indices"], eqn.params["limit_indices"], strides, shape)
    ):
        if n is None or (lo == 0 and hi == n and step == 1):
            continue  # the whole (symbolic batch) axis
        starts, ends, axes, steps = starts + [lo], ends + [hi], axes + [axis], steps + [step]
    if not axes:
        return g.op("Identity", [a])
    return g.op("Slice", [a, *(np.asarray(v, np.int64) for v in (starts, ends, axes, steps))])


def _rev(g: _Graph, eqn: Any, a: Any) -> str:
    axes = list(eqn.params["dimensions"])
    big = np.iinfo(np.int64).max
    return g.op(
        "Slice",
        [a, np.full(len(axes), -1, np.int64), np.full(len(axes), -big, np.int64), np.asarray(axes, np.int64)]
        + [np.full(len(axes), -1, np.int64)],
    )


def _concatenate(g: _Graph, eqn: Any, *parts: Any) -> str:
    return g.op("Concat", list(parts), axis=int(eqn.params["dimension"]))


def _stack(g: _Graph, eqn: Any, *parts: Any) -> str:
    axis = np.asarray([eqn.params["axis"]], np.int64)
    return g.op("Concat", [g.op("Unsqueeze", [p, axis]) for p in parts], axis=int(eqn.params["axis"]))


def _select_n(g: _Graph, eqn: Any, which: Any, *cases: Any) -> str:
    if len(cases) != 2:
        raise ValueError(f"ONNX export: select_n of {len(cases)} cases; expected 2")
    return g.op("Where", [which, cases[1], cases[0]])


def _dot_general(g: _Graph, eqn: Any, a: Any, b: Any) -> str:
    """Any dot_general as an Einsum (batch axes first, then a's free axes, then b's)."""
    ((ca, cb), (ba, bb)) = eqn.params["dimension_numbers"]
    ra, rb = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    la, lb = [None] * ra, [None] * rb
    for i, j in zip(ba, bb):
        la[i] = lb[j] = next(letters)
    for i, j in zip(ca, cb):
        la[i] = lb[j] = next(letters)
    la = [c or next(letters) for c in la]
    lb = [c or next(letters) for c in lb]
    out = [la[i] for i in ba] + [la[i] for i in range(ra) if i not in ba and i not in ca]
    out += [lb[j] for j in range(rb) if j not in bb and j not in cb]
    return g.op("Einsum", [a, b], equation=f"{''.join(la)},{''.join(lb)}->{''.join(out)}")


def _dilate(g: _Graph, x: str, shape: Sequence[int], factors: Sequence[int]) -> str:
    """Insert ``factor - 1`` zeros between the pixels of an NCHW tensor (the input
    dilation of a transposed convolution): reshape, pad, reshape, crop."""
    c, h, w = shape[1:]
    dh, dw = factors
    u = g.op("Reshape", [x, np.asarray([0, c, h, 1, w, 1], np.int64)])
    u = g.op("Pad", [u, np.asarray([0] * 9 + [dh - 1, 0, dw - 1], np.int64)])
    u = g.op("Reshape", [u, np.asarray([0, c, h * dh, w * dw], np.int64)])
    ends = np.asarray([(h - 1) * dh + 1, (w - 1) * dw + 1], np.int64)
    return g.op("Slice", [u, np.zeros(2, np.int64), ends, np.asarray([2, 3], np.int64)])


def _conv(g: _Graph, eqn: Any, x: Any, w: Any) -> str:
    """conv_general_dilated (any layout, input and kernel dilation, groups) as an ONNX Conv
    on NCHW / OIHW, transposed in and out."""
    p = eqn.params
    dn = p["dimension_numbers"]
    pads = [tuple(pair) for pair in p["padding"]]
    if p["batch_group_count"] != 1 or len(pads) != 2 or min(min(pads)) < 0:
        raise ValueError(f"ONNX export: a convolution with {p}; expected 2-D, batch groups 1, padding >= 0")
    xs = g.op("Transpose", [x], perm=list(dn.lhs_spec))
    if tuple(p["lhs_dilation"]) != (1, 1):
        shape = [eqn.invars[0].aval.shape[i] for i in dn.lhs_spec]
        xs = _dilate(g, xs, shape, p["lhs_dilation"])
    ws = np.transpose(w, dn.rhs_spec) if isinstance(w, np.ndarray) else g.op("Transpose", [w], perm=list(dn.rhs_spec))
    y = g.op(
        "Conv",
        [xs, ws],
        strides=list(p["window_strides"]),
        dilations=list(p["rhs_dilation"]),
        pads=[pads[0][0], pads[1][0], pads[0][1], pads[1][1]],
        group=int(p["feature_group_count"]),
    )
    return g.op("Transpose", [y], perm=[int(i) for i in np.argsort(dn.out_spec)])


def _pad(g: _Graph, eqn: Any, x: Any, value: Any) -> str:
    """lax.pad without interior padding: a constant Pad, then a Slice for negative edges."""
    config = eqn.params["padding_config"]
    if any(interior for _, _, interior in config):
        raise ValueError(f"ONNX export: lax.pad with interior padding {config}; expected none")
    lows, highs = [max(lo, 0) for lo, _, _ in config], [max(hi, 0) for _, hi, _ in config]
    y = g.op("Pad", [x, np.asarray(lows + highs, np.int64), value], mode="constant") if any(lows + highs) else x
    cut = [(axis, -lo, hi) for axis, (lo, hi, _) in enumerate(config) if lo < 0 or hi < 0]
    if not cut:
        return y if y is not x else g.op("Identity", [x])
    big = np.iinfo(np.int64).max
    starts = np.asarray([s if s > 0 else 0 for _, s, _ in cut], np.int64)
    ends = np.asarray([hi if hi < 0 else big for _, _, hi in cut], np.int64)
    return g.op("Slice", [y, starts, ends, np.asarray([a for a, _, _ in cut], np.int64)])


def _max_pool(g: _Graph, eqn: Any, x: Any) -> str:
    """reduce_window_max over two axes of a 4-D tensor (max pooling) as an ONNX MaxPool:
    the two untouched axes moved first (as N, C), the pooled ones last."""
    p = eqn.params
    window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    pooled = [a for a in range(len(window)) if window[a] != 1 or strides[a] != 1 or tuple(padding[a]) != (0, 0)]
    dilated = any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"]))
    if len(window) != 4 or len(pooled) != 2 or dilated:
        raise ValueError(f"ONNX export: reduce_window_max with {p}; expected 2-D max pooling of a 4-D tensor")
    perm = [a for a in range(4) if a not in pooled] + pooled
    y = g.op(
        "MaxPool",
        [g.op("Transpose", [x], perm=perm)],
        kernel_shape=[window[a] for a in pooled],
        strides=[strides[a] for a in pooled],
        pads=[padding[a][0] for a in pooled] + [padding[a][1] for a in pooled],
    )
    return g.op("Transpose", [y], perm=[int(i) for i in np.argsort(perm)])


_OPS: dict[str, Callable] = {
    **{
        k: _elementwise(v)
        for k, v in {
            "add": "Add",
            "sub": "Sub",
            "mul": "Mul",
            "div": "Div",
            "max": "Max",
            "min": "Min",
            "exp": "Exp",
            "log": "Log",
            "neg": "Neg",
            "sqrt": "Sqrt",
            "tanh": "Tanh",
            "logistic": "Sigmoid",
            "abs": "Abs",
            "pow": "Pow",
            "erf": "Erf",
            "stop_gradient": "Identity",
            "gt": "Greater",
            "lt": "Less",
            "ge": "GreaterOrEqual",
            "le": "LessOrEqual",
            "eq": "Equal",
            "and": "And",
            "or": "Or",
            "not": "Not",
        }.items()
    },  # fmt: skip
    "rsqrt": _rsqrt,
    "integer_pow": _integer_pow,
    "convert_element_type": _convert,
    "reduce_max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"),
    "reduce_sum": _reduce("ReduceSum"),
    "reshape": _reshape,
    "broadcast_in_dim": _broadcast_in_dim,
    "squeeze": _squeeze,
    "expand_dims": _expand_dims,
    "transpose": _transpose,
    "slice": _slice,
    "rev": _rev,
    "concatenate": _concatenate,
    "stack": _stack,
    "select_n": _select_n,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "pad": _pad,
    "reduce_window_max": _max_pool,
}


def _sub_jaxpr(eqn: Any) -> tuple[Any, Sequence[Any]]:
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())


def _emit(g: _Graph, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Walk ``jaxpr``: nested calls inlined, equations of constants evaluated (folded),
    the others written as ONNX nodes. Returns the outputs (arrays or tensor names)."""
    env: dict[Any, Any] = {}
    for var, value in [*zip(jaxpr.constvars, consts), *zip(jaxpr.invars, args)]:
        env[var] = value if isinstance(value, str) else np.asarray(value)

    def read(v: Any) -> Any:
        return np.asarray(v.val, v.aval.dtype) if isinstance(v, jcore.Literal) else env[v]

    for eqn in jaxpr.eqns:
        ins, name = [read(v) for v in eqn.invars], eqn.primitive.name
        if name in _CALLS:
            outs = _emit(g, *_sub_jaxpr(eqn), ins)
        elif not any(isinstance(v, str) for v in ins):
            folded = eqn.primitive.bind(*ins, **eqn.params)
            outs = [np.asarray(o) for o in (folded if eqn.primitive.multiple_results else [folded])]
        elif name in _OPS:
            outs = [_OPS[name](g, eqn, *ins)]
        else:
            raise ValueError(
                f"ONNX export: the network uses the primitive {name!r}, which has no ONNX translation "
                f"here; expected one of {sorted(_OPS)}"
            )
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def network_graph(loaded: LoadedModel, flip_tta: bool) -> onnx.ModelProto:
    """The ONNX model of ``loaded``'s network (all its ensemble members averaged; the
    mirrored pass inside when ``flip_tta``): see the module docstring for its inputs and
    outputs. A box-prompted model is a ValueError (its prompts are not exported)."""
    if needs_box_prompts(loaded.model):
        raise ValueError(f"{loaded.config.preset} is box-prompted; ONNX export covers unprompted segmenters only")
    size, channels = loaded.config.image_size, loaded.config.channels
    members = [jax.tree.map(np.asarray, v) for v in loaded.all_variables]
    # Traced under XLA's own convolution: the other lowerings (unet_jax.lowering) compute the
    # same sum, but Winograd's tile indexing traces as gathers under a symbolic batch, and
    # ONNX Runtime chooses its own convolution kernels anyway.
    model = loaded.model.clone(lowering="lax") if getattr(loaded.model, "lowering", "lax") != "lax" else loaded.model

    def network(x: jax.Array, members: list[Any]) -> tuple[jax.Array, jax.Array | None]:
        outs = [network_probabilities(model, v, x, None, flip_tta) for v in members]
        if outs[0][0] is None:
            raise ValueError(f"{loaded.config.preset} has no mask head; expected a segmentation model")
        prob = sum(o[0] for o in outs) / len(outs)
        return prob, (None if outs[0][1] is None else sum(o[1] for o in outs) / len(outs))

    (batch,) = jax.export.symbolic_shape("batch")
    closed = jax.make_jaxpr(network)(jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32), members)
    g = _Graph()
    results = _emit(g, closed.jaxpr, closed.consts, ["image", *jax.tree.leaves(members)])
    names = ["probabilities", "class_probabilities"][: len(results)]
    for result, name in zip(results, names):
        g.nodes.append(helper.make_node("Identity", [g.name(result)], [name]))
    shapes = [["batch", size, size], ["batch", int(closed.out_avals[-1].shape[-1])]]
    graph = helper.make_graph(
        g.nodes,
        "unet_jax",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", size, size, channels])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(names, shapes)],
        initializer=list(g.initializers.values()),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="unet_jax")
    model.ir_version = 9  # readable by onnxruntime >= 1.16
    onnx.checker.check_model(model)
    return model


def onnx_export(members: Sequence[LoadedModel], flip_tta: bool, dtype: str = "float16") -> tuple[bytes, dict[str, Any]]:
    """``(model.onnx bytes, its description for model.json)`` of :func:`network_graph` over
    every member's variables (an ensemble's own members included) rounded to the storage
    ``dtype``, exactly as :func:`unet_jax.inference.export_model` writes them (then computed
    in float32): what export_model takes as ``onnx``."""
    everything = [from_stored(as_stored(v, dtype)) for m in members for v in m.all_variables]
    loaded = dataclasses.replace(members[0], variables=everything[0], members=tuple(everything[1:]))
    model = network_graph(loaded, flip_tta)
    size, channels = loaded.config.image_size, loaded.config.channels
    outputs = {
        "probabilities": f"float32 (N, {size}, {size}) lesion probability",
        "class_probabilities": "float32 (N, K) class probabilities (softmax)",
    }
    info = {
        "file": ONNX_FILE,
        "opset": OPSET,
        "input": f"image: float32 (N, {size}, {size}, {channels}) NHWC, uint8 pixels / 255 (in [0, 1])",
        "outputs": {o.name: outputs[o.name] for o in model.graph.output},
        "members_averaged": len(loaded.all_variables),
        "flip_tta_in_graph": bool(flip_tta),
        "recipe": f"not in the graph: the 'inference' entry of {MODEL_FILE}",
    }
    return model.SerializeToString(), info
