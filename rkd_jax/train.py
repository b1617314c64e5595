"""The job driver and the resumable training loop of one phase (teacher or student).

One jitted step per iteration (`steps.make_train_step`). Host syncs happen only on log steps
and before saves. The loop resumes from the phase's last checkpoint, with the data iterator at
the exact next batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from rkd_jax import checkpoint as ckpt_lib
from rkd_jax import evaluate as eval_lib
from rkd_jax import metrics as metrics_lib
from rkd_jax import parallel, platform, teacher_targets
from rkd_jax import text_features as text_lib
from rkd_jax.config_loader import phase_configs
from rkd_jax.models import build
from rkd_jax.optim import make_optimizer
from rkd_jax.steps import MODES, create_train_state, make_train_step, text_frozen

log = logging.getLogger("rkd_jax")


def meta_for(config, role: str, epoch: float) -> dict:
    """The meta item saved with a phase's checkpoints."""
    model_cfg, _ = phase_configs(config, role)
    return {
        "role": role,
        "model": model_cfg.to_dict(),
        "architecture": build.architecture(model_cfg),
        "config": config.to_dict(),
        "image_size": int(config.data.image_size),
        "max_tokens": int(config.data.max_tokens),
        "epoch": float(epoch),
        "versions": versions(),
    }


def versions() -> dict:
    return platform.package_versions("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def load_teacher(config, path: str, mesh) -> dict:
    """Teacher variables from a checkpoint, checked against config.teacher's architecture."""
    what = f"teacher checkpoint {path}"
    loaded = ckpt_lib.load_model(path, "teacher", expected=(config.teacher, what))
    return parallel.replicate(loaded.variables, mesh)


def check_categories(category_id: np.ndarray, num_categories: int, role: str) -> None:
    """ValueError when a batch's category id has no class in the model's category head."""
    bad = np.asarray(category_id)
    bad = bad[(bad < 0) | (bad >= num_categories)]
    if bad.size:
        raise ValueError(
            f"config.{role}.category_classes={num_categories}, but the data has category id "
            f"{int(bad[0])}: expected ids 0..{num_categories - 1} (COCO's go up to 90: use 91; "
            "the embedded data's up to 8: use 9)"
        )


@dataclasses.dataclass
class Phase:
    """What one phase trains with: its models, optimizer, schedule and length."""

    role: str  # the model trained: 'teacher' | 'student'
    mode: str  # the step's mode: teacher | student | distill
    model_cfg: Any
    sched: Any
    model: Any
    teacher: Any  # the folded frozen teacher (distill), else None
    teacher_vars: Any
    tokenize: Callable
    tx: Any
    schedule: Callable
    steps_per_epoch: int
    total: int


def _make_phase(config, role: str, teacher_vars) -> Phase:
    from rkd_jax.data import pipeline

    mode = (
        "teacher" if role == "teacher" else ("distill" if teacher_vars is not None else "student")
    )
    model_cfg, sched = phase_configs(config, role)
    dtype = build.resolve_dtype(config.run.compute_dtype)
    model = build.build_model(model_cfg, dtype)
    teacher = None
    if mode == "distill":
        # The frozen teacher only runs in inference mode: its BatchNorms fold into its convs.
        from rkd_jax.models.fold import fold_batch_norm

        teacher, teacher_vars = fold_batch_norm(
            build.build_model(config.teacher, dtype), teacher_vars
        )
    roles = ("student", "teacher") if mode == "distill" else (role,)
    tokenize = text_lib.make_tokenizer(config, roles)
    parallel.check_batch_size(int(sched.batch_size), f"{role} batch_size")

    steps_per_epoch = pipeline.steps_per_epoch(config.data, int(sched.batch_size))
    total = int(sched.epochs) * steps_per_epoch
    if config.run.max_steps >= 0:
        total = min(total, int(config.run.max_steps))
    frozen = None if model_cfg.text_trainable else text_frozen
    tx, schedule = make_optimizer(sched, steps_per_epoch, frozen=frozen)
    return Phase(
        role,
        mode,
        model_cfg,
        sched,
        model,
        teacher,
        teacher_vars,
        tokenize,
        tx,
        schedule,
        steps_per_epoch,
        total,
    )


def _restore_or_init(config, phase: Phase, ckpt: ckpt_lib.Checkpointer, mesh):
    """(state replicated over `mesh`, the data iterator's saved state or None): the phase's
    last checkpoint, or a fresh state."""
    init_rng = jax.random.fold_in(build.make_key(int(config.seed)), int(phase.role != "teacher"))

    def fresh_state():
        return create_train_state(
            config, phase.mode, phase.model, phase.model_cfg, phase.tx, init_rng
        )

    latest = ckpt.latest_step()
    if latest is None:
        return parallel.replicate(fresh_state(), mesh), None
    # Traced only to resume: tracing the state builds the model and reads the pretrained
    # weights once more.
    abstract = jax.eval_shape(fresh_state)
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)),
        abstract,
    )
    state, data_state, _ = ckpt.restore(latest, target)
    log.info("%s: resumed from step %d (%s)", phase.role, latest, ckpt.directory)
    return state, data_state


