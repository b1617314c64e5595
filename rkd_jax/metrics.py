"""Training metrics: the JSONL + TensorBoard writer and the NaN guard of the logged steps."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np


class MetricWriter:
    """JSONL + TensorBoard event files (tensorboardX), written by process 0 only."""

    def __init__(self, run_dir: Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # logging must never stop training
            self.tb = None

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


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
