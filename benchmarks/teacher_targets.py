"""The distillation step with the teacher run in it against the step with cached teacher targets.

    python benchmarks/teacher_targets.py [--config configs/distill.py[:VARIANT]] [--batch 16]
        [--steps 10] [--repeats 6] [--out FILE.json]

Builds the config's teacher (BatchNorm folded, as in training) and student, the real jitted
distill step (`steps.make_train_step`), and times it both ways, interleaved in one process so a
shared machine slows both alike: with `tables["targets"] = None` (the teacher's forward in every
step) and with a table of the method's targets (`rkd_jax.teacher_targets`, looked up by
pair_id). Prints the median step time and images/s of each and their ratio; --out writes them
with the load average.
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "distill.py"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)

    from rkd_jax import platform

    platform.configure_cpu_flags()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rkd_jax import config_loader, pretrained, steps, teacher_targets, text_features
    from rkd_jax.models import build
    from rkd_jax.models.fold import fold_batch_norm
    from rkd_jax.optim import make_optimizer

    c = config_loader.load_config_file(a.config)
    size, length, b = int(c.data.image_size), int(c.data.max_tokens), a.batch
    student, teacher = build.build_model(c.student), build.build_model(c.teacher)
    s_vars = pretrained.init_variables(student, c.student, build.make_key(1), size, length)
    t_vars = pretrained.init_variables(teacher, c.teacher, build.make_key(2), size, length)
    teacher, t_vars = fold_batch_norm(teacher, t_vars)
    tx, _ = make_optimizer(c.train, 100, frozen=steps.text_frozen)
    step = steps.make_train_step(c, "distill", tx, student, teacher)

    rng = np.random.default_rng(0)
    batch = {
        "image": rng.random((b, size, size, 3), dtype=np.float32),
        "mask": (rng.random((b, size, size)) > 0.8).astype(np.int32),
        "tokens": rng.integers(1000, 3000, (b, length)).astype(np.int32),
        "token_mask": np.ones((b, length), np.int32),
        "sentence_id": np.arange(b, dtype=np.int32),
        "pair_id": np.arange(b, dtype=np.int32),
    }
    text = {}
    for role, cfg, model, variables in (
        ("student", c.student, student, s_vars),
        ("teacher", c.teacher, teacher, t_vars),
    ):
        # Frozen text encoders read precomputed features, as in training (run.cache_text_features).
        if not cfg.text_trainable:
            text[role] = jnp.asarray(
                text_features.text_features(model, variables, batch["tokens"], batch["token_mask"])
            )
    targets = teacher_targets.make_targets_fn(teacher, c.distill)(
        t_vars, {k: jnp.asarray(v) for k, v in batch.items()}, text.get("teacher")
    )
    tables = {
        "online": {"student": text.get("student"), "teacher": text.get("teacher"), "targets": None},
        "cached": {
            "student": text.get("student"),
            "teacher": text.get("teacher"),
            "targets": targets,
        },
    }

    def fresh():
        params = jax.tree.map(jnp.array, s_vars["params"])
        stats = jax.tree.map(jnp.array, s_vars["batch_stats"])
        return steps.TrainState(jnp.zeros((), jnp.int32), params, stats, tx.init(params))

    states = {k: fresh() for k in tables}
    times = {k: [] for k in tables}
    for k, table in tables.items():  # compile
        states[k], m = step(states[k], batch, t_vars, table)
        jax.block_until_ready(m)
    for _ in range(a.repeats):
        for k, table in tables.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                states[k], m = step(states[k], batch, t_vars, table)
            jax.block_until_ready(m)
            times[k].append((time.perf_counter() - t0) / a.steps)
    spec = Path(a.config.partition(":")[0]).resolve()
    shown = spec.relative_to(ROOT) if spec.is_relative_to(ROOT) else spec
    variant = a.config.partition(":")[2]
    result = {
        "config": f"{shown}:{variant}" if variant else str(shown),
        "batch": b,
        "method": c.distill.method,
        "load_average": os.getloadavg(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }
    for k, v in times.items():
        med = float(np.median(v))
        result[k] = {"median_step_ms": 1e3 * med, "images_per_s": b / med}
        print(f"{k:6s}: median step {1e3 * med:7.1f} ms, {b / med:7.1f} images/s")
    result["speedup"] = result["online"]["median_step_ms"] / result["cached"]["median_step_ms"]
    print(
        f"cached / online speed: {result['speedup']:.2f}x (load average {os.getloadavg()[0]:.1f})"
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