def _text_tables(config, phase: Phase, state, mesh) -> dict:
    """{"student", "teacher"}: the frozen text encoders' features of every training sentence
    (`text_features.text_table`), None for a model that encodes its text in the step."""
    from rkd_jax.data import pipeline

    tables = {"student": None, "teacher": None}
    roles = ("student", "teacher") if phase.mode == "distill" else (phase.role,)
    if not any(text_lib.uses_text_cache(config, phase_configs(config, r)[0]) for r in roles):
        return tables
    t0 = time.perf_counter()
    tokens, mask = pipeline.sentence_table(config.data, phase.tokenize, config.data.train_split)
    hits = []
    if text_lib.uses_text_cache(config, phase.model_cfg):
        # The model this phase trains is the step's "student", also for the teacher phase.
        tables["student"], hit = text_lib.text_table(
            config, phase.model, phase.model_cfg, {"params": state.params}, tokens, mask, mesh
        )
        hits.append(hit)
    if phase.mode == "distill" and text_lib.uses_text_cache(config, config.teacher):
        tables["teacher"], hit = text_lib.text_table(
            config, phase.teacher, config.teacher, phase.teacher_vars, tokens, mask, mesh
        )
        hits.append(hit)
    log.info(
        "%s: text features of %d unique sentences in %.1fs (%d of %d tables from %s)",
        phase.role,
        len(tokens),
        time.perf_counter() - t0,
        sum(hits),
        len(hits),
        config.run.get("text_cache_dir", "") or "this process's memory",
    )
    return tables


def run_phase(config, run_dir: Path, role: str, mesh, teacher_vars=None) -> dict:
    """Train one model (role 'teacher', or 'student' with or without a teacher) in run_dir,
    resuming from its last checkpoint. Returns the final variables (replicated)."""
    from rkd_jax.data import pipeline

    phase = _make_phase(config, role, teacher_vars)
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", keep=int(config.run.keep_checkpoints))
    state, data_state = _restore_or_init(config, phase, ckpt, mesh)
    start = int(jax.device_get(state.step))

    tables = {"student": None, "teacher": None, "targets": None}
    if start < phase.total:
        tables.update(_text_tables(config, phase, state, mesh))
    pair_offsets = None
    if (
        phase.mode == "distill"
        and start < phase.total
        and config.run.get("cache_teacher_targets", False)
    ):
        tables["targets"], pair_offsets, _ = teacher_targets.compute_table(
            config,
            phase.teacher,
            config.teacher,
            phase.teacher_vars,
            phase.tokenize,
            tables["teacher"],
            mesh,
        )
    pcount = jax.process_count()
    data_iter = pipeline.make_train_iterator(
        config.data,
        phase.tokenize,
        int(phase.sched.batch_size) // pcount,
        int(config.seed),
        process_index=jax.process_index(),
        process_count=pcount,
        pair_offsets=pair_offsets,
    )
    if data_state:
        data_iter.set_state(data_state)
    if jax.process_index() == 0:
        # Rows logged after the checkpoint we resume from are logged again by this run.
        ckpt_lib.truncate_metrics(run_dir / "metrics.jsonl", start)
    state = _train_loop(config, phase, state, start, data_iter, tables, ckpt, run_dir, mesh)
    ckpt.close()
    return {"params": state.params, "batch_stats": state.batch_stats}


