"""Jitted prediction and the evaluation protocol (mIoU, overall IoU, precision@X).

Protocol (written into every results file):
- the network sees the image squashed to image_size x image_size, pixels in [0, 1];
- the model's stride-4 foreground margin (logit_fg - logit_bg) is resized bilinearly
  (half-pixel centres, edge clamp; the same map as jax.image.resize) to the network
  resolution and, separately, to the image's original H x W, and thresholded there at
  logit(threshold): logits are resized before the threshold, never masks;
- per sentence IoU = I / U; a sentence whose prediction and target are both empty has
  IoU 1 (U = 0); mIoU is the mean over sentences, overall IoU (oIoU, cIoU) = sum I / sum U,
  precision@t = share of sentences with IoU >= t;
- every sentence of the split is scored once (padding rows of the last batch are ignored).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def foreground_margin(logits: jax.Array) -> jax.Array:
    """Logits [B, h, w, 2] -> the foreground margin logit_fg - logit_bg [B, h, w], float32."""
    logits = logits.astype(jnp.float32)
    return logits[..., 1] - logits[..., 0]


def margin_threshold(threshold: float) -> float:
    """The margin at which the foreground probability reaches `threshold`: logit(threshold)."""
    return math.log(threshold / (1.0 - threshold))


def predict(model, variables, images, tokens, token_mask) -> dict:
    """The model's prediction (not jitted; `make_predict_fn` jits it, the export traces it).

    `model` is a Segmenter, images [B,S,S,3] in [0, 1], tokens and token_mask [B,L]. Outputs:
      margin: [B, S/4, S/4] float32 foreground logit margin at stride 4 (for rescoring);
      prob: [B, S, S] float32 foreground probability at the input resolution.
    """
    out = model.apply(variables, images, tokens, token_mask, train=False)
    margin = foreground_margin(out["logits"])
    size = (images.shape[0], images.shape[1], images.shape[2])
    prob = jax.nn.sigmoid(jax.image.resize(margin, size, "bilinear", antialias=False))
    return {"margin": margin, "prob": prob}


def make_predict_fn(model, threshold: float = 0.5) -> Callable:
    """Jitted (variables, images [B,S,S,3], tokens [B,L], token_mask [B,L]) -> dict: `predict`'s
    margin and prob, and mask [B, S, S] bool, prob >= threshold.

    `model` is a Segmenter (rkd_jax.models.build.build_model(model_config)). Shapes are fixed by
    the inputs: pad the last batch rather than change B.
    """

    @jax.jit
    def predict_fn(variables, images, tokens, token_mask):
        out = predict(model, variables, images, tokens, token_mask)
        return dict(out, mask=out["prob"] >= threshold)

    return predict_fn


@lru_cache(maxsize=256)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] weights of 1-D bilinear resizing with half-pixel centres and edge clamp."""
    m = np.zeros((out_size, in_size), np.float32)
    scale = in_size / out_size
    for o in range(out_size):
        x = (o + 0.5) * scale - 0.5
        x0 = math.floor(x)
        frac = x - x0
        for idx, w in ((x0, 1.0 - frac), (x0 + 1, frac)):
            m[o, min(max(idx, 0), in_size - 1)] += w
    return m


