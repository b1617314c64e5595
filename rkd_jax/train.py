"""Functional training: teacher, student and distillation steps, and the resumable loop.

One jitted step per iteration. The train state is donated; the teacher's variables are a
separate argument that is never donated, differentiated or saved with the student: its
forward runs inside the same step in inference mode under `stop_gradient`, outside the
function that is differentiated. Host syncs happen only on log steps and before saves.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rkd_jax import checkpoint as ckpt_lib
from rkd_jax import evaluate as eval_lib
from rkd_jax import feature_cache, parallel, platform, teacher_targets
from rkd_jax import losses as loss_lib
from rkd_jax.models import build
from rkd_jax.models.adapter import ChannelAdapter
from rkd_jax.optim import make_optimizer

log = logging.getLogger("rkd_jax")

MODES = ("teacher", "student", "distill")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # Training-only modules that are not part of the model (the ICKD adapter):
    # {"params", "batch_stats", "opt_state"}, or None. See `init_aux`.
    aux: Any = None


def phase_configs(config, role: str):
    """(model config, schedule) of the model a phase trains."""
    if role == "teacher":
        return config.teacher, config.teacher_train
    return config.student, config.train


def uses_text_cache(config, model_cfg) -> bool:
    return bool(config.run.cache_text_features) and not model_cfg.text_trainable


def text_frozen(path: tuple) -> bool:
    return len(path) > 0 and getattr(path[0], "key", None) == "text_encoder"


def uses_adapter(config, mode: str) -> bool:
    """Whether the step trains ICKD's student-side adapter (distill mode, method 'ickd',
    `config.distill.ickd_adapter` true)."""
    d = config.distill
    return mode == "distill" and d.method == "ickd" and bool(d.get("ickd_adapter", True))


def make_adapter(config) -> ChannelAdapter:
    """ICKD's adapter: student decoder channels -> the teacher's."""
    return ChannelAdapter(features=int(config.teacher.fpn_dim))


def init_aux(config, mode: str, tx: optax.GradientTransformation, rng: jax.Array):
    """The `aux` part of a fresh TrainState: the adapter's variables and optimizer state
    (trained by `tx`, like the student), or None when the step has no training-only module."""
    if not uses_adapter(config, mode):
        return None
    dummy = jnp.zeros((1, 4, int(config.student.fpn_dim)), jnp.float32)
    variables = make_adapter(config).init(rng, dummy, train=False)
    return {
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": tx.init(variables["params"]),
    }


def make_train_step(
    config, mode: str, tx: optax.GradientTransformation, student, teacher=None
) -> Callable:
    """Jitted `step(state, batch, teacher_vars, tables) -> (state, metrics)`.

    mode: teacher | student (supervised L_seg) or distill (Eq. 9 against `teacher`).
    batch: image [B,S,S,3] in [0,1], mask [B,S,S], tokens/token_mask [B,L], sentence_id [B].
    tables: {"student": [N,L,D] | None, "teacher": [N,L,D] | None} precomputed text
      features of the frozen text encoders, indexed by sentence_id; optionally "targets":
      the teacher's precomputed distillation targets indexed by the batch's pair_id
      (rkd_jax.teacher_targets), which then replace the teacher's forward pass.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    if mode == "distill" and teacher is None:
        raise ValueError("distill mode needs the teacher model")
    base_key = build.make_key(int(config.seed))
    adapter = make_adapter(config) if uses_adapter(config, mode) else None

    def text_of(tables, name, batch):
        table = tables.get(name)
        return None if table is None else table[batch["sentence_id"]]

    def step(state: TrainState, batch, teacher_vars, tables):
        rng = jax.random.fold_in(base_key, state.step)
        args = (batch["image"], batch["tokens"], batch["token_mask"])
        teacher_out = None
        if mode == "distill":
            if tables.get("targets") is not None:
                # The frozen teacher's targets of this (image, sentence), computed once.
                teacher_out = teacher_targets.lookup(tables["targets"], batch["pair_id"])
            else:
                teacher_out = teacher.apply(
                    teacher_vars,
                    *args,
                    train=False,
                    text_features=text_of(tables, "teacher", batch),
                )
            teacher_out = jax.lax.stop_gradient(teacher_out)

        def loss_fn(params, aux_params):
            out, updates = student.apply(
                {"params": params, "batch_stats": state.batch_stats},
                *args,
                train=True,
                text_features=text_of(tables, "student", batch),
                mutable=["batch_stats"],
                rngs={"dropout": rng},
            )
            aux_stats = None
            if adapter is not None:
                # ICKD compares the teacher's features with the adapted student features.
                embedded, aux_updates = adapter.apply(
                    {"params": aux_params, "batch_stats": state.aux["batch_stats"]},
                    out["decoder"],
                    train=True,
                    mutable=["batch_stats"],
                )
                out = dict(out, decoder=embedded)
                aux_stats = aux_updates["batch_stats"]
            if mode == "distill":
                terms = loss_lib.distillation_losses(teacher_out, out, batch, config.distill)
            else:
                terms = loss_lib.supervised_losses(out, batch, config.distill)
            return terms["loss"], (terms, updates["batch_stats"], aux_stats)

        aux = state.aux
        if adapter is None:
            grads, (terms, batch_stats, _) = jax.grad(loss_fn, has_aux=True)(state.params, None)
        else:
            if aux is None:
                raise ValueError(
                    "config.distill.method='ickd' with ickd_adapter=True needs "
                    "TrainState.aux from train.init_aux (the adapter's variables)"
                )
            (grads, aux_grads), (terms, batch_stats, aux_stats) = jax.grad(
                loss_fn, argnums=(0, 1), has_aux=True
            )(state.params, aux["params"])
            aux_upd, aux_opt = tx.update(aux_grads, aux["opt_state"], aux["params"])
            aux = {
                "params": optax.apply_updates(aux["params"], aux_upd),
                "batch_stats": aux_stats,
                "opt_state": aux_opt,
            }
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(terms, grad_norm=optax.tree.norm(grads))
        new_state = TrainState(state.step + 1, params, batch_stats, opt_state, aux)
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,))


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
    pass


