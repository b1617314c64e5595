"""launch.sh (the staged Table I experiment) and rkd_jax.table (its report)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
from conftest import ROOT, load_config

from rkd_jax import table

LAUNCH = ROOT / "launch.sh"


def _results(
    run_dir: Path,
    dataset: str,
    split: str,
    miou_net: float,
    miou_orig: float,
    oiou_net: float,
    oiou_orig: float,
    families: dict[str, tuple[float, int]] | None = None,
) -> None:
    """A results file shaped like the ones python -m rkd_jax.main writes; `families`: family
    -> (mIoU, sentences)."""

    def block(miou, oiou):
        return {"mIoU": miou, "oIoU": oiou, "P@0.5": 0.0, "P@0.9": 0.0, "num_sentences": 40}

    payload = {
        "metrics": {"network": block(miou_net, oiou_net), "original": block(miou_orig, oiou_orig)},
        "protocol": {
            "split": split,
            "dataset": dataset,
            "image_size": 96,
            "max_tokens": 12,
            "threshold": 0.5,
            "sentences": "every sentence",
            "max_eval_examples": -1,
            "resize": "squash",
            "empty_union": "IoU = 1",
            "resolutions": {"network": "net text", "original": "orig text"},
        },
        "role": "student",
    }
    if families is not None:
        payload["metrics"]["families"] = {
            fam: {"mIoU": m, "oIoU": m, "num_sentences": n} for fam, (m, n) in families.items()
        }
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    (run_dir / "results" / f"{dataset}_{split}.json").write_text(json.dumps(payload))


def _config(run_dir: Path, mode: str, **changes) -> None:
    c = load_config("distill", "")
    c.mode = mode
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(c.to_dict(), default=list))


@pytest.fixture
def fake_root(tmp_path):
    """refcoco val: teacher on seeds 0-2, student on seeds 0-1 (seed 2 killed before its
    results), distill on seeds 0-2; the teacher also has testA on seed 0 only."""
    root = tmp_path / "runs"
    teacher = {
        0: (0.60, 0.50, 0.70, 0.10),
        1: (0.62, 0.55, 0.70, 0.20),
        2: (0.64, 0.60, 0.70, 0.30),
    }
    for k, vals in teacher.items():
        d = root / "refcoco" / f"seed{k}" / "teacher"
        _results(d, "refcoco", "val", *vals)
        _config(d, "teacher", seed=k)
    _results(root / "refcoco/seed0/teacher", "refcoco", "testA", 0.70, 0.70, 0.70, 0.70)
    for k, v in {0: 0.50, 1: 0.54}.items():
        d = root / "refcoco" / f"seed{k}" / "student"
        _results(d, "refcoco", "val", v, v, v, v)
        _config(d, "student", seed=k)
    _config(root / "refcoco/seed2/student", "student", seed=2)  # no results: killed
    for k, v in {0: 0.55, 1: 0.56, 2: 0.60}.items():
        d = root / "refcoco" / f"seed{k}" / "distill"
        _results(d, "refcoco", "val", v, v, v, v)
        # seed 2 ran with another learning rate: the table must say so.
        _config(
            d,
            "distill",
            seed=k,
            **{
                "train.epochs": 7,
                "train.lr": 0.002 if k == 2 else 0.001,
                "train.backbone_lr_mult": 0.3,
            },
        )
    _results(root / "refcoco/seed0/my_extra_run", "refcoco", "val", 0.3, 0.3, 0.3, 0.3)
    (root / "launch.json").write_text(json.dumps({"setting": "miniature", "seeds": 3}))
    (root / "stage_times.tsv").write_text(
        "teacher\trefcoco/seed0/teacher\t120\tok\td\n"
        "teacher\trefcoco/seed1/teacher\t60\tok\td\n"
        "student\trefcoco/seed2/student\t30\tfailed(1)\td\n"
    )
    return root


def _row(md: str, label: str, section: str) -> list[str]:
    """Cells of the row `label` in the markdown table under the heading `section`."""
    text = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} under {section!r}")


def test_table_means_stds_and_missing_seeds(fake_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the report names its root relative to here
    out = tmp_path / "out"
    (out).mkdir()
    (out / "model_report_miniature.json").write_text(
        json.dumps(
            [
                {
                    "role": "teacher",
                    "backbone": "resnet18",
                    "text_layers": 6,
                    "input": "96x96, 12 tokens",
                    "params_M": 3.4,
                    "gflops": 1.014,
                    "latency_ms_median": 12.34,
                }
            ]
        )
    )
    assert table.main(["--root", str(fake_root), "--out", str(out)]) == 0
    md = (out / "table1.md").read_text()

    # Columns: refcoco val, testA, testB, refcoco+ val, testA, testB.
    net = "mIoU (%), network resolution"
    t = _row(md, "teacher", net)
    assert t[0] == "62.00 ± 2.00 (n=3)"  # 60, 62, 64
    assert t[1] == "70.00 (n=1 of 3)"  # one seed: no std
    assert t[2] == t[3] == "— (n=0 of 3)"
    # Seed 2 of the student has no results: counted, never dropped. std(50, 54) = 2.83.
    assert _row(md, "student (no distillation)", net)[0] == "52.00 ± 2.83 (n=2 of 3)"
    # 55, 56, 60: mean 57, std sqrt(14 / 2) = 2.65.
    assert _row(md, "student + L_VL + L_C (the paper)", net)[0] == "57.00 ± 2.65 (n=3)"
    assert _row(md, "student + CWD", net)[0] == "— (n=0 of 3)"  # every row is listed
    assert _row(md, "my_extra_run", net)[0] == "30.00 (n=1 of 3)"  # unknown runs too
    assert _row(md, "teacher", "mIoU (%), original resolution")[0] == "55.00 ± 5.00 (n=3)"
    assert _row(md, "teacher", "oIoU (%), network resolution")[0] == "70.00 ± 0.00 (n=3)"
    assert _row(md, "teacher", "oIoU (%), original resolution")[0] == "20.00 ± 10.00 (n=3)"

    # The paper's Table I beside, gains paired by seed (seeds 0 and 1 have both runs).
    assert _row(md, "student ResNet-18 + BERT-4 w/ distill", "The paper's Table I")[0] == "63.36"
    gains = "Gain over the student baseline"
    assert _row(md, "teacher − student (the margin)", gains)[0] == "+9.00 ± 1.41 (n=2 of 3)"
    assert _row(md, "student + L_VL + L_C (the paper)", gains)[0] == "+3.50 ± 2.12 (n=2 of 3)"
    assert _row(md, "paper: distilled − student", gains)[0] == "+1.87"
    assert (
        "Teacher's margin over the student baseline on refcoco val (mIoU, network): "
        "+9.00 ± 1.41 (n=2 of 3)"
    ) in md
    assert "the paper: +7.89" in md
    # The share of the gap closed: mean gain / mean margin, 3.50 / 9.00; the paper's 1.87 / 7.89.
    closed = "Share of the teacher-student gap closed"
    assert _row(md, "student + L_VL + L_C (the paper)", closed)[:2] == ["39%", "—"]
    assert _row(md, "paper: student + L_VL + L_C", closed)[0] == "24%"
    assert "`python -m rkd_jax.table --root runs`" in md  # no machine path

    hp = _row(md, "student + L_VL + L_C (the paper)", "Hyper-parameters")
    assert hp[0] == "distill" and hp[2] == "7" and "0.5 L_VL + 0.5 L_C" in hp[5]
    assert "; backbone x0.3;" in hp[3]
    assert "backbone" not in _row(md, "student (no distillation)", "Hyper-parameters")[3]
    assert "differs between its runs: train.lr (0.001, 0.002)" in md
    assert (
        "resnet18 width 12 blocks [1, 1, 1, 1]"
        in _row(md, "student (no distillation)", "Hyper-parameters")[1]
    )
    rep = _row(md, "teacher resnet18 + BERT-6", "Model report")
    assert rep[:5] == ["96x96, 12 tokens", "3.40", "1.01", "12.3", "miniature"]
    assert _row(md, "teacher", "Wall time per stage") == ["2", "0", "3.0"]
    assert _row(md, "student", "Wall time per stage") == ["0", "1", "0.5"]
    assert "sentences scored per split: refcoco val 40; refcoco testA 40" in md

    data = json.loads((out / "table1.json").read_text())
    cell = data["rows"]["student"]["mIoU_network"]["refcoco val"]
    assert cell["n"] == 2 and cell["expected"] == 3 and cell["mean"] == pytest.approx(52.0)
    assert cell["values"] == {"0": pytest.approx(50.0), "1": pytest.approx(54.0)}
    assert data["gap_closed_percent"]["distill"]["refcoco val"] == pytest.approx(350 / 9)
    assert data["gap_closed_percent"]["cwd"]["refcoco val"] is None
    assert data["root"] == "runs"
    png = (out / "table1_miou.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # A seed directory beyond --seeds counts as well: nothing found is ever left out.
    _results(fake_root / "refcoco/seed3/teacher", "refcoco", "val", 0.66, 0.66, 0.66, 0.66)
    table.build(fake_root, out, seeds=3)
    md = (out / "table1.md").read_text()
    assert _row(md, "teacher", net)[0] == "63.00 ± 2.58 (n=4)"  # sqrt(20 / 3)
    assert _row(md, "student (no distillation)", net)[0] == "52.00 ± 2.83 (n=2 of 4)"


def test_table_shared_teacher_pairs_with_every_seed(tmp_path):
    """launch.sh's layout: one teacher per dataset (<root>/refcoco/teacher) for every seed."""
    root, out = tmp_path / "runs", tmp_path / "out"
    _results(root / "refcoco/teacher", "refcoco", "val", 0.60, 0.60, 0.60, 0.60)
    _config(root / "refcoco/teacher", "teacher", seed=0)
    for k, v in {0: 0.50, 1: 0.54, 2: 0.40}.items():
        for run, gain in (("student", 0.0), ("distill", 0.05 + 0.01 * k)):
            d = root / "refcoco" / f"seed{k}" / run
            _results(d, "refcoco", "val", v + gain, v + gain, v + gain, v + gain)
            _config(d, "student" if run == "student" else "distill", seed=k)
    (root / "launch.json").write_text(json.dumps({"setting": "miniature", "seeds": 3}))
    table.build(root, out)
    md = (out / "table1.md").read_text()
    net = "mIoU (%), network resolution"
    assert _row(md, "teacher", net)[0] == "60.00 (n=1)"
    assert "One run per dataset, shared by every seed" in md and ": teacher." in md
    assert _row(md, "student (no distillation)", net)[0] == "48.00 ± 7.21 (n=3)"
    gains = "Gain over the student baseline"
    # 60 - (50, 54, 40): 10, 6, 20 -> mean 12, std sqrt(52) = 7.21.
    assert _row(md, "teacher − student (the margin)", gains)[0] == "+12.00 ± 7.21 (n=3)"
    assert _row(md, "student + L_VL + L_C (the paper)", gains)[0] == "+6.00 ± 1.00 (n=3)"
    assert "Every row's runs share one configuration apart from the seed." in md