def resize_margin(margin: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a [h, w] logit map to [height, width] (numpy, float32)."""
    h, w = margin.shape
    return bilinear_matrix(height, h) @ margin.astype(np.float32) @ bilinear_matrix(width, w).T


def intersection_union(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    pred = pred.astype(bool)
    target = target.astype(bool)
    return int(np.count_nonzero(pred & target)), int(np.count_nonzero(pred | target))


class IoUAccumulator:
    """Sums what the protocol needs; `merge` adds another's sums (other processes)."""

    def __init__(self):
        self.sums = np.zeros(4 + len(PRECISION_THRESHOLDS), np.float64)

    def add(self, inter: int, union: int) -> None:
        iou = 1.0 if union == 0 else inter / union
        self.sums[:4] += (inter, union, iou, 1)
        self.sums[4:] += [iou >= t for t in PRECISION_THRESHOLDS]

    def result(self) -> dict[str, float]:
        inter, union, iou_sum, n = self.sums[:4]
        out = {
            "mIoU": float(iou_sum / n) if n else float("nan"),
            "oIoU": float(inter / union) if union else float("nan"),
            "num_sentences": int(n),
        }
        for t, c in zip(PRECISION_THRESHOLDS, self.sums[4:]):
            out[f"P@{t}"] = float(c / n) if n else float("nan")
        return out


class GroupedIoU:
    """One IoUAccumulator per group of sentences (e.g. expression family), by sentence_id."""

    def __init__(self, group_of: Sequence[str]):
        self.group_of = list(group_of)
        self.names = sorted(set(self.group_of))
        self.accs = {name: IoUAccumulator() for name in self.names}

    def add(self, sentence_id: int, inter: int, union: int) -> None:
        self.accs[self.group_of[int(sentence_id)]].add(inter, union)

    def merge_processes(self) -> GroupedIoU:
        for acc in self.accs.values():
            _merge_processes(acc)
        return self

    def result(self) -> dict[str, dict[str, float]]:
        """{group: metrics} for the groups that have sentences."""
        return {k: a.result() for k, a in self.accs.items() if a.sums[3] > 0}


def score_batch(
    margins: np.ndarray,
    batch: dict,
    threshold: float,
    net: IoUAccumulator,
    orig: IoUAccumulator | None,
    groups: GroupedIoU | None = None,
) -> None:
    """Add a batch's valid rows at the network resolution and (if `orig`) the original one;
    `groups` also gets each row's network-resolution IoU under its sentence's group."""
    cut = margin_threshold(threshold)
    size = batch["mask"].shape[1:3]
    for i in np.nonzero(batch["valid"])[0]:
        iu = intersection_union(resize_margin(margins[i], *size) >= cut, batch["mask"][i])
        net.add(*iu)
        if groups is not None:
            groups.add(batch["sentence_id"][i], *iu)
        if orig is not None:
            target = batch["orig_mask"][i]
            pred = resize_margin(margins[i], *target.shape) >= cut
            orig.add(*intersection_union(pred, target))


def _merge_processes(acc: IoUAccumulator) -> IoUAccumulator:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        acc.sums = np.asarray(multihost_utils.process_allgather(acc.sums)).sum(axis=0)
    return acc


def evaluate_batches(
    predict_fn: Callable,
    variables: Any,
    batches: Iterable[dict],
    put: Callable[[dict], dict],
    threshold: float = 0.5,
    original_resolution: bool = True,
    total: int | None = None,
    desc: str = "eval",
    families: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Score every valid row of `batches`; returns {"network": {...}, "original": {...}}.

    With `families` (a group name per sentence_id: the embedded data's expression families),
    the result also has "families": {family: metrics at the network resolution}.
    """
    from tqdm import tqdm

    net, orig = IoUAccumulator(), IoUAccumulator() if original_resolution else None
    groups = GroupedIoU(families) if families is not None else None
    pending = None
    show = jax.process_index() == 0 and total is not None
    bar = tqdm(total=total, desc=desc, unit="sent", disable=not show, leave=False)
    for batch in batches:
        device_batch = put(batch)
        out = predict_fn(
            variables, device_batch["image"], device_batch["tokens"], device_batch["token_mask"]
        )
        # Score the previous batch while the device computes this one.
        if pending is not None:
            _score_pending(pending, threshold, net, orig, groups, bar)
        pending = (out["margin"], batch)
    if pending is not None:
        _score_pending(pending, threshold, net, orig, groups, bar)
    bar.close()
    results = {"network": _merge_processes(net).result()}
    if orig is not None:
        results["original"] = _merge_processes(orig).result()
    if groups is not None:
        results["families"] = groups.merge_processes().result()
    return results


def _score_pending(pending, threshold, net, orig, groups, bar):
    margin, batch = pending
    margins = local_rows(margin)
    score_batch(margins, batch, threshold, net, orig, groups)
    bar.update(int(np.count_nonzero(batch["valid"])))


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards], axis=0)


def protocol(config, split: str, step: int, counts: dict | None = None) -> dict:
    """The evaluation settings written next to every number."""
    return {
        "dataset": config.data.dataset,
        "split_by": config.data.split_by,
        "split": split,
        "data_root": config.data.root or "(embedded synthetic dataset)",
        "checkpoint_step": int(step),
        "image_size": int(config.data.image_size),
        "resize": "squash (aspect ratio not kept), bilinear image, nearest mask",
        "max_tokens": int(config.data.max_tokens),
        "threshold": float(config.run.threshold),
        "sentences": "every sentence of every referred object in the split, once",
        "max_eval_examples": int(config.run.max_eval_examples),
        "resolutions": {
            "network": "stride-4 logits resized bilinearly to image_size x image_size, "
            "against the mask resized (nearest) to that size",
            "original": "stride-4 logits resized bilinearly to the image's original H x W, "
            "against the original mask",
        },
        "empty_union": "IoU = 1 when prediction and target are both empty",
        "counts": counts or {},
    }


def write_results(path: Path, payload: dict) -> None:
    """Atomic JSON write (a crash never leaves half a results file)."""
    from rkd_jax.files import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, payload, indent=2, sort_keys=True)


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# Evaluation takes the model and everything that shapes its predictions from the checkpoint;
# only where the data comes from and how much of it is scored may differ from training.
DATA_SETTINGS = (
    "data.root",
    "data.image_dir",
    "data.dataset",
    "data.split_by",
    "data.data_dir",
    "data.eval_splits",
    "data.num_workers",
    "data.skip_corrupt_images",
    "data.skip_invalid_annotations",
    "data.synthetic_num_images",
    "data.synthetic_seed",
    "run.eval_batch_size",
    "run.max_eval_examples",
)
MODEL_SETTINGS = ("data.image_size", "data.max_tokens", "run.threshold", "run.compute_dtype")
# Fields of a model config that only decide how training starts, not the trained model.
_INIT_ONLY = ("backbone_weights", "text_pretrained")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config (ConfigDict or dict) -> {"data.root": ..., "student.backbone": ...}."""
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) or hasattr(v, "to_dict"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _plain(v: Any) -> Any:
    """Tuples and lists compare equal (a config's tuple comes back from JSON as a list)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def data_settings(config) -> dict[str, Any]:
    """The DATA_SETTINGS of a config, flattened (what a training run evaluates with)."""
    flat = flatten(config)
    return {k: flat[k] for k in DATA_SETTINGS if k in flat}


def command_line_settings(config, overrides: dict[str, Any], config_given: bool) -> dict[str, Any]:
    """Settings that `main --mode=eval` hands to `evaluate_checkpoint`.

    `overrides` are the `--config.FIELD=value` flags (data settings are used, model settings
    checked). When `--config` itself was given, the file's model settings are checked too; its
    data settings are not used unless overridden, so a run trained on a REFER root is scored on
    that root without repeating --config.data.root.
    """
    settings = {}
    if config_given:
        for key, value in flatten(config).items():
            head = key.split(".", 1)[0]
            if key in MODEL_SETTINGS or head in ("teacher", "student"):
                settings[key] = value
    settings.update(overrides)
    return settings


def eval_config(config, role: str, model_config, settings: dict[str, Any] | None = None):
    """The checkpoint's config with the data settings of `settings` applied.

    A model setting (MODEL_SETTINGS, or a field of the checkpoint's `role` model) in `settings`
    must equal the checkpoint's value: ValueError otherwise. Other keys (training settings)
    are not used by evaluation and are ignored.
    """
    import ml_collections

    out = ml_collections.ConfigDict(config.to_dict())
    if "image_dir" not in out.data:  # checkpoints from before data.image_dir existed
        out.data.image_dir = ""
    saved_model = model_config.to_dict()
    conflicts = []
    for key, value in (settings or {}).items():
        head, _, field = key.partition(".")
        if key in DATA_SETTINGS:
            out[head][field] = list(value) if isinstance(value, (list, tuple)) else value
            continue
        if key in MODEL_SETTINGS:
            saved = out[head][field]
        elif head == role and field in saved_model and field not in _INIT_ONLY:
            saved = saved_model[field]
        else:
            continue  # a training setting: evaluation does not use it
        if _plain(saved) != _plain(value):
            conflicts.append((key, value, saved))
    if conflicts:
        key, value, saved = conflicts[0]
        more = f" (and {', '.join(c[0] for c in conflicts[1:])})" if len(conflicts) > 1 else ""
        raise ValueError(
            f"{key}={value!r} conflicts with the checkpoint's {key}={saved!r}{more}: the model, "
            "image size, token limit and threshold come from the checkpoint; only data settings "
            f"({', '.join(DATA_SETTINGS)}) can be changed at evaluation"
        )
    return out


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
    from rkd_jax import parallel
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
    return evaluate_batches(
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


def evaluate_run(config, run_dir: Path, splits, mesh) -> dict:
    """Score the best checkpoint of run_dir on `splits` -> {split: metrics}; writes
    results/<dataset>_<split>.json through `evaluate_checkpoint`, the path of
    `python -m rkd_jax.evaluate`: the model and its settings come from the checkpoint, the data
    settings from `config`."""
    payloads = evaluate_checkpoint(run_dir, splits, data_settings(config), mesh=mesh)
    return {split: payload["metrics"] for split, payload in payloads.items()}


def run_directory(checkpoints_dir: Path) -> Path:
    """The run directory a checkpoints directory belongs to (paths in results are relative
    to it)."""
    return checkpoints_dir.parent if checkpoints_dir.name == "checkpoints" else checkpoints_dir


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    splits: Iterable[str] | None = None,
    settings: dict[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    mesh=None,
) -> dict[str, dict]:
    """Score a checkpoint on `splits`; the one evaluation path of the project.

    Args:
      checkpoint: a run directory (its best checkpoint), its checkpoints/ directory or one
        checkpoints/<step> directory. The model, image size, token limit and threshold come
        from the checkpoint's saved config (`checkpoint.load_model`).
      splits: splits to score; default the (possibly overridden) data.eval_splits.
      settings: flattened config fields (`eval_config`): data settings are applied, model
        settings must equal the checkpoint's.
      out: one JSON file {split: results}; default `<run>/results/<dataset>_<split>.json` for a
        run's best checkpoint, `<run>/results/step<N>/...` for an explicit step directory.
      mesh: the device mesh (default: one over every device).

    Returns {split: results payload}. Every check (settings, architecture, splits) runs before
    anything is written.
    """
    from rkd_jax import checkpoint as ckpt_lib
    from rkd_jax import parallel
    from rkd_jax.data import pipeline, prepare, refer
    from rkd_jax.data.tokenizer import load_tokenizer, tokenize
    from rkd_jax.pretrained import resolve_text_encoder_dir

    path = Path(checkpoint).absolute()
    directory, step = ckpt_lib.find_checkpoint(path)
    restored = ckpt_lib.load_model(path)
    config = eval_config(restored.config, restored.role, restored.model_config, settings)
    splits = list(splits or config.data.eval_splits)
    if not splits:
        raise ValueError("no splits to evaluate (give --splits or data.eval_splits)")
    run_dir = run_directory(directory)
    for split in splits:
        refer.check_dataset(config.data.dataset, config.data.split_by, split)
    prepare.ensure_prepared(config.data)
    for split in splits:  # a split the prepared dataset lacks fails here, before any writing
        pipeline.num_eval_examples(config.data, split)
    if out is None:
        results_dir = run_dir / "results"
        if path == directory / str(step):
            results_dir = results_dir / f"step{step}"
    if mesh is None:
        mesh = parallel.make_mesh()
    predict_fn = make_predict_fn(restored.model, float(restored.config.run.threshold))
    tokenizer = load_tokenizer(resolve_text_encoder_dir(restored.model_config.text_encoder_dir))
    tokenize_fn = partial(tokenize, tokenizer)
    log = logging.getLogger("rkd_jax")
    payloads = {}
    with parallel.set_mesh(mesh):
        variables = parallel.replicate(restored.variables, mesh)
        for split in splits:
            t0 = time.perf_counter()
            res = evaluate_split(
                config, predict_fn, variables, tokenize_fn, split, mesh, desc=f"eval {split}"
            )
            payload = {
                "metrics": res,
                "protocol": protocol(
                    config, split, step, pipeline.split_counts(config.data, split)
                ),
                "role": restored.role,
                "model": restored.model_config.to_dict(),
                "checkpoint": os.path.relpath(directory / str(step), run_dir),
                "val_metrics_at_selection": restored.meta.get("metrics", {}),
                "seconds": time.perf_counter() - t0,
                "written": timestamp(),
            }
            payloads[split] = payload
            if out is None and jax.process_index() == 0:
                write_results(results_dir / f"{config.data.dataset}_{split}.json", payload)
            log.info(
                "%s %s (%d sentences): mIoU %.4f oIoU %.4f (network) | mIoU %.4f oIoU %.4f "
                "(original)",
                restored.role,
                split,
                res["network"]["num_sentences"],
                res["network"]["mIoU"],
                res["network"]["oIoU"],
                res["original"]["mIoU"],
                res["original"]["oIoU"],
            )
    if out is not None and jax.process_index() == 0:
        write_results(Path(out), payloads)
    return payloads


def _main(argv: list[str] | None = None) -> int:
    from rkd_jax import cli, parallel, platform

    p = cli.ArgumentParser(
        prog="python -m rkd_jax.evaluate",
        description="Score a checkpoint on REFER splits. The model, image size, token limit and "
        "threshold come from the checkpoint's saved config; only data settings can be changed.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory (its best checkpoint), its checkpoints/ or one checkpoints/<step>",
    )
    p.add_argument("--splits", nargs="+", help="splits to score (default: data.eval_splits)")
    p.add_argument(
        "--out",
        help="one JSON file {split: results}; default <run>/results/<dataset>_<split>.json "
        "(<run>/results/step<N>/ for a checkpoints/<step> directory)",
    )
    data = p.add_argument_group("data (default: the checkpoint's)")
    data.add_argument("--refer-root", help="REFER root (<dataset>/instances.json, refs(*).p)")
    data.add_argument(
        "--image-dir", help="COCO train2014 images (default <refer-root>/images/mscoco/...)"
    )
    data.add_argument("--dataset", help="refcoco | refcoco+ | refcocog")
    data.add_argument("--split-by", help="unc (refcoco, refcoco+) | umd, google (refcocog)")
    data.add_argument("--data-dir", help="TFDS cache of prepared examples")
    data.add_argument("--batch-size", type=int, help="evaluation batch (run.eval_batch_size)")
    data.add_argument(
        "--max-examples", type=int, help="score at most this many sentences per split (-1: all)"
    )
    model = p.add_argument_group("model settings (checked: must equal the checkpoint's)")
    model.add_argument("--image-size", type=int)
    model.add_argument("--max-tokens", type=int)
    model.add_argument("--threshold", type=float)
    p.add_argument("--coordinator-address", default="", help="jax.distributed host:port")
    p.add_argument("--num-processes", type=int, default=0)
    p.add_argument("--process-id", type=int, default=-1)
    args = p.parse_args(argv)
    flags_to_settings = {
        "refer_root": "data.root",
        "image_dir": "data.image_dir",
        "dataset": "data.dataset",
        "split_by": "data.split_by",
        "data_dir": "data.data_dir",
        "batch_size": "run.eval_batch_size",
        "max_examples": "run.max_eval_examples",
        "image_size": "data.image_size",
        "max_tokens": "data.max_tokens",
        "threshold": "run.threshold",
    }
    settings = {
        key: getattr(args, name)
        for name, key in flags_to_settings.items()
        if getattr(args, name) is not None
    }
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    platform.configure_cpu_flags_for_cpu_backend()
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    results = evaluate_checkpoint(args.checkpoint, args.splits, settings, args.out)
    for split, payload in results.items():
        m = payload["metrics"]
        print(
            f"{split}: mIoU {m['network']['mIoU']:.4f} oIoU {m['network']['oIoU']:.4f} (network)"
            f" | mIoU {m['original']['mIoU']:.4f} oIoU {m['original']['oIoU']:.4f} (original)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m rkd_jax.evaluate --checkpoint RUN --splits val testA testB [--out FILE]`;
    bad input ends with one `error:` line and exit code 2."""
    from rkd_jax import cli

    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