def _flush(pending: list, first_step: int) -> dict[str, float]:
    """Fetch the metrics of the steps since the last log; stop on the first NaN/Inf."""
    host = jax.device_get(pending)
    for i, m in enumerate(host):
        for k, v in m.items():
            if not np.isfinite(v):
                raise NonFiniteLossError(
                    f"step {first_step + i + 1}: {k} is {float(v)}; training stopped, the last "
                    "complete checkpoint is kept"
                )
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _tokenizer(model_cfg, max_tokens: int):
    from rkd_jax.convert.bert import load_tokenizer, resolve_text_encoder_dir, tokenize

    tok = load_tokenizer(resolve_text_encoder_dir(model_cfg.text_encoder_dir))
    return functools.partial(tokenize, tok), tok


def make_tokenizer(config, roles: tuple[str, ...]):
    """The tokenising function shared by the phase's models (their vocabularies must agree)."""
    fns = [_tokenizer(phase_configs(config, r)[0], config.data.max_tokens) for r in roles]
    vocabs = [tok.get_vocab() for _, tok in fns]
    if any(v != vocabs[0] for v in vocabs[1:]):
        raise ValueError(
            "teacher.text_encoder_dir and student.text_encoder_dir have different vocabularies;"
            " distillation feeds both the same token ids"
        )
    return fns[0][0]


def text_features(
    model, variables, tokens: np.ndarray, mask: np.ndarray, chunk: int = 256
) -> np.ndarray:
    """Frozen text features of every unique sentence, [N, L, D], on the host."""
    encode = jax.jit(lambda v, t, m: model.apply(v, t, m, method=model.encode_text))
    out = []
    for i in range(0, len(tokens), chunk):
        t, m = tokens[i : i + chunk], mask[i : i + chunk]
        pad = chunk - len(t)
        if pad:
            t = np.concatenate([t, np.zeros((pad, t.shape[1]), t.dtype)])
            m = np.concatenate([m, np.repeat(m[:1], pad, 0)])
        out.append(np.asarray(encode(variables, t, m))[: chunk - pad])
    return np.concatenate(out)


