"""The loss-weight sweep: the same grid for every method, the best val mIoU chosen."""

import json

import pytest

from rkd_jax import sweep


def test_overrides_scale_the_rows_default_weights():
    d = sweep.default_weights()
    assert d["lambda_vl"] == d["lambda_channel"] == 0.5 and d["kd_weight"] == 10.0
    assert sweep.overrides("distill", 0.1) == [
        "--config.distill.lambda_vl=0.05",
        "--config.distill.lambda_channel=0.05",
    ]
    assert sweep.overrides("vl_only", 10) == ["--config.distill.lambda_vl=5"]
    assert sweep.overrides("cwd", 10) == ["--config.distill.cwd_weight=30"]
    with pytest.raises(ValueError, match="row 'student' has no loss weight"):
        sweep.overrides("student", 1)
    with pytest.raises(ValueError, match="factor -1"):
        sweep.overrides("cwd", -1)


def _val(root, ds, row, factor, miou):
    d = root / ds / "sweep" / sweep.run_name(row, factor) / "results"
    d.mkdir(parents=True)
    (d / f"{ds}_val.json").write_text(json.dumps({"metrics": {"network": {"mIoU": miou}}}))


def test_choose_keeps_the_best_val_factor_and_chosen_reads_it(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "out"
    factors = [0.1, 1.0, 10.0]
    for f, m in zip(factors, (0.40, 0.45, 0.30)):
        _val(root, "refcoco", "cwd", f, m)
    for f, m in zip(factors, (0.50, 0.50, 0.20)):  # a tie: the factor nearest x1 wins
        _val(root, "refcoco", "distill", f, m)
    _val(root, "refcoco", "skd", 1.0, 0.9)  # incomplete: never chosen
    r = sweep.choose(root, out, ["refcoco"], factors)
    rows = r["datasets"]["refcoco"]
    assert rows["cwd"]["chosen_factor"] == 1.0 and rows["cwd"]["val_mIoU"]["10"] == 0.30
    assert rows["distill"]["chosen_factor"] == 1.0
    assert rows["skd"]["chosen_factor"] is None
    assert "logit_kd" not in rows
    assert sweep.chosen(out, "refcoco", "cwd") == ["--config.distill.cwd_weight=3"]
    assert sweep.chosen(out, "refcoco", "skd") == []
    assert sweep.chosen(out, "refcoco+", "cwd") == []
    # The run seed 0 reuses: the chosen factor's directory, named as the sweep stage names it.
    assert sweep.chosen_run(out, "refcoco", "cwd") == sweep.run_name("cwd", 1.0) == "cwd_x1"
    assert sweep.chosen_run(out, "refcoco", "skd") == ""
    assert sweep.chosen_run(tmp_path / "nowhere", "refcoco", "cwd") == ""
    md = (out / "sweep.md").read_text()
    assert "| cwd | 40.00 | 45.00 | 30.00 | x1 |" in md
    assert "| skd | - | 90.00 | - | (incomplete) |" in md
    # Another sitting sweeps refcoco+ only: refcoco's choices stay (read again from its runs).
    for f, m in zip(factors, (0.50, 0.52, 0.55)):
        _val(root, "refcoco+", "distill", f, m)
    r = sweep.choose(root, out, ["refcoco+"], factors)
    assert list(r["datasets"]) == ["refcoco", "refcoco+"]
    assert sweep.chosen_run(out, "refcoco", "cwd") == "cwd_x1"
    assert sweep.chosen_run(out, "refcoco+", "distill") == "distill_x10"
    assert "## refcoco\n" in (out / "sweep.md").read_text()
    _val(root, "refcoco", "ickd", 0.1, 0.2)
    (root / "refcoco/sweep/ickd_x1/results").mkdir(parents=True)
    (root / "refcoco/sweep/ickd_x1/results/refcoco_val.json").write_text("{}")
    with pytest.raises(ValueError, match="ickd_x1/results/refcoco_val.json: lacks"):
        sweep.choose(root, out, ["refcoco"], factors)


def test_cli_prints_overrides_and_refuses_an_unknown_row(capsys):
    assert sweep.main(["overrides", "logit_kd", "0.1"]) == 0
    assert capsys.readouterr().out.strip() == "--config.distill.kd_weight=1"
    assert sweep.main(["run-name", "logit_kd", "0.10"]) == 0
    assert capsys.readouterr().out.strip() == "logit_kd_x0.1"
    assert sweep.main(["overrides", "teacher", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: row 'teacher'")
