"""int8 ONNX: static QDQ quantisation calibrated on training images, and its report (val scores
of Flax, float and int8 ONNX under rkd_jax.evaluate's protocol, CPU latency)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rkd_jax.export.common import ExportError, require
from rkd_jax.export.onnx import onnx_session, run_onnx
from rkd_jax.export.sidecar import PARITY_SENTENCE, parity_report

DEFAULT_CALIBRATION_EXAMPLES = 256

# Weight-bearing ops are quantised (W8A8) outside the text encoder; everything between them
# stays float. docs/export.md has what quantising more (the text encoder: -2.5 mIoU points;
# every op type onnxruntime can: -10.4) cost on the embedded val split.
DEFAULT_QUANT_OPS = ("Conv", "MatMul", "Gemm")


def evaluate_margin_fn(
    margin_fn: Callable,
    config,
    tokenize,
    split: str,
    batch_size: int,
    max_examples: int = -1,
    original_resolution: bool = True,
) -> dict:
    """Score `margin_fn(image, tokens, token_mask) -> margin [B, S/4, S/4]` on a split with
    rkd_jax.evaluate's protocol (IoUAccumulator, score_batch)."""
    from rkd_jax import evaluate as eval_lib
    from rkd_jax.data import pipeline

    threshold = float(config.run.threshold)
    net = eval_lib.IoUAccumulator()
    orig = eval_lib.IoUAccumulator() if original_resolution else None
    batches = pipeline.make_eval_iterator(config.data, tokenize, split, batch_size)
    seen = 0
    try:
        for batch in batches:
            if 0 <= max_examples <= seen:
                break
            valid = batch["valid"].copy()
            idx = np.nonzero(valid)[0]
            if max_examples >= 0:
                valid[idx[max_examples - seen :]] = False
            seen += int(np.count_nonzero(valid))
            margin = np.asarray(margin_fn(batch["image"], batch["tokens"], batch["token_mask"]))
            eval_lib.score_batch(margin, dict(batch, valid=valid), threshold, net, orig)
    finally:
        batches.close()
    out = {"network": net.result()}
    if orig is not None:
        out["original"] = orig.result()
    return out


