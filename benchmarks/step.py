"""Speed of rkd_jax's distillation step and student inference, side by side with the PyTorch peer.

On whatever backend JAX has (CPU here, GPU where available), for a config of configs/distill.py:
- distill: the real train step (`rkd_jax.steps.make_train_step`, mode "distill") on random
  batches of the config's shapes: frozen teacher forward (BatchNorm folded, `rkd_jax.models.fold`) +
  student forward/backward + AdamW, in images/s;
- infer: the student's predict function (`rkd_jax.evaluate.make_predict_fn`, folded), images/s;
- latency: batch-1 predict, median / p90 / mean over `--latency-runs` calls;
with compile time apart (trace + lower + compile), warm-up excluded, the step's FLOPs from XLA's
cost analysis and, counted the way torch's FlopCounterMode counts (2 per multiply-add of
matmuls and convolutions, forward and backward), from the traced program.

Configs: `tiny` and `mini` (= configs/distill.py's tiny and default variants: frozen MiniLM
text features from a table, as training uses them) and `paper` (384x384, 20 tokens, ResNet-101 +
12-layer BERT-base teacher, ResNet-18 + 4-layer BERT student, text encoders inside the step;
random weights, which cost the same as trained ones).

`--peer` runs torch_peer.py, the team's PyTorch peer script kept outside this repository (the
same step written the PyTorch way; paper config only; pass its path with --peer-script PATH,
default shared/bench/torch_peer.py in or beside the checkout; docs/speed.md), in the same
invocation at the same batch sizes, in its own virtualenv that this script creates on first use
(benchmarks/.peer-venv: torch==2.13.0, torchvision==0.28.0 --no-deps, transformers), never in
the project's environment; on a GPU machine `--peer-python python3` runs it with that machine's
own CUDA torch instead. It prints one table with the JAX/PyTorch ratio per row and, as its last
line, `jax/pytorch min ratio: X.XX (<row>)` over the throughput rows. Results:
benchmarks/results/<backend>-<date>.json (or --out).

    python benchmarks/step.py --config paper --batch 2 8 --peer
    python benchmarks/step.py --config mini --batch 16 64
    python benchmarks/step.py --smoke --out /tmp/smoke.json     # tiny, 2 steps (the test suite)

On CPU the YNNPACK-off XLA flag (rkd_jax.platform) is set before JAX initialises, when the
running jaxlib knows it; `--keep-ynn` keeps XLA's default, `--no-fold` runs the unfolded
teacher/student, `--xla-flags` adds flags: the switches docs/speed.md compares.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform as host_platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run from a checkout without installing: the repository root holds the rkd_jax package.
sys.path.insert(0, str(ROOT))

CONFIGS = {"tiny": "tiny", "mini": "", "paper": "paper"}
# docs/miniature.md (the FLOP convention): one distillation step at 384x384 and 20 tokens is
# 184 GFLOP of useful work per image (teacher forward 75.5, student forward 34.7, student
# backward ~2x that), the numerator of the model-FLOPs-utilisation figures of both
# implementations.
PAPER_GFLOP_PER_IMAGE = 184.0
PEER_VENV = ROOT / "benchmarks" / ".peer-venv"
PEER_PACKAGES = (
    ("torch==2.13.0",),
    # --no-deps: its CUDA-linked requirements; it imports PIL itself (datasets), so pillow.
    ("--no-deps", "torchvision==0.28.0"),
    ("pillow", "transformers"),
)
PEER_MARKER = "rkd_peer_ready_v2.json"  # bump when PEER_PACKAGES changes
PEER_VERSIONS = """
import importlib.metadata as m, json
def version(p):
    try:
        return m.version(p)
    except m.PackageNotFoundError:
        return None
