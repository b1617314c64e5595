"""Batch-1 CPU latency of the exported student: onnxruntime (float, int8) against JAX (the
jitted Flax predict function and the deserialized jax.export artifact).

Exports the student of a checkpoint to a scratch directory (rkd_jax.export), quantises the ONNX
model to int8 on training images, then times one real input (skimage's chelsea squashed to the
network size + one expression) through each runtime: warm-up calls first, then `--iters` timed
calls, each waiting for its result. Prints a table and writes
benchmarks/results/export-<date>.json.

    python benchmarks/export.py --checkpoint runs/default
    python benchmarks/export.py --checkpoint runs/default --threads 1 --iters 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host_platform
import sys
import tempfile
import time
from pathlib import Path

# Run from a checkout without installing: the repository root holds the rkd_jax package.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rkd_jax import platform

XLA_FLAGS_ADDED = platform.configure_cpu_flags()

import jax

from rkd_jax import export


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args) -> dict:
    from rkd_jax.evaluate import make_predict_fn
    from rkd_jax.models.build import count_params

    work = Path(args.out_dir or tempfile.mkdtemp(prefix="rkd_export_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    model, variables, meta, config = export.load_student(args.checkpoint, args.allow_teacher)
    size, max_tokens = int(meta["image_size"]), int(meta["max_tokens"])
    tokenize, _, _ = export.tokenizer_for(meta["model"])
    inputs = export.photo_inputs(size, tokenize, max_tokens)

    onnx_path, jax_path = work / "student.onnx", work / "student.jax"
    # The benchmark's own scratch files: a rerun into the same --out-dir replaces them.
    for path, fmt in ((onnx_path, "onnx"), (jax_path, "jax")):
        export.export(
            args.checkpoint, path, fmt, allow_teacher=args.allow_teacher, log=log, overwrite=True
        )
    int8_path = export.int8_path(onnx_path)
    quant = None
    if not args.skip_int8:
        feed = min(16, int(config.train.batch_size))
        reader = export.TrainingImages(
            config, tokenize, args.calibration_examples, feed, int(config.seed)
        )
        quant = export.quantize_int8(onnx_path, int8_path, reader)
        log(f"quantised {int8_path} on {reader.seen} training examples")

    predict = make_predict_fn(model, float(config.run.threshold))
    device_vars = jax.device_put(variables)
    device_inputs = [jax.device_put(x) for x in inputs]
    artifact = jax.jit(export.load_jax(jax_path))

    def flax_call():
        jax.block_until_ready(predict(device_vars, *device_inputs))

    def artifact_call():
        jax.block_until_ready(artifact(*device_inputs))

    runners = {
        "jax_predict_fn": flax_call,
        "jax_export_artifact": artifact_call,
    }
    sessions = {"onnxruntime_float": export.onnx_session(onnx_path, args.threads)}
    if quant is not None:
        sessions["onnxruntime_int8"] = export.onnx_session(int8_path, args.threads)
    for name, sess in sessions.items():
        runners[name] = lambda s=sess: export.run_onnx(s, *inputs)

    rows = {}
    for name, fn in runners.items():
        t0 = time.perf_counter()
        fn()  # compile / session warm-up, not timed
        first = time.perf_counter() - t0
        rows[name] = dict(
            export.latency_ms(fn, warmup=args.warmup, iters=args.iters), first_call_s=first
        )
        log(f"{name}: median {rows[name]['median_ms']:.2f} ms, p90 {rows[name]['p90_ms']:.2f} ms")

    sizes = {p.name: p.stat().st_size for p in (onnx_path, jax_path, int8_path) if p.exists()}
    return {
        "benchmark": "export latency, batch 1, CPU",
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": f"{meta.get('directory')}/{meta.get('step')}",
        "model": meta["model"],
        "parameters": count_params(variables["params"]),
        "image_size": size,
        "max_tokens": max_tokens,
        "input": f"skimage chelsea squashed to {size}x{size} + {export.PARITY_SENTENCE!r}",
        "iters": args.iters,
        "warmup": args.warmup,
        "onnxruntime_threads": args.threads or "onnxruntime default",
        "jax_threads": "XLA CPU default (all cores)",
        "xla_flags_added": XLA_FLAGS_ADDED,
        "machine": {
            "cpu": platform.cpu_model(),
            "cores": os.cpu_count(),
            "system": host_platform.system(),
        },
        "versions": platform.package_versions(
            "jax", "jaxlib", "flax", "jax2onnx", "onnx", "onnxruntime"
        ),
        "file_bytes": sizes,
        "quantization": quant,
        "latency_ms": rows,
    }


def table(result: dict) -> str:
    rows = result["latency_ms"]
    lines = [f"{'runtime':24s} {'median ms':>10s} {'p90 ms':>8s}", "-" * 44]
    for name, r in rows.items():
        lines.append(f"{name:24s} {r['median_ms']:10.2f} {r['p90_ms']:8.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="student run directory or checkpoint")
    p.add_argument("--out-dir", default="", help="where the exported files go (default: temp)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = default)")
    p.add_argument("--calibration-examples", type=int, default=export.DEFAULT_CALIBRATION_EXAMPLES)
    p.add_argument("--skip-int8", action="store_true")
    p.add_argument("--allow-teacher", action="store_true")
    p.add_argument("--json", default="", help="results file (default: results/export-<date>.json)")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except export.ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    path = (
        Path(args.json)
        if args.json
        else (ROOT / "benchmarks" / "results" / f"export-{time.strftime('%Y-%m-%d')}.json")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
