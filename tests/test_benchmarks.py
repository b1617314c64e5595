"""The speed benchmark's smoke mode: tiny config, 2 steps, the real entry point in a subprocess."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest

from rkd_jax import platform

ROOT = Path(__file__).resolve().parents[1]


def _wanted(name: str):
    return lambda item: item.name == name and item.module.__name__ == __name__


# The two smokes run in the background (conftest.background), after the tiny run's training.
@conftest.background("step_benchmark_smoke", "b", _wanted("test_step_benchmark_smoke"))
def _step_smoke(tmp_path: Path, env: dict):
    out = tmp_path / "smoke.json"
    # conftest's XLA_FLAGS (fake devices, optimisation level 0, the YNNPACK-off flag) carry over.
    proc = conftest.run_command(
        [sys.executable, str(ROOT / "benchmarks" / "step.py"), "--smoke", "--out", str(out)],
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    return out, proc


@pytest.mark.slow
def test_step_benchmark_smoke():
    out, proc = conftest.background_result("step_benchmark_smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "jax/pytorch min ratio: n/a (no peer figures)"

    res = json.loads(out.read_text())
    assert res["config"] == "tiny" and res["backend"] == "cpu" and res["fold_bn"] is True
    assert res["versions"]["jax"] and res["host"]["cpus"] >= 1
    assert (platform.YNN_OFF_FLAG in res["xla_flags"]) == res["ynn_convolutions_off"]
    if sys.platform == "linux" and (platform._glibc_version() or (0, 0)) >= (2, 35):
        # The benchmark runs in the process setting of training (malloc on huge pages).
        assert "glibc.malloc.hugetlb" in res["glibc_tunables"]
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


def test_peer_script_given_relative_is_made_absolute(tmp_path, monkeypatch):
    # The peer runs in its own folder, so a relative --peer-script must not reach it as is.
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks" / "step.py")
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "torch_peer.py").write_text("")
    monkeypatch.chdir(tmp_path)
    got = step.peer_script(argparse.Namespace(peer_script="bench/torch_peer.py"))
    assert got == tmp_path / "bench" / "torch_peer.py"
    assert got.is_absolute()


def test_peer_runs_with_a_given_interpreter_and_relative_paths(tmp_path, monkeypatch):
    # --peer-python (a GPU machine's own torch) and relative --peer-script / --out paths.
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks" / "step.py")
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "torch_peer.py").write_text(
        "import argparse, json\n"
        "p = argparse.ArgumentParser()\n"
        "for a in ('--device', '--compile', '--steps', '--out'):\n"
        "    p.add_argument(a)\n"
        "p.add_argument('--batch', nargs='+')\n"
        "a = p.parse_args()\n"
        "res = {b: {'distill_img_s': 2.0, 'student_infer_img_s': 8.0} for b in a.batch}\n"
        "res['device'] = a.device\n"
        "open(a.out, 'w').write(json.dumps(res))\n"
    )
    (tmp_path / "out").mkdir()  # step.py's main has written JAX's results there already
    monkeypatch.chdir(tmp_path)
    args = step.parse_args(
        [
            "--peer",
            "--peer-python",
            sys.executable,
            "--peer-script",
            "bench/torch_peer.py",
            "--batch",
            "2",
            "8",
        ]
    )
    peer = step.run_peer(args, "cpu", Path("out") / "peer.json")
    assert peer["results"]["2"]["distill_img_s"] == 2.0
    assert peer["results"]["device"] == "cpu"
    assert (tmp_path / "out" / "peer.json").is_file()
    assert peer["command"][0] == sys.executable
    assert set(peer["versions"]) == {"torch", "torchvision", "transformers"}


@conftest.background(
    "teacher_targets_benchmark_smoke", "b", _wanted("test_teacher_targets_benchmark_smoke")
)
def _targets_smoke(tmp_path: Path, env: dict):
    out = tmp_path / "targets.json"
    proc = conftest.run_command(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "teacher_targets.py"),
            "--config",
            str(ROOT / "configs" / "distill.py") + ":tiny",
            "--batch",
            "8",
            "--steps",
            "1",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        timeout=600,
        env=env,
        cwd=str(tmp_path),
    )
    return out, proc


@pytest.mark.slow
def test_teacher_targets_benchmark_smoke():
    """benchmarks/teacher_targets.py on the tiny config: both steps run and are timed."""
    out, proc = conftest.background_result("teacher_targets_benchmark_smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["method"] == "vl_channel" and res["batch"] == 8
    for k in ("online", "cached"):
        assert res[k]["median_step_ms"] > 0 and res[k]["images_per_s"] > 0
    ratio = res["online"]["median_step_ms"] / res["cached"]["median_step_ms"]
    assert abs(res["speedup"] - ratio) < 1e-9
    assert "cached / online speed" in proc.stdout


def _data_pipeline_module():
    spec = importlib.util.spec_from_file_location(
        "bench_data_pipeline", ROOT / "benchmarks" / "data_pipeline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_pipeline_arithmetic():
    """The num_workers and wall-time arithmetic of the paper's run, by hand."""
    dp = _data_pipeline_module()
    # 1.5 x 735.5 = 1103.25 images/s at r = 100 per worker: ceil(11.03) = 12 workers; the
    # training process unpacks at 1 ms per example: 1.10 cores; + 1 reserved = 14.1 of 16.
    w = dp.workers_for(100.0, 1.0, 735.5)
    assert w["num_workers"] == 12 and w["fits_host"] and w["cores_needed"] == 14.1
    assert w["host_max_workers"] == 13 and w["host_max_images_per_s"] == 1300.0  # 15 / 1.1
    assert not dp.workers_for(100.0, 1.0, 1161.9)["fits_host"]  # 18 workers + 1.7 + 1 > 16
    # 40 epochs x 2,650 steps x 16 = 1,696,000 images at min(1000, 735) images/s; validation:
    # 40 x 10,834 + 21,586 sentences at min(1000, 7814) sentences/s.
    s = dp.phase_seconds(1000.0, 735.0, 7814.0, 40, 16)
    assert s["images"] == 1_696_000 and s["train_s"] == round(1_696_000 / 735)
    assert s["eval_s"] == round((40 * 10_834 + 10_834 + 5_657 + 5_095) / 1000)
    # The per-worker rate: the smaller of the 1-worker row's wall rate and 1 / its CPU time.
    rows = [
        {"image_size": 384, "num_workers": 0, "examples_per_s_per_worker": 300.0,
         "workers_cpu_ms_per_example": 0.0, "main_cpu_ms_per_example": 4.0},
        {"image_size": 384, "num_workers": 1, "examples_per_s_per_worker": 150.0,
         "workers_cpu_ms_per_example": 8.0, "main_cpu_ms_per_example": 1.5},
    ]  # fmt: skip
    r = dp.per_worker_rate(rows, 384)
    assert r["examples_per_s"] == 125.0 and r["main_cpu_ms_per_example"] == 1.5
    assert dp.per_worker_rate(rows, 96) is None
    pl = dp.plan(rows, dp.GPU_RESULTS, 1.5, 16)
    # 1.5 x 735.5 / 125 -> 9 workers at the paper's batch 16; 1.5 x 1161.9 / 125 -> 14 workers
    # + 2.6 + 1 cores > 16: the batch-16 target is chosen.
    assert pl["workers"]["at_batch_16_step"]["num_workers"] == 9
    assert not pl["workers"]["at_fastest_step"]["fits_host"]
    assert pl["chosen_num_workers"] == 9 and pl["loader_images_per_s"] == 1125.0
    assert pl["student_phase"]["train_s"] == round(1_696_000 / 735.4716110118568)
    # The teacher's phase, estimated at the distill step's useful FLOP rate: 735.47 x 184 /
    # (3 x 75.5) = 597.5 images/s (below the loader's 1125); inference 7814.2 x 34.7 / 75.5.
    t = pl["teacher_phase"]
    assert t["estimated"] and t["step_images_per_s"] == round(735.4716110118568 * 184 / 226.5, 1)
    assert t["train_s"] == round(1_696_000 / (735.4716110118568 * 184 / 226.5))
    assert t["infer_images_per_s"] == round(7814.240843450967 * 34.7 / 75.5, 1)


