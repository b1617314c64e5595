"""Atomic file writes: the content goes to a hidden temporary name beside the target (the same
file system) and is renamed over it when complete, so a crash or a failed check never leaves half
a file, and the previous file stays until the new one is whole."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def temporary_path(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` under a temporary name, then rename it into place."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, payload: Any, **dumps_kwargs) -> None:
    """`json.dumps(payload, **dumps_kwargs)` written atomically."""
    write_text_atomic(path, json.dumps(payload, **dumps_kwargs))
