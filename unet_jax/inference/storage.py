"""How an export stores its weights, and how a load reads them back: the one home of both.

* ``float32``: as trained;
* ``float16``: every array that fits (|x| < 60000), half the size, outputs within ~1e-3;
* ``int8``: every convolution and dense ``kernel`` as int8 with one float32 scale per output
  channel (symmetric, ``w ~ q * scale``, ``scale = max |w| / 127`` over the other axes),
  everything else as ``float16``: a quarter of float32. A quantised kernel is stored as
  the leaf ``{"int8": q, "scale": s}``; :func:`from_stored` turns it back into float32.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["STORAGE_DTYPES", "as_stored", "from_stored"]

STORAGE_DTYPES = ("float16", "float32", "int8")
_FP16_MAX = 60000.0  # below float16's largest finite value (65504), with margin
_QUANTISED = frozenset({"int8", "scale"})


def _is_kernel(path: tuple[Any, ...], x: np.ndarray) -> bool:
    last = path[-1] if path else None
    return getattr(last, "key", None) == "kernel" and x.ndim >= 2


def _quantise(w: np.ndarray) -> dict[str, np.ndarray]:
    """``w`` (``(..., out)``) as int8 with a per-output-channel float32 scale."""
    peak = np.max(np.abs(w), axis=tuple(range(w.ndim - 1)))
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return {"int8": q, "scale": scale}


def as_stored(tree: Any, dtype: str) -> Any:
    """``tree``'s arrays as an export stores them in ``dtype`` (one of :data:`STORAGE_DTYPES`)."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r}: expected one of {list(STORAGE_DTYPES)}")

    def store(path: tuple[Any, ...], x: Any) -> Any:
        x = np.asarray(x, np.float32)
        if dtype == "int8" and _is_kernel(path, x):
            return _quantise(x)
        if dtype != "float32" and np.all(np.abs(x) < _FP16_MAX):
            return x.astype(np.float16)
        return x  # float32, or a leaf float16 cannot hold

    return jax.tree_util.tree_map_with_path(store, tree)


def from_stored(tree: Any) -> Any:
    """A stored tree (:func:`as_stored`, or read back from msgpack) as float32 arrays."""
    if isinstance(tree, dict) and set(tree) == _QUANTISED:
        q, scale = np.asarray(tree["int8"]), np.asarray(tree["scale"], np.float32)
        if q.dtype != np.int8 or scale.shape != q.shape[-1:]:
            raise ValueError(
                f"a quantised kernel holds {q.dtype} {q.shape} with scales {scale.shape}; "
                f"expected int8 values and one scale per output channel"
            )
        return q.astype(np.float32) * scale
    if isinstance(tree, dict):
        return {k: from_stored(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)
