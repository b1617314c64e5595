"""Checkpoints (the only module that imports orbax).

A run directory holds `checkpoints/<step>/` with three items: `state` (TrainState: step,
params, batch_stats, opt_state), `data` (the input iterator's state, so a resumed run
continues with the exact next batch) and `meta` (the whole config, the role of the model
and its architecture, the validation metrics of that step). orbax writes each step to a
temporary directory and renames it when complete, so a run killed at any moment, even
during a save, resumes from the last complete checkpoint.

From plain JAX code:

    from rkd_jax.checkpoint import restore
    config, variables, meta = restore("runs/distill")         # best checkpoint of a run
    logits = model.apply(variables, images, tokens, mask)["logits"]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

BEST_METRIC = "val_mIoU"


class CheckpointError(ValueError):
    """A path holds no usable checkpoint, or one of another architecture."""


class Checkpointer:
    """CheckpointManager keeping the last `keep` steps and the best by validation mIoU."""

    def __init__(self, directory: str | Path, keep: int = 2, read_only: bool = False):
        self.directory = Path(directory).absolute()
        policy = pp.AnyPreservationPolicy(
            [
                pp.LatestN(n=keep),
                pp.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        """Step with the highest saved validation mIoU; the latest when none has one."""
        best, best_value = None, -1.0
        for step in self.all_steps():
            value = self.read_meta(step).get("metrics", {}).get(BEST_METRIC)
            if value is not None and value > best_value:
                best, best_value = step, value
        return best if best is not None else self.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict | None,
        meta: dict,
        metrics: dict | None = None,
    ) -> None:
        meta = dict(meta, metrics=metrics or {})
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state or {}),
                meta=ocp.args.JsonSave(_jsonable(meta)),
            ),
            metrics=metrics if metrics and BEST_METRIC in metrics else None,
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore (state, data_state, meta) of `step` onto `abstract_state`'s shardings."""
        out = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})

    def read_meta(self, step: int) -> dict:
        path = self.directory / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            out = self.manager.restore(
                int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
            return dict(out["meta"] or {})

    def close(self) -> None:
        self.manager.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, ml_collections.ConfigDict):
        x = x.to_dict()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    return x


def find_checkpoint(path: str | Path) -> tuple[Path, int]:
    """Resolve a run directory, its `checkpoints/` directory or one `checkpoints/<step>`
    directory to (checkpoints directory, step); a run gives its best step."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if (path / "meta").is_dir() and (path / "state").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
            ckpt = Checkpointer(candidate, read_only=True)
            step = ckpt.best_step()
            ckpt.close()
            if step is not None:
                return candidate, step
    raise CheckpointError(
        f"{path}: no checkpoint found (expected a run directory with checkpoints/<step>/, "
        "a checkpoints/ directory, or one checkpoints/<step>/ directory)"
    )


def restore(path: str | Path) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """Load (config, variables {'params', 'batch_stats'}, meta) from a run or checkpoint.

    Needs no abstract target: arrays come back as saved (replicated on the default device).
    `meta["role"]` says which model of the config the variables belong to ('teacher' or
    'student'); `meta["model"]` is that model's config.
    """
    directory, step = find_checkpoint(path)
    ckpt = Checkpointer(directory, read_only=True)
    try:
        meta = ckpt.read_meta(step)
        # Without a target, arrays land on this process's first device, whatever the number
        # of devices they were saved from (a checkpoint of 8 GPUs loads on a laptop).
        fallback = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        out = ckpt.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(fallback_sharding=fallback)),
        )
    finally:
        ckpt.close()
    state = out["state"]
    get = (lambda k: state[k]) if isinstance(state, dict) else (lambda k: getattr(state, k))
    variables = {"params": get("params"), "batch_stats": get("batch_stats")}
    config = ml_collections.ConfigDict(meta.get("config", {}))
    meta = dict(meta, step=step, directory=str(directory))
    return config, jax.tree.map(lambda a: a, variables), meta