@pytest.mark.slow
def test_data_pipeline_benchmark_smoke(tmp_path):
    """benchmarks/data_pipeline.py on 48 generated images re-encoded larger, 0 and 1 workers."""
    out = tmp_path / "pipeline.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "data_pipeline.py"),
            *("--synthetic-num-images", "48", "--jpeg-size", "96x72", "--sizes", "384"),
            *("--workers", "0", "1", "--batches", "2", "--warmup", "1", "--batch-size", "4"),
            *("--json", str(out)),
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=600,
        env=dict(os.environ),  # conftest's RKD_JAX_CACHE: the data stays in the test cache
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["source"]["reencoded"]["jpeg_size"] == "96x72"
    assert res["source"]["reencoded"]["images"] == 48
    assert [(r["image_size"], r["num_workers"]) for r in res["results"]] == [(384, 0), (384, 1)]
    assert all(r["examples_per_s"] > 0 for r in res["results"])
    assert res["host"]["cpus"] >= 1 and "load_start" in res["host"]
    assert res["plan"]["per_worker"]["from_num_workers"] == 1
    assert res["plan"]["chosen_num_workers"] >= 1
    assert "chosen num_workers" in proc.stdout


def test_data_pipeline_rejects_a_bad_jpeg_size(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "data_pipeline.py"), "--jpeg-size", "640"],
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 2
    assert "'640': expected WIDTHxHEIGHT in pixels" in proc.stderr
