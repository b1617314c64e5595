"""The ONNX artifact (jax2onnx) and running it with onnxruntime.

The ONNX path traces the model to a jaxpr first and hands jax2onnx a replay of its lax
primitives, so jax2onnx's patches of Flax layers never see our modules. Max pools over NHWC
are replayed as 3-D pools over [1, 1, B*C, H, W] (onnxruntime's CPU MaxPool runs 1- to 3-D
windows only), and the Einsum nodes jax2onnx writes for Dense layers on [B, N, C] inputs become
MatMul nodes (the same product, broadcast over the leading axes), which onnxruntime's int8
quantiser handles and leaves nothing in float.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rkd_jax.export.common import INPUT_NAMES, OUTPUT_NAMES, ExportError, first_line, require
from rkd_jax.models.layers import native_depthwise

DEFAULT_OPSET = 23


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


def jax2onnx_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("jax2onnx")
    except md.PackageNotFoundError:
        return "?"


def export_onnx(fn: Callable, specs: list, opset: int = DEFAULT_OPSET, model_name: str = "student"):
    """ONNX ModelProto of `fn` via jax2onnx; an operator it cannot convert -> ExportError."""
    jax2onnx = require("jax2onnx")
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
            f"jax2onnx {jax2onnx_version()} failed to convert the model ({type(e).__name__}: "
            f"{first_line(e)}); use --format jax (serialized StableHLO) instead"
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
        f"ONNX export: jax2onnx {jax2onnx_version()} cannot convert the JAX operator(s) {ops}; "
        "use --format jax (serialized StableHLO runs every JAX operator)"
    )


def onnx_session(model: str | Path | bytes, threads: int = 0):
    """onnxruntime CPU session (`threads` 0 = onnxruntime's default); load errors -> ExportError."""
    ort = require("onnxruntime")
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
        f"onnxruntime {ort.__version__} cannot run {what} ({first_line(e)}); use --format jax "
        "(serialized StableHLO) instead"
    )