def _train_loop(config, phase: Phase, state, start, data_iter, tables, ckpt, run_dir, mesh):
    """Steps start..total: log every `run.log_every_steps`, validate and save on the eval grid
    and every `run.checkpoint_every_steps`, and save the final state. Returns the state."""
    from tqdm import tqdm

    role, total, steps_per_epoch = phase.role, phase.total, phase.steps_per_epoch
    num_categories = int(phase.model_cfg.get("category_classes", 0))
    step_fn = make_train_step(config, phase.mode, phase.tx, phase.model, phase.teacher)
    predict_fn = eval_lib.make_predict_fn(phase.model, float(config.run.threshold))
    writer = metrics_lib.MetricWriter(run_dir)
    eval_every = max(1, round(config.run.eval_every_epochs * steps_per_epoch))

    def validate(step: int) -> dict:
        return _validate(config, phase, predict_fn, state, mesh)

    def save(step: int, metrics: dict | None = None):
        meta = meta_for(config, role, step / steps_per_epoch)
        ckpt.save(step, state, data_iter.get_state(), meta, metrics)

    pending: list = []
    last_log, t_last = start, time.perf_counter()
    bar = tqdm(
        total=total,
        initial=start,
        desc=f"{role}",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    try:
        for step in range(start, total):
            host_batch = next(data_iter)
            if num_categories:
                check_categories(host_batch["category_id"], num_categories, role)
            batch = parallel.put_batch(host_batch, mesh)
            state, metrics = step_fn(state, batch, phase.teacher_vars, tables)
            pending.append(metrics)
            done = step + 1
            is_eval = done % eval_every == 0 or done == total
            is_ckpt = done % int(config.run.checkpoint_every_steps) == 0
            if done % int(config.run.log_every_steps) == 0 or is_eval or is_ckpt:
                scalars = _log_scalars(phase, pending, done, last_log, t_last)
                pending, last_log = [], done
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", ips=f"{scalars['images_per_s']:.0f}")
                bar.update(done - bar.n)
                val = None
                if is_eval:
                    val = validate(done)
                    scalars.update(val)
                    log.info(
                        "%s step %d epoch %.2f: val mIoU %.4f oIoU %.4f",
                        role,
                        done,
                        done / steps_per_epoch,
                        val["val_mIoU"],
                        val["val_oIoU"],
                    )
                writer.write(done, scalars)
                if is_eval or is_ckpt:
                    save(done, val)
                t_last = time.perf_counter()
    finally:
        bar.close()
        writer.close()
    latest = ckpt.latest_step()
    if total > 0 and (latest is None or latest < total):
        # max_steps may stop off the eval grid: keep the final state too. (A run resumed with a
        # shorter schedule than its checkpoints' trains nothing and saves nothing.)
        if pending:
            metrics_lib.flush(pending, total - len(pending))
        save(total, validate(total))
    return state


def _log_scalars(phase: Phase, pending: list, done: int, last_log: int, t_last: float) -> dict:
    """The mean metrics of the steps last_log+1..done (`pending`, NaN-checked), the learning
    rate, the throughput since `t_last` and the epoch."""
    scalars = metrics_lib.flush(pending, done - len(pending))
    now = time.perf_counter()
    images = (done - last_log) * int(phase.sched.batch_size)
    scalars.update(
        lr=float(phase.schedule(done - 1)),
        images_per_s=images / (now - t_last),
        step_time_s=(now - t_last) / max(1, done - last_log),
        epoch=done / phase.steps_per_epoch,
    )
    return scalars


def _validate(config, phase: Phase, predict_fn, state, mesh) -> dict:
    """Validation mIoU and oIoU of the state's model at the network resolution."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    res = eval_lib.evaluate_split(
        config,
        predict_fn,
        variables,
        phase.tokenize,
        config.data.val_split,
        mesh,
        original_resolution=False,
    )
    return {"val_mIoU": res["network"]["mIoU"], "val_oIoU": res["network"]["oIoU"]}


def write_config(run_dir: Path, config) -> None:
    """<run_dir>/config.json: the run's whole configuration (process 0 writes it)."""
    if jax.process_index() == 0:
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """The whole job for config.mode: (teacher first if needed), train, then evaluate."""
    from rkd_jax.data import prepare

    if config.mode not in MODES:
        raise ValueError(f"config.mode={config.mode!r}; expected one of {MODES}")
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(workdir, config)
    mesh = parallel.make_mesh()
    prepare.ensure_prepared(config.data)
    splits = config.data.eval_splits
    with parallel.set_mesh(mesh):
        if config.mode == "teacher":
            run_phase(config, workdir, "teacher", mesh)
            return eval_lib.evaluate_run(config, workdir, splits, mesh)
        teacher_vars = None
        if config.mode == "distill":
            if config.teacher_checkpoint:
                teacher_vars = load_teacher(config, config.teacher_checkpoint, mesh)
            else:
                log.info("no teacher_checkpoint: training the teacher in %s", workdir / "teacher")
                run_phase(config, workdir / "teacher", "teacher", mesh)
                teacher_vars = load_teacher(config, str(workdir / "teacher"), mesh)
        run_phase(config, workdir, "student", mesh, teacher_vars)
        results = eval_lib.evaluate_run(config, workdir, splits, mesh)
        if config.mode == "distill" and config.get("student_alone", False):
            compare_with_student_alone(config, workdir, results, mesh)
        return results


def compare_with_student_alone(config, workdir: Path, distilled: dict, mesh) -> dict:
    """config.student_alone: train the same student without the teacher (same seed, data order
    and schedule) in <workdir>/student_alone, score the teacher and it on the same splits and
    write results/comparison.{json,md} (rkd_jax.comparison); logs the table."""
    from rkd_jax import comparison

    splits = config.data.eval_splits
    alone_dir = workdir / "student_alone"
    alone_config = ml_collections.ConfigDict(config.to_dict())
    alone_config.mode = "student"
    alone_config.student_alone = False
    alone_dir.mkdir(parents=True, exist_ok=True)
    write_config(alone_dir, alone_config)
    log.info("config.student_alone: training the same student without the teacher in %s", alone_dir)
    run_phase(alone_config, alone_dir, "student", mesh)
    results = {
        "distilled": distilled,
        "student_alone": eval_lib.evaluate_run(alone_config, alone_dir, splits, mesh),
    }
    if config.teacher_checkpoint:
        teacher_run = str(config.teacher_checkpoint)
        payloads = eval_lib.evaluate_checkpoint(
            teacher_run,
            splits,
            eval_lib.data_settings(config),
            out=workdir / "results" / "teacher.json",
            mesh=mesh,
        )
        results["teacher"] = {split: p["metrics"] for split, p in payloads.items()}
    else:
        teacher_run = "teacher"
        results["teacher"] = eval_lib.evaluate_run(config, workdir / "teacher", splits, mesh)
    runs = {"teacher": teacher_run, "student_alone": "student_alone", "distilled": "."}
    if jax.process_index() == 0:
        text = comparison.write(workdir, config.data.dataset, results, runs)
        log.info("what distillation did (%s):\n%s", workdir / "results" / "comparison.md", text)
    return results
