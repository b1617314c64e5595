"""`python -m rkd_jax.evaluate` and `main --mode=eval`: scores from a checkpoint equal the training
run's own results; the model comes from the checkpoint, only data settings can change; bad input
is one `error:` line, exit code 2 and nothing written."""

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_config

from rkd_jax import checkpoint as ckpt_lib
from rkd_jax import evaluate

# pycocotools decoding the reference masks (numpy 2 deprecation, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPLITS = ("val", "testA", "testB")
VOLATILE = ("seconds", "written")


def saved(run: Path, split: str) -> dict:
    return json.loads((run / "results" / f"refcoco_{split}.json").read_text())


def lasting(payload: dict) -> dict:
    """A results payload without what differs between two scorings (time, clock)."""
    return {k: v for k, v in payload.items() if k not in VOLATILE}


def assert_same_scores(got: dict, want: dict) -> None:
    """Two scorings of one checkpoint on one split: every field but the clock equal, and the
    metrics equal up to pixels at the threshold. The tiny run trained and scored on one CPU
    device; these evaluations run on the session's 8 fake devices, where XLA compiles the model
    for a slice of the batch and may sum in another order; the 6-step model has margins within
    ~1e-6 of the threshold, so a pixel may flip (measured on an AVX-512 EPYC: original-resolution
    mIoU 0.01706191 against 0.01706166, 2.5e-7; other CPUs gave equal scores). Sentence counts
    agree exactly, every score within 1e-4 (one sentence scored wrongly moves mIoU by its IoU /
    16)."""
    got, want = lasting(got), lasting(want)
    assert {k: v for k, v in got.items() if k != "metrics"} == {
        k: v for k, v in want.items() if k != "metrics"
    }
    assert sorted(got["metrics"]) == sorted(want["metrics"])
    assert_same_metrics(got["metrics"], want["metrics"])


def assert_same_metrics(got: dict, want: dict) -> None:
    """Both resolutions (and the families `want` has): counts exact, scores within 1e-4."""
    for key in ("network", "original"):
        assert got[key]["num_sentences"] == want[key]["num_sentences"], key
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    for family, scores in want.get("families", {}).items():
        assert got["families"][family] == pytest.approx(scores, abs=1e-4), family