print(json.dumps({p: version(p) for p in ("torch", "torchvision", "transformers")}))
"""
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes (default: paper 2 8, mini 16 64, tiny 8)",
    )
    p.add_argument("--steps", type=int, default=3, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    p.add_argument("--latency-runs", type=int, default=30, help="batch-1 calls timed one by one")
    p.add_argument(
        "--only",
        nargs="+",
        choices=("distill", "infer", "latency"),
        default=("distill", "infer", "latency"),
        help="measure only these",
    )
    p.add_argument(
        "--peer",
        action="store_true",
        help="run torch_peer.py too: the team's PyTorch peer script, outside this repository "
        "(give its path with --peer-script)",
    )
    p.add_argument(
        "--peer-python",
        default="",
        help="run the peer with this interpreter as it is (e.g. a GPU machine's CUDA torch) "
        "instead of the CPU virtualenv --peer-venv",
    )
    p.add_argument(
        "--peer-script",
        default="",
        help="path to torch_peer.py, the team's PyTorch peer script kept outside this repository "
        "(default: shared/bench/torch_peer.py in or beside the checkout; docs/speed.md)",
    )
    p.add_argument(
        "--peer-compile",
        type=int,
        choices=(0, 1),
        default=1,
        help="the peer's --compile (torch.compile; its default)",
    )
    p.add_argument("--peer-steps", type=int, default=None, help="the peer's --steps (= --steps)")
    p.add_argument("--peer-venv", default=str(PEER_VENV))
    p.add_argument("--no-fold", action="store_true", help="unfolded BatchNorm (before/after)")
    p.add_argument("--keep-ynn", action="store_true", help="keep XLA's YNNPACK convolutions")
    p.add_argument("--xla-flags", default="", help="extra XLA flags, appended to XLA_FLAGS")
    p.add_argument(
        "--profile",
        action="store_true",
        help="op census of the distill step at the first batch size (slow)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny config, batch 8, 2 steps, 3 latency runs, no peer (test suite)",
    )
    p.add_argument("--out", default="", help="results JSON (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.steps, args.warmup, args.latency_runs = "tiny", 2, 1, 3
        args.batch = args.batch or [8]
        if args.peer:
            p.error("--smoke runs without the peer")
    if args.batch is None:
        args.batch = {"paper": [2, 8], "mini": [16, 64], "tiny": [8]}[args.config]
    if min(args.batch) < 1 or args.steps < 1 or args.warmup < 1 or args.latency_runs < 1:
        p.error("--batch, --steps, --warmup and --latency-runs must be >= 1")
    if args.peer and args.config != "paper":
        p.error(f"--peer compares the paper config (the peer's models); got --config {args.config}")
    return args


def configure_flags(args) -> list[str]:
    """XLA flags, set before JAX initialises a backend (an unknown flag aborts; see
    rkd_jax.platform for the probe). Returns the flags this run added."""
    added = []
    if args.keep_ynn:
        os.environ["RKD_JAX_KEEP_YNN"] = "1"
    else:
        from rkd_jax import platform

        added += platform.configure_cpu_flags()
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
        added += shlex.split(args.xla_flags)
    return added


def load_config(variant: str):
    from rkd_jax.config_loader import load_config_file

    return load_config_file(f"{ROOT / 'configs' / 'distill.py'}:{variant}")


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring), to prove the loop never recompiles."""

    def __init__(self):
        import jax

        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_):
        if event == COMPILE_EVENT:
            self.count += 1
            self.seconds += duration