def test_table_per_family_means_from_a_hand_built_set(tmp_path):
    """The per-family section: seed means of each family's mIoU per row, the family's
    sentence count in its head, missing seeds counted, malformed families named by file."""
    root, out = tmp_path / "runs", tmp_path / "out"
    fam = lambda col, loc: {"colour_shape": (col, 7), "location": (loc, 5)}
    _results(root / "refcoco/teacher", "refcoco", "val", 0.6, 0.6, 0.6, 0.6, fam(0.9, 0.5))
    for k, (col, loc) in {0: (0.8, 0.2), 1: (0.7, 0.3)}.items():
        _results(
            root / f"refcoco/seed{k}/student", "refcoco", "val", 0.5, 0.5, 0.5, 0.5, fam(col, loc)
        )
    _results(
        root / "refcoco/seed0/distill", "refcoco", "val", 0.5, 0.5, 0.5, 0.5, {"location": (0.4, 5)}
    )
    _results(root / "refcoco/seed1/distill", "refcoco", "val", 0.5, 0.5, 0.5, 0.5)
    (root / "launch.json").write_text(json.dumps({"setting": "miniature", "seeds": 2}))
    table.build(root, out, datasets=["refcoco"], splits=["val"])
    md = (out / "table1.md").read_text()
    fams = "Per expression family"
    head = md.split(f"## {fams}", 1)[1].split("### refcoco val", 1)[1].strip().splitlines()[0]
    assert head == "| model | colour + shape (7) | location (5) |"
    assert _row(md, "teacher", fams) == ["90.0", "50.0"]
    assert _row(md, "student (no distillation)", fams) == ["75.0", "25.0"]
    assert _row(md, "student + L_VL + L_C (the paper)", fams) == ["—", "40.0 (n=1 of 2)"]
    with pytest.raises(AssertionError):
        _row(md, "student + CWD", fams)  # rows without family scores are left out
    data = json.loads((out / "table1.json").read_text())["families"]["refcoco val"]
    assert data["location"]["sentences"] == 5
    assert data["location"]["mIoU_network"]["student"]["mean"] == pytest.approx(25.0)

    bad = root / "refcoco/seed1/distill/results/refcoco_val.json"
    payload = json.loads(bad.read_text())
    payload["metrics"]["families"] = {"size": {"mIoU": 0.5}}
    bad.write_text(json.dumps(payload))
    with pytest.raises(table.TableError, match=r"refcoco_val.json: metrics.families.size lacks"):
        table.build(root, out)


