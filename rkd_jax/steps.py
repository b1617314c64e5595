"""The train state and the jitted train step of the three modes (teacher, student, distill).

The train state is donated; the teacher's variables are a separate argument that is never
donated, differentiated or saved with the student: its forward runs inside the same step in
inference mode under `stop_gradient`, outside the function that is differentiated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from rkd_jax import losses as loss_lib
from rkd_jax import pretrained, teacher_targets
from rkd_jax.models import build
from rkd_jax.models.adapter import ChannelAdapter

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


def text_frozen(path: tuple) -> bool:
    """Whether a parameter's key path lies in the text encoder (frozen unless text_trainable)."""
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


def create_train_state(
    config, mode: str, model, model_cfg, tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """Step 0: the model's initial variables (with the pretrained weights the config names),
    the optimizer's state and, where the step has one, the adapter's (`init_aux`)."""
    size, max_tokens = int(config.data.image_size), int(config.data.max_tokens)
    variables = pretrained.init_variables(model, model_cfg, rng, size, max_tokens)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        aux=init_aux(config, mode, tx, jax.random.fold_in(rng, 7)),
    )


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
                    "TrainState.aux from steps.init_aux (the adapter's variables)"
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