def xla_flops(compiled) -> float | None:
    """FLOPs of one call from XLA's cost analysis (a dict in jax 0.10, a list before)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def matmul_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general and convolution in a jaxpr (sub-jaxprs included,
    scans times their length): torch's FlopCounterMode convention, so both sides count alike."""
    import math

    from jax.extend import core as jcore

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[i] for i in lhs_contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            # Every output element uses rhs.size / out_features weights (groups included).
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_features
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    total += times * matmul_flops(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    total += times * matmul_flops(sub)
    return total


def _conv_kind(params) -> str:
    dn = params["dimension_numbers"]
    if dn.lhs_spec[0] != 0:
        return "conv dW"  # the input's channels act as the batch: a weight gradient
    if tuple(dn.rhs_spec[:2]) == (2, 3) or max(params["lhs_dilation"]) > 1:
        return "conv dX"  # kernel in/out swapped, or a transposed (dilated-input) conv
    return "conv fwd"


def op_census(jaxpr, repeats: int = 3) -> list[dict]:
    """Every distinct convolution and matmul of a traced program, timed alone (jitted, the
    best of `repeats` calls on random inputs) and multiplied by how often the program runs it.
    What XLA spends outside them (fusions, copies, reductions) is the step time minus the sum."""
    import math
    from collections import Counter

    import jax
    import numpy as np
    from jax.extend import core as jcore

    counts, eqns = Counter(), {}

    def walk(j, times):
        for eqn in j.eqns:
            name = eqn.primitive.name
            if name in ("conv_general_dilated", "dot_general"):
                key = (
                    name,
                    tuple((v.aval.shape, str(v.aval.dtype)) for v in eqn.invars),
                    repr(sorted(eqn.params.items())),
                )
                counts[key] += times
                eqns[key] = eqn
            mult = eqn.params.get("length", 1) if name == "scan" else 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jcore.ClosedJaxpr):
                        walk(sub.jaxpr, times * mult)
                    elif isinstance(sub, jcore.Jaxpr):
                        walk(sub, times * mult)

    walk(jaxpr, 1)
    rng = np.random.default_rng(0)
    rows = []
    for key, n in counts.items():
        eqn = eqns[key]
        args = [np.asarray(rng.standard_normal(v.aval.shape), v.aval.dtype) for v in eqn.invars]
        fn = jax.jit(lambda *a, e=eqn: e.primitive.bind(*a, **e.params))
        fn(*args).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn(*args).block_until_ready()
            best = min(best, time.perf_counter() - t)
        out = eqn.outvars[0].aval.shape
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[i] for i in lc)
            flops, kind = 2.0 * math.prod(out) * k, "dot"
        else:
            rhs = eqn.invars[1].aval.shape
            o = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            flops, kind = 2.0 * math.prod(out) * math.prod(rhs) / o, _conv_kind(eqn.params)
        rows.append(
            {
                "kind": kind,
                "count": n,
                "seconds_each": best,
                "seconds_total": best * n,
                "gflop_each": flops / 1e9,
                "gflops": flops / best / 1e9,
                "shapes": [list(v.aval.shape) for v in eqn.invars],
                "out": list(out),
                "window_strides": list(eqn.params.get("window_strides", ())),
            }
        )
    rows.sort(key=lambda r: -r["seconds_total"])
    return rows


def print_census(rows: list[dict], step_seconds: float, top: int = 25) -> None:
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        acc = by_kind.setdefault(r["kind"], [0.0, 0.0])
        acc[0] += r["seconds_total"]
        acc[1] += r["gflop_each"] * r["count"]
    total = sum(v[0] for v in by_kind.values())
    print(
        f"op census: step {step_seconds:.3f}s; convolutions and matmuls timed alone sum to "
        f"{total:.3f}s; the rest (fusions, copies, reductions) ~{step_seconds - total:.3f}s"
    )
    for kind, (sec, gf) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(
            f"  {kind:9s} {sec:7.3f}s {100 * sec / step_seconds:5.1f}% of the step, "
            f"{gf:8.1f} GFLOP, {gf / max(sec, 1e-9):6.1f} GFLOP/s"
        )
    for r in rows[:top]:
        print(
            f"  {r['kind']:9s} x{r['count']:<3d} {1e3 * r['seconds_each']:8.2f} ms "
            f"{r['gflops']:6.1f} GFLOP/s  {r['shapes']} -> {r['out']} s{r['window_strides']}"
        )


