"""The whole export: check the request, load the student, trace and write the artifact, check
its parity, write the sidecar and vocab.txt, and optionally the int8 model and its report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rkd_jax.export.common import FORMATS, ExportError, require
from rkd_jax.export.jax_export import DEFAULT_PLATFORMS, export_jax, load_jax
from rkd_jax.export.onnx import DEFAULT_OPSET, export_onnx, jax2onnx_version, onnx_session, run_onnx
from rkd_jax.export.quantize import (
    DEFAULT_CALIBRATION_EXAMPLES,
    DEFAULT_QUANT_OPS,
    TrainingImages,
    compare_int8,
    int8_path,
    quantize_int8,
)
from rkd_jax.export.sidecar import (
    PARITY_SENTENCE,
    check_parity,
    parity_report,
    photo_inputs,
    sidecar,
    sidecar_path,
    tokenizer_for,
    vocab_text,
    write_json,
)
from rkd_jax.export.student import input_specs, load_student, make_serving_fn
from rkd_jax.files import temporary_path, write_bytes_atomic


def export(
    checkpoint: str | Path,
    out: str | Path,
    fmt: str = "onnx",
    quantize: str | None = None,
    batch: int | None = None,
    allow_teacher: bool = False,
    opset: int = DEFAULT_OPSET,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
    calibration_examples: int = DEFAULT_CALIBRATION_EXAMPLES,
    calibration_method: str = "minmax",
    quant_op_types: tuple[str, ...] = DEFAULT_QUANT_OPS,
    exclude_nodes: tuple[str, ...] = (),
    float_text_encoder: bool = True,
    eval_split: str | None = None,
    max_eval_examples: int = -1,
    latency_iters: int = 30,
    threads: int = 0,
    log: Callable[[str], None] = lambda s: None,
    overwrite: bool = False,
) -> dict:
    """Export the student of `checkpoint` to `out`; returns the sidecar written beside it.

    Writes `out`, `<out>.json` and `vocab.txt` in out's directory. With quantize='int8' (ONNX
    only) also `<stem>.int8.onnx` and its `.json`, and the returned dict has "int8": val
    metrics (flax, float ONNX, int8 ONNX) and batch-1 CPU latency of both ONNX files.

    Nothing is replaced unless `overwrite`: an existing file among those (a vocab.txt with other
    words included) raises ExportError before any work. The model is written under a temporary
    name and renamed to `out` only after its parity check against the Flax predict function
    passed (PARITY_MAX_PROB_DIFF, PARITY_MIN_MASK_IOU), so a failed export leaves the previous
    files as they were.
    """
    _check_request(fmt, quantize)
    if fmt == "params":  # the weights themselves, with their config and a model card
        from rkd_jax.export import params

        return params.export_params(
            checkpoint, out, batch, allow_teacher, overwrite, latency_iters, log
        )
    out = Path(out)
    _check_targets(out, fmt, quantize, overwrite)
    if fmt == "onnx":
        require("jax2onnx")
        require("onnxruntime")

    model, variables, meta, config = load_student(checkpoint, allow_teacher)
    size, max_tokens = int(meta["image_size"]), int(meta["max_tokens"])
    tokenize, tok, text_dir = tokenizer_for(meta["model"])
    vocab = vocab_text(tok, text_dir)
    vocab_file = out.parent / "vocab.txt"
    if vocab_file.exists() and not overwrite and vocab_file.read_bytes() != vocab:
        raise ExportError(
            f"--out {out}: {vocab_file} holds another vocabulary than this model's; pass "
            "--overwrite to replace it, or export into another directory (nothing was written)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)

    # The Flax reference on a real photo, to record the artifact's parity at export time.
    photo = photo_inputs(size, tokenize, max_tokens)
    if batch is not None and batch > 1:
        photo = tuple(np.repeat(x, batch, axis=0) for x in photo)
    # The reference is rkd_jax.evaluate's predict function (variables as arguments: XLA compiles
    # it far faster than a program with the weights folded in as constants).
    from rkd_jax.evaluate import make_predict_fn

    predict = make_predict_fn(model, float(config.run.threshold))
    ref = predict(variables, *photo)
    reference = (np.asarray(ref["prob"]), np.asarray(ref["margin"]))

    t0 = time.perf_counter()
    serve = make_serving_fn(model, variables)
    specs = input_specs(size, max_tokens, batch)
    parity = _write_checked_artifact(
        fmt, out, serve, specs, photo, reference, opset, platforms, threads
    )
    log(f"exported {out} ({fmt}) in {time.perf_counter() - t0:.1f}s")

    info = sidecar(fmt, out, meta, config, tok, batch)
    info["parity_at_export"] = parity
    info.update(_format_info(fmt, opset, platforms))
    write_bytes_atomic(vocab_file, vocab)
    write_json(sidecar_path(out), info)

    if quantize == "int8":
        info["int8"] = _write_int8(
            out,
            meta,
            config,
            tok,
            tokenize,
            lambda i, t, m: predict(variables, i, t, m)["margin"],
            photo,
            reference,
            batch,
            calibration_examples=calibration_examples,
            calibration_method=calibration_method,
            quant_op_types=quant_op_types,
            exclude_nodes=exclude_nodes,
            float_text_encoder=float_text_encoder,
            eval_split=eval_split,
            max_eval_examples=max_eval_examples,
            latency_iters=latency_iters,
            threads=threads,
            log=log,
        )
        write_json(sidecar_path(out), info)
    return info


def _check_request(fmt: str, quantize: str | None) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize {quantize!r}; expected int8")
    if quantize and fmt != "onnx":
        raise ExportError("--quantize int8 needs --format onnx (onnxruntime quantisation)")


def _check_targets(out: Path, fmt: str, quantize: str | None, overwrite: bool) -> None:
    """ExportError, before any work, when `out` is a directory or a file the export would write
    exists (unless `overwrite`)."""
    if out.is_dir():
        raise ExportError(f"--out {out}: is a directory; expected a file name like student.{fmt}")
    targets = [out, sidecar_path(out)]
    if quantize == "int8":
        targets += [int8_path(out), sidecar_path(int8_path(out))]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise ExportError(
            f"--out {out}: {', '.join(existing)} already exist(s); pass --overwrite to replace "
            "them, or choose another --out (nothing was written)"
        )


def _write_checked_artifact(
    fmt, out: Path, serve, specs, photo, reference, opset, platforms, threads
) -> dict:
    """Trace `serve` to a jax.export or ONNX file under a temporary name, run it on the photo,
    and rename it to `out` only when its parity with the Flax reference passes; returns the
    parity report."""
    ref_prob, ref_margin = reference
    tmp = temporary_path(out)
    try:
        if fmt == "jax":
            tmp.write_bytes(export_jax(serve, specs, platforms))
            got_prob, got_margin = (np.asarray(x) for x in load_jax(tmp)(*photo))
        else:
            proto = export_onnx(serve, specs, opset)
            import onnx

            onnx.save(proto, str(tmp))
            got_prob, got_margin = run_onnx(onnx_session(tmp, threads), *photo)
        parity = parity_report(
            got_prob, got_margin, ref_prob, ref_margin, f"skimage chelsea + {PARITY_SENTENCE!r}"
        )
        check_parity(parity, out)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return parity


def _format_info(fmt: str, opset: int, platforms: tuple[str, ...]) -> dict:
    """The sidecar's format-specific part: how to load a jax.export file, or the ONNX opset and
    the exporter's and runtime's versions."""
    if fmt == "jax":
        return {
            "jax": {
                "platforms": list(platforms),
                "load": "exp = jax.export.deserialize(bytearray(open(file, 'rb').read())); "
                "prob, margin = exp.call(image, tokens, token_mask)",
            }
        }
    import onnxruntime as ort

    return {
        "onnx": {
            "opset": int(opset),
            "exporter": f"jax2onnx {jax2onnx_version()}",
            "onnxruntime": ort.__version__,
        }
    }


def _write_int8(
    out: Path,
    meta,
    config,
    tok,
    tokenize,
    margin_fn,
    photo,
    reference,
    batch,
    *,
    calibration_examples,
    calibration_method,
    quant_op_types,
    exclude_nodes,
    float_text_encoder,
    eval_split,
    max_eval_examples,
    latency_iters,
    threads,
    log,
) -> dict:
    """Quantise the float ONNX file `out` to `<stem>.int8.onnx` on training images, compare
    the two (val metrics, latency) and write the int8 file's sidecar; returns its report."""
    qpath = int8_path(out)
    feed = batch or min(16, int(config.train.batch_size))
    reader = TrainingImages(config, tokenize, calibration_examples, feed, int(config.seed))
    t0 = time.perf_counter()
    qtmp = temporary_path(qpath)
    try:
        qinfo = quantize_int8(
            out,
            qtmp,
            reader,
            quant_op_types,
            exclude_nodes,
            calibration_method,
            float_text_encoder,
        )
        qinfo.update(
            compare_int8(
                out,
                qtmp,
                margin_fn,
                config,
                tokenize,
                photo,
                reference,
                batch,
                eval_split,
                max_eval_examples,
                latency_iters,
                threads,
                log,
            ),
            file=qpath.name,
        )
        qtmp.replace(qpath)
    finally:
        qtmp.unlink(missing_ok=True)
    log(
        f"quantised {qpath} on {reader.seen} training examples ({reader.split} split) in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    qside = sidecar("onnx", qpath, meta, config, tok, batch)
    qside["quantization"] = qinfo
    write_json(sidecar_path(qpath), qside)
    return qinfo
