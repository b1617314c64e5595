"""config.student_alone: the distillation job trains the student alone beside the distilled one
and writes teacher / student alone / distilled side by side (rkd_jax.comparison)."""

import json

import pytest

from rkd_jax import comparison


def _payload(miou, families=None):
    net = {"mIoU": miou, "oIoU": miou - 0.05, "P@0.5": miou + 0.02}
    out = {"network": net, "original": {"mIoU": miou + 0.01}}
    if families is not None:
        out["families"] = {f: {"mIoU": v} for f, v in families.items()}
    return out


def test_summary_gain_and_gap_share_by_hand():
    results = {
        "teacher": {"val": _payload(0.60, {"colour": 0.9, "location": 0.5})},
        "student_alone": {"val": _payload(0.50, {"colour": 0.8, "location": 0.4})},
        "distilled": {"val": _payload(0.525, {"colour": 0.85, "location": 0.45})},
    }
    record = comparison.summarise(results)
    val = record["splits"]["val"]
    assert val["teacher"]["mIoU"] == 0.60
    assert val["distilled"]["mIoU_original"] == pytest.approx(0.535)
    assert val["gain"] == pytest.approx(0.025)
    assert val["teacher_margin"] == pytest.approx(0.10)
    assert val["gap_closed"] == pytest.approx(0.25)  # 2.5 of the 10 points
    assert record["families"]["val"]["location"] == {
        "teacher": 0.5,
        "student_alone": 0.4,
        "distilled": 0.45,
    }
    text = comparison.markdown(record, "refcoco")
    assert "| teacher | 60.00 |" in text
    assert "| student alone | 50.00 |" in text
    assert "| distilled student | 52.50 |" in text
    assert "| distilled - alone | +2.50 |" in text
    assert "| share of the teacher-student gap closed | 25% |" in text
    assert "| location | 50.0 | 40.0 | 45.0 |" in text


def test_no_gap_share_when_teacher_is_not_above():
    results = {
        "teacher": {"val": _payload(0.40)},
        "student_alone": {"val": _payload(0.45)},
        "distilled": {"val": _payload(0.47)},
    }
    record = comparison.summarise(results)
    assert record["splits"]["val"]["gap_closed"] is None
    assert record["families"] == {}  # no family scores: no family table
    assert "| share of the teacher-student gap closed | - |" in comparison.markdown(record, "d")


def test_missing_row_or_split_is_named():
    with pytest.raises(ValueError, match="student_alone"):
        comparison.summarise({"teacher": {}, "distilled": {}})
    with pytest.raises(ValueError, match="teacher has no results for split 'testA'"):
        comparison.summarise(
            {
                "teacher": {"val": _payload(0.5)},
                "student_alone": {"val": _payload(0.4), "testA": _payload(0.4)},
                "distilled": {"val": _payload(0.45), "testA": _payload(0.4)},
            }
        )


def test_distill_job_trains_student_alone_and_compares(tiny_run, tmp_path):
    """The job with student_alone (here with the tiny run's teacher as teacher_checkpoint)
    trains <workdir>/student_alone in student mode and writes the three rows' real scores."""
    from conftest import tiny_config

    from rkd_jax import train

    config = tiny_config(max_steps=2)
    config.student_alone = True
    config.teacher_checkpoint = str(tiny_run / "teacher")
    config.data.eval_splits = ("val",)
    results = train.train_and_evaluate(config, tmp_path)
    assert set(results) == {"val"}

    alone = json.loads((tmp_path / "student_alone" / "config.json").read_text())
    assert alone["mode"] == "student" and alone["student_alone"] is False
    assert (tmp_path / "student_alone" / "results" / "refcoco_val.json").exists()
    # Student mode: no teacher is trained or read, no distillation term is logged.
    log = [json.loads(line) for line in (tmp_path / "student_alone" / "metrics.jsonl").open()]
    assert log[-1]["step"] == 2 and "loss_seg" in log[-1]
    assert not {"loss_vl", "loss_channel"} & set().union(*log)
    assert not (tmp_path / "student_alone" / "teacher").exists()
    distilled = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert {"loss_vl", "loss_channel"} <= set(distilled[-1])
    record = json.loads((tmp_path / "results" / "comparison.json").read_text())
    assert record["runs"]["teacher"] == str(tiny_run / "teacher")
    val = record["splits"]["val"]
    for row, run_results in (
        ("distilled", tmp_path / "results" / "refcoco_val.json"),
        ("student_alone", tmp_path / "student_alone" / "results" / "refcoco_val.json"),
    ):
        scored = json.loads(run_results.read_text())["metrics"]["network"]["mIoU"]
        assert val[row]["mIoU"] == scored
    teacher = json.loads((tmp_path / "results" / "teacher.json").read_text())
    assert val["teacher"]["mIoU"] == teacher["val"]["metrics"]["network"]["mIoU"]
    assert teacher["val"]["role"] == "teacher"
    assert val["gain"] == pytest.approx(val["distilled"]["mIoU"] - val["student_alone"]["mIoU"])
    md = (tmp_path / "results" / "comparison.md").read_text()
    assert "| student alone |" in md and "Per expression family (val)" in md