def matmul_ceiling_tflops(n: int = 2048, dtype=None) -> float:
    """TFLOP/s of an n^3 matmul in `dtype` (the step's compute dtype; float32 by default):
    this machine's practical ceiling, measured now."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype or jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


class Workload:
    """Models, variables and jitted functions of one config, built once for all batch sizes."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from rkd_jax import evaluate, pretrained, steps, text_features
        from rkd_jax.models import build, fold
        from rkd_jax.models.bert import BertConfig
        from rkd_jax.optim import make_optimizer

        self.jax, self.jnp, self.np = jax, jnp, np
        c = load_config(CONFIGS[args.config])
        c.run.compute_dtype = "auto"
        self.config = c
        self.size, self.tokens = int(c.data.image_size), int(c.data.max_tokens)
        # The peer masks words 12..19 of 20: the same share of padding everywhere.
        self.real_tokens = max(1, (3 * self.tokens) // 5)
        self.dtype = build.resolve_dtype(c.run.compute_dtype)
        # The paper's BERT-base (no offline weights exist: its shape, random weights).
        bert = BertConfig.base() if args.config == "paper" else None
        t0 = time.perf_counter()
        self.student = build.build_model(c.student, self.dtype, bert)
        self.teacher = build.build_model(c.teacher, self.dtype, bert)
        # Variable shapes do not depend on the image size: initialise on small images.
        init = lambda model, cfg, i: pretrained.init_variables(
            model,
            cfg,
            jax.random.fold_in(build.make_key(0), i),
            min(self.size, 64),
            self.tokens,
            pretrained=False,
        )
        student_vars = init(self.student, c.student, 1)
        teacher_vars = init(self.teacher, c.teacher, 0)
        self.fold = not args.no_fold
        if self.fold:
            self.teacher, teacher_vars = fold.fold_batch_norm(self.teacher, teacher_vars)
            self.predict_model, self.predict_vars = fold.fold_batch_norm(self.student, student_vars)
        else:
            self.predict_model, self.predict_vars = self.student, student_vars
        self.teacher_vars = teacher_vars
        frozen = None if c.student.text_trainable else steps.text_frozen
        tx, _ = make_optimizer(c.train, 1000, frozen=frozen)
        self.state0 = steps.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=student_vars["params"],
            batch_stats=student_vars["batch_stats"],
            opt_state=tx.init(student_vars["params"]),
        )
        # Frozen text encoders run once per sentence in training (text_features.text_table): a table of
        # features indexed by sentence_id stands in for it here.
        self.num_sentences = 64
        self.tables = {"student": None, "teacher": None}
        for role, model, cfg in (
            ("student", self.student, c.student),
            ("teacher", self.teacher, c.teacher),
        ):
            if text_features.uses_text_cache(c, cfg):
                dim = model.text_config.hidden_size
                self.tables[role] = jax.random.normal(
                    jax.random.key(5), (self.num_sentences, self.tokens, dim), jnp.float32
                )
        self.step_fn = steps.make_train_step(c, "distill", tx, self.student, self.teacher)
        self.predict_fn = evaluate.make_predict_fn(self.predict_model, float(c.run.threshold))
        self.init_s = time.perf_counter() - t0
        self.params = {
            "student": build.count_params(student_vars["params"]),
            "teacher": build.count_params(teacher_vars["params"]),
        }

    def batch(self, b: int, seed: int = 0) -> dict:
        np, jnp = self.np, self.jnp
        rng = np.random.default_rng(seed)
        s, n = self.size, self.tokens
        mask = np.zeros((b, n), np.int32)
        mask[:, : self.real_tokens] = 1
        host = {
            "image": rng.random((b, s, s, 3), np.float32),
            "mask": rng.integers(0, 2, (b, s, s), np.int32),
            "tokens": np.where(mask > 0, rng.integers(1000, 30000, (b, n)), 0).astype(np.int32),
            "token_mask": mask,
            "sentence_id": rng.integers(0, self.num_sentences, (b,)).astype(np.int32),
        }
        return {k: jnp.asarray(v) for k, v in host.items()}

    def fresh_state(self):
        # The step donates its state: every measurement starts from its own copy.
        return self.jax.tree.map(self.jnp.copy, self.state0)


