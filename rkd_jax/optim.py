"""Optimizer: AdamW with a step-decay schedule counted in optimizer steps.

The paper (Section IV-A) trains with AdamW, learning rate 2e-5 divided by 10 after 20 epochs.
`make_optimizer` builds that from `config.train`:

- AdamW with PyTorch's defaults (b1 0.9, b2 0.999, eps 1e-8) and `weight_decay` passed
  explicitly (optax's default is 1e-4, PyTorch's 1e-2; the config sets 0.01). As in PyTorch
  the decay is decoupled and scaled by the current learning rate: p <- p - lr * wd * p.
- learning rate `lr`, multiplied by `lr_decay_factor` at the start of each epoch listed in
  `lr_decay_epochs`; the boundaries are optimizer steps, `epoch * steps_per_epoch`.
- optional linear warmup over `warmup_steps` (0 = none) and gradient clipping by global norm
  `grad_clip_norm` (0 = off).
- optionally a smaller learning rate for the image backbone, `backbone_lr_mult` (1 = the
  same as the rest; beyond the paper): the usual way to fine-tune an ImageNet-pretrained
  backbone under freshly initialised fusion and decoder layers. Its updates, weight decay
  included, are scaled, so the backbone trains exactly as AdamW at lr * backbone_lr_mult.
- no weight decay on biases, normalisation scales/offsets and embeddings (`decay_mask`).
- optionally frozen sub-trees (e.g. a frozen text encoder): zero updates, no optimizer state.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

# PyTorch's torch.optim.AdamW defaults.
ADAM_B1 = 0.9
ADAM_B2 = 0.999
ADAM_EPS = 1e-8

_NO_DECAY_LEAF_NAMES = ("bias", "scale")

_REQUIRED = object()

# Called with a jax.tree_util key path (tuple of DictKey / GetAttrKey / ...), as
# tree_map_with_path gives it; `path_names(path)` turns it into strings.
PathPredicate = Callable[[tuple[Any, ...]], bool]


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A `jax.tree_util` key path as plain strings, e.g. ('encoder', 'Dense_0', 'kernel')."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def decay_mask(params: Any) -> Any:
    """Which parameters get weight decay: a pytree of bools shaped like `params`.

    Rule: a parameter is decayed iff it has ndim >= 2, its own (leaf) name is neither 'bias'
    nor 'scale', and its leaf name does not contain 'embed'. So Dense and Conv kernels decay;
    biases (including DenseGeneral's multi-dimensional ones), BatchNorm and LayerNorm
    scales and biases, nn.Embed tables ('embedding') and learnt position embeddings
    ('position_embedding', ...) do not. This is the usual BERT / timm exclusion list.
    """

    def rule(path: tuple[Any, ...], leaf: Any) -> bool:
        name = path_names(path)[-1].lower() if path else ""
        return jnp.ndim(leaf) >= 2 and name not in _NO_DECAY_LEAF_NAMES and "embed" not in name

    return jax.tree_util.tree_map_with_path(rule, params)


def _frozen_predicate(frozen: PathPredicate | Sequence[str] | None) -> PathPredicate:
    if frozen is None:
        return lambda path: False
    if callable(frozen):
        return frozen
    if isinstance(frozen, str):
        raise TypeError(f"frozen={frozen!r}: expected a sequence of prefixes, not one string")
    prefixes = []
    for p in frozen:
        if not isinstance(p, str) or not p.strip("/"):
            raise ValueError(f"frozen prefix {p!r}: expected a path like 'text_encoder'")
        prefixes.append(tuple(p.strip("/").split("/")))
    return lambda path: any(path_names(path)[: len(p)] == p for p in prefixes)


def frozen_mask(params: Any, frozen: PathPredicate | Sequence[str] | None) -> Any:
    """Which parameters are frozen: a pytree of bools shaped like `params`.

    Args:
      params: the parameter tree (without the 'params' collection key).
      frozen: None (nothing frozen); a predicate on the jax key path (as
        `jax.tree_util.tree_map_with_path` gives it; `path_names` makes strings of it); or a
        sequence of prefixes such as ('text_encoder', 'visual/stem'), matched component-wise
        from the root of `params` ('text_encoder' freezes everything under
        params['text_encoder'], but not params['text_encoder_proj']).
    """
    pred = _frozen_predicate(frozen)
    return jax.tree_util.tree_map_with_path(lambda path, _: bool(pred(path)), params)


def _get(cfg: Any, name: str, default: Any = _REQUIRED) -> Any:
    if isinstance(cfg, Mapping):
        value = cfg.get(name)
    else:
        value = getattr(cfg, name, None)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"config.train.{name} is missing: make_optimizer needs it")
        return default
    return value


def make_schedule(train_cfg: Any, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step count (0 for the first update).

    lr(count) = lr * lr_decay_factor ** (number of epochs e in lr_decay_epochs with
    count >= e * steps_per_epoch) * min(1, count / warmup_steps) (the last factor only when
    warmup_steps > 0). So with lr_decay_epochs=(20,) the first step of the 21st epoch
    (count = 20 * steps_per_epoch) is the first at lr * 0.1, as PyTorch's MultiStepLR stepped
    once per epoch; warmup rises linearly from 0 at count 0 to lr at count = warmup_steps, and
    decay boundaries stay at their absolute steps.
    """
    if not isinstance(steps_per_epoch, numbers.Integral) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch!r}: expected an int >= 1")
    lr = float(_get(train_cfg, "lr"))
    if lr <= 0:
        raise ValueError(f"config.train.lr={lr}: expected > 0")
    epochs = tuple(_get(train_cfg, "lr_decay_epochs", ()))
    factor = float(_get(train_cfg, "lr_decay_factor", 0.1))
    warmup = _get(train_cfg, "warmup_steps", 0)
    increasing = all(a < b for a, b in itertools.pairwise(epochs))
    if not increasing or any(not isinstance(e, numbers.Integral) or e < 1 for e in epochs):
        raise ValueError(
            f"config.train.lr_decay_epochs={epochs!r}: expected strictly increasing ints >= 1"
        )
    if factor <= 0:
        raise ValueError(f"config.train.lr_decay_factor={factor}: expected > 0")
    if not isinstance(warmup, numbers.Integral) or warmup < 0:
        raise ValueError(f"config.train.warmup_steps={warmup!r}: expected an int >= 0")
    step_decay = optax.piecewise_constant_schedule(
        lr, {int(e) * int(steps_per_epoch): factor for e in epochs}
    )
    if warmup == 0:
        return step_decay

    def schedule(count):
        ramp = jnp.minimum(1.0, jnp.asarray(count, jnp.float32) / int(warmup))
        return step_decay(count) * ramp

    return schedule


