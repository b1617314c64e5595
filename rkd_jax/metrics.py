"""Training metrics: the JSONL + TensorBoard writer and the NaN guard of the logged steps."""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import time
from pathlib import Path

import jax
import numpy as np


class MetricWriter:
    """metrics.jsonl and TensorBoard scalars (`EventFile`), written by process 0 only."""

    def __init__(self, run_dir: Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            self.tb = EventFile(run_dir / "tensorboard")
        except OSError:  # logging to TensorBoard must never stop training
            self.tb = None

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        if self.tb is not None:
            self.tb.scalars(int(step), scalars)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


# TensorBoard's event file, scalars only, written here rather than through tensorboardX, which
# imports torch whenever it is installed (~1.7 s of CPU and ~300 MB in every training process).
# A file of TFRecords; each record: uint64 length, uint32 masked CRC-32C of the length bytes, the
# data, uint32 masked CRC-32C of the data (all little-endian). The data is a serialised
# tensorflow.Event protobuf: wall_time = 1 (double), step = 2 (int64), file_version = 3
# (string, the first record: "brain.Event:2"), summary = 5 (Summary: repeated value = 1;
# Summary.Value: tag = 1 (string), simple_value = 2 (float)).


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 fields: negative numbers as their 64-bit two's complement
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + body


def scalar_event(wall_time: float, step: int, scalars: dict[str, float]) -> bytes:
    """A serialised Event holding one Summary.Value (tag, simple_value) per scalar."""
    values = b"".join(
        _field(1, _field(1, str(tag).encode()) + b"\x15" + struct.pack("<f", float(value)))
        for tag, value in scalars.items()
    )
    return _event(wall_time, step, _field(5, values))


def tf_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", _masked_crc(length))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


_FILE_COUNTER = itertools.count()


class EventFile:
    """One new events.out.tfevents.* file under `directory` (TensorBoard reads every file of a
    directory, so a resumed run adds a file); each `scalars` call is one Event, flushed."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
            f".{os.getpid()}.{next(_FILE_COUNTER)}"
        )
        self.path = directory / name
        self._file = open(self.path, "ab")
        self._write(_event(time.time(), 0, _field(3, b"brain.Event:2")))

    def _write(self, event: bytes) -> None:
        self._file.write(tf_record(event))
        self._file.flush()

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._write(scalar_event(time.time(), step, scalars))

    def close(self) -> None:
        self._file.close()


class NonFiniteLossError(FloatingPointError):
    """A logged metric (loss, grad_norm) is NaN or infinite: training diverged."""


def flush(pending: list, first_step: int) -> dict[str, float]:
    """Fetch the metrics of the steps since the last log (`pending`, the first of them step
    `first_step + 1`) and average them; NonFiniteLossError on the first NaN/Inf."""
    host = jax.device_get(pending)
    for i, m in enumerate(host):
        for k, v in m.items():
            if not np.isfinite(v):
                raise NonFiniteLossError(
                    f"step {first_step + i + 1}: {k} is {float(v)}; training stopped, the last "
                    "complete checkpoint is kept"
                )
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}
