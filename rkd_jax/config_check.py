"""Check a whole configuration before any work: `validate_config(config)`.

`python -m rkd_jax.main` calls it before it prepares data or builds a model, so a typo in a
field that is read late (the student's backbone, an eval split, the distillation method) stops
the command at once instead of after the teacher has trained. Each problem is one UserError
naming the field, its value and what is expected; a field missing from the config file is one
too (never a KeyError).
"""

from __future__ import annotations

import math
from pathlib import Path

from rkd_jax.cli import UserError

MODES = ("teacher", "student", "distill")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
# The backbone's coarsest stage (V5) has stride 32: a smaller input leaves it no pixel.
MIN_IMAGE_SIZE = 32
# [CLS], one word piece, [SEP].
MIN_TOKENS = 3


class _Fields:
    """Reads `config.<path>` for the checks; a missing field is a UserError naming it."""

    def __init__(self, config):
        self.config = config

    def __call__(self, path: str):
        node = self.config
        for part in path.split("."):
            try:
                node = node[part]
            except (KeyError, AttributeError, TypeError):
                raise UserError(f"config.{path} is missing from the configuration") from None
        return node


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_at_least(get, path: str, low: int, why: str = "") -> int:
    value = get(path)
    if not _number(value) or value != int(value) or value < low:
        raise UserError(f"config.{path}={value!r}: expected an integer >= {low}{why}")
    return int(value)


def _float_in(get, path: str, low: float, high: float = math.inf, open_low: bool = False):
    value = get(path)
    ok = _number(value) and math.isfinite(value) and value <= high
    ok = ok and (value > low if open_low else value >= low)
    if not ok:
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        upper = "" if high == math.inf else f" and <= {high:g}"
        raise UserError(f"config.{path}={value!r}: expected a finite number {bound}{upper}")
    return float(value)


def _one_of(get, path: str, options) -> str:
    value = get(path)
    if value not in options:
        raise UserError(f"config.{path}={value!r}: expected one of {', '.join(map(str, options))}")
    return value


def _check_model(get, role: str) -> None:
    from rkd_jax.models.fusion import ATTENTION_NORMS, FUSION_MODES
    from rkd_jax.models.segmenter import BACKBONES

    _one_of(get, f"{role}.backbone", sorted(BACKBONES))
    _int_at_least(get, f"{role}.backbone_width", 1)
    stages = get(f"{role}.backbone_stage_sizes")
    if not isinstance(stages, (list, tuple)) or not all(
        _number(s) and s == int(s) and s >= 1 for s in stages
    ):
        raise UserError(
            f"config.{role}.backbone_stage_sizes={stages!r}: expected () or positive block counts"
        )
    for field in ("text_num_layers", "fusion_dim", "fpn_dim"):
        _int_at_least(get, f"{role}.{field}", 1)
    _one_of(get, f"{role}.attention_norm", ATTENTION_NORMS)
    _one_of(get, f"{role}.fusion_mode", FUSION_MODES)
    _int_at_least(get, f"{role}.category_classes", 0, " (0: no category head)")
    text_dir = get(f"{role}.text_encoder_dir")
    if text_dir and not Path(text_dir).expanduser().is_dir():
        raise UserError(
            f"config.{role}.text_encoder_dir={text_dir!r}: no such directory (expected a Hugging "
            "Face BERT directory, or '' for the offline MiniLM)"
        )
    weights = get(f"{role}.backbone_weights")
    if weights and weights != "offline" and not Path(weights).expanduser().is_file():
        raise UserError(
            f"config.{role}.backbone_weights={weights!r}: no such file (expected a .pth or "
            ".safetensors state dict, 'offline' for Lite0's bundled weights, or '')"
        )


def _check_schedule(get, name: str) -> None:
    _int_at_least(get, f"{name}.batch_size", 1)
    _int_at_least(get, f"{name}.epochs", 1)
    _float_in(get, f"{name}.lr", 0.0, open_low=True)
    decay = get(f"{name}.lr_decay_epochs")
    if not isinstance(decay, (list, tuple)) or not all(
        _number(e) and math.isfinite(e) and e >= 0 for e in decay
    ):
        raise UserError(f"config.{name}.lr_decay_epochs={decay!r}: expected epochs >= 0")
    _float_in(get, f"{name}.lr_decay_factor", 0.0, open_low=True)
    _int_at_least(get, f"{name}.warmup_steps", 0)
    _float_in(get, f"{name}.weight_decay", 0.0)
    _float_in(get, f"{name}.grad_clip_norm", 0.0)
    _float_in(get, f"{name}.backbone_lr_mult", 0.0, open_low=True)


