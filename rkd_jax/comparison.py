"""What distillation did, from one job: teacher, student alone and distilled student side by side.

A distillation job with `config.student_alone` trains the same student twice (with the teacher
and without it, same seed and schedule) and scores all three models on the same splits;
`write` puts their scores in `<workdir>/results/comparison.json` and `comparison.md` (also
logged), so the default job itself shows the teacher's margin and the distilled student's gain.
"""

from __future__ import annotations

from pathlib import Path

from rkd_jax.files import write_json_atomic, write_text_atomic

ROWS = ("teacher", "student_alone", "distilled")
LABELS = {"teacher": "teacher", "student_alone": "student alone", "distilled": "distilled student"}
METRICS = ("mIoU", "oIoU", "P@0.5")


def gap_closed(gain: float, margin: float) -> float | None:
    """The share of the teacher-student gap a distilled student closes: its gain over the
    student alone / the teacher's margin over it (None when the teacher is not above it)."""
    return gain / margin if margin > 0 else None


def summarise(results: dict[str, dict[str, dict]]) -> dict:
    """{row: {split: metrics}} (`evaluate.evaluate_run`'s payloads) -> the comparison record:
    per split and row the network-resolution mIoU, oIoU, P@0.5 and the original-size mIoU;
    per expression family (where the data has them) the network mIoU; the distilled student's
    gain over the student alone and the share of the teacher-student gap it closes."""
    missing = [row for row in ROWS if row not in results]
    if missing:
        raise ValueError(f"comparison: no results for {missing}; expected rows {ROWS}")
    splits = list(results["distilled"])
    record: dict = {"splits": {}, "families": {}}
    for split in splits:
        per_row = {}
        for row in ROWS:
            if split not in results[row]:
                raise ValueError(f"comparison: {row} has no results for split {split!r}")
            metrics = results[row][split]
            entry = {k: metrics["network"][k] for k in METRICS}
            if metrics.get("original"):
                entry["mIoU_original"] = metrics["original"]["mIoU"]
            per_row[row] = entry
        teacher, alone, distilled = (per_row[r]["mIoU"] for r in ROWS)
        gap = teacher - alone
        per_row["gain"] = distilled - alone
        per_row["teacher_margin"] = gap
        per_row["gap_closed"] = gap_closed(distilled - alone, gap)
        record["splits"][split] = per_row
        families = {row: results[row][split].get("families") or {} for row in ROWS}
        if all(families.values()):
            record["families"][split] = {
                fam: {row: families[row][fam]["mIoU"] for row in ROWS if fam in families[row]}
                for fam in sorted(families["distilled"])
            }
    return record


def markdown(record: dict, dataset: str) -> str:
    """The record as the tables the job prints: mIoU per split, then per family."""
    splits = list(record["splits"])
    lines = [
        f"# Teacher, student alone and distilled student ({dataset}, network-resolution mIoU %)",
        "",
        "| model | " + " | ".join(splits) + " |",
        "|---|" + "---|" * len(splits),
    ]
    for row in ROWS:
        cells = [f"{100 * record['splits'][s][row]['mIoU']:.2f}" for s in splits]
        lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    gains = [f"{100 * record['splits'][s]['gain']:+.2f}" for s in splits]
    lines.append("| distilled - alone | " + " | ".join(gains) + " |")
    shares = []
    for s in splits:
        closed = record["splits"][s]["gap_closed"]
        shares.append("-" if closed is None else f"{100 * closed:.0f}%")
    lines.append("| share of the teacher-student gap closed | " + " | ".join(shares) + " |")
    for split, fams in record["families"].items():
        lines += ["", f"Per expression family ({split}):", ""]
        lines.append("| family | " + " | ".join(LABELS[r] for r in ROWS) + " |")
        lines.append("|---|" + "---|" * len(ROWS))
        for fam, scores in fams.items():
            cells = [f"{100 * scores[r]:.1f}" if r in scores else "-" for r in ROWS]
            lines.append(f"| {fam.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(workdir: Path, dataset: str, results: dict, runs: dict[str, str]) -> str:
    """Write results/comparison.{json,md} under workdir; returns the markdown. `runs` names
    each row's run directory relative to workdir (or as given, for an outside teacher)."""
    record = summarise(results)
    record = {"dataset": dataset, "runs": runs, **record}
    out = Path(workdir) / "results"
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(record, dataset)
    write_json_atomic(out / "comparison.json", record, indent=2)
    write_text_atomic(out / "comparison.md", text)
    return text