def text_table(
    config, model, model_cfg, variables, tokens: np.ndarray, mask: np.ndarray, mesh
) -> tuple[jax.Array, bool]:
    """(`text_features` replicated over `mesh`, whether they came from the on-disk cache).

    With `config.run.text_cache_dir` set they are read from / written to it under a key that
    fingerprints the frozen encoder's weights, the model config, the sentences' tokens and
    masks, the compute dtype, the backend and the jax version (feature_cache).
    """
    directory = config.run.get("text_cache_dir", "")

    def compute():
        return text_features(model, variables, tokens, mask)

    if not directory:
        return parallel.replicate(compute(), mesh), False
    key = feature_cache.fingerprint(
        variables["params"]["text_encoder"],
        model_cfg.to_dict(),
        tokens,
        mask,
        str(config.run.compute_dtype),
        jax.default_backend(),
        jax.__version__,
    )
    info = {"sentences": len(tokens), "architecture": build.architecture(model_cfg)}
    table, hit = feature_cache.load_or_compute(directory, key, compute, info)
    return parallel.replicate(table, mesh), hit


def meta_for(config, role: str, epoch: float) -> dict:
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
    _, variables, meta = ckpt_lib.restore(path)
    ckpt_lib.check_role(meta, "teacher", f"teacher checkpoint {path}")
    expected = build.architecture(config.teacher)
    saved = meta.get("architecture")
    if saved is not None and _normalise(saved) != _normalise(expected):
        saved = _normalise(saved)
        diff = {k: (saved.get(k), expected[k]) for k in expected if saved.get(k) != expected[k]}
        raise ckpt_lib.CheckpointError(
            f"teacher checkpoint {path} has another architecture than config.teacher: "
            + ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        )
    model = build.build_model(config.teacher)
    target = build.abstract_variables(model, config.data.image_size, config.data.max_tokens)
    check_same_shapes(target["params"], variables["params"], f"teacher checkpoint {path}")
    return parallel.replicate(variables, mesh)


def _normalise(arch: dict) -> dict:
    # Checkpoints saved before a field existed: what it meant then.
    arch = {**build.FIELD_DEFAULTS, **arch}
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in arch.items()}


def check_same_shapes(target, loaded, what: str) -> None:
    t = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(target)}
    s = {
        jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(loaded)
    }
    for key, shape in t.items():
        if key not in s:
            raise ckpt_lib.CheckpointError(f"{what}: lacks parameter {key} {tuple(shape)}")
        if tuple(s[key]) != tuple(shape):
            raise ckpt_lib.CheckpointError(
                f"{what}: parameter {key} has shape {tuple(s[key])}, expected {tuple(shape)}"
            )
    extra = sorted(set(s) - set(t))
    if extra:
        raise ckpt_lib.CheckpointError(f"{what}: unexpected parameters {extra[:3]}")


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


