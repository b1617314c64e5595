"""Checkpoints (the only module that imports orbax).

A run directory holds `checkpoints/<step>/` with three items: `state` (TrainState: step,
params, batch_stats, opt_state), `data` (the input iterator's state, so a resumed run
continues with the exact next batch) and `meta` (the whole config, the role of the model
and its architecture, the validation metrics of that step). orbax writes each step to a
temporary directory and renames it when complete, so a run killed at any moment, even
during a save, resumes from the last complete checkpoint.

A step directory without all three items (an interrupted copy, an emptied directory) is left
out with a warning, and a writable Checkpointer moves it aside to `<step>.incomplete`, so the
complete steps still load and resume. A damaged file raises CheckpointError naming it. A state
with a NaN or infinite value is never saved (NonFiniteStateError). `RunLock` keeps a second
process out of a run directory.

From plain JAX code:

    from rkd_jax.checkpoint import restore
    config, variables, meta = restore("runs/distill")         # best checkpoint of a run
    logits = model.apply(variables, images, tokens, mask)["logits"]
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from rkd_jax.config_loader import phase_configs
from rkd_jax.files import write_text_atomic
from rkd_jax.models import build

BEST_METRIC = "val_mIoU"
ITEMS = ("state", "data", "meta")
# orbax writes this file last, when it commits a step.
COMMIT_FILE = "_CHECKPOINT_METADATA"
INCOMPLETE_SUFFIX = ".incomplete"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A path holds no usable checkpoint, or one of another architecture."""


class NonFiniteStateError(FloatingPointError):
    """The state to save holds NaN or infinite values: training diverged; nothing is saved."""


def missing_parts(step_dir: Path) -> list[str]:
    """What a step directory lacks to be a complete checkpoint ([] when complete)."""
    parts = [f"{item}/" for item in ITEMS if not (step_dir / item).is_dir()]
    if not (step_dir / "meta" / "metadata").is_file() and "meta/" not in parts:
        parts.append("meta/metadata")
    if not (step_dir / COMMIT_FILE).is_file():
        parts.append(COMMIT_FILE)
    return parts


def _step_dirs(directory: Path) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    return {int(p.name): p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()}