def copy_best_checkpoint(run: Path, dest: Path) -> tuple[Path, int]:
    """A new run directory holding only the best checkpoint of `run` -> (dest, step)."""
    _, step = ckpt_lib.find_checkpoint(run)
    shutil.copytree(run / "checkpoints" / str(step), dest / "checkpoints" / str(step))
    return dest, step


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_evaluate_command_equals_the_training_results(tiny_run, tmp_path, capsys):
    out = tmp_path / "scores.json"
    # Model settings may be given when they agree with the checkpoint's.
    argv = ["--checkpoint", str(tiny_run), "--splits", *SPLITS, "--out", str(out)]
    assert evaluate.main([*argv, "--image-size", "64", "--max-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    assert sorted(got) == sorted(SPLITS)
    _, best = ckpt_lib.find_checkpoint(tiny_run)
    for split in SPLITS:
        want = saved(tiny_run, split)
        assert_same_scores(got[split], want)
        # Paths are relative to the run directory, never this machine's absolute ones.
        assert want["checkpoint"] == f"checkpoints/{best}"
        assert (tiny_run / want["checkpoint"] / "state").is_dir()
        assert want["metrics"]["original"]["num_sentences"] == 16
        assert f"{split}: mIoU {want['metrics']['network']['mIoU']:.4f}" in printed


def test_main_eval_mode_and_a_step_directory_score_the_same(tiny_run, tmp_path):
    run, step = copy_best_checkpoint(tiny_run, tmp_path / "run")
    # The config file's model settings agree with the checkpoint's; its data settings
    # (max_eval_examples 32 in the tiny variant) are not used unless overridden: the run's own
    # (16 sentences) are.
    cmd = [
        sys.executable,
        "-m",
        "rkd_jax.main",
        f"--workdir={run}",
        "--mode=eval",
        "--config=configs/distill.py:tiny",
        "--config.run.max_steps=6",
        '--config.data.eval_splits=("val",)',
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "results").iterdir()) == ["refcoco_val.json"]
    assert_same_scores(saved(run, "val"), saved(tiny_run, "val"))

    # An explicit step directory scores into results/step<N>/, beside the run's best results.
    assert (
        evaluate.main(["--checkpoint", str(run / "checkpoints" / str(step)), "--splits", "val"])
        == 0
    )
    written = json.loads((run / "results" / f"step{step}" / "refcoco_val.json").read_text())
    assert_same_scores(written, saved(tiny_run, "val"))


def test_a_conflicting_model_setting_is_refused(tiny_run, tmp_path, capsys):
    out = tmp_path / "scores.json"
    argv = ["--checkpoint", str(tiny_run), "--splits", "val", "--out", str(out)]
    assert evaluate.main([*argv, "--image-size", "96"]) == 2
    line = error_line(capsys)
    assert "data.image_size=96 conflicts with the checkpoint's data.image_size=64" in line
    assert evaluate.main([*argv, "--threshold", "0.4"]) == 2
    assert "run.threshold=0.4" in error_line(capsys)
    assert not out.exists()

    # main --mode=eval: an explicit --config file is checked field by field against the
    # checkpoint's model; without --config only the --config.X overrides count.
    config = tiny_config()
    config.student.fusion_dim = 32
    settings = evaluate.command_line_settings(config, {"data.root": "/refer"}, True)
    assert settings["data.root"] == "/refer" and settings["student.fusion_dim"] == 32
    with pytest.raises(
        ValueError,
        match=r"student\.fusion_dim=32 conflicts with the checkpoint's student\.fusion_dim=8",
    ):
        evaluate.evaluate_checkpoint(tiny_run, ["val"], settings, out)
    assert not out.exists()
    default_file = tiny_config()
    default_file.data.image_size = 96  # configs/distill.py's default, not given on the line
    assert evaluate.command_line_settings(default_file, {"data.max_tokens": 12}, False) == {
        "data.max_tokens": 12
    }


def test_a_checkpoint_of_another_architecture_is_refused(tiny_run, tmp_path, capsys):
    run, step = copy_best_checkpoint(tiny_run, tmp_path / "run")
    meta_file = run / "checkpoints" / str(step) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["model"]["fusion_dim"] *= 2  # the config now describes a model the weights don't fit
    meta_file.write_text(json.dumps(meta))
    assert evaluate.main(["--checkpoint", str(run), "--splits", "val"]) == 2
    assert "another architecture" in error_line(capsys)
    assert not (run / "results").exists()


def test_refer_root_with_images_apart_and_a_missing_split(tiny_run, tmp_path, capsys):
    """The tiny run's own data, rewritten as a REFER root without testB whose COCO images live in
    another directory (data.image_dir): val scores as in training; testB is refused."""
    from rkd_jax.data import prepare, refer

    data = tiny_config().data
    source = prepare.ensure_synthetic(int(data.synthetic_seed), int(data.synthetic_num_images))
    root, images = tmp_path / "refer", tmp_path / "coco_train2014"
    (root / "refcoco").mkdir(parents=True)
    shutil.copy(source / "refcoco" / "instances.json", root / "refcoco" / "instances.json")
    refs = refer.load_plain_pickle(source / "refcoco" / "refs(unc).p")
    kept = [r for r in refs if r["split"] != "testB"]
    assert 0 < len(kept) < len(refs)
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(kept, f)
    shutil.copytree(source / refer.IMAGE_SUBDIR, images)
    run, _ = copy_best_checkpoint(tiny_run, tmp_path / "run")
    out = tmp_path / "scores.json"
    base = ["--checkpoint", str(run), "--refer-root", str(root), "--out", str(out)]

    assert evaluate.main([*base, "--splits", "val", "--image-dir", str(tmp_path / "none")]) == 2
    assert "image directory does not exist" in error_line(capsys)
    assert evaluate.main([*base, "--image-dir", str(images), "--splits", "val", "testB"]) == 2
    assert "no evaluation (per-sentence) split 'testB'" in error_line(capsys)
    assert not out.exists() and not (run / "results").exists()

    assert evaluate.main([*base, "--image-dir", str(images), "--splits", "val"]) == 0
    got = json.loads(out.read_text())["val"]
    # The same sentences, images and model: the same scores (expression families exist only for
    # the embedded data, whose generator knows them).
    want = saved(tiny_run, "val")["metrics"]
    assert_same_metrics(got["metrics"], {k: want[k] for k in ("network", "original")})
    assert got["protocol"]["data_root"] == str(root)
    assert not os.path.isabs(got["checkpoint"])


def _slurm_job_id() -> int:
    """A job id whose coordinator port (JAX: 61440 + job_id % 4096) is free here."""
    for port in range(61440 + os.getpid() % 4000, 65536):
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
        return 4096 + port - 61440
    raise RuntimeError("no free port for the coordinator")


@pytest.mark.slow
def test_two_slurm_tasks_score_as_one_process(tiny_run, tmp_path):
    """`srun -n2 python -m rkd_jax.evaluate ...` on one CPU host: jax.distributed starts from the
    Slurm environment alone (gloo), each task scores its own rows, task 0 writes the results,
    which equal the run's own."""
    xla = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join(["--xla_force_host_platform_device_count=1", *xla]),
        SLURM_JOB_ID=str(_slurm_job_id()),
        SLURM_STEP_NODELIST="localhost",
        SLURM_NTASKS="2",
        SLURM_STEP_NUM_TASKS="2",
        SLURM_STEP_NUM_NODES="2",
        SLURM_LOCALID="0",  # as if each task ran on its own host
    )
    out = tmp_path / "scores.json"
    cmd = [sys.executable, "-m", "rkd_jax.evaluate", "--checkpoint", str(tiny_run)]
    cmd += ["--splits", "val", "testA", "--out", str(out)]
    tasks = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(env, SLURM_PROCID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [t.communicate(timeout=600)[0] for t in tasks]
    for t, log in zip(tasks, logs):
        assert t.returncode == 0, log[-3000:]
    assert "slurm job, process 1 of 2" in logs[1]
    got = json.loads(out.read_text())
    for split in ("val", "testA"):
        want = saved(tiny_run, split)
        assert got[split]["checkpoint"] == want["checkpoint"]
        assert got[split]["protocol"] == want["protocol"]
        # Each task computes half of every global batch: the convolutions sum in another order,
        # and the tiny model (6 steps) has many margins within ~1e-5 of the threshold, so a few
        # pixels may flip (measured: mIoU 0.0130128 against 0.0130041, 1.3e-5). Counts agree
        # exactly; the scores within 1e-3, far below what a wrong merge of the processes gives.
        for resolution in ("network", "original"):
            g, w = got[split]["metrics"][resolution], want["metrics"][resolution]
            assert g["num_sentences"] == w["num_sentences"]
            assert g == pytest.approx(w, abs=1e-3)