def make_optimizer(
    train_cfg: Any,
    steps_per_epoch: int,
    frozen: PathPredicate | Sequence[str] | None = None,
    backbone: PathPredicate | Sequence[str] | None = ("visual",),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW + step decay (+ warmup, clipping, frozen sub-trees) from `config.train`.

    Args:
      train_cfg: `config.train` with `lr`, `weight_decay` (both required), and optionally
        `lr_decay_epochs` (default ()), `lr_decay_factor` (0.1), `warmup_steps` (0),
        `grad_clip_norm` (0 = off), `backbone_lr_mult` (1).
      steps_per_epoch: optimizer steps per epoch (dataset size // global batch), used to turn
        the decay epochs into steps.
      frozen: parameters that must not train (see `frozen_mask`): they get exactly zero
        updates from `optax.set_to_zero` and keep no Adam moments. Their gradients are still
        computed unless the model stops them; the clipping norm covers only trainable ones.
      backbone: the parameters `backbone_lr_mult` applies to, as `frozen` (default: the
        segmenter's image backbone, params['visual']). With a multiplier of 1 no extra
        transformation is added, so the optimizer state is the plain AdamW one.

    Returns:
      (tx, schedule): the transformation and the learning-rate schedule (for logging:
      `schedule(opt_step)`).
    """
    schedule = make_schedule(train_cfg, steps_per_epoch)
    weight_decay = float(_get(train_cfg, "weight_decay"))
    clip = float(_get(train_cfg, "grad_clip_norm", 0.0))
    if weight_decay < 0:
        raise ValueError(f"config.train.weight_decay={weight_decay}: expected >= 0")
    if clip < 0:
        raise ValueError(f"config.train.grad_clip_norm={clip}: expected >= 0 (0 = off)")
    mult = _get(train_cfg, "backbone_lr_mult", 1.0)
    if not isinstance(mult, numbers.Real) or not 0 < mult <= 1e3:
        raise ValueError(f"config.train.backbone_lr_mult={mult!r}: expected a number > 0")
    parts = []
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(
        optax.adamw(
            schedule,
            b1=ADAM_B1,
            b2=ADAM_B2,
            eps=ADAM_EPS,
            weight_decay=weight_decay,
            mask=decay_mask,
        )
    )
    if float(mult) != 1.0:
        in_backbone = _frozen_predicate(backbone)
        parts.append(
            optax.masked(
                optax.scale(float(mult)),
                lambda params: jax.tree_util.tree_map_with_path(
                    lambda path, _: bool(in_backbone(path)), params
                ),
            )
        )
    tx = optax.chain(*parts)
    if frozen is None:
        return tx, schedule
    pred = _frozen_predicate(frozen)  # bad prefixes fail here, not at tx.init

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if pred(path) else "trainable", params
        )

    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
