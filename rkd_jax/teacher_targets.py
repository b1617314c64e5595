"""A frozen teacher's distillation targets, computed once per (image, sentence) pair.

There is no data augmentation, and the teacher is frozen and runs in inference mode during
distillation, so what it gives for one (image, sentence) pair of the training split never
changes. `compute_table` runs the teacher once over every pair of the split and keeps only
what the distillation method compares with (`losses.teacher_targets`: the vision-language
maps A of V3..V5 and the channel correlation A_c^t for the paper's loss, the logits for
logit KD and CWD, ...); the train step then looks the targets up by `pair_id` instead of
running the teacher, and costs about what a student step costs. The losses read the same
values either way (tests/test_teacher_targets.py compares losses and gradients).

The table is kept on every device, so it is for datasets whose targets fit in memory (the
embedded miniature: ~25 KB per pair at 96 px, ~0.5 GB for the default data); the paper
setting (384 px, 256-channel correlations, 120k sentences) keeps the teacher in the step.
With `run.text_cache_dir` set the table is also stored on disk (its teacher_targets/
subdirectory) under a key that
fingerprints the teacher's variables, its config, the distillation settings that shape the
targets, the data, the compute dtype, the backend and the jax version (feature_cache).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rkd_jax import feature_cache, parallel
from rkd_jax import losses as loss_lib

log = logging.getLogger("rkd_jax")

_VL = "vl_attention"


def flatten(targets: dict[str, Any]) -> dict[str, Any]:
    """`losses.teacher_targets` output -> flat {name: array} (the V3..V5 maps as vl_attention_i)."""
    flat = {}
    for key, value in targets.items():
        if key == _VL:
            flat.update({f"{_VL}_{i}": a for i, a in enumerate(value)})
        else:
            flat[key] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten`."""
    out = {k: v for k, v in flat.items() if not k.startswith(f"{_VL}_")}
    stages = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in flat.items() if k.startswith(_VL))
    if stages:
        out[_VL] = [v for _, v in stages]
    return out


def lookup(table: dict[str, jax.Array], pair_id: jax.Array) -> dict[str, Any]:
    """The targets of a batch's pairs: {key: [B, ...]} in `losses.teacher_targets`' form."""
    return unflatten({k: v[pair_id] for k, v in table.items()})


def make_targets_fn(teacher, distill_cfg):
    """Jitted (teacher_vars, batch, text_table | None) -> flat targets of the batch's rows."""

    @jax.jit
    def targets(teacher_vars, batch, text_table):
        text = None if text_table is None else text_table[batch["sentence_id"]]
        out = teacher.apply(
            teacher_vars,
            batch["image"],
            batch["tokens"],
            batch["token_mask"],
            train=False,
            text_features=text,
        )
        return flatten(loss_lib.teacher_targets(out, distill_cfg))

    return targets


def _compute(config, teacher, teacher_vars, tokenize, text_table, mesh, offsets, sentence_ids):
    from rkd_jax.data import pipeline
    from rkd_jax.evaluate import local_rows

    batch_size = int(config.run.eval_batch_size)
    parallel.check_batch_size(batch_size, "run.eval_batch_size")
    batches = pipeline.make_pair_iterator(config.data, tokenize, batch_size, offsets, sentence_ids)
    fn = make_targets_fn(teacher, config.distill)
    num_pairs = len(sentence_ids)
    table: dict[str, np.ndarray] = {}
    for batch in batches:
        # Every process reads every pair: the rows a process gets back are its own copy.
        out = fn(teacher_vars, parallel.put_batch(batch, mesh), text_table)
        valid = batch["valid"]
        rows = batch["pair_id"][valid]
        for key, value in out.items():
            value = local_rows(value)[valid]
            if key not in table:
                table[key] = np.zeros((num_pairs, *value.shape[1:]), value.dtype)
            table[key][rows] = value
    batches.close()
    return table


def compute_table(
    config, teacher, teacher_cfg, teacher_vars, tokenize, text_table, mesh
) -> tuple[dict[str, jax.Array], np.ndarray, bool]:
    """The method's teacher targets for every pair of the train split, replicated on `mesh`.

    Returns ({name: [P, ...]} as in `flatten`, the pair offsets for
    `pipeline.make_train_iterator(pair_offsets=...)`, whether the table came from the on-disk
    cache). `text_table`: the teacher's precomputed text features by sentence_id, or None.
    """
    from rkd_jax.data import pipeline

    t0 = time.perf_counter()
    offsets, sentence_ids = pipeline.train_pairs(config.data)
    names = loss_lib.target_keys(config.distill)

    def compute():
        return _compute(
            config, teacher, teacher_vars, tokenize, text_table, mesh, offsets, sentence_ids
        )

    directory = config.run.get("text_cache_dir", "")
    hit = False
    if not directory:
        table = compute()
    else:
        key = feature_cache.fingerprint(
            teacher_vars,
            "teacher_targets",
            teacher_cfg.to_dict(),
            list(names),
            str(config.distill.get("channel_norm", "hw")),
            {k: config.data[k] for k in sorted(config.data.keys()) if k != "num_workers"},
            offsets,
            sentence_ids,
            str(config.run.compute_dtype),
            jax.default_backend(),
            jax.__version__,
        )
        table, hit = _load_or_compute_all(Path(directory) / "teacher_targets", key, compute)
    nbytes = sum(v.nbytes for v in table.values())
    log.info(
        "teacher targets (%s) of %d (image, sentence) pairs: %.0f MB in %.1fs (%s)",
        ", ".join(names) or "none",
        len(sentence_ids),
        nbytes / 2**20,
        time.perf_counter() - t0,
        "from the cache" if hit else "computed",
    )
    return parallel.replicate(table, mesh), offsets, hit


def _load_or_compute_all(directory: Path, key: str, compute) -> tuple[dict, bool]:
    """All arrays of one table under `key`, read together or computed and stored together."""
    index = feature_cache.load(directory, f"{key}-names")
    if index is not None:
        names = bytes(index).decode().split("\n") if index.size else []
        parts = {name: feature_cache.load(directory, f"{key}-{name}") for name in names}
        if all(v is not None for v in parts.values()):
            return parts, True
    table = compute()
    for name, value in table.items():
        feature_cache.store(directory, f"{key}-{name}", value, {"teacher_target": name})
    # The index last: a table is only ever read back complete.
    names = np.frombuffer("\n".join(sorted(table)).encode(), np.uint8)
    feature_cache.store(directory, f"{key}-names", names)
    return table, False
