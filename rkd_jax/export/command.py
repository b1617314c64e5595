"""`python -m rkd_jax.export`: the command line of `export`."""

from __future__ import annotations

import argparse
import sys

from rkd_jax import cli
from rkd_jax.export.common import FORMATS
from rkd_jax.export.jax_export import DEFAULT_PLATFORMS
from rkd_jax.export.onnx import DEFAULT_OPSET
from rkd_jax.export.quantize import DEFAULT_CALIBRATION_EXAMPLES, DEFAULT_QUANT_OPS
from rkd_jax.export.run import export


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
