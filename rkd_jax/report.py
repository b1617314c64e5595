"""Model report: parameters, GFLOPs per image and latency of teacher and students.

    python -m rkd_jax.report [--config distill[:variant] | FILE[:variant]] [--params] [--latency]

GFLOPs come from XLA's cost analysis of the jitted inference forward at batch 1 (one
multiply-add counts as 2 FLOPs; the GFLOPs column reports multiply-adds x 2). Latency is the
median of repeated batch-1 calls after warm-up, on the backend JAX runs on. Without weights
(the paper sizes) the text encoders are built from bert-base-uncased's architecture.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rkd_jax import cli, platform


def forward_flops(model, variables, image_size: int, max_tokens: int, batch: int = 1) -> float:
    """FLOPs of one jitted inference forward (XLA cost analysis)."""
    import jax

    from rkd_jax.models.build import dummy_inputs

    fn = jax.jit(lambda v, *a: model.apply(v, *a, train=False)["logits"])
    compiled = fn.lower(variables, *dummy_inputs(image_size, max_tokens, batch)).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def backbone_flops(name: str, image_size: int = 224, width: int = 64) -> float:
    """FLOPs of a backbone alone (V1..V5, no head) at batch 1."""
    import jax
    import jax.numpy as jnp

    from rkd_jax.models.segmenter import make_backbone

    net = make_backbone(name, width, (), jnp.float32)
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), x, False))
    fn = jax.jit(lambda v, x: net.apply(v, x, False))
    cost = fn.lower(abstract, x).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def latency_ms(model, variables, image_size: int, max_tokens: int, repeats: int = 20):
    import jax
    import numpy as np

    from rkd_jax.models.build import dummy_inputs

    fn = jax.jit(lambda v, *a: model.apply(v, *a, train=False)["logits"])
    args = dummy_inputs(image_size, max_tokens, 1)
    fn(variables, *args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(variables, *args).block_until_ready()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 90))


def _model(model_cfg, paper: bool):
    """The model of a config; the paper sizes without a BERT directory use bert-base's shape."""
    from rkd_jax.models import build
    from rkd_jax.models.bert import BertConfig

    if paper and not model_cfg.text_encoder_dir:
        return build.build_model(model_cfg, bert_config=BertConfig.base())
    return build.build_model(model_cfg)


def report(config, sizes, with_latency: bool) -> list[dict]:
    import jax

    from rkd_jax.models import build

    rows = []
    for role in ("teacher", "student"):
        model_cfg = config[role]
        model = _model(model_cfg, config.variant.startswith("paper"))
        for image_size, max_tokens in sizes:
            abstract = build.abstract_variables(model, image_size, max_tokens)
            parts = {k: build.count_params(v) for k, v in abstract["params"].items()}
            row = {
                "role": role,
                "backbone": model_cfg.backbone,
                "text_layers": int(model_cfg.text_num_layers),
                "input": f"{image_size}x{image_size}, {max_tokens} tokens",
                "params_M": build.count_params(abstract["params"]) / 1e6,
                "params_by_part_M": {k: v / 1e6 for k, v in parts.items()},
                "gflops": forward_flops(model, abstract, image_size, max_tokens) / 1e9,
            }
            if with_latency:
                variables = jax.jit(model.init)(
                    build.make_key(0), *build.dummy_inputs(image_size, max_tokens)
                )
                row["latency_ms_median"], row["latency_ms_p90"] = latency_ms(
                    model, variables, image_size, max_tokens
                )
            rows.append(row)
    return rows


def main(argv=None) -> int:
    """The command; bad input: one `error:` line on stderr, exit code 2."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    # Before jax starts (the command, not the import: importing a module starts no process).
    platform.configure_cpu_flags()
    p = cli.ArgumentParser(
        prog="python -m rkd_jax.report",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "--config", default="distill", help="config name or file, [:variant] (distill:paper)"
    )
    p.add_argument("--params", action="store_true", help="parameter counts only (fast)")
    p.add_argument("--latency", action="store_true", help="also measure batch-1 latency")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    from rkd_jax.config_loader import load_config_file

    config = load_config_file(args.config)
    if args.json and Path(args.json).is_dir():
        raise cli.UserError(f"--json {args.json}: is a directory; expected a file name")
    sizes = [(int(config.data.image_size), int(config.data.max_tokens))]
    if args.params:
        from rkd_jax.models import build

        for role in ("teacher", "student"):
            model = _model(config[role], config.variant.startswith("paper"))
            a = build.abstract_variables(model, *sizes[0])
            parts = ", ".join(
                f"{k} {build.count_params(v) / 1e6:.2f} M" for k, v in a["params"].items()
            )
            print(f"{role}: {build.count_params(a['params']) / 1e6:.2f} M parameters ({parts})")
        return 0
    rows = report(config, sizes, args.latency)
    head = f"{'model':<34} {'input':<20} {'params (M)':>10} {'GFLOPs':>8}"
    if args.latency:
        head += f" {'ms (median)':>12} {'ms (p90)':>9}"
    print(head)
    for r in rows:
        name = f"{r['role']} {r['backbone']} + BERT-{r['text_layers']}"
        line = f"{name:<34} {r['input']:<20} {r['params_M']:>10.2f} {r['gflops']:>8.2f}"
        if args.latency:
            line += f" {r['latency_ms_median']:>12.1f} {r['latency_ms_p90']:>9.1f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
