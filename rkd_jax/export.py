"""Export a trained student for deployment: ONNX (onnxruntime) or serialized JAX (jax.export).

    python -m rkd_jax.export --checkpoint runs/default --format onnx --out export/student.onnx
    python -m rkd_jax.export --checkpoint runs/default --format jax --out export/student.jax
    python -m rkd_jax.export --checkpoint runs/default --format onnx --quantize int8 \\
        --out export/student.onnx        # also writes export/student.int8.onnx
    python -m rkd_jax.export --checkpoint runs/default --format params \\
        --out export/student.safetensors # the weights, config, model card: rkd_jax.export_params

The exported function (batch B dynamic unless --batch fixes it, S = image size, L = max tokens):
  inputs   image float32 [B, S, S, 3]: RGB squashed to S x S, pixels / 255 in [0, 1]; the
             backbone's mean/std normalisation is inside the graph (do not apply it yourself);
           tokens int32 [B, L]: [CLS] word pieces [SEP] [PAD]... (BERT uncased WordPiece);
           token_mask int32 [B, L]: 1 on [CLS]..[SEP], 0 on padding;
  outputs  prob float32 [B, S, S]: foreground probability at the input resolution;
           margin float32 [B, S/4, S/4]: foreground minus background logit at stride 4, for
             resizing to the original image size (threshold it at logit(threshold)).
The model's variables are constants of the exported graph. Beside the model go `vocab.txt` and
`<file>.json` (sizes, tokenisation, normalisation constants, threshold, names and shapes), so
a user of the file needs neither rkd_jax nor the checkpoint.

The ONNX path traces the model to a jaxpr first and hands jax2onnx a replay of its lax
primitives, so jax2onnx's patches of Flax layers never see our modules. Max pools over NHWC
are replayed as 3-D pools over [1, 1, B*C, H, W] (onnxruntime's CPU MaxPool runs 1- to 3-D
windows only), and the Einsum nodes jax2onnx writes for Dense layers on [B, N, C] inputs become
MatMul nodes (the same product, broadcast over the leading axes), which onnxruntime's int8
quantiser handles and leaves nothing in float.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rkd_jax import cli
from rkd_jax.models.layers import native_depthwise

FORMATS = ("onnx", "jax", "params")  # params: rkd_jax.export_params
INPUT_NAMES = ("image", "tokens", "token_mask")
OUTPUT_NAMES = ("prob", "margin")
DEFAULT_OPSET = 23
DEFAULT_CALIBRATION_EXAMPLES = 256
# One artifact for CPU and NVIDIA GPU hosts: both lowerings share the constants (same file size).
DEFAULT_PLATFORMS = ("cpu", "cuda")
# Weight-bearing ops are quantised (W8A8) outside the text encoder; everything between them
# stays float. docs/export.md has what quantising more (the text encoder: -2.5 mIoU points;
# every op type onnxruntime can: -10.4) cost on the embedded val split.
DEFAULT_QUANT_OPS = ("Conv", "MatMul", "Gemm")
# ORT's quantised MatMul/Gemm on x86 runs u8 activations x s8 weights (its "U8S8" fast path).
PARITY_SENTENCE = "the cat on the left"


class ExportError(ValueError):
    """A checkpoint or model that cannot be exported as asked, with what to do instead."""


# ---------------------------------------------------------------------------------------------
# Loading the student and the function to export


def load_student(checkpoint: str | Path, allow_teacher: bool = False):
    """(model, variables, meta, config) of a run's student, float32, variables on the host.

    `checkpoint` is a run directory, its checkpoints/ directory or one checkpoints/<step>/.
    A teacher checkpoint raises ExportError unless `allow_teacher`.
    """
    from rkd_jax import checkpoint as ckpt_lib

    # The role is in the small meta item: refuse a teacher before reading its weights.
    directory, step = ckpt_lib.find_checkpoint(checkpoint)
    reader = ckpt_lib.Checkpointer(directory, read_only=True)
    try:
        saved_meta = reader.read_meta(step)
    finally:
        reader.close()
    role = saved_meta.get("role")
    where = f"{directory}/{step}"
    if role != "student" and not allow_teacher:
        raise ExportError(
            f"{where}: this checkpoint holds the {role or 'unknown-role'} model (meta role "
            f"{role!r}); export the student: pass the distillation or student run directory (not "
            "its teacher/ subdirectory), or add --allow-teacher to export it anyway"
        )
    missing = [k for k in ("model", "image_size", "max_tokens") if k not in saved_meta]
    if missing:
        raise ExportError(
            f"{where}/meta/metadata: lacks {', '.join(map(repr, missing))}; cannot rebuild the "
            "model (is this an rkd_jax checkpoint?)"
        )
    model, variables, config, meta, _, _ = ckpt_lib.load_model(where, dtype=jnp.float32)
    # Host numpy arrays: they become constants of the exported graph, on no particular device.
    variables = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), variables)
    return model, variables, meta, config


def make_serving_fn(model, variables) -> Callable:
    """(image [B,S,S,3], tokens [B,L], token_mask [B,L]) -> (prob [B,S,S], margin [B,S/4,S/4]).

    The same computation as rkd_jax.evaluate.make_predict_fn, with the variables closed over.
    """

    def serve(image, tokens, token_mask):
        out = model.apply(variables, image, tokens, token_mask, train=False)
        logits = out["logits"].astype(jnp.float32)
        margin = logits[..., 1] - logits[..., 0]
        size = (image.shape[0], image.shape[1], image.shape[2])
        prob = jax.nn.sigmoid(jax.image.resize(margin, size, "bilinear", antialias=False))
        return prob, margin

    return serve


def input_specs(image_size: int, max_tokens: int, batch: int | None = None) -> list:
    """ShapeDtypeStructs of the three inputs; batch None = symbolic dimension 'B'."""
    if batch is None:
        (b,) = jax.export.symbolic_shape("B")
    else:
        if batch < 1:
            raise ExportError(f"--batch {batch}: expected a positive batch size (or omit it)")
        b = int(batch)
    return [
        jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.float32),
        jax.ShapeDtypeStruct((b, max_tokens), jnp.int32),
        jax.ShapeDtypeStruct((b, max_tokens), jnp.int32),
    ]


# ---------------------------------------------------------------------------------------------
# jax.export


def export_jax(fn: Callable, specs: list, platforms: tuple[str, ...] = DEFAULT_PLATFORMS) -> bytes:
    """Serialized jax.export artifact of `fn` (StableHLO with the variables as constants)."""
    try:
        with native_depthwise():  # a portable program: no CPU-specific depthwise taps
            exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*specs)
    except Exception as e:  # lowering errors come as several unrelated types
        raise ExportError(
            f"jax.export failed for platforms {','.join(platforms)} ({type(e).__name__}: "
            f"{_first_line(e)}); try --platforms cpu or a fixed --batch"
        ) from e
    return bytes(exported.serialize())


def load_jax(path: str | Path) -> Callable:
    """The deserialized artifact's `call`: (image, tokens, token_mask) -> (prob, margin).

    Plain JAX needs only this: `jax.export.deserialize(bytearray(open(p, 'rb').read())).call`.
    """
    return jax.export.deserialize(bytearray(Path(path).read_bytes())).call


# ---------------------------------------------------------------------------------------------
# ONNX (jax2onnx)


def _is_nhwc_pool(eqn) -> bool:
    p = eqn.params
    w, s, pad = p["window_dimensions"], p["window_strides"], p["padding"]
    return (
        len(w) == 4
        and w[0] == w[3] == 1
        and s[0] == s[3] == 1
        and tuple(pad[0]) == tuple(pad[3]) == (0, 0)
        and all(d == 1 for d in p["base_dilation"])
        and all(d == 1 for d in p["window_dilation"])
    )


def _nhwc_pool_as_3d(x, params):
    """reduce_window_max over H, W of [N, H, W, C] as a 3-D window over [N*C, H, W]."""
    n, h, w, c = x.shape
    (_, kh, kw, _), (_, sh, sw, _) = params["window_dimensions"], params["window_strides"]
    pad = params["padding"]
    y = jnp.transpose(x, (0, 3, 1, 2)).reshape(n * c, h, w)
    y = jax.lax.reduce_window_max_p.bind(
        y,
        window_dimensions=(1, kh, kw),
        window_strides=(1, sh, sw),
        padding=((0, 0), tuple(pad[1]), tuple(pad[2])),
        base_dilation=(1, 1, 1),
        window_dilation=(1, 1, 1),
    )
    return jnp.transpose(y.reshape(n, c, y.shape[1], y.shape[2]), (0, 2, 3, 1))


def _dense_einsum_to_matmul(model) -> int:
    """Rewrite Einsum('<lead>c,cd-><lead>d', x, W) with W an initializer as MatMul(x, W), in
    place; returns how many nodes changed."""
    weights = {i.name: len(i.dims) for i in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Einsum" or weights.get(node.input[1]) != 2:
            continue
        eq = next(a.s.decode() for a in node.attribute if a.name == "equation").replace(" ", "")
        lhs, _, out = eq.partition("->")
        x, _, w = lhs.partition(",")
        if len(w) == 2 and x[-1] == w[0] and out == x[:-1] + w[1] and w[1] not in x:
            node.op_type = "MatMul"
            del node.attribute[:]
            changed += 1
    return changed


def _replay(jaxpr, consts, args) -> list:
    """Evaluate a jaxpr primitive by primitive, inlining jit and custom_jvp calls."""
    from jax.extend.core import DropVar, Literal

    env: dict = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in ("jit", "pjit"):
            inner = eqn.params["jaxpr"]
            outs = _replay(inner.jaxpr, inner.consts, invals)
        elif name == "custom_jvp_call":
            # Inference needs the primal only; inlining keeps the graph free of call nodes.
            inner = eqn.params["call_jaxpr"]
            outs = _replay(inner.jaxpr, inner.consts, invals)
        elif name == "reduce_window_max" and _is_nhwc_pool(eqn):
            outs = [_nhwc_pool_as_3d(invals[0], eqn.params)]
        else:
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
                subfuns, bind_params = bind_params
                invals = [*subfuns, *invals]
            outs = eqn.primitive.bind(*invals, **bind_params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _primitives(jaxpr, out: set | None = None) -> set:
    """Names of the primitives the replayed (inlined) jaxpr binds."""
    out = set() if out is None else out
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("jit", "pjit"):
            _primitives(eqn.params["jaxpr"].jaxpr, out)
        elif name == "custom_jvp_call":
            _primitives(eqn.params["call_jaxpr"].jaxpr, out)
        else:
            out.add(name)
    return out


def _jax2onnx_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("jax2onnx")
    except md.PackageNotFoundError:
        return "?"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"--format onnx needs {module}: pip install 'rkd_jax[export]' (jax2onnx, onnx, "
            "onnxruntime), or use --format jax"
        ) from None


def export_onnx(fn: Callable, specs: list, opset: int = DEFAULT_OPSET, model_name: str = "student"):
    """ONNX ModelProto of `fn` via jax2onnx; an operator it cannot convert -> ExportError."""
    jax2onnx = _require("jax2onnx")
    from jax2onnx.plugins import plugin_system

    with native_depthwise():  # ONNX runtimes have depthwise Conv kernels
        closed = jax.make_jaxpr(fn)(*specs)
    _load_lax_plugins(plugin_system)
    missing = sorted(p for p in _primitives(closed.jaxpr) if p not in plugin_system.PLUGIN_REGISTRY)
    if missing:
        raise ExportError(_operator_message(missing))

    def replay(*args):
        return tuple(_replay(closed.jaxpr, closed.consts, args))

    import logging

    # onnx_ir warns once per shape-only helper constant it leaves untyped: noise for users.
    ir_log = logging.getLogger("onnx_ir")
    level = ir_log.level
    ir_log.setLevel(logging.ERROR)
    try:
        proto = jax2onnx.to_onnx(
            replay,
            specs,
            model_name=model_name,
            opset=opset,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
        )
    except Exception as e:  # jax2onnx's lowerings raise NotImplementedError, ValueError, ...
        found = re.search(r"primitive '([^']+)'", str(e))
        if found:
            raise ExportError(_operator_message([found.group(1)])) from e
        raise ExportError(
            f"jax2onnx {_jax2onnx_version()} failed to convert the model ({type(e).__name__}: "
            f"{_first_line(e)}); use --format jax (serialized StableHLO) instead"
        ) from e
    finally:
        ir_log.setLevel(level)
    _dense_einsum_to_matmul(proto)
    return proto


def _load_lax_plugins(plugin_system) -> None:
    """Register jax2onnx's plugins for JAX primitives only.

    The replayed jaxpr binds lax primitives and nothing else, so the Flax, Equinox, dm-pix and
    example plugins are never used; importing all ~500 plugin modules costs ~30 s of the export
    on a 2-core machine, the JAX ones ~3 s. Where the flag that skips the full import is
    missing (another jax2onnx version), to_onnx imports everything itself: slower, same graph.
    """
    import importlib
    import pkgutil

    import jax2onnx.plugins.jax as jax_plugins

    if getattr(plugin_system, "_already_imported_plugins", False):
        return
    for mod in pkgutil.walk_packages(jax_plugins.__path__, prefix=f"{jax_plugins.__name__}."):
        # A plugin module that fails to import (an optional dependency) is one we cannot need.
        try:
            importlib.import_module(mod.name)
        except Exception:
            continue
    if hasattr(plugin_system, "_already_imported_plugins"):
        plugin_system._already_imported_plugins = True


def _operator_message(names: list[str]) -> str:
    ops = ", ".join(repr(n) for n in names)
    return (
        f"ONNX export: jax2onnx {_jax2onnx_version()} cannot convert the JAX operator(s) {ops}; "
        "use --format jax (serialized StableHLO runs every JAX operator)"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def onnx_session(model: str | Path | bytes, threads: int = 0):
    """onnxruntime CPU session (`threads` 0 = onnxruntime's default); load errors -> ExportError."""
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: shape-merge notes are not the user's problem
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(_ort_message(e)) from e


def run_onnx(session, image, tokens, token_mask) -> tuple[np.ndarray, np.ndarray]:
    """(prob, margin) of an onnxruntime session; runtime errors -> ExportError."""
    feed = {
        "image": np.asarray(image, np.float32),
        "tokens": np.asarray(tokens, np.int32),
        "token_mask": np.asarray(token_mask, np.int32),
    }
    try:
        prob, margin = session.run(list(OUTPUT_NAMES), feed)
    except Exception as e:
        raise ExportError(_ort_message(e)) from e
    return prob, margin


def _ort_message(e: BaseException) -> str:
    import onnxruntime as ort

    text = str(e)
    node = re.search(r"running (\w+) node", text) or re.search(r"op_type[=:]\s*'?(\w+)", text)
    what = f"the ONNX operator {node.group(1)!r}" if node else "the exported graph"
    return (
        f"onnxruntime {ort.__version__} cannot run {what} ({_first_line(e)}); use --format jax "
        "(serialized StableHLO) instead"
    )


# ---------------------------------------------------------------------------------------------
# Inputs: real images, the tokenizer and the sidecar


def tokenizer_for(model_cfg):
    """(tokenize(texts, max_len) -> (ids, mask), HF tokenizer, text encoder directory)."""
    import functools

    from rkd_jax.data.tokenizer import load_tokenizer, tokenize
    from rkd_jax.pretrained import resolve_text_encoder_dir

    directory = resolve_text_encoder_dir(model_cfg["text_encoder_dir"])
    tok = load_tokenizer(directory)
    return functools.partial(tokenize, tok), tok, directory


def photo_inputs(image_size: int, tokenize, max_tokens: int, sentence: str = PARITY_SENTENCE):
    """A real photo (skimage's chelsea) squashed like the pipeline + one expression, batch 1."""
    from PIL import Image
    from skimage import data

    rgb = Image.fromarray(data.chelsea()).resize((image_size, image_size), Image.BILINEAR)
    image = np.asarray(rgb, np.float32)[None] * np.float32(1 / 255)
    ids, mask = tokenize([sentence], max_tokens)
    return image, np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def backbone_normalisation(backbone: str) -> tuple[list[float], list[float]]:
    """(mean, std) the backbone applies inside the model to [0, 1] pixels."""
    from rkd_jax.models.layers import input_normalisation

    mean, std = input_normalisation(backbone)
    return list(mean), list(std)


def vocab_text(tok, text_dir: Path) -> bytes:
    """The vocab.txt that goes beside the model: the text encoder's own file, else the
    tokenizer's vocabulary one word piece a line, in id order."""
    source = Path(text_dir) / "vocab.txt"
    if source.is_file():
        return source.read_bytes()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return "".join(f"{w}\n" for w, _ in vocab).encode("utf-8")


def write_vocab(tok, text_dir: Path, out_dir: Path) -> Path:
    """Write vocab.txt (`vocab_text`) into out_dir, atomically."""
    target = out_dir / "vocab.txt"
    write_bytes_atomic(target, vocab_text(tok, text_dir))
    return target


def sidecar_path(path: Path) -> Path:
    """student.onnx -> student.onnx.json"""
    return path.with_name(path.name + ".json")


def _temporary(path: Path) -> Path:
    """A hidden name beside `path` (same file system: the final rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = _temporary(path)
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# A correct export differs from the Flax function by float reordering only (measured: 8e-7 for
# ONNX, 3e-7 for jax.export, docs/export.md); a thousand times that is a broken graph, not rounding.
PARITY_MAX_PROB_DIFF = 1e-3
PARITY_MIN_MASK_IOU = 0.99


def check_parity(parity: dict, out: Path) -> None:
    """ExportError unless the exported model reproduces the Flax predict function."""
    if (
        not parity["max_abs_prob_diff"] <= PARITY_MAX_PROB_DIFF
        or not parity["mask_iou"] >= PARITY_MIN_MASK_IOU
    ):
        raise ExportError(
            f"--out {out}: the exported model fails the parity check against the Flax predict "
            f"function (max |prob diff| {parity['max_abs_prob_diff']:.3g}, expected <= "
            f"{PARITY_MAX_PROB_DIFF:g}; mask IoU {parity['mask_iou']:.4f}, expected >= "
            f"{PARITY_MIN_MASK_IOU:g}); nothing was written: try --format jax"
        )


def sidecar(fmt: str, out: Path, meta: dict, config, tok, batch: int | None) -> dict:
    """Everything a user of the exported file needs to feed it and read its outputs."""
    size, max_tokens = int(meta["image_size"]), int(meta["max_tokens"])
    b = "B" if batch is None else int(batch)
    mean, std = backbone_normalisation(meta["model"]["backbone"])
    threshold = float(config.run.threshold) if "run" in config else 0.5
    lower = bool(getattr(tok, "do_lower_case", True))
    return {
        "format": fmt,
        "file": out.name,
        "role": meta.get("role"),
        "checkpoint": f"{meta.get('directory')}/{meta.get('step')}",
        "model": meta.get("model"),
        "val_metrics_at_selection": meta.get("metrics", {}),
        "batch": "dynamic" if batch is None else int(batch),
        "inputs": [
            {
                "name": "image",
                "shape": [b, size, size, 3],
                "dtype": "float32",
                "layout": "NHWC, RGB",
            },
            {"name": "tokens", "shape": [b, max_tokens], "dtype": "int32"},
            {"name": "token_mask", "shape": [b, max_tokens], "dtype": "int32"},
        ],
        "outputs": [
            {
                "name": "prob",
                "shape": [b, size, size],
                "dtype": "float32",
                "meaning": "foreground probability at the input resolution",
            },
            {
                "name": "margin",
                "shape": [b, size // 4, size // 4],
                "dtype": "float32",
                "meaning": "foreground minus background logit at stride 4",
            },
        ],
        "image": {
            "image_size": size,
            "resize": "squash the whole RGB image to image_size x image_size (bilinear), "
            "aspect ratio not kept",
            "scale": "pixel / 255, float32 in [0, 1]",
            "mean": mean,
            "std": std,
            "normalisation": "(x - mean) / std is applied INSIDE the exported graph: feed the "
            "[0, 1] image, do not normalise it yourself",
        },
        "text": {
            "vocab": "vocab.txt",
            "tokenizer": "BERT WordPiece with this vocab.txt, e.g. "
            "tokenizers.BertWordPieceTokenizer("
            "'vocab.txt', lowercase=lower_case) with enable_truncation(max_length=max_tokens) and "
            "enable_padding(length=max_tokens, pad_id=pad_id): ids -> tokens, attention_mask -> "
            "token_mask",
            "lower_case": lower,
            "max_tokens": max_tokens,
            "format": "[CLS] word pieces [SEP], the pieces cut to max_tokens - 2, then [PAD] up "
            "to max_tokens; token_mask 1 on [CLS] .. [SEP], 0 on padding",
            "cls_id": int(tok.cls_token_id),
            "sep_id": int(tok.sep_token_id),
            "pad_id": int(tok.pad_token_id),
            "unk_id": int(tok.unk_token_id),
        },
        "threshold": threshold,
        "postprocess": "mask = prob >= threshold at image_size; for the original H x W resize "
        "margin bilinearly (half-pixel centres, edge clamp) to H x W and keep margin >= "
        "log(threshold / (1 - threshold))",
    }


def write_json(path: Path, payload: dict) -> None:
    write_bytes_atomic(path, json.dumps(payload, indent=2, default=_json_default).encode())


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "to_dict"):
        return x.to_dict()
    return str(x)


# ---------------------------------------------------------------------------------------------
# Evaluation, latency, int8


def margin_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of the masks margin_a >= 0 and margin_b >= 0 (1.0 when both are empty)."""
    ma, mb = np.asarray(a) >= 0, np.asarray(b) >= 0
    union = np.count_nonzero(ma | mb)
    return 1.0 if union == 0 else float(np.count_nonzero(ma & mb) / union)


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
    _require("onnxruntime")
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


# ---------------------------------------------------------------------------------------------
# The whole export


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
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize {quantize!r}; expected int8")
    if quantize and fmt != "onnx":
        raise ExportError("--quantize int8 needs --format onnx (onnxruntime quantisation)")
    if fmt == "params":  # the weights themselves, with their config and a model card
        from rkd_jax import export_params

        return export_params.export_params(
            checkpoint, out, batch, allow_teacher, overwrite, latency_iters, log
        )
    out = Path(out)
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
    if fmt == "onnx":
        _require("jax2onnx")
        _require("onnxruntime")

    model, variables, meta, config = load_student(checkpoint, allow_teacher)
    size, max_tokens = int(meta["image_size"]), int(meta["max_tokens"])
    serve = make_serving_fn(model, variables)
    specs = input_specs(size, max_tokens, batch)
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
    ref_prob, ref_margin = np.asarray(ref["prob"]), np.asarray(ref["margin"])

    t0 = time.perf_counter()
    tmp = _temporary(out)
    try:
        if fmt == "jax":
            tmp.write_bytes(export_jax(serve, specs, platforms))
            got_prob, got_margin = (np.asarray(x) for x in load_jax(tmp)(*photo))
        else:
            proto = export_onnx(serve, specs, opset)
            import onnx

            onnx.save(proto, str(tmp))
            got_prob, got_margin = run_onnx(onnx_session(tmp, threads), *photo)
        parity = _parity(
            got_prob, got_margin, ref_prob, ref_margin, f"skimage chelsea + {PARITY_SENTENCE!r}"
        )
        check_parity(parity, out)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    log(f"exported {out} ({fmt}) in {seconds:.1f}s")

    info = sidecar(fmt, out, meta, config, tok, batch)
    info["parity_at_export"] = parity
    if fmt == "jax":
        info["jax"] = {
            "platforms": list(platforms),
            "load": "exp = jax.export.deserialize(bytearray(open(file, 'rb').read())); "
            "prob, margin = exp.call(image, tokens, token_mask)",
        }
    else:
        import onnxruntime as ort

        info["onnx"] = {
            "opset": int(opset),
            "exporter": f"jax2onnx {_jax2onnx_version()}",
            "onnxruntime": ort.__version__,
        }
    write_bytes_atomic(vocab_file, vocab)
    write_json(sidecar_path(out), info)

    if quantize == "int8":
        qpath = int8_path(out)
        feed = batch or min(16, int(config.train.batch_size))
        reader = TrainingImages(config, tokenize, calibration_examples, feed, int(config.seed))
        t0 = time.perf_counter()
        qtmp = _temporary(qpath)
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
                    lambda i, t, m: predict(variables, i, t, m)["margin"],
                    config,
                    tokenize,
                    photo,
                    (ref_prob, ref_margin),
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
        info["int8"] = qinfo
        write_json(sidecar_path(out), info)
    return info


def _parity(prob, margin, ref_prob, ref_margin, what: str) -> dict:
    return {
        "inputs": what,
        "max_abs_prob_diff": float(np.max(np.abs(prob - ref_prob))),
        "max_abs_margin_diff": float(np.max(np.abs(margin - ref_margin))),
        "mask_iou": margin_iou(prob - 0.5, ref_prob - 0.5),
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
    parity = _parity(q_prob, q_margin, *reference, f"skimage chelsea + {PARITY_SENTENCE!r}")
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


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m rkd_jax.export",
        description="Export a trained student to ONNX, a serialized JAX (jax.export) artifact "
        "or its weights (safetensors) with a model card (--format params).",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory (the student's), checkpoints/ or checkpoints/<step>/",
    )
    p.add_argument("--format", choices=FORMATS, default="onnx", dest="fmt")
    p.add_argument(
        "--out", required=True, help="output file (student.onnx, student.jax, student.safetensors)"
    )
    p.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="also write <stem>.int8.onnx (static QDQ, calibrated on training images)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="fixed batch size (default: dynamic batch dimension)",
    )
    p.add_argument(
        "--allow-teacher",
        action="store_true",
        help="export a teacher checkpoint too (default: students only)",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument(
        "--platforms",
        default=",".join(DEFAULT_PLATFORMS),
        help="jax.export lowering platforms, comma separated (cpu, cuda, rocm, tpu)",
    )
    p.add_argument("--calibration-examples", type=int, default=DEFAULT_CALIBRATION_EXAMPLES)
    p.add_argument(
        "--calibration-method", default="minmax", choices=("minmax", "percentile", "entropy")
    )
    p.add_argument(
        "--quant-op-types",
        default=",".join(DEFAULT_QUANT_OPS),
        help="ONNX op types to quantise, comma separated ('' = onnxruntime's default)",
    )
    p.add_argument(
        "--exclude-nodes", default="", help="ONNX node names kept in float, comma separated"
    )
    p.add_argument(
        "--quantize-text-encoder",
        action="store_true",
        help="quantise the text encoder too (default: kept in float; quantised it cost 2.5 "
        "mIoU points on the embedded val split, see docs/export.md)",
    )
    p.add_argument("--eval-split", default=None, help="split for the int8 report (default: val)")
    p.add_argument("--max-eval-examples", type=int, default=-1)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing files at --out (the model, its .json, vocab.txt, the int8 files)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command; bad input: one `error:` line on stderr, exit code 2."""
    return cli.run(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    info = export(
        args.checkpoint,
        args.out,
        args.fmt,
        quantize=args.quantize,
        batch=args.batch,
        allow_teacher=args.allow_teacher,
        opset=args.opset,
        platforms=tuple(p for p in args.platforms.split(",") if p),
        calibration_examples=args.calibration_examples,
        calibration_method=args.calibration_method,
        quant_op_types=tuple(t for t in args.quant_op_types.split(",") if t),
        exclude_nodes=tuple(n for n in args.exclude_nodes.split(",") if n),
        float_text_encoder=not args.quantize_text_encoder,
        eval_split=args.eval_split,
        max_eval_examples=args.max_eval_examples,
        threads=args.threads,
        log=say,
        overwrite=args.overwrite,
    )
    par = info["parity_at_export"]
    print(
        f"{args.out}: {info['format']}, batch {info['batch']}, max |prob - flax| "
        f"{par['max_abs_prob_diff']:.2e}, mask IoU vs flax {par['mask_iou']:.4f}"
    )
    if "int8" in info:
        q = info["int8"]
        print(f"{'model':12s} {'mIoU':>8s} {'oIoU':>8s} {'median ms':>10s} {'p90 ms':>8s}")
        for k in ("flax", "onnx_float", "onnx_int8"):
            m = q["metrics"][k]["network"]
            lat = q["latency"].get(k)
            lat_s = f"{lat['median_ms']:10.2f} {lat['p90_ms']:8.2f}" if lat else f"{'':>19s}"
            print(f"{k:12s} {m['mIoU']:8.4f} {m['oIoU']:8.4f} {lat_s}")
        print(
            f"int8 mIoU loss: {q['mIoU_loss_points']:.2f} points ({q['split']}, "
            f"{q['metrics']['onnx_int8']['network']['num_sentences']} sentences)"
        )
    return 0


if __name__ == "__main__":
    from rkd_jax import platform

    platform.configure_cpu_flags()
    sys.exit(main())
