"""launch.sh: seed 0 of a swept distillation row is the sweep's run of the chosen factor."""

import json
import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT

LAUNCH = ROOT / "launch.sh"


def test_seed0_of_a_swept_row_reuses_the_sweep_run(tiny_run, tmp_path):
    """The sweep trained `distill` at the chosen factor with seed 0: the distill stage's seed-0
    run starts from that run's checkpoints (nothing trains again) and scores them."""
    root, out = tmp_path / "runs", tmp_path / "out"
    shutil.copytree(tiny_run / "teacher", root / "refcoco" / "teacher")
    sweep_run = root / "refcoco" / "sweep" / "distill_x1"
    shutil.copytree(tiny_run / "checkpoints", sweep_run / "checkpoints")
    shutil.copy(tiny_run / "metrics.jsonl", sweep_run / "metrics.jsonl")
    steps = sorted(int(p.name) for p in (sweep_run / "checkpoints").iterdir() if p.name.isdigit())
    out.mkdir()
    weights = ["--config.distill.lambda_vl=0.5", "--config.distill.lambda_channel=0.5"]
    (out / "sweep.json").write_text(
        json.dumps(
            {
                "factors": [0.1, 1.0],
                "datasets": {
                    "refcoco": {
                        "distill": {
                            "val_mIoU": {"0.1": 0.1, "1": 0.2},
                            "chosen_factor": 1.0,
                            "overrides": weights,
                        }
                    }
                },
            }
        )
    )
    env = dict(os.environ, PYTHON=sys.executable)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=1"
    cmd = ["bash", str(LAUNCH), "--setting", "tiny", "--seeds", "1", "--root", str(root)]
    cmd += ["--out", str(out), "--stages", "distill", "--sweep-rows", "distill"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "seed 0 of refcoco distill is the sweep's run distill_x1" in r.stdout

    run = root / "refcoco" / "seed0" / "distill"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["distill"]["lambda_vl"] == 0.5 and cfg["seed"] == 0
    # launch.sh's tiny runs stop at 2 steps; the sweep's run went to steps[-1] > 2. The scored
    # checkpoint is one of the sweep's: nothing was trained from scratch.
    assert steps[-1] > 2
    res = json.loads((run / "results" / "refcoco_val.json").read_text())
    assert int(res["checkpoint"].split("/")[-1]) in steps
    kept = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == steps