def _compile(fn, *args) -> tuple[Any, dict]:
    """Trace, lower and compile `fn` for these arguments, timed apart; (traced, info) with the
    FLOPs of one call."""
    t0 = time.perf_counter()
    traced = fn.trace(*args)
    t1 = time.perf_counter()
    compiled = traced.lower().compile()
    t2 = time.perf_counter()
    return traced, {
        "trace_s": t1 - t0,
        "compile_s": t2 - t1,
        "xla_flops": xla_flops(compiled),
        "matmul_flops": matmul_flops(traced.jaxpr.jaxpr),
    }


def measure_distill(w: Workload, b: int, steps: int, warmup: int, counter: CompileCounter) -> dict:
    batch = w.batch(b)
    state = w.fresh_state()
    args = (batch, w.teacher_vars, w.tables)
    traced, info = _compile(w.step_fn, state, *args)
    w.last_distill_jaxpr = traced.jaxpr.jaxpr
    # The jitted function itself from here on, as training calls it: its first call may compile
    # (that is the "first step"); none after it may.
    t0 = time.perf_counter()
    state, metrics = w.step_fn(state, *args)
    w.jax.block_until_ready((state, metrics))
    first_call_s = time.perf_counter() - t0
    after_first = counter.count
    for _ in range(warmup - 1):
        state, metrics = w.step_fn(state, *args)
    w.jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = w.step_fn(state, *args)  # no host sync inside the loop
    w.jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - t0) / steps
    # Random weights and identity running statistics make the frozen teacher's activations grow
    # through its depth (the peer's too), so the loss can be huge: the work is the same.
    loss = float(metrics["loss"])
    return _row("distill", b, seconds, info, first_call_s, counter.count - after_first, loss=loss)


def measure_infer(w: Workload, b: int, steps: int, warmup: int, counter: CompileCounter) -> dict:
    batch = w.batch(b, seed=1)
    args = (w.predict_vars, batch["image"], batch["tokens"], batch["token_mask"])
    _, info = _compile(w.predict_fn, *args)
    t0 = time.perf_counter()
    w.jax.block_until_ready(w.predict_fn(*args))
    first_call_s = time.perf_counter() - t0
    after_first = counter.count
    out = None
    for _ in range(warmup - 1):
        out = w.predict_fn(*args)
    w.jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = w.predict_fn(*args)
    w.jax.block_until_ready(out)
    seconds = (time.perf_counter() - t0) / steps
    return _row("infer", b, seconds, info, first_call_s, counter.count - after_first)


def measure_latency(w: Workload, runs: int, warmup: int, counter: CompileCounter) -> dict:
    batch = w.batch(1, seed=2)
    args = (w.predict_vars, batch["image"], batch["tokens"], batch["token_mask"])
    _, info = _compile(w.predict_fn, *args)
    for _ in range(max(warmup, 2)):
        w.jax.block_until_ready(w.predict_fn(*args))
    after_first = counter.count
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        w.jax.block_until_ready(w.predict_fn(*args))
        times.append(time.perf_counter() - t0)
    times.sort()
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    row = _row("latency", 1, statistics.mean(times), info, None, counter.count - after_first)
    row.update(
        median_ms=1e3 * statistics.median(times),
        p90_ms=1e3 * p90,
        mean_ms=1e3 * statistics.mean(times),
        runs=runs,
    )
    return row


def _row(kind, b, seconds, info, first_call_s, recompiles, **extra) -> dict:
    row = {
        "kind": kind,
        "batch": b,
        "seconds_per_call": seconds,
        "images_per_s": b / seconds,
        "first_call_s": first_call_s,
        "recompiles_after_first_call": recompiles,
        **info,
    }
    for key in ("xla_flops", "matmul_flops"):
        v = info.get(key)
        row[key.replace("flops", "gflop_per_image")] = None if v is None else v / b / 1e9
        row[key.replace("flops", "tflops")] = None if v is None else v / seconds / 1e12
    row.update(extra)
    return row


