"""Run logs: a JSON-lines metrics file and TensorBoard event files, without TensorFlow.

The TensorBoard writer emits the TFRecord framing (length, masked CRC-32C, payload, masked
CRC-32C) around hand-encoded ``Event`` protocol buffers holding scalar summaries: the
format TensorBoard reads, in 80 lines and no dependency.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "TensorBoardWriter", "crc32c", "cut_back", "read_jsonl"]


# --------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as TFRecord requires
# --------------------------------------------------------------------------------------
def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# Minimal protobuf encoding of tensorflow.Event / Summary
# --------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    # Event: wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5.
    return _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step) + body


def _scalar_summary(tag: str, value: float) -> bytes:
    # Summary.value = 1 (repeated Value); Value.tag = 1 (string), simple_value = 2 (float).
    value_msg = _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value)
    return _bytes_field(5, _bytes_field(1, value_msg))


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


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
    """The step of a record written by :func:`_event` (wall_time, then step, first); 0 for
    any other layout, so that such a record is kept."""
    payload = record[12:-4]
    if payload[:1] != _field(1, 1) or payload[9:10] != _field(2, 0):
        return 0
    return _read_varint(payload, 10)[0]


def cut_back(logdir: str | os.PathLike, step: int) -> None:
    """Drop the events after ``step`` from the event files of ``logdir``, each file
    rewritten atomically: a resumed run repeats those steps, and TensorBoard would draw
    them twice (its SessionLog purge is not honoured by every reader)."""
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        kept = b"".join(r for r in _records(data) if _step_of(r) <= step)
        if kept != data:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(kept)
            os.replace(tmp, path)


class TensorBoardWriter:
    """Appends scalar events to ``logdir/events.out.tfevents.<time>.<host>``."""

    def __init__(self, logdir: str | os.PathLike):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = logdir / name
        self._file = open(self.path, "ab")
        self._write(_event(time.time(), 0, _bytes_field(3, b"brain.Event:2")))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                         + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        for tag, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._write(_event(now, step, _scalar_summary(tag, float(value))))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per epoch) and TensorBoard scalars side by side.

    On resume both are cut back to the epochs (``resume_epochs``) and steps
    (``resume_step``) the checkpoint has seen, so the logs of a resumed run equal those of
    an uninterrupted one. Every write replaces the whole metrics file (temporary file, then
    rename: a few kB), so a killed run never leaves half a line.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_epochs: int = 0, resume_step: int = 0):
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self._lines = [json.dumps(r) + "\n" for r in read_jsonl(self.path)
                       if r.get("epoch", 0) <= resume_epochs] if resume_epochs else []
        self._flush()
        cut_back(run_dir / "tensorboard", resume_step)
        self.tensorboard = TensorBoardWriter(run_dir / "tensorboard")

    def _flush(self) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(self._lines))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any], step: int) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._lines.append(json.dumps(clean) + "\n")
        self._flush()
        self.tensorboard.scalars(step, {k: v for k, v in record.items() if "/" in k})

    def close(self) -> None:
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
            raise ValueError(f"{str(path)!r} line {n} is not valid JSON ({err}); expected one JSON object per line") from None
    return records
