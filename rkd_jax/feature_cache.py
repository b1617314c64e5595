"""On-disk cache of frozen text features, shared by the runs of one experiment.

With a frozen text encoder a run computes the features of every unique training sentence
once (`text_features.text_table`). The runs of launch.sh's table use the same sentences and, per
model, the same frozen encoder weights, so they would compute the same array dozens of
times. `load_or_compute` stores it under a key that fingerprints everything the array
depends on: the encoder's weights (paths, shapes, dtypes and bytes), the model config, the
token ids and masks, the compute dtype, the backend and the jax version. A changed input
gives a new key; nothing is ever looked up by name alone.

Files are written to a temporary name and renamed into place, so a run that stops midway
or two runs writing the same key never leave a partial file behind. A file that cannot be
read (or does not match the expected shape) is reported and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger("rkd_jax")

FORMAT = 1


def _hash_array(h, a: np.ndarray) -> None:
    h.update(f"{a.dtype.name}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())


def fingerprint(tree: Any, *parts: Any) -> str:
    """sha256 over a pytree of arrays (paths, shapes, dtypes, bytes) and JSON-able parts."""
    h = hashlib.sha256()
    h.update(f"rkd_jax.feature_cache/{FORMAT}".encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        _hash_array(h, np.asarray(jax.device_get(leaf)))
    for part in parts:
        if isinstance(part, np.ndarray):
            _hash_array(h, part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _paths(directory: Path, key: str) -> tuple[Path, Path]:
    return directory / f"{key}.npy", directory / f"{key}.json"


def load(directory: Path, key: str) -> np.ndarray | None:
    """The stored array for `key`, or None when absent or unreadable (logged)."""
    data_path, meta_path = _paths(directory, key)
    if not (data_path.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        raw = np.load(data_path, allow_pickle=False)
        dtype = np.dtype(jax.numpy.dtype(meta["dtype"]))
        shape = tuple(int(s) for s in meta["shape"])
        if raw.dtype != np.uint8 or raw.size != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"{raw.size} bytes, expected {shape} of {dtype.name}")
        return raw.view(dtype).reshape(shape)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("feature cache: ignoring unreadable %s (%s); recomputing", data_path, e)
        return None


def store(directory: Path, key: str, array: np.ndarray, info: dict | None = None) -> Path:
    """Write `array` under `key` atomically; returns the .npy path."""
    directory.mkdir(parents=True, exist_ok=True)
    data_path, meta_path = _paths(directory, key)
    array = np.ascontiguousarray(array)
    meta = {"dtype": array.dtype.name, "shape": list(array.shape), **(info or {})}
    # Bytes plus a dtype name: np.save cannot round-trip bfloat16 on its own.
    for path, write in (
        (data_path, lambda f: np.save(f, array.reshape(-1).view(np.uint8), allow_pickle=False)),
        (meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode())),
    ):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return data_path


# With no directory, arrays are kept in this process's memory instead, so the phases of one job
# (teacher, distillation, student alone) still compute each one once; the oldest goes first.
MEMORY_ENTRIES = 4
_memory: dict[str, np.ndarray] = {}


def load_or_compute(
    directory: str | os.PathLike,
    key: str,
    compute: Callable[[], np.ndarray],
    info: dict | None = None,
) -> tuple[np.ndarray, bool]:
    """(array, whether it was found); computed and stored on a miss: in `directory`, or with an
    empty `directory` in this process's memory (at most MEMORY_ENTRIES arrays)."""
    if not directory:
        if key in _memory:
            return _memory[key], True
        array = np.asarray(compute())
        while len(_memory) >= MEMORY_ENTRIES:
            _memory.pop(next(iter(_memory)))
        _memory[key] = array
        return array, False
    directory = Path(directory)
    cached = load(directory, key)
    if cached is not None:
        return cached, True
    array = np.asarray(compute())
    store(directory, key, array, info)
    return array, False