def test_table_bad_input_names_the_file(tmp_path, capsys):
    assert table.main(["--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope: not a directory" in capsys.readouterr().err
    bad = tmp_path / "r" / "refcoco" / "seed0" / "student" / "results" / "refcoco_val.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"metrics": {"network": {"mIoU": 0.5}}}))
    with pytest.raises(table.TableError, match=r"refcoco_val.json: lacks metrics.original.mIoU"):
        table.build(tmp_path / "r", tmp_path / "o")


def test_launch_rejects_bad_options(tmp_path):
    def launch(*args):
        return subprocess.run(
            ["bash", str(LAUNCH), "--root", str(tmp_path / "r"), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = launch("--config.seed=3")
    assert r.returncode == 2 and "use --seeds N" in r.stderr
    r = launch("--stages", "teacher bogus")
    assert r.returncode == 2 and "unknown stage bogus" in r.stderr
    r = launch("--paper")
    assert r.returncode == 2 and "--paper needs --refer-root" in r.stderr
    r = launch("--seeds", "0")
    assert r.returncode == 2 and "positive integer" in r.stderr
    r = launch("--sweep-rows", "distill bogus")
    assert r.returncode == 2 and "--sweep-rows: unknown row bogus (valid: distill" in r.stderr
    r = launch("--rows", "cwd bogus")
    assert r.returncode == 2 and "--rows: unknown row bogus (valid: student distill" in r.stderr
    r = launch("--jobs", "two")
    assert r.returncode == 2 and "--jobs two: expected a positive integer" in r.stderr
    r = launch("--jobs", str(len(os.sched_getaffinity(0)) + 1))
    assert r.returncode == 2 and "one per job at least" in r.stderr
    assert not (tmp_path / "r").exists()  # nothing written before the error


def test_launch_resumes_a_teacher_stopped_early_before_any_student_distils_it(tmp_path):
    """A teacher killed mid-schedule (checkpoints, no results) is trained to its end first."""
    r, root = _fake_launch(
        tmp_path,
        *("--stages", "distill", "--rows", "distill", "--sweep-factors", ""),
        FAKE_SECONDS="0",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "run teacher refcoco/teacher to its end" in r.stdout
    teacher = json.loads((root / "refcoco/teacher/ran.json").read_text())
    student = json.loads((root / "refcoco/seed0/distill/ran.json").read_text())
    assert teacher["end"] <= student["start"]
    assert (root / "refcoco/teacher/results/refcoco_val.json").is_file()


# A stand-in for the python launch.sh calls: `-m rkd_jax.main` writes the run's results after
# FAKE_SECONDS (FAKE_FAIL: a workdir suffix that fails instead), its arguments (argv.txt) and
# when it ran and on which cores; every other call is the real interpreter.
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1 $2" != "-m rkd_jax.main" ]]; then exec "$REAL_PYTHON" "$@"; fi
for a in "$@"; do
  case "$a" in --workdir=*) dir=${a#*=} ;; --config.data.dataset=*) ds=${a#*=} ;; esac
done
mkdir -p "$dir/results"
printf '%s\\n' "${@:3}" >"$dir/argv.txt"
start=$(date +%s.%N)
cores=$(taskset -pc $$ | sed 's/.*: //')
if [[ -n $FAKE_FAIL && $dir == *"$FAKE_FAIL" ]]; then sleep 0.2; exit 3; fi
sleep "$FAKE_SECONDS"
echo "{\\"start\\": $start, \\"end\\": $(date +%s.%N), \\"cores\\": \\"$cores\\"}" >"$dir/ran.json"
echo '{"metrics": {"network": {"mIoU": 0.5}}}' >"$dir/results/${ds}_val.json"
"""


def _fake_launch(tmp_path: Path, *args: str, teacher_finished: bool = False, **env: str):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    root = tmp_path / "runs"
    # The teacher's checkpoints of a run killed before its end (no results).
    (root / "refcoco" / "teacher" / "checkpoints" / "2").mkdir(parents=True, exist_ok=True)
    if teacher_finished:  # its results too: a teacher that ran to its end
        (root / "refcoco" / "teacher" / "results").mkdir()
        (root / "refcoco" / "teacher" / "results" / "refcoco_val.json").write_text("{}")
    out = tmp_path / "out"
    cmd = ["bash", str(LAUNCH), "--setting", "tiny", "--root", str(root), "--out", str(out)]
    environ = dict(os.environ, PYTHON=str(fake), REAL_PYTHON=sys.executable, **env)
    r = subprocess.run(
        cmd + list(args), capture_output=True, text=True, timeout=120, env=environ, check=False
    )
    return r, root


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--jobs 2 needs 2 cores")
def test_launch_jobs_run_side_by_side_on_their_own_cores(tmp_path):
    """--jobs 2: a stage's runs train two at a time, each pinned to its half of the cores but
    the last."""
    r, root = _fake_launch(
        tmp_path,
        *("--stages", "ablations", "--seeds", "2", "--jobs", "2"),
        teacher_finished=True,
        FAKE_SECONDS="1.5",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    runs = [f"seed{k}/{run}" for k in (0, 1) for run in ("vl_only", "channel_only")]
    ran = {run: json.loads((root / "refcoco" / run / "ran.json").read_text()) for run in runs}
    # Each pair ran side by side; every run but the stage's last was pinned to one half of
    # the cores, the last one (nothing queued behind it) to all of them.
    for a, b in (runs[:2], runs[2:]):
        assert ran[a]["start"] < ran[b]["end"] and ran[b]["start"] < ran[a]["end"], ran
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    cores = {run: _cores(ran[run]["cores"]) for run in runs}
    assert cores[runs[0]] != cores[runs[1]]
    assert {frozenset(cores[r]) for r in runs[:3]} == {
        frozenset(cpus[:half]),
        frozenset(cpus[half : 2 * half]),
    }
    assert cores[runs[3]] == set(cpus)
    for run in runs:  # archived and timed as one after the other would be
        assert (tmp_path / "out/runs/refcoco" / run / "results/refcoco_val.json").is_file()
        assert re.search(rf"^done ablations refcoco/{run} in \d+s", r.stdout, re.MULTILINE)
    times = (root / "stage_times.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in times) == sorted(f"refcoco/{r}" for r in runs)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--jobs 2 needs 2 cores")
def test_launch_jobs_stop_after_a_failed_run(tmp_path):
    """A failed run: the run beside it finishes and is archived, no later run starts, and
    launch.sh exits 1 naming the failed run."""
    r, root = _fake_launch(
        tmp_path,
        *("--stages", "ablations", "--seeds", "2", "--jobs", "2"),
        FAKE_SECONDS="1.5",
        FAKE_FAIL="seed0/vl_only",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED in stage ablations: refcoco/seed0/vl_only failed" in r.stderr
    assert "refcoco/seed0/vl_only exited with 3" in r.stderr
    archived = tmp_path / "out/runs/refcoco/seed0/channel_only/results"
    assert (archived / "refcoco_val.json").is_file()
    assert "run ablations refcoco/seed1" not in r.stdout
    assert not (root / "refcoco" / "seed1").exists()


def _resolved_config(run_dir: Path):
    """The config `python -m rkd_jax.main` would run with the arguments the fake recorded."""
    from absl import flags
    from ml_collections import config_flags

    from rkd_jax import main

    args = (run_dir / "argv.txt").read_text().splitlines()
    argv = ["main"] + [a for a in args if a.startswith("--config")]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
    values["config"].parser = main._NamedConfigParser(values["config"].parser)
    values(argv)
    assert f"--workdir={run_dir}" in args
    return values.config


def test_launch_gives_every_row_its_config(tmp_path, monkeypatch):
    """Every stage's runs (stand-in trainer): each row's resolved config, the one the real
    trainer would read, has its method, loss weights, backbone and teacher."""
    monkeypatch.chdir(ROOT)  # launch.sh names the configs relative to the repository
    stages = "teacher student distill ablations baselines lite0"
    r, root = _fake_launch(tmp_path, "--stages", stages, "--seeds", "1", FAKE_SECONDS="0")
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = {
        run: _resolved_config(
            root / "refcoco" / ("teacher" if run == "teacher" else f"seed0/{run}")
        )
        for run in TINY_RUNS
    }
    for run, c in cfg.items():
        assert c.seed == 0 and c.data.dataset == "refcoco", run
        assert c.run.max_steps == 2 and tuple(c.data.eval_splits) == ("val",), run
        distils = run not in ("teacher", "student", "lite0")
        assert c.mode == ("distill" if distils else run.replace("lite0", "student")), run
        assert c.get("teacher_checkpoint", "") == (str(root / "refcoco/teacher") if distils else "")
        if run != "teacher":
            lite = run.startswith("lite0")
            assert c.student.backbone == ("efficientnet_lite0" if lite else "resnet18"), run
    # Every distilling row builds the teacher the teacher run trained (its checkpoint loads).
    for run in ("distill", "vl_only", "cwd", "ickd", "lite0_distill"):
        assert cfg[run].teacher.to_dict() == cfg["teacher"].teacher.to_dict(), run
    assert cfg["vl_only"].distill.lambda_channel == 0.0 < cfg["vl_only"].distill.lambda_vl
    assert cfg["channel_only"].distill.lambda_vl == 0.0 < cfg["channel_only"].distill.lambda_channel
    for run in ("distill", "lite0_distill"):
        assert cfg[run].distill.lambda_vl > 0 and cfg[run].distill.lambda_channel > 0
    for method in ("logit_kd", "skd", "cwd", "ickd"):
        assert cfg[method].distill.method == method
    assert cfg["distill"].distill.method == cfg["lite0_distill"].distill.method


def test_launch_miniature_schedules(tmp_path, monkeypatch):
    """The miniature's student rows train the same 12 epochs: the ResNet-18 rows with x0.1 at
    epoch 8, the Lite0 rows with x0.1 at 8 and 10 and their ImageNet backbone at 0.3 of the lr
    (docs/table1.md, "The Lite0 schedule")."""
    monkeypatch.chdir(ROOT)
    r, root = _fake_launch(
        tmp_path,
        *("--setting", "miniature", "--datasets", "refcoco", "--seeds", "1", "--sweep-factors", ""),
        *("--stages", "student distill lite0", "--rows", "student distill lite0 lite0_distill"),
        FAKE_SECONDS="0",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    decay = {"student": (8,), "distill": (8,), "lite0": (8, 10), "lite0_distill": (8, 10)}
    for run, epochs in decay.items():
        c = _resolved_config(root / "refcoco" / "seed0" / run)
        assert c.train.epochs == 12 and tuple(c.train.lr_decay_epochs) == epochs, run
        lite = run.startswith("lite0")
        assert (c.student.backbone == "efficientnet_lite0") == lite, run
        assert c.train.backbone_lr_mult == (0.3 if lite else 1.0), run
        assert c.data.synthetic_num_images == 1600, run


def test_launch_rows_trains_only_the_chosen_rows(tmp_path):
    """--rows: the training stages train the teacher and the chosen rows only; the sweep tunes
    only the chosen rows among the swept ones."""
    r, root = _fake_launch(
        tmp_path,
        *("--rows", "cwd lite0", "--sweep-factors", "1 10", "--seeds", "1"),
        *("--stages", "teacher sweep student distill ablations baselines lite0 eval"),
        FAKE_SECONDS="0",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    ran = sorted(str(p.parent.relative_to(root)) for p in root.glob("refcoco/**/argv.txt"))
    assert ran == [
        "refcoco/seed0/cwd",
        "refcoco/seed0/lite0",
        "refcoco/sweep/cwd_x1",
        "refcoco/sweep/cwd_x10",
        "refcoco/teacher",
    ]
    for stage in ("student", "distill", "ablations"):
        assert f"stage {stage}: none of its rows is among --rows (cwd lite0)" in r.stdout
    assert "stage baselines: results in" in r.stdout
    assert "eval refcoco/seed0/skd" not in r.stdout  # the eval stage looks at the rows only
    r, _ = _fake_launch(
        tmp_path, "--rows", "student", "--sweep-factors", "1", "--stages", "sweep", FAKE_SECONDS="0"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stage sweep: none of the swept rows is among --rows (student)" in r.stdout


def _cores(text: str) -> set[int]:
    """The cores taskset lists ("0-3,6")."""
    out = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _checkpoints(root: Path) -> dict[str, float]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime
        for p in [*root.glob("*/seed*/*/checkpoints/*"), *root.glob("*/teacher/checkpoints/*")]
        if p.name.isdigit()
    }


TINY_RUNS = (
    "teacher",
    "student",
    "distill",
    "vl_only",
    "channel_only",
    "logit_kd",
    "skd",
    "cwd",
    "ickd",
    "lite0",
    "lite0_distill",
)


def _launch_env(environ) -> dict:
    env = dict(environ, PYTHON=sys.executable)
    # One device compiles about 3x faster than the suite's 8 fake ones; sharding is tested
    # elsewhere.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=1"
    return env


def _launch_tiny(cmd: list[str], *extra: str, environ=os.environ):
    t0 = time.perf_counter()
    env = _launch_env(environ)
    r = conftest.run_command(cmd + list(extra), timeout=3000, env=env, cwd=ROOT)
    return r, time.perf_counter() - t0


# The end-to-end test trains the teacher, the paper's row and the Lite0 student (every row's
# config is checked above with the stand-in trainer; the student alone trains end to end in
# tests/test_comparison.py): a ResNet-18 run costs ~25 s of CPU, mostly compiling its training
# step, the Lite0 run ~60 s on the AVX2-only 2-core machine.
E2E_ROWS = ("distill", "lite0_distill")
E2E_RUNS = ("teacher", *E2E_ROWS)


def _tiny_cmd(root: Path, out: Path) -> list[str]:
    return ["bash", str(LAUNCH), "--setting", "tiny", "--seeds", "1"] + (
        ["--root", str(root), "--out", str(out), "--rows", " ".join(E2E_ROWS)]
    )


@conftest.background(
    "launch_tiny",
    "a",
    lambda item: item.name == "test_launch_tiny_runs_every_stage_then_skips_them",
)
def _first_launch(base: Path, env: dict):
    """The test's first invocation (every stage trains), started when the session starts."""
    root, out = base / "runs", base / "out"
    return root, out, _launch_tiny(_tiny_cmd(root, out), environ=env)


@pytest.mark.slow
def test_launch_tiny_runs_every_stage_then_skips_them(tmp_path):
    """launch.sh --setting tiny --seeds 1 --rows "distill lite0_distill": every stage end to end
    (2 steps per run, 8 val sentences, refcoco; the student, ablations and baselines stages find
    none of their rows, whose configs test_launch_gives_every_row_its_config checks), then a
    second invocation skips every stage, then `--stages "eval report"` re-scores a run whose
    results file was deleted and regenerates the table."""
    # The first invocation ran in the background (conftest.background) while other tests ran.
    root, out, first_result = conftest.background_result("launch_tiny")
    cmd = _tiny_cmd(root, out)

    def launch(*extra, result=None):
        r, seconds = result or _launch_tiny(cmd, *extra)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        print(f"launch.sh {' '.join(extra)}: {seconds:.0f} s")
        return r.stdout

    def run_dir(run):
        return root / "refcoco" / ("teacher" if run == "teacher" else f"seed0/{run}")

    first = launch(result=first_result)
    for run in E2E_RUNS:
        d = run_dir(run)
        name = "refcoco/teacher" if run == "teacher" else f"refcoco/seed0/{run}"
        res = json.loads((d / "results" / "refcoco_val.json").read_text())
        assert res["role"] == ("teacher" if run == "teacher" else "student"), run
        assert re.search(rf"^run \w+ {name} ", first, re.MULTILINE), run
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["seed"] == 0 and cfg["data"]["dataset"] == "refcoco"
        assert cfg["run"]["max_steps"] == 2
        assert not (d / "teacher").exists()  # the teacher run is reused, never retrained
        if run not in ("teacher", "student"):
            assert cfg["mode"] == "distill"
            assert cfg["teacher_checkpoint"] == str(root / "refcoco" / "teacher")
    # The config each run wrote is the one launch.sh gave it (every row: see above).
    cfg = {r: json.loads((run_dir(r) / "config.json").read_text()) for r in E2E_RUNS}
    assert cfg["lite0_distill"]["student"]["backbone"] == "efficientnet_lite0"
    for stage in (
        "data",
        "teacher",
        "student",
        "distill",
        "ablations",
        "baselines",
        "lite0",
        "eval",
        "report",
    ):
        assert f"stage {stage} finished" in first
    for stage in ("student", "ablations", "baselines"):  # their rows are not among --rows here
        assert f"stage {stage}: none of its rows is among --rows" in first
    assert "skip eval refcoco/seed0/distill: results exist" in first  # the runs just wrote them
    md = (out / "table1.md").read_text()
    paper_row = _row(md, "student + L_VL + L_C (the paper)", "mIoU (%), network resolution")
    assert paper_row[0].endswith("(n=1)")
    # CWD is not among --rows here: its cell counts the missing seed.
    assert _row(md, "student + CWD", "mIoU (%), network resolution")[0] == "— (n=0 of 1)"
    assert (out / "table1_miou.png").stat().st_size > 0
    # The report draws every row's val curve from the runs' metrics.jsonl.
    assert (out / "table1_curves.png").stat().st_size > 0
    assert "## Learning curves" in md
    curves = json.loads((out / "table1.json").read_text())["curves"]
    assert {"teacher/refcoco", "distill/refcoco", "lite0_distill/refcoco"} <= set(curves)
    # Distillation runs read the teacher's targets from a table computed once per method.
    assert list((root / "text_cache" / "teacher_targets").glob("*-names.npy"))
    assert json.loads((out / "model_report_tiny.json").read_text())[0]["params_M"] > 0
    ckpts = _checkpoints(root)
    assert len(ckpts) == len(E2E_RUNS)
    # Frozen text features: computed once per encoder (teacher, ResNet-18 student, Lite0
    # student), read by every later run.
    assert len(list((root / "text_cache").glob("*.npy"))) == 3
    log = (root / "logs" / "refcoco_seed0_distill.log").read_text()
    assert "(1 of 2 tables from" in log  # the teacher's, computed by the teacher run
    log = (root / "logs" / "refcoco_seed0_lite0_distill.log").read_text()
    assert "(1 of 2 tables from" in log  # the teacher's; the Lite0 student's is its own

    second = launch()
    assert not re.search(r"^run ", second, re.MULTILINE), second
    assert "skip data refcoco: results exist" in second
    for run in E2E_RUNS:
        name = "refcoco/teacher" if run == "teacher" else f"refcoco/seed0/{run}"
        line = rf"^skip \w+ {name}: results exist$"
        assert re.search(line, second, re.MULTILINE), run
    assert "skip report table1: results exist" in second
    assert "skip report model_report_tiny: results exist" in second
    assert _checkpoints(root) == ckpts

    # Every finished run's small files are archived under <out>/runs, which the report reads.
    archived = out / "runs" / "refcoco/seed0/distill"
    assert (archived / "results/refcoco_val.json").read_bytes() == (
        root / "refcoco/seed0/distill/results/refcoco_val.json"
    ).read_bytes()
    assert (archived / "metrics.jsonl").is_file() and (archived / "config.json").is_file()
    assert not (archived / "checkpoints").exists()
    # Committed files name no machine path: paths under the root read <root>/...
    text = (archived / "config.json").read_text()
    assert str(root) not in text
    assert json.loads(text)["teacher_checkpoint"] == "<root>/refcoco/teacher"

    for where in (root, out / "runs"):
        (where / "refcoco/seed0/distill/results/refcoco_val.json").unlink()
    third = launch("--stages", "eval report")
    assert "run eval refcoco/seed0/distill" in third
    assert (root / "refcoco/seed0/distill/results/refcoco_val.json").is_file()
    assert (archived / "results/refcoco_val.json").is_file()
    assert "run report table1" in third  # a results file is newer than the table
    assert _checkpoints(root) == ckpts

    # Another machine with only the archived (committed) results: nothing trains again.
    fresh = tmp_path / "fresh_runs"
    cmd[cmd.index(str(root))] = str(fresh)
    fourth = launch()
    # (the report may be redrawn: the fresh root's launch.json is newer than the table)
    assert not re.search(r"^run (?!report)", fourth, re.MULTILINE), fourth
    for run in E2E_RUNS:
        name = "refcoco/teacher" if run == "teacher" else f"refcoco/seed0/{run}"
        assert re.search(rf"^skip \w+ {name}: results exist$", fourth, re.MULTILINE), run


def test_val_curves_plateau_gain_and_mean_over_seeds(tmp_path):
    root = tmp_path / "runs"
    rows = [(1.0, 0.20), (2.0, 0.30), (3.0, 0.40), (4.0, 0.42)]
    for k, shift in ((0, 0.0), (1, 0.02)):
        d = root / "refcoco" / f"seed{k}" / "student"
        d.mkdir(parents=True)
        lines = [json.dumps({"step": 5, "loss": 1.0, "epoch": 0.5})]  # a log row, no val
        lines += [
            json.dumps({"step": int(e * 10), "epoch": e, "val_mIoU": v + shift}) for e, v in rows
        ]
        if k == 1:  # a resumed run repeats its last validation: the last row per epoch wins
            lines.append(json.dumps({"step": 40, "epoch": 4.0, "val_mIoU": 0.46}))
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    curve = table.val_curve(root / "refcoco/seed0/student")
    assert curve == rows
    # Last quarter of 4 epochs: from epoch 3 (0.40) to 4 (0.42).
    assert table.last_quarter_gain(curve) == pytest.approx(0.02)
    assert table.last_quarter_gain(curve[:1]) is None
    got = table.mean_curves(root, [("student", "s")], ["refcoco"], [0, 1])[("student", "refcoco")]
    assert got["n"] == 2 and got["epochs"] == [1.0, 2.0, 3.0, 4.0]
    assert got["mean"] == pytest.approx([21.0, 31.0, 41.0, 44.0])
    assert got["gain_last_quarter"] == pytest.approx((2.0 + 4.0) / 2)
    bad = root / "refcoco/seed0/student/metrics.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(table.TableError, match="metrics.jsonl:1"):
        table.val_curve(bad.parent)