def peer_script(args) -> Path:
    candidates = (
        [Path(args.peer_script)]
        if args.peer_script
        else [
            ROOT / "shared" / "bench" / "torch_peer.py",
            ROOT.parent / "shared" / "bench" / "torch_peer.py",
        ]
    )
    for c in candidates:
        if c.is_file():
            # Absolute: the peer runs with its own folder as working directory.
            return c.resolve()
    raise FileNotFoundError(
        "torch_peer.py not found (looked in "
        + ", ".join(map(str, candidates))
        + "); pass --peer-script PATH"
    )


def ensure_peer_venv(venv: Path) -> Path:
    """The peer's own virtualenv, created on first use (PyPI torchvision beside the CPU torch
    breaks `import transformers` in the project's environment: docs/miniature.md)."""
    python = venv / "bin" / "python"
    marker = venv / PEER_MARKER
    if marker.is_file() and python.exists():
        return python
    print(f"[peer] creating {venv} (first use)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for pkgs in PEER_PACKAGES:
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pkgs],
            check=True,
        )
    marker.write_text(_peer_versions(python))
    return python


def _peer_versions(python: Path) -> str:
    """JSON of the torch, torchvision and transformers versions that `python` imports."""
    out = subprocess.run(
        [str(python), "-c", PEER_VERSIONS], check=True, capture_output=True, text=True
    )
    return out.stdout


