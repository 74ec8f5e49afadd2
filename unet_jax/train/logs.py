"""Run logs: a JSON-lines metrics file, and TensorBoard event files written by tensorboardX.

tensorboardX (pure Python on numpy and protobuf; no TensorFlow, no PyTorch needed) writes
the events: the scalars of every epoch, and images (a few validation predictions every
epoch, the training curves at the end). What no writer offers is taking events back, which
a resumed run needs so that TensorBoard draws each step once: :func:`cut_back` splits the
TFRecord framing (8-byte length, 4-byte CRC, payload, 4-byte CRC) and reads each payload's
step with tensorboardX's ``Event`` message.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from google.protobuf.message import DecodeError
from PIL import Image

from unet_jax._io import write_bytes, write_text
from unet_jax.plots import overlay, plot_training_curves, to_rgb_uint8
from unet_jax.train.steps import apply_model

__all__ = ["MetricsLog", "cut_back", "prediction_overlays", "read_jsonl"]

PREVIEW_PIXELS = 128  # the longer side of one overlay panel in TensorBoard


def _tensorboardx():
    """The tensorboardX module, imported without PyTorch.

    Its writer imports torch whenever torch is installed, only to accept torch tensors
    (3.5 s of a 4 s import on 2 CPU cores, where the test extra installs torch); this
    package passes NumPy arrays. So unless torch is already loaded, ``import torch`` is made
    to fail for the length of that import, and works again after it.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX  # deferred: imported with torch blocked (above), never at the top

        return tensorboardX
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` an ImportError
    try:
        import tensorboardX  # deferred: see above
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return tensorboardX


# --------------------------------------------------------------------------------------
# Cutting an event file back to a step
# --------------------------------------------------------------------------------------
def _records(data: bytes) -> list[bytes]:
    """The complete TFRecords of ``data``, framing included (a record cut short by a kill
    ends the list)."""
    records, pos = [], 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + length + 4
        if end > len(data):
            break
        records.append(data[pos:end])
        pos = end
    return records


def _step_of(record: bytes) -> int:
    """The step of the Event in ``record``; 0 (kept) for a payload that is not one."""
    event_pb2 = _tensorboardx().proto.event_pb2
    try:
        return event_pb2.Event.FromString(record[12:-4]).step
    except DecodeError:
        return 0


def cut_back(logdir: str | os.PathLike, step: int) -> None:
    """Drop the events after ``step`` (and a record cut short) from the event files of
    ``logdir``, each file rewritten atomically: a resumed run repeats those steps, and
    TensorBoard would draw them twice (the SessionLog purge that tensorboardX's
    ``purge_step`` writes is not honoured by every reader)."""
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        kept = b"".join(r for r in _records(data) if _step_of(r) <= step)
        if kept != data:
            write_bytes(path, kept)


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------
def prediction_overlays(
    images_u8: np.ndarray, masks: np.ndarray, predicted: np.ndarray, max_side: int = PREVIEW_PIXELS
) -> np.ndarray:
    """One RGB uint8 picture (HWC) with a row per image: the image, its ground truth (green)
    and the prediction (red) over it, each panel shrunk by an integer stride to at most
    ``max_side`` pixels a side, a 2-pixel white gap between panels.

    images_u8: (N, H, W[, C]) uint8, C 1 or 3; masks, predicted: (N, H, W[, 1]), nonzero
    (``> 0.5``) where lesion.
    """
    images_u8, masks, predicted = np.asarray(images_u8), np.asarray(masks), np.asarray(predicted)
    if images_u8.dtype != np.uint8 or len(images_u8) == 0:
        raise ValueError(
            f"prediction_overlays: images of dtype {images_u8.dtype} and length {len(images_u8)}; "
            f"expected at least one uint8 image"
        )
    shape = images_u8.shape[:3]
    for name, m in (("masks", masks), ("predicted", predicted)):
        if m.shape[:3] != shape or m.ndim not in (3, 4):
            raise ValueError(
                f"prediction_overlays: {name} of shape {m.shape}; expected {shape} (+ (1,)) "
                f"to match images of shape {images_u8.shape}"
            )
    stride = max(1, math.ceil(max(shape[1:]) / max_side))
    rows = []
    for image, mask, pred in zip(images_u8, masks, predicted):
        rgb = to_rgb_uint8(image)[::stride, ::stride]
        gt = mask.reshape(mask.shape[:2])[::stride, ::stride] > 0.5
        pr = pred.reshape(pred.shape[:2])[::stride, ::stride] > 0.5
        panels = [rgb, overlay(rgb, gt, (0, 255, 0), alpha=0.45), overlay(rgb, pr, (255, 0, 0), alpha=0.45)]
        gap = np.full((rgb.shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1))
    gap = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0)


def _as_hwc(value: np.ndarray | bytes, tag: str) -> np.ndarray:
    """An image as HWC uint8: PNG (or any Pillow format) bytes decoded, arrays checked."""
    if isinstance(value, (bytes, bytearray)):
        with Image.open(io.BytesIO(value)) as im:
            return np.asarray(im.convert("RGB"))
    array = np.asarray(value)
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image {tag!r}: {array.dtype} array of shape {array.shape}; expected PNG bytes or "
            f"a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    return array


# --------------------------------------------------------------------------------------
# The run's log
# --------------------------------------------------------------------------------------
class MetricsLog:
    """``metrics.jsonl`` (one JSON object per epoch) and TensorBoard events side by side.

    On resume both are cut back to the epochs (``resume_epochs``) and steps
    (``resume_step``) the checkpoint has seen, so the logs of a resumed run equal those of
    an uninterrupted one. Every write replaces the whole metrics file (temporary file, then
    rename: a few kB), so a killed run never leaves half a line. Each writer opens its own
    event file (``events.out.tfevents.<s>.<host>.<ns>.<pid>``, names in the order written);
    TensorBoard reads all of a folder's files. Where tensorboardX cannot be imported (the package used from a
    checkout on a machine without pip), only metrics.jsonl is written, with a RuntimeWarning.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_epochs: int = 0, resume_step: int = 0):
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self._predict = None  # the jitted forward pass of predictions(), built on first use
        self._lines = (
            [json.dumps(r) + "\n" for r in read_jsonl(self.path) if r.get("epoch", 0) <= resume_epochs]
            if resume_epochs
            else []
        )
        self._flush()
        logdir = run_dir / "tensorboard"
        self.tensorboard = None
        try:
            tensorboardx = _tensorboardx()
        except ImportError as err:  # e.g. the package used from a checkout on a machine without pip
            warnings.warn(
                f"tensorboardX cannot be imported ({err}): no TensorBoard events in {str(logdir)!r} for "
                f"this run, metrics.jsonl has every value; expected tensorboardX>=2.6.5 installed",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        cut_back(logdir, resume_step)
        # The suffix: tensorboardX names a file by the second (and opens it with "wb"), so two
        # writers started within one second would share a file; nanoseconds (19 digits) keep
        # the names distinct and sorted in the order written, which is the order readers take.
        # flush_secs: the writer's thread also flushes on its own every 10 s.
        self.tensorboard = tensorboardx.SummaryWriter(
            str(logdir), flush_secs=10, filename_suffix=f".{time.time_ns()}.{os.getpid()}"
        )

    def _flush(self) -> None:
        write_text(self.path, "".join(self._lines))

    def write(self, record: dict[str, Any], step: int) -> None:
        """Append ``record`` to metrics.jsonl (non-finite floats as null) and its numeric
        ``group/name`` values to TensorBoard as scalars at ``step``."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._lines.append(json.dumps(clean) + "\n")
        self._flush()
        if self.tensorboard is None:
            return
        for tag, value in record.items():
            if "/" in tag and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tensorboard.add_scalar(tag, float(value), step)
        self.tensorboard.flush()

    def images(self, step: int, images: Mapping[str, np.ndarray | bytes]) -> None:
        """Log images at ``step``, by tag: PNG bytes, or uint8 arrays (H, W) or (H, W, C)
        with C 1, 3 or 4."""
        if self.tensorboard is None:
            return
        for tag, value in images.items():
            self.tensorboard.add_image(tag, _as_hwc(value, tag), step, dataformats="HWC")
        self.tensorboard.flush()

    def predictions(self, step: int, state: Any, examples: Any, threshold: float, tag: str = "val/predictions") -> None:
        """Log :func:`prediction_overlays` of the model in ``state`` (a TrainState) on
        ``examples`` (a BusiDataset, a few images): one batched forward pass, jitted once
        per log. A model without a mask head, or no examples, logs nothing."""
        if self.tensorboard is None or len(examples.images_u8) == 0:
            return
        if self._predict is None:
            self._predict = jax.jit(lambda st, x, m: apply_model(st, st.params, x, m, train=False)[0][0])
        images = np.asarray(examples.images_u8)
        masks = np.asarray(examples.masks, np.float32).reshape(*images.shape[:3], 1)
        logits = self._predict(state, images.astype(np.float32) / 255.0, masks)
        if logits is None:  # a classifier
            return
        if not 0 < threshold < 1:
            raise ValueError(f"threshold {threshold!r}: expected a probability in (0, 1)")
        # sigmoid(x) > t, as in training's metrics, without overflowing exp
        predicted = np.asarray(logits, np.float32) > math.log(threshold / (1 - threshold))
        self.images(step, {tag: prediction_overlays(images, masks, predicted)})

    def training_curves(
        self,
        step: int,
        history: Sequence[Mapping[str, Any]],
        title: str | None = None,
        best_epoch: int | None = None,
        monitor: str = "val/loss",
        tag: str = "training_curves",
    ) -> None:
        """Log the figure of unet_jax.plots.plot_training_curves for ``history``."""
        if self.tensorboard is None:
            return
        with tempfile.TemporaryDirectory() as folder:
            path = plot_training_curves(
                history, Path(folder) / "curves.png", title=title, best_epoch=best_epoch, monitor=monitor
            )
            png = path.read_bytes()
        self.images(step, {tag: png})

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A last line cut short (no newline, not valid JSON:
    a writer killed mid-line) is left out; a bad line anywhere else is a ValueError."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines) and not text.endswith("\n"):
                break  # an unfinished last line
            raise ValueError(
                f"{str(path)!r} line {n} is not valid JSON ({err}); expected one JSON object per line"
            ) from None
    return records