def run_phase(config, run_dir: Path, role: str, mesh, teacher_vars=None) -> dict:
    """Train one model (role 'teacher', or 'student' with or without a teacher) in run_dir,
    resuming from its last checkpoint. Returns the final variables (replicated)."""
    from tqdm import tqdm

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
        from rkd_jax.fold import fold_batch_norm

        teacher, teacher_vars = fold_batch_norm(
            build.build_model(config.teacher, dtype), teacher_vars
        )
    roles = ("student", "teacher") if mode == "distill" else (role,)
    tokenize = make_tokenizer(config, roles)
    parallel.check_batch_size(int(sched.batch_size), f"{role} batch_size")

    steps_per_epoch = pipeline.steps_per_epoch(config.data, int(sched.batch_size))
    total = int(sched.epochs) * steps_per_epoch
    if config.run.max_steps >= 0:
        total = min(total, int(config.run.max_steps))
    frozen = None if model_cfg.text_trainable else text_frozen
    tx, schedule = make_optimizer(sched, steps_per_epoch, frozen=frozen)

    rng = build.make_key(int(config.seed))
    init_rng = jax.random.fold_in(rng, 0 if role == "teacher" else 1)
    size, max_tokens = int(config.data.image_size), int(config.data.max_tokens)

    def fresh_state():
        variables = build.init_variables(model, model_cfg, init_rng, size, max_tokens)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
            aux=init_aux(config, mode, tx, jax.random.fold_in(init_rng, 7)),
        )

    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", keep=int(config.run.keep_checkpoints))
    pcount, pindex = jax.process_count(), jax.process_index()
    data_state = None
    latest = ckpt.latest_step()
    abstract = jax.eval_shape(fresh_state)
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), abstract)
    if latest is not None:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        state, data_state, _ = ckpt.restore(latest, target)
        log.info("%s: resumed from step %d (%s)", role, latest, ckpt.directory)
    else:
        state = parallel.replicate(fresh_state(), mesh)
    start = int(jax.device_get(state.step))

    tables = {"student": None, "teacher": None, "targets": None}
    need_tables = start < total and any(
        uses_text_cache(config, phase_configs(config, r)[0]) for r in roles
    )
    if need_tables:
        t0 = time.perf_counter()
        tokens, mask = pipeline.sentence_table(config.data, tokenize, config.data.train_split)
        hits = []
        if uses_text_cache(config, model_cfg):
            # The model this phase trains is the step's "student", also for the teacher phase.
            tables["student"], hit = text_table(
                config, model, model_cfg, {"params": state.params}, tokens, mask, mesh
            )
            hits.append(hit)
        if mode == "distill" and uses_text_cache(config, config.teacher):
            tables["teacher"], hit = text_table(
                config, teacher, config.teacher, teacher_vars, tokens, mask, mesh
            )
            hits.append(hit)
        log.info(
            "%s: text features of %d unique sentences in %.1fs (%d of %d tables from %s)",
            role,
            len(tokens),
            time.perf_counter() - t0,
            sum(hits),
            len(hits),
            config.run.get("text_cache_dir", "") or "no cache",
        )

    pair_offsets = None
    if mode == "distill" and start < total and config.run.get("cache_teacher_targets", False):
        tables["targets"], pair_offsets, _ = teacher_targets.compute_table(
            config, teacher, config.teacher, teacher_vars, tokenize, tables["teacher"], mesh
        )
    data_iter = pipeline.make_train_iterator(
        config.data,
        tokenize,
        int(sched.batch_size) // pcount,
        int(config.seed),
        process_index=pindex,
        process_count=pcount,
        pair_offsets=pair_offsets,
    )
    if data_state:
        data_iter.set_state(data_state)

    num_categories = int(model_cfg.get("category_classes", 0))
    step_fn = make_train_step(config, mode, tx, model, teacher)
    predict_fn = eval_lib.make_predict_fn(model, float(config.run.threshold))
    if jax.process_index() == 0:
        # Rows logged after the checkpoint we resume from are logged again by this run.
        ckpt_lib.truncate_metrics(run_dir / "metrics.jsonl", start)
    writer = MetricWriter(run_dir)
    eval_every = max(1, round(config.run.eval_every_epochs * steps_per_epoch))

    def validate(step: int) -> dict:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        res = evaluate_split(
            config,
            predict_fn,
            variables,
            tokenize,
            config.data.val_split,
            mesh,
            original_resolution=False,
        )
        m = res["network"]
        return {"val_mIoU": m["mIoU"], "val_oIoU": m["oIoU"]}

    def save(step: int, metrics: dict | None = None):
        ckpt.save(
            step,
            state,
            data_iter.get_state(),
            meta_for(config, role, step / steps_per_epoch),
            metrics,
        )

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
            state, metrics = step_fn(state, batch, teacher_vars, tables)
            pending.append(metrics)
            done = step + 1
            is_eval = done % eval_every == 0 or done == total
            is_ckpt = done % int(config.run.checkpoint_every_steps) == 0
            if done % int(config.run.log_every_steps) == 0 or is_eval or is_ckpt:
                scalars = _flush(pending, done - len(pending))
                now = time.perf_counter()
                images = (done - last_log) * int(sched.batch_size)
                scalars.update(
                    lr=float(schedule(done - 1)),
                    images_per_s=images / (now - t_last),
                    step_time_s=(now - t_last) / max(1, done - last_log),
                    epoch=done / steps_per_epoch,
                )
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
    if ckpt.latest_step() != total and total > 0:
        # max_steps may stop off the eval grid: keep the final state too.
        if pending:
            _flush(pending, total - len(pending))
        save(total, validate(total))
    ckpt.close()
    return {"params": state.params, "batch_stats": state.batch_stats}


