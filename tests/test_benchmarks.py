"""The speed benchmark's smoke mode: tiny config, 2 steps, the real entry point in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

from rkd_jax import platform

ROOT = Path(__file__).resolve().parents[1]


def test_step_benchmark_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    # conftest's XLA_FLAGS (fake devices, optimisation level 0, the YNNPACK-off flag) carry over.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
        env=dict(os.environ),
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "jax/pytorch min ratio: n/a (no peer figures)"

    res = json.loads(out.read_text())
    assert res["config"] == "tiny" and res["backend"] == "cpu" and res["fold_bn"] is True
    assert res["versions"]["jax"] and res["host"]["cpus"] >= 1
    assert (platform.YNN_OFF_FLAG in res["xla_flags"]) == res["ynn_convolutions_off"]
    kinds = [(r["kind"], r["batch"]) for r in res["jax"]]
    assert kinds == [("distill", 8), ("infer", 8), ("latency", 1)]
    for r in res["jax"]:
        # The jitted step/predict function compiles once; the timed calls never recompile.
        assert r["recompiles_after_first_call"] == 0, r
        assert r["images_per_s"] > 0 and r["compile_s"] > 0
        assert r["xla_flops"] > 0 and r["matmul_flops"] > 0
    for r in res["jax"]:
        # Our conv/matmul count and XLA's cost analysis describe the same program.
        assert 0.5 < r["matmul_flops"] / r["xla_flops"] < 2, r
    latency = res["jax"][2]
    assert latency["median_ms"] <= latency["p90_ms"]
    assert [row["row"] for row in res["table"]] == [
        "distill b8 img/s",
        "infer b8 img/s",
        "latency b1 ms (mean)",
    ]
