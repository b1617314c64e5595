"""Depthwise convolutions on XLA:CPU: the grouped conv against rkd_jax's shifted-tap form.

    python benchmarks/depthwise.py [--batch 16] [--size 96] [--out FILE.json]

Times (best of --repeats, after a warm-up call) the forward and the gradient (input and
kernel) of every distinct depthwise conv of EfficientNet-Lite0 at --size x --size input, then
the whole Lite0 backbone's training gradient (BatchNorm in training mode), each with
`lax.conv_general_dilated(feature_group_count=C)` ("native") and with
`rkd_jax.models.layers.depthwise_taps` ("taps"), and once more with flax's nn.BatchNorm in
place of rkd_jax.models.layers.BatchNorm (the tree-summed statistics). Prints one row per shape and the load average,
since a shared machine skews absolute times (the ratios hold better).

`--backbone-only` times only the Lite0 backbone's training gradient in rkd_jax's form and prints
its images/s: run under `taskset -c 0` and as two pinned processes side by side, it shows what
launch.sh's `--jobs 2` gains for the Lite0 rows on a 2-core machine (docs/table1.md):

    python benchmarks/depthwise.py --backbone-only --repeats 10
    taskset -c 0 python benchmarks/depthwise.py --backbone-only --repeats 10 &
    taskset -c 1 python benchmarks/depthwise.py --backbone-only --repeats 10; wait
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_ms(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="")
    p.add_argument(
        "--backbone-only", action="store_true", help="only the Lite0 backbone's training gradient"
    )
    args = p.parse_args(argv)

    from rkd_jax import platform

    platform.configure_cpu_flags()
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from rkd_jax.models import efficientnet, layers
    from rkd_jax.models.efficientnet import EfficientNet, architecture

    load0 = os.getloadavg()
    rows = []
    seen = set()
    h = -(-args.size // 2)  # after the stride-2 stem
    for spec in [] if args.backbone_only else architecture("lite0").blocks:
        c = spec.in_ch * spec.expand
        key = (h, c, spec.kernel, spec.stride)
        h_in, h = h, -(-h // spec.stride)
        if key in seen:
            continue
        seen.add(key)
        x = jax.random.normal(jax.random.key(0), (args.batch, h_in, h_in, c))
        w = jax.random.normal(jax.random.key(1), (spec.kernel, spec.kernel, c))
        row = {"input": list(x.shape), "kernel": spec.kernel, "stride": spec.stride}
        for name, f in (("native", layers.depthwise_native), ("taps", layers.depthwise_taps)):
            s = spec.stride
            fwd = jax.jit(lambda x, w, f=f, s=s: f(x, w, s))
            grad = jax.jit(jax.grad(lambda x, w, f=f, s=s: jnp.sum(f(x, w, s) ** 2), (0, 1)))
            row[f"{name}_fwd_ms"] = best_ms(fwd, x, w, repeats=args.repeats)
            row[f"{name}_grad_ms"] = best_ms(grad, x, w, repeats=args.repeats)
        rows.append(row)
        print(
            f"{row['input']!s:22s} k{spec.kernel} s{spec.stride} | fwd native "
            f"{row['native_fwd_ms']:7.1f} ms taps {row['taps_fwd_ms']:6.1f} ms | grad native "
            f"{row['native_grad_ms']:7.1f} ms taps {row['taps_grad_ms']:6.1f} ms",
            flush=True,
        )

    model = EfficientNet("lite0")
    x = jnp.ones((args.batch, args.size, args.size, 3))
    v = model.init(jax.random.key(0), x, train=True)

    def loss(params, x):
        outs, _ = model.apply(
            {"params": params, "batch_stats": v["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return sum(jnp.mean(o**2) for o in outs)

    backbone = {}
    if args.backbone_only:
        fn = jax.jit(jax.grad(loss)).lower(v["params"], x).compile()
        ms = best_ms(fn, v["params"], x, repeats=args.repeats)
        print(
            f"Lite0 backbone training gradient, batch {args.batch}, {args.size}x{args.size}, "
            f"{len(os.sched_getaffinity(0))} cores: {ms:.0f} ms, {args.batch / ms * 1e3:.1f} "
            f"images/s; load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        return 0
    for name in ("native", "taps", "taps_flax_batchnorm"):
        if name == "native":
            with layers.native_depthwise():
                fn = jax.jit(jax.grad(loss)).lower(v["params"], x).compile()
        elif name == "taps":
            fn = jax.jit(jax.grad(loss)).lower(v["params"], x).compile()
        else:  # the same model with flax's nn.BatchNorm (same variables) instead of ours
            efficientnet.BatchNorm = nn.BatchNorm
            try:
                fn = jax.jit(jax.grad(loss)).lower(v["params"], x).compile()
            finally:
                efficientnet.BatchNorm = layers.BatchNorm
        backbone[name] = best_ms(fn, v["params"], x, repeats=args.repeats)
    print(
        f"Lite0 backbone training gradient, batch {args.batch}, {args.size}x{args.size}: "
        f"native depthwise {backbone['native']:.0f} ms, taps {backbone['taps']:.0f} ms "
        f"({backbone['native'] / backbone['taps']:.1f}x); taps with flax's nn.BatchNorm "
        f"{backbone['taps_flax_batchnorm']:.0f} ms; load {load0[0]:.2f} -> "
        f"{os.getloadavg()[0]:.2f}"
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "jax": jax.__version__,
                    "backend": jax.default_backend(),
                    "cpu": platform.cpu_model(),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "load_start": load0,
                    "load_end": os.getloadavg(),
                    "batch": args.batch,
                    "size": args.size,
                    "depthwise": rows,
                    "lite0_backbone_grad_ms": backbone,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