def latency_ms(fn: Callable, warmup: int = 3, iters: int = 30) -> dict:
    """Median and p90 wall time of `fn()` in ms (fn must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "iters": iters,
    }


class TrainingImages:
    """onnxruntime CalibrationDataReader over TRAINING batches (pipeline.make_train_iterator).

    Yields `num_examples` rows in feeds of `feed_batch` rows (the exported batch when fixed).
    Evaluation splits are never read here.
    """

    def __init__(self, config, tokenize, num_examples: int, feed_batch: int = 16, seed: int = 0):
        from rkd_jax.data import pipeline

        self.left = int(num_examples)
        self.feed_batch = int(feed_batch)
        self.split = config.data.train_split
        self._it = pipeline.make_train_iterator(config.data, tokenize, self.feed_batch, seed)
        self.seen = 0

    def get_next(self) -> dict | None:
        if self.left <= 0:
            self._it.close()
            return None
        b = next(self._it)
        take = min(self.left, self.feed_batch)
        self.left -= take
        self.seen += take
        return {
            "image": b["image"][:take].astype(np.float32),
            "tokens": b["tokens"][:take].astype(np.int32),
            "token_mask": b["token_mask"][:take].astype(np.int32),
        }

    def rewind(self) -> None:  # onnxruntime's CalibrationDataReader interface
        pass


def text_only_nodes(model) -> list[str]:
    """Names of the nodes of an ONNX graph that depend on tokens/token_mask but not on image."""
    from_image, from_text, names = {"image"}, {"tokens", "token_mask"}, []
    for node in model.graph.node:  # ONNX graphs are stored in topological order
        img = any(i in from_image for i in node.input)
        txt = any(i in from_text for i in node.input)
        if img:
            from_image.update(node.output)
        if txt:
            from_text.update(node.output)
        if txt and not img:
            names.append(node.name)
    return names


def quantize_int8(
    float_path: Path,
    out_path: Path,
    reader,
    op_types=DEFAULT_QUANT_OPS,
    nodes_to_exclude: tuple[str, ...] = (),
    method: str = "minmax",
    float_text_encoder: bool = True,
) -> dict:
    """Static QDQ int8 quantisation (per-channel s8 weights, u8 activations) of an ONNX file.

    `float_text_encoder` keeps every node that depends on the tokens but not on the image (the
    text encoder and the padding-mask arithmetic) in float, besides `nodes_to_exclude`.
    """
    require("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if method not in methods:
        raise ExportError(f"--calibration-method {method!r}; expected one of {sorted(methods)}")

    class _Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

    pre = out_path.with_name(f".{out_path.name}.pre.onnx")
    try:
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
        exclude = list(nodes_to_exclude)
        text_nodes = []
        if float_text_encoder:
            import onnx

            # Names after pre-processing: onnxruntime's optimiser renames the nodes it fuses.
            text_nodes = text_only_nodes(onnx.load(str(pre), load_external_data=False))
            exclude += text_nodes
        quantize_static(
            str(pre),
            str(out_path),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types) if op_types else None,
            nodes_to_exclude=exclude or None,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    finally:
        pre.unlink(missing_ok=True)
    return {
        "format": "QDQ",
        "weights": "int8, per channel, symmetric",
        "activations": "uint8, per tensor, asymmetric",
        "calibration_method": method,
        "op_types_quantized": list(op_types) if op_types else "onnxruntime default",
        "nodes_excluded": list(nodes_to_exclude),
        "text_encoder": f"float ({len(text_nodes)} nodes kept in float)"
        if float_text_encoder
        else "quantised like the rest",
        "calibration_examples": int(getattr(reader, "seen", 0)),
        "calibration_split": getattr(reader, "split", "train"),
    }


def int8_path(out: Path) -> Path:
    """student.onnx -> student.int8.onnx"""
    return out.with_name(f"{out.stem}.int8{out.suffix or '.onnx'}")


def compare_int8(
    float_path: Path,
    int8_file: Path,
    flax_margin_fn: Callable,
    config,
    tokenize,
    photo,
    reference,
    batch: int | None = None,
    eval_split: str | None = None,
    max_eval_examples: int = -1,
    latency_iters: int = 30,
    threads: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Val mIoU/oIoU of Flax, float ONNX and int8 ONNX (rkd_jax.evaluate's protocol) and the
    batch-1 CPU latency of both ONNX files."""
    float_sess, int8_sess = onnx_session(float_path, threads), onnx_session(int8_file, threads)
    q_prob, q_margin = run_onnx(int8_sess, *photo)
    parity = parity_report(q_prob, q_margin, *reference, f"skimage chelsea + {PARITY_SENTENCE!r}")
    split = eval_split or config.data.val_split
    eval_bs = batch or int(config.run.eval_batch_size)
    metrics = {}
    for name, fn in (
        ("flax", flax_margin_fn),
        ("onnx_float", lambda i, t, m: run_onnx(float_sess, i, t, m)[1]),
        ("onnx_int8", lambda i, t, m: run_onnx(int8_sess, i, t, m)[1]),
    ):
        t0 = time.perf_counter()
        metrics[name] = evaluate_margin_fn(fn, config, tokenize, split, eval_bs, max_eval_examples)
        m = metrics[name]["network"]
        log(
            f"{split} {name}: mIoU {m['mIoU']:.4f} oIoU {m['oIoU']:.4f} "
            f"({m['num_sentences']} sentences, {time.perf_counter() - t0:.1f}s)"
        )
    one = tuple(x[:1] for x in photo) if batch in (None, 1) else photo
    latency = {
        "onnx_float": latency_ms(lambda: run_onnx(float_sess, *one), iters=latency_iters),
        "onnx_int8": latency_ms(lambda: run_onnx(int8_sess, *one), iters=latency_iters),
        "batch": int(one[0].shape[0]),
        "threads": threads or "onnxruntime default",
    }
    for k in ("onnx_float", "onnx_int8"):
        log(
            f"latency {k}: median {latency[k]['median_ms']:.2f} ms, "
            f"p90 {latency[k]['p90_ms']:.2f} ms (batch {latency['batch']})"
        )
    loss = metrics["onnx_float"]["network"]["mIoU"] - metrics["onnx_int8"]["network"]["mIoU"]
    return {
        "file": int8_file.name,
        "parity_at_export": parity,
        "split": split,
        "metrics": metrics,
        "latency": latency,
        "mIoU_loss_points": 100.0 * loss,
    }