class Checkpointer:
    """CheckpointManager keeping the last `keep` steps and the best by validation mIoU."""

    def __init__(self, directory: str | Path, keep: int = 2, read_only: bool = False):
        self.directory = Path(directory).absolute()
        # Steps left out (read-only; a writable Checkpointer moves them aside): what they lack.
        self.incomplete: dict[int, list[str]] = {}
        for step, path in sorted(_step_dirs(self.directory).items()):
            lacks = missing_parts(path)
            if not lacks:
                continue
            where = f"{path}: incomplete checkpoint (lacks {', '.join(lacks)})"
            if read_only:
                self.incomplete[step] = lacks
                log.warning("%s: left out", where)
                continue
            # A directory orbax would take for a step blocks saving that step: move it aside.
            aside = path.with_name(f"{path.name}{INCOMPLETE_SUFFIX}")
            n = 1
            while aside.exists():
                n += 1
                aside = path.with_name(f"{path.name}{INCOMPLETE_SUFFIX}{n}")
            path.rename(aside)
            log.warning("%s: moved to %s", where, aside.name)
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
        steps = self.all_steps()
        return max(steps) if steps else None

    def all_steps(self) -> list[int]:
        """The complete steps, ascending."""
        return sorted(s for s in self.manager.all_steps() if s not in self.incomplete)

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
        """Save one step; NonFiniteStateError (nothing written) if `state` holds NaN or inf."""
        bad = first_non_finite(state)
        if bad is not None:
            last = self.latest_step()
            raise NonFiniteStateError(
                f"step {int(step)}: not saved: {bad} holds NaN or infinite values (training "
                "diverged: lower the learning rate or set grad_clip_norm); the last complete "
                f"checkpoint{'' if last is None else f' (step {last})'} in {self.directory} "
                "is kept"
            )
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
        """Restore (state, data_state, meta) of `step` onto `abstract_state`'s shardings.

        CheckpointError when the saved arrays differ from `abstract_state` (another
        architecture: the first differing parameter is named) or a file is damaged."""
        where = self.directory / str(int(step))
        self._check_shapes(int(step), abstract_state)
        with _naming_damage(where):
            out = self.manager.restore(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})

    def saved_state(self, step: int) -> Any:
        """The state item's tree of orbax ArrayMetadata (shape, dtype, saved sharding)."""
        from etils import epath

        state_dir = self.directory / str(step) / "state"
        with _naming_damage(state_dir):
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
        return getattr(saved, "tree", saved)

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """CheckpointError naming the first parameter whose saved shape differs."""
        saved = self.saved_state(step)
        where = f"{self.directory}/{step}"
        advice = "resume it with the config it was trained with, or use another run directory"
        for part in ("params", "batch_stats"):
            have, want = _shapes(_item(saved, part)), _shapes(_item(abstract_state, part))
            for key, shape in want.items():
                if key not in have:
                    raise CheckpointError(
                        f"{where}: saved by another architecture than this config's model: it "
                        f"lacks {part}/{key} {shape}; {advice}"
                    )
                if have[key] != shape:
                    raise CheckpointError(
                        f"{where}: saved by another architecture than this config's model: "
                        f"{part}/{key} has shape {have[key]}, this config's model {shape}; "
                        f"{advice}"
                    )
            extra = sorted(set(have) - set(want))
            if extra:
                raise CheckpointError(
                    f"{where}: saved by another architecture than this config's model: it has "
                    f"{', '.join(f'{part}/{k}' for k in extra[:3])}, which this config's model "
                    f"lacks; {advice}"
                )

    def read_meta(self, step: int) -> dict:
        """The meta item of `step` (config, role, model, metrics); CheckpointError naming the
        file when it is missing or not JSON."""
        path = self.directory / str(step) / "meta" / "metadata"
        try:
            meta = json.loads(path.read_text())
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read the checkpoint's meta ({e})") from None
        except ValueError as e:
            raise CheckpointError(f"{path}: damaged checkpoint meta, not JSON ({e})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: damaged checkpoint meta, expected a JSON object")
        return meta

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
    if path.name.isdigit() and not (path / "checkpoints").exists() and not _step_dirs(path):
        lacks = missing_parts(path)
        if lacks:
            raise CheckpointError(f"{path}: incomplete checkpoint (lacks {', '.join(lacks)})")
        return path.parent, int(path.name)
    incomplete = []
    for candidate in (path / "checkpoints", path):
        if _step_dirs(candidate):
            ckpt = Checkpointer(candidate, read_only=True)
            try:
                step = ckpt.best_step()
            finally:
                ckpt.close()
            if step is not None:
                return candidate, step
            incomplete += [f"{candidate}/{s}" for s in ckpt.incomplete]
    if incomplete:
        raise CheckpointError(
            f"{path}: no complete checkpoint; incomplete step directories: {', '.join(incomplete)}"
        )
    raise CheckpointError(
        f"{path}: no checkpoint found (expected a run directory with checkpoints/<step>/, "
        "a checkpoints/ directory, or one checkpoints/<step>/ directory)"
    )


def check_checkpoint_role(path: str | Path, expected: str, what: str) -> None:
    """CheckpointError unless the checkpoint at `path` (passed as `what`) records `expected`
    as its role; reads only its small meta item."""
    directory, step = find_checkpoint(path)
    reader = Checkpointer(directory, read_only=True)
    try:
        meta = reader.read_meta(step)
    finally:
        reader.close()
    check_role(meta, expected, f"{what} ({directory}/{step})")


def check_role(meta: dict, expected: str, what: str) -> None:
    """CheckpointError unless `meta` (of a checkpoint passed as `what`) records `expected`."""
    role = meta.get("role")
    if role != expected:
        hint = (
            "a distillation run keeps its teacher in <run>/teacher"
            if expected == "teacher"
            else "pass the student's run directory, not its teacher/ subdirectory"
        )
        raise CheckpointError(
            f"{what}: this checkpoint holds the {role or 'unknown-role'} model (its meta role), "
            f"expected the {expected}; {hint}"
        )