def _check_data(get) -> None:
    from rkd_jax.data.refer import VALID, check_dataset

    dataset, split_by = get("data.dataset"), get("data.split_by")
    try:
        check_dataset(dataset, split_by)
    except ValueError as e:
        raise UserError(f"config.data.dataset/split_by: {e}") from None
    splits = VALID[(dataset, split_by)]
    _one_of(get, "data.train_split", splits)
    _one_of(get, "data.val_split", splits)
    eval_splits = get("data.eval_splits")
    if (
        isinstance(eval_splits, str)
        or not isinstance(eval_splits, (list, tuple))
        or not eval_splits
    ):
        raise UserError(
            f"config.data.eval_splits={eval_splits!r}: expected a non-empty list of splits of "
            f"{dataset}/{split_by} ({', '.join(splits)})"
        )
    for split in eval_splits:
        if split not in splits:
            raise UserError(
                f"config.data.eval_splits: {split!r} is not a split of {dataset}/{split_by}; "
                f"expected some of {', '.join(splits)}"
            )
    _int_at_least(get, "data.image_size", MIN_IMAGE_SIZE, " (the backbone's stride is 32)")
    _int_at_least(get, "data.max_tokens", MIN_TOKENS, " ([CLS], a word piece, [SEP])")
    _int_at_least(get, "data.num_workers", 0)
    root = get("data.root")
    if root:
        if not Path(root).is_dir():
            raise UserError(f"config.data.root={root!r}: no such directory (a REFER root)")
    else:
        _int_at_least(get, "data.synthetic_num_images", 1)


def _check_distill(get) -> None:
    from rkd_jax import losses

    aliases = losses.METHOD_ALIASES
    method = _one_of(get, "distill.method", (*losses.VALID_METHODS, *aliases))
    method = aliases.get(method, method)
    _one_of(get, "distill.channel_norm", losses.CHANNEL_NORMS)
    _one_of(get, "distill.seg_loss", losses.SEG_LOSS_KINDS)
    for field in ("lambda_vl", "lambda_channel", "kd_weight", "skd_weight", "cwd_weight"):
        _float_in(get, f"distill.{field}", 0.0)
    _float_in(get, "distill.ickd_weight", 0.0)
    _float_in(get, "distill.category_weight", 0.0)
    _float_in(get, "distill.kd_temperature", 0.0, open_low=True)
    _float_in(get, "distill.cwd_tau", 0.0, open_low=True)
    _float_in(get, "distill.skd_pool_scale", 0.0, 1.0)
    if (
        get("mode") == "distill"
        and method == losses.PAPER_METHOD
        and get("distill.lambda_channel") > 0
        and get("teacher.fpn_dim") != get("student.fpn_dim")
    ):
        raise UserError(
            f"config.student.fpn_dim={get('student.fpn_dim')} differs from config.teacher.fpn_dim"
            f"={get('teacher.fpn_dim')}: L_C compares their C x C channel correlations (set them "
            "equal, or distill.lambda_channel=0)"
        )


def _check_run(get) -> None:
    _one_of(get, "run.compute_dtype", COMPUTE_DTYPES)
    _int_at_least(get, "run.log_every_steps", 1)
    _float_in(get, "run.eval_every_epochs", 0.0, open_low=True)
    _int_at_least(get, "run.checkpoint_every_steps", 1)
    _int_at_least(get, "run.keep_checkpoints", 1)
    _int_at_least(get, "run.eval_batch_size", 1)
    _int_at_least(get, "run.max_steps", -1, " (-1: the full schedule)")
    _int_at_least(get, "run.max_eval_examples", -1, " (-1: every sentence)")
    _float_in(get, "run.threshold", 0.0, 1.0, open_low=True)
    if get("run.threshold") >= 1.0:
        raise UserError(f"config.run.threshold={get('run.threshold')!r}: expected 0 < t < 1")


def validate_config(config) -> None:
    """UserError naming the first field of `config` that cannot work; None when all can.

    Reads nothing but the config and the paths it names (directories, weight files, the
    teacher checkpoint's small meta item): no data, no model, no JAX computation.
    """
    get = _Fields(config)
    mode = _one_of(get, "mode", MODES)
    _int_at_least(get, "seed", 0)
    _check_data(get)
    roles = {"teacher": ("teacher",), "student": ("student",), "distill": ("teacher", "student")}
    for role in roles[mode]:
        _check_model(get, role)
    teacher_checkpoint = get("teacher_checkpoint")
    if mode == "teacher" or (mode == "distill" and not teacher_checkpoint):
        _check_schedule(get, "teacher_train")
    if mode != "teacher":
        _check_schedule(get, "train")
    _check_distill(get)
    _check_run(get)
    if mode == "distill" and not isinstance(get("student_alone"), bool):
        raise UserError(f"config.student_alone={get('student_alone')!r}: expected True or False")
    if mode == "distill" and teacher_checkpoint:
        from rkd_jax import checkpoint as ckpt_lib

        ckpt_lib.check_checkpoint_role(
            teacher_checkpoint, "teacher", f"config.teacher_checkpoint={teacher_checkpoint!r}"
        )
