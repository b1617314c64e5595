"""The metric writer: metrics.jsonl and TensorBoard event files, the latter read back with
tensorboardX's Event protobuf and CRC (the reference; rkd_jax writes them itself)."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from rkd_jax import metrics


def read_events(path):
    """Every Event of a TFRecord file, checking both CRCs of each record."""
    data, i, events = path.read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        assert struct.unpack("<I", data[i + 8 : i + 12])[0] == masked_crc32c(data[i : i + 8])
        record = data[i + 12 : i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n : i + 16 + n])[0] == masked_crc32c(record)
        events.append(event_pb2.Event.FromString(record))
        i += 16 + n
    return events


def test_crc32c_check_value():
    assert metrics.crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
    assert metrics.crc32c(b"") == 0


def test_writer_scalars_read_back_in_jsonl_and_tensorboard(tmp_path):
    w = metrics.MetricWriter(tmp_path)
    w.write(5, {"loss": 1.25, "lr": 3e-4})
    w.write(2**40, {"loss": float("nan"), "loss_vl/x": -2.0})
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 5, "loss": 1.25, "lr": 3e-4}
    assert lines[1]["step"] == 2**40 and lines[1]["loss_vl/x"] == -2.0

    (events_file,) = (tmp_path / "tensorboard").iterdir()
    assert events_file.name.startswith("events.out.tfevents.")
    first, *events = read_events(events_file)
    assert first.file_version == "brain.Event:2"
    assert [e.step for e in events] == [5, 2**40]
    values = [{v.tag: v.simple_value for v in e.summary.value} for e in events]
    assert values[0] == {"loss": 1.25, "lr": pytest.approx(3e-4)}
    assert np.isnan(values[1]["loss"]) and values[1]["loss_vl/x"] == -2.0
    assert all(e.wall_time >= first.wall_time > 1e9 for e in events)

    # A resumed run appends to metrics.jsonl and adds a second event file.
    w = metrics.MetricWriter(tmp_path)
    w.write(6, {"loss": 1.0})
    w.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    files = sorted((tmp_path / "tensorboard").iterdir())
    assert len(files) == 2
    (new,) = [f for f in files if f != events_file]
    assert [e.step for e in read_events(new)[1:]] == [6]


def test_training_process_does_not_import_torch(tmp_path):
    """Writing metrics imports no torch (tensorboardX did, when torch is installed)."""
    code = (
        "import sys; from pathlib import Path; from rkd_jax import metrics;"
        f"w = metrics.MetricWriter(Path({str(tmp_path)!r})); w.write(1, {{'loss': 1.0}});"
        "w.close(); print('torch' in sys.modules, 'tensorboardX' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "False"]