def restore(path: str | Path) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """Load (config, variables {'params', 'batch_stats'}, meta) from a run or checkpoint.

    Needs no abstract target: shapes and dtypes come from the checkpoint's metadata, and the
    arrays land on this process's first device.
    `meta["role"]` says which model of the config the variables belong to ('teacher' or
    'student'); `meta["model"]` is that model's config.
    """
    directory, step = find_checkpoint(path)
    ckpt = Checkpointer(directory, read_only=True)
    try:
        meta = ckpt.read_meta(step)
        # Every array lands on this process's first device, whatever devices it was saved
        # from: a checkpoint of 8 GPUs loads on a laptop, and one saved from a single device
        # loads in each task of a multi-process job. (The saved sharding is not used: a
        # one-device checkpoint names device 0, which only the first process holds, and the
        # others' restores then never finished.)
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
            ckpt.saved_state(step),
        )
        with _naming_damage(directory / str(step) / "state"):
            out = ckpt.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
    finally:
        ckpt.close()
    state = out["state"]
    get = (lambda k: state[k]) if isinstance(state, dict) else (lambda k: getattr(state, k))
    variables = {"params": get("params"), "batch_stats": get("batch_stats")}
    config = ml_collections.ConfigDict(meta.get("config", {}))
    meta = dict(meta, step=step, directory=str(directory))
    return config, jax.tree.map(lambda a: a, variables), meta


class LoadedModel(NamedTuple):
    """A checkpoint with the model its variables belong to (`load_model`)."""

    model: Any  # the rebuilt Segmenter
    variables: dict  # {"params", "batch_stats"}, as restored (on this process's first device)
    config: ml_collections.ConfigDict  # the run's whole config
    meta: dict  # the checkpoint's meta item, with "step" and "directory"
    role: str  # "teacher" | "student"
    model_config: ml_collections.ConfigDict


def load_model(
    path: str | Path,
    role: str | None = None,
    dtype: Any = None,
    expected: tuple[Any, str] | None = None,
) -> LoadedModel:
    """Restore a checkpoint and rebuild its model, checked against the restored variables: the
    one restore-and-rebuild of the project (training's teacher, evaluation, the predictor and
    export read checkpoints through it).

    Args:
      path: a run directory (its best checkpoint), its checkpoints/ or one checkpoints/<step>.
      role: which model of the checkpoint's config the variables belong to; default its meta
        role.
      dtype: the rebuilt model's compute dtype; default the run's run.compute_dtype (bfloat16
        on GPU/TPU under 'auto', float32 on CPU).
      expected: (model config, what) of a reader that knows which model it needs (training's
        teacher): the checkpoint must record `role` and that model config's architecture, and
        errors name it as `what`.

    Raises CheckpointError: no checkpoint, another role than `expected` asks for, or variables
    of another architecture than the model config describes (the first differing parameter).
    """
    config, variables, meta = restore(path)
    where = f"checkpoint {meta.get('directory', path)}/{meta.get('step', '?')}"
    role = role or meta.get("role")
    if expected is not None:
        model_config, what = expected
        check_role(meta, role, what)
        check_architecture(meta, model_config, what)
        describes = f"{what}: its variables do not fit the {role} model of the config"
    else:
        if role not in ("teacher", "student"):
            raise CheckpointError(
                f"{where}: role {role!r}; expected 'teacher' or 'student' (is this an rkd_jax "
                "checkpoint?)"
            )
        if "teacher" not in config or "student" not in config or "run" not in config:
            raise CheckpointError(f"{where}: its meta holds no rkd_jax config")
        model_config = phase_configs(config, role)[0]
        if role == meta.get("role") and meta.get("model"):
            model_config = ml_collections.ConfigDict(meta["model"])
        arch = build.architecture(model_config)
        describes = (
            f"{where}: its variables are of another architecture than the {role} model its "
            f"config describes ({arch['backbone']} width {arch['backbone_width']}, fusion_dim "
            f"{arch['fusion_dim']}, fpn_dim {arch['fpn_dim']})"
        )
    image_size = int(meta.get("image_size", config.data.image_size))
    max_tokens = int(meta.get("max_tokens", config.data.max_tokens))
    target = _abstract_variables(build.build_model(model_config), image_size, max_tokens)
    mismatch = build.shape_mismatch(target["params"], variables["params"]) or (
        build.shape_mismatch(target.get("batch_stats", {}), variables["batch_stats"])
    )
    if mismatch:
        raise CheckpointError(f"{describes}; variables: {mismatch}")
    if dtype is None:
        dtype = build.resolve_dtype(config.run.compute_dtype)
    model = build.build_model(model_config, dtype)
    return LoadedModel(model, variables, config, meta, role, model_config)