def run_peer(args, backend: str, out_json: Path) -> dict:
    if args.peer_python:
        python = Path(args.peer_python)
        versions = _peer_versions(python)
    else:
        python = ensure_peer_venv(Path(args.peer_venv))
        versions = (Path(args.peer_venv) / PEER_MARKER).read_text()
    script = peer_script(args)
    out_json = out_json.resolve()  # the peer runs in its own folder
    device = "cuda" if backend == "gpu" else "cpu"
    cmd = [
        str(python),
        str(script),
        "--device",
        device,
        "--compile",
        str(args.peer_compile),
        "--steps",
        str(args.peer_steps or args.steps),
        "--out",
        str(out_json),
        "--batch",
        *map(str, args.batch),
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env.pop("XLA_FLAGS", None)
    print("[peer] " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(script.parent),
    ) as proc:
        for line in proc.stdout:
            print("[peer] " + line.rstrip(), flush=True)
    if proc.returncode:
        raise RuntimeError(f"the peer ({script}) exited with {proc.returncode}")
    results = json.loads(out_json.read_text())
    return {
        "command": cmd,
        "seconds": time.perf_counter() - t0,
        "results": results,
        "versions": json.loads(versions),
        "omp_num_threads": env["OMP_NUM_THREADS"],
    }


def table(jax_rows: list[dict], peer: dict | None, config: str) -> tuple[list[dict], str]:
    """Rows of (name, jax, pytorch, ratio); ratio = JAX speed / PyTorch speed (> 1: JAX faster),
    so for latency it is pytorch_ms / jax_ms."""
    rows = []
    pres = (peer or {}).get("results", {})
    for r in jax_rows:
        if r["kind"] == "latency":
            # The peer reports the mean of its batch-1 calls: compare means.
            pt = pres.get("latency_b1_ms")
            rows.append(
                {
                    "row": "latency b1 ms (mean)",
                    "jax": r["mean_ms"],
                    "pytorch": pt,
                    "ratio": pt / r["mean_ms"] if pt else None,
                    "throughput": False,
                    "jax_median_ms": r["median_ms"],
                    "jax_p90_ms": r["p90_ms"],
                }
            )
            continue
        key = {"distill": "distill_img_s", "infer": "student_infer_img_s"}[r["kind"]]
        pt = pres.get(str(r["batch"]), {}).get(key)
        row = {
            "row": f"{r['kind']} b{r['batch']} img/s",
            "jax": r["images_per_s"],
            "pytorch": pt,
            "ratio": r["images_per_s"] / pt if pt else None,
            "throughput": True,
        }
        if r["kind"] == "distill" and config == "paper":
            row["jax_useful_tflops"] = r["images_per_s"] * PAPER_GFLOP_PER_IMAGE / 1e3
            if pt:
                row["pytorch_useful_tflops"] = pt * PAPER_GFLOP_PER_IMAGE / 1e3
                peer_b = pres[str(r["batch"])]
                peer_gflop = peer_b["distill_tflop_per_step"] * 1e3 / r["batch"]
                row["pytorch_gflop_per_image"] = peer_gflop
                # The same ratio at equal work: model FLOPs (matmul/conv, torch's convention).
                row["equal_work_ratio"] = (
                    r["images_per_s"] * r["matmul_gflop_per_image"] / (pt * peer_gflop)
                )
        rows.append(row)
    ratios = [(x["ratio"], x["row"]) for x in rows if x["throughput"] and x["ratio"]]
    if ratios:
        worst = min(ratios)
        last = f"jax/pytorch min ratio: {worst[0]:.2f} ({worst[1]})"
    else:
        last = "jax/pytorch min ratio: n/a (no peer figures)"
    return rows, last


def _fmt(v, digits=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def print_report(res: dict, rows: list[dict], last: str) -> None:
    h = res["host"]
    print()
    print(
        f"rkd_jax {res['config']} ({res['image_size']}x{res['image_size']}, {res['max_tokens']} "
        f"tokens) on {res['backend']} ({res['device']}, {h['cpus']} cpus); load "
        f"{h['load_start'][0]:.2f} -> {h['load_end'][0]:.2f}; matmul ceiling "
        f"{res['matmul_ceiling_tflops']:.3f} TFLOP/s ({res.get('matmul_ceiling_matmul', '')}); "
        f"fold {res['fold_bn']}; "
        f"XLA_FLAGS={res['xla_flags']!r}"
    )
    print(f"{'row':24s} {'jax':>10s} {'pytorch':>10s} {'jax/pytorch':>12s}")
    for r in rows:
        print(
            f"{r['row']:24s} {_fmt(r['jax']):>10s} {_fmt(r['pytorch']):>10s} "
            f"{_fmt(r['ratio']):>12s}"
        )
    print("details (JAX):")
    for r in res["jax"]:
        extra = ""
        if r["kind"] == "latency":
            extra = f" median {r['median_ms']:.1f} ms p90 {r['p90_ms']:.1f} ms"
        print(
            f"  {r['kind']:8s} b{r['batch']:<3d} compile {r['compile_s']:6.1f}s trace "
            f"{r['trace_s']:5.1f}s | XLA {_fmt(r['xla_gflop_per_image'], 1)} GFLOP/img "
            f"{_fmt(r['xla_tflops'], 3)} TFLOP/s | matmul/conv "
            f"{_fmt(r['matmul_gflop_per_image'], 1)} GFLOP/img "
            f"{_fmt(r['matmul_tflops'], 3)} TFLOP/s | recompiles "
            f"{r['recompiles_after_first_call']}{extra}"
        )
    for r in rows:
        if "jax_useful_tflops" in r:
            ceil = res["matmul_ceiling_tflops"]
            line = (
                f"  {r['row']}: useful ({PAPER_GFLOP_PER_IMAGE:.0f} GFLOP/img) "
                f"jax {r['jax_useful_tflops']:.3f} TFLOP/s ({r['jax_useful_tflops'] / ceil:.0%}"
                " of the matmul ceiling)"
            )
            if "pytorch_useful_tflops" in r:
                line += (
                    f", pytorch {r['pytorch_useful_tflops']:.3f} TFLOP/s; pytorch counts "
                    f"{r['pytorch_gflop_per_image']:.1f} GFLOP/img; equal-work ratio "
                    f"{r['equal_work_ratio']:.2f}"
                )
            print(line)
    print(last)


def main(argv=None) -> int:
    args = parse_args(argv)
    added = configure_flags(args)
    load_start = os.getloadavg()
    import jax

    from rkd_jax import platform

    counter = CompileCounter()
    backend = jax.default_backend()
    ynn_off = platform.YNN_OFF_FLAG in os.environ.get("XLA_FLAGS", "")
    print(
        f"jax {jax.__version__} on {backend} ({jax.devices()[0].device_kind}); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; YNNPACK convolutions "
        f"{'off' if ynn_off else 'on'}",
        flush=True,
    )
    w = Workload(args)
    # The ceiling in the step's compute dtype (bf16 on GPU), big enough to fill the device.
    ceiling_n = 512 if args.smoke else (8192 if backend == "gpu" else 2048)
    ceiling_dtype = jax.numpy.dtype(w.dtype).name
    ceiling = matmul_ceiling_tflops(ceiling_n, w.dtype)
    print(
        f"{args.config}: models and variables in {w.init_s:.1f}s; parameters {w.params}; "
        f"compute dtype {jax.numpy.dtype(w.dtype).name}; BatchNorm folded: {w.fold}",
        flush=True,
    )
    results = []
    for b in args.batch:
        if "distill" in args.only:
            results.append(measure_distill(w, b, args.steps, args.warmup, counter))
            print(json.dumps(results[-1]), flush=True)
            if args.profile and b == args.batch[0]:
                census = op_census(w.last_distill_jaxpr)
                results[-1]["op_census"] = census
                print_census(census, results[-1]["seconds_per_call"])
        if "infer" in args.only:
            results.append(measure_infer(w, b, args.steps, args.warmup, counter))
            print(json.dumps(results[-1]), flush=True)
    if "latency" in args.only:
        results.append(measure_latency(w, args.latency_runs, args.warmup, counter))
        print(json.dumps(results[-1]), flush=True)

    stamp = datetime.datetime.now().astimezone()
    out = (
        Path(args.out)
        if args.out
        else (ROOT / "benchmarks" / "results" / f"{backend}-{stamp.date().isoformat()}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {
        "written": stamp.isoformat(timespec="seconds"),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "config": args.config,
        "image_size": w.size,
        "max_tokens": w.tokens,
        "real_tokens": w.real_tokens,
        "backend": backend,
        "device": jax.devices()[0].device_kind,
        "compute_dtype": jax.numpy.dtype(w.dtype).name,
        "fold_bn": w.fold,
        "parameters": w.params,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "flags_added_by_this_run": added,
        "ynn_convolutions_off": ynn_off,
        "matmul_ceiling_tflops": ceiling,
        "matmul_ceiling_matmul": f"{ceiling_n}^3 {ceiling_dtype}",
        "host": {
            "cpu": platform.cpu_model(),
            "cpus": os.cpu_count(),
            "load_start": load_start,
            "load_end": os.getloadavg(),
            "platform": host_platform.platform(),
        },
        "versions": {
            "python": sys.version.split()[0],
            **platform.package_versions("jax", "jaxlib", "flax", "optax", "numpy"),
        },
        "steps": args.steps,
        "warmup": args.warmup,
        "latency_runs": args.latency_runs,
        "compile_events": {"count": counter.count, "seconds": counter.seconds},
        "jax": results,
    }
    # JAX's figures are on disk before the (long) peer run starts.
    out.write_text(json.dumps(res, indent=1))
    peer = None
    if args.peer:
        peer = run_peer(args, backend, out.with_name(out.stem + ".peer-raw.json"))
    rows, last = table(results, peer, args.config)
    res["host"]["load_end"] = os.getloadavg()
    res.update(peer=peer, table=rows, summary=last)
    out.write_text(json.dumps(res, indent=1))
    print(f"results: {out}", flush=True)
    print_report(res, rows, last)  # its last line is the min-ratio summary
    return 0


if __name__ == "__main__":
    # The same process setting as training (python -m rkd_jax.main): malloc on huge pages.
    from rkd_jax import platform

    platform.reexec_with_hugepage_malloc()
    sys.exit(main())