def evaluate_split(
    config,
    predict_fn,
    variables,
    tokenize,
    split: str,
    mesh,
    original_resolution: bool = True,
    desc: str | None = None,
) -> dict:
    """Score one split with the jitted predict function (sharded like training)."""
    from rkd_jax.data import pipeline

    bs = int(config.run.eval_batch_size)
    parallel.check_batch_size(bs, "run.eval_batch_size")
    pcount, pindex = jax.process_count(), jax.process_index()
    batches = pipeline.make_eval_iterator(
        config.data, tokenize, split, bs // pcount, process_index=pindex, process_count=pcount
    )
    limit = int(config.run.max_eval_examples)
    n = pipeline.num_eval_examples(config.data, split)
    if limit >= 0:
        batches = _take_examples(batches, limit // pcount)
        n = min(n, limit)
    return eval_lib.evaluate_batches(
        predict_fn,
        variables,
        batches,
        lambda b: parallel.put_batch(b, mesh),
        float(config.run.threshold),
        original_resolution,
        total=n,
        desc=desc or split,
        families=pipeline.sentence_families(config.data, split),
    )


def _take_examples(batches, limit: int):
    seen = 0
    for b in batches:
        if seen >= limit:
            return
        valid = b["valid"].copy()
        room = limit - seen
        idx = np.nonzero(valid)[0]
        valid[idx[room:]] = False
        seen += min(len(idx), room)
        yield dict(b, valid=valid)


def evaluate_run(config, run_dir: Path, role: str, splits, mesh) -> dict:
    """Score the best checkpoint of run_dir on `splits` -> {split: metrics}; writes
    results/<dataset>_<split>.json through `evaluate.evaluate_checkpoint`, the path of
    `python -m rkd_jax.evaluate`: the model and its settings come from the checkpoint, the data
    settings from `config`."""
    del role  # the checkpoint's meta says which model it holds
    payloads = eval_lib.evaluate_checkpoint(
        run_dir, splits, eval_lib.data_settings(config), mesh=mesh
    )
    return {split: payload["metrics"] for split, payload in payloads.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """The whole job for config.mode: (teacher first if needed), train, then evaluate."""
    from rkd_jax.data import prepare

    if config.mode not in MODES:
        raise ValueError(f"config.mode={config.mode!r}; expected one of {MODES}")
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))
    mesh = parallel.make_mesh()
    prepare.ensure_prepared(config.data)
    with _set_mesh(mesh):
        if config.mode == "teacher":
            run_phase(config, workdir, "teacher", mesh)
            return evaluate_run(config, workdir, "teacher", config.data.eval_splits, mesh)
        teacher_vars = None
        if config.mode == "distill":
            if config.teacher_checkpoint:
                teacher_vars = load_teacher(config, config.teacher_checkpoint, mesh)
            else:
                log.info("no teacher_checkpoint: training the teacher in %s", workdir / "teacher")
                run_phase(config, workdir / "teacher", "teacher", mesh)
                teacher_vars = load_teacher(config, str(workdir / "teacher"), mesh)
        run_phase(config, workdir, "student", mesh, teacher_vars)
        return evaluate_run(config, workdir, "student", config.data.eval_splits, mesh)


def _set_mesh(mesh):
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return jax.sharding.use_mesh(mesh)