# Expected shapes per architecture (flax modules hash by their fields): checkpoints of one
# architecture (two of a run, a reloaded one) trace the model's init once.
@functools.lru_cache(maxsize=8)
def _abstract_variables(model, image_size: int, max_tokens: int):
    return build.abstract_variables(model, image_size, max_tokens)


def check_architecture(meta: dict, model_config, what: str) -> None:
    """CheckpointError unless the architecture `meta` records (if any) is `model_config`'s."""
    expected = build.architecture(model_config)
    saved = meta.get("architecture")
    if saved is None or _normalise(saved) == _normalise(expected):
        return
    saved = _normalise(saved)
    diff = {k: (saved.get(k), expected[k]) for k in expected if saved.get(k) != expected[k]}
    raise CheckpointError(
        f"{what} has another architecture than config.{meta.get('role')}: "
        + ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
    )


def _normalise(arch: dict) -> dict:
    # Checkpoints saved before a field existed: what it meant then.
    arch = {**build.FIELD_DEFAULTS, **arch}
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in arch.items()}


def _item(tree: Any, name: str) -> Any:
    """`tree[name]` of a dict, `tree.name` of a TrainState; None when absent."""
    if isinstance(tree, dict):
        return tree.get(name)
    return getattr(tree, name, None)


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes(tree: Any) -> dict[str, tuple]:
    """{'a/b/kernel': shape} of a tree of arrays, ShapeDtypeStructs or orbax array metadata."""
    if tree is None:
        return {}
    leaves = jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)
    )
    return {
        "/".join(_key_name(e) for e in path): tuple(int(d) for d in leaf.shape)
        for path, leaf in leaves
        if getattr(leaf, "shape", None) is not None
    }


class _naming_damage:
    """Within: an error reading checkpoint files becomes a CheckpointError naming `where`."""

    def __init__(self, where: Path):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, CheckpointError) or not isinstance(error, Exception):
            return False
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise CheckpointError(
            f"{self.where}: damaged or unreadable checkpoint files ({type(error).__name__}: "
            f"{first})"
        ) from error


@jax.jit
def _finite_flags(leaves):
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def _host_view(x) -> np.ndarray | None:
    """A host array holding every value of `x` when one is at hand without a collective: a
    numpy array, or a fully replicated jax.Array's first local copy (the train state: every
    process holds all of it); None for an array sharded across devices."""
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_replicated and x.addressable_shards:
        return np.asarray(x.addressable_shards[0].data)
    return None


def first_non_finite(state: Any) -> str | None:
    """Key path of the first floating-point array of `state` with a NaN or inf, else None.

    Replicated arrays are checked on the host, one local copy each (no program to compile:
    a jitted check of every leaf took ~3 s of XLA compilation per state structure on CPU);
    sharded ones in one jitted reduction, so that every process reaches the same answer."""
    leaves = [
        (jax.tree_util.keystr(k).lstrip("."), x)
        for k, x in jax.tree_util.tree_leaves_with_path(state)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    host = [_host_view(x) for _, x in leaves]
    sharded = [x for (_, x), h in zip(leaves, host) if h is None]
    flags = iter(jax.device_get(_finite_flags(sharded)) if sharded else ())
    for (path, _), h in zip(leaves, host):
        ok = bool(np.isfinite(h).all()) if h is not None else bool(next(flags))
        if not ok:
            return path
    return None


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop the rows of a metrics JSONL file whose step is after `last_step` (written after the
    checkpoint a run resumes from, and written again by the resumed run); returns how many.
    The file is replaced atomically; an unparsable row is kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            step = None
        if isinstance(step, (int, float)) and step > last_step:
            dropped += 1
            continue
        kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        write_text_atomic(path, "".join(kept))
    return dropped


class RunBusyError(CheckpointError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive lock on a run directory (`<run>/.lock`, flock) for one training process.

    A live holder makes `acquire` raise RunBusyError naming its pid, host and start time. The
    kernel drops the lock of a process that died (SIGKILL included), so a lock file left by a
    dead process is simply taken over (with a log line).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir).absolute() / ".lock"
        self._file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunBusyError(
                f"{self.path.parent}: in use by {holder} (lock {self.path}); wait for it to end, "
                "stop it, or use another run directory"
            ) from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log.warning("%s: taking over the lock of %s, which has ended", self.path, previous)
        f.seek(0)
        f.truncate()
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False
