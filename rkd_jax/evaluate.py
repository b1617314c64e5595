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

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def make_predict_fn(model, threshold: float = 0.5) -> Callable:
    """Jitted (variables, images [B,S,S,3], tokens [B,L], token_mask [B,L]) -> dict.

    `model` is a Segmenter (rkd_jax.models.build.build_model(model_config)). Outputs:
      margin: [B, S/4, S/4] float32 foreground logit margin at stride 4 (for rescoring);
      prob: [B, S, S] float32 foreground probability at the input resolution;
      mask: [B, S, S] bool, prob >= threshold.
    Shapes are fixed by the inputs: pad the last batch rather than change B.
    """

    @jax.jit
    def predict(variables, images, tokens, token_mask):
        out = model.apply(variables, images, tokens, token_mask, train=False)
        logits = out["logits"].astype(jnp.float32)
        margin = logits[..., 1] - logits[..., 0]
        b, s = images.shape[0], images.shape[1]
        big = jax.image.resize(margin, (b, s, images.shape[2]), "bilinear", antialias=False)
        prob = jax.nn.sigmoid(big)
        return {"margin": margin, "prob": prob, "mask": prob >= threshold}

    return predict


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


def score_batch(
    margins: np.ndarray,
    batch: dict,
    threshold: float,
    net: IoUAccumulator,
    orig: IoUAccumulator | None,
) -> None:
    """Add a batch's valid rows at the network resolution and (if `orig`) the original one."""
    cut = math.log(threshold / (1.0 - threshold))
    size = batch["mask"].shape[1:3]
    for i in np.nonzero(batch["valid"])[0]:
        net.add(*intersection_union(resize_margin(margins[i], *size) >= cut, batch["mask"][i]))
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
) -> dict[str, dict[str, float]]:
    """Score every valid row of `batches`; returns {"network": {...}, "original": {...}}."""
    from tqdm import tqdm

    net, orig = IoUAccumulator(), IoUAccumulator() if original_resolution else None
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
            _score_pending(pending, threshold, net, orig, bar)
        pending = (out["margin"], batch)
    if pending is not None:
        _score_pending(pending, threshold, net, orig, bar)
    bar.close()
    results = {"network": _merge_processes(net).result()}
    if orig is not None:
        results["original"] = _merge_processes(orig).result()
    return results


def _score_pending(pending, threshold, net, orig, bar):
    margin, batch = pending
    margins = local_rows(margin)
    score_batch(margins, batch, threshold, net, orig)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
