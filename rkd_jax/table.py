"""Table I from the results files of launch.sh: table1.md, table1.json and table1_miou.png.

    python -m rkd_jax.table --root runs/table1 --out results/ [--seeds N]
        [--datasets refcoco refcoco+] [--splits val testA testB]

Reads `<root>/<dataset>/seed<k>/<run>/results/<dataset>_<split>.json` (written by
`python -m rkd_jax.main`), each run's `config.json`, `<root>/stage_times.tsv` (wall time per
run, written by launch.sh) and `<out>/model_report_*.json` (python -m rkd_jax.report --json).
Every cell is the mean +- sample standard deviation (ddof=1) over seeds, in percent, with the
number of seeds n; a seed whose results file is missing is never dropped from the count: the
cell then reads "n=2 of 3". Where the results files score expression families (the embedded
data), a section gives each row's mean mIoU per family and split.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from rkd_jax import cli, comparison

# Row order of Table I; the run directory names are the ones launch.sh writes.
ROWS: tuple[tuple[str, str], ...] = (
    ("teacher", "teacher"),
    ("student", "student (no distillation)"),
    ("distill", "student + L_VL + L_C (the paper)"),
    ("vl_only", "student + L_VL only"),
    ("channel_only", "student + L_C only"),
    ("logit_kd", "student + pixel-wise logit KD"),
    ("skd", "student + SKD (pair-wise)"),
    ("cwd", "student + CWD"),
    ("ickd", "student + ICKD"),
    ("lite0", "Lite0 student (no distillation)"),
    ("lite0_distill", "Lite0 student + L_VL + L_C"),
)
# Shown only when some run of theirs exists (launch.sh --paper --efficientnet-b0 FILE).
OPTIONAL_ROWS: tuple[tuple[str, str], ...] = (
    ("b0", "EfficientNet-B0 student (no distillation)"),
    ("b0_distill", "EfficientNet-B0 student + L_VL + L_C"),
)
# The distillation rows of the ResNet-18 student, compared with the student alone.
DISTILLED_ROWS = ("distill", "vl_only", "channel_only", "logit_kd", "skd", "cwd", "ickd")
DATASETS = ("refcoco", "refcoco+")
SPLITS = ("val", "testA", "testB")
METRICS = (("mIoU", "network"), ("mIoU", "original"), ("oIoU", "network"), ("oIoU", "original"))

# docs/paper.md, Table I (mIoU, %). The student's RefCOCO testA (54.02) is probably a typo.
PAPER_TABLE1: dict[str, dict[tuple[str, str], float]] = {
    "teacher": {
        ("refcoco", "val"): 69.38,
        ("refcoco", "testA"): 71.86,
        ("refcoco", "testB"): 65.02,
        ("refcoco+", "val"): 56.59,
        ("refcoco+", "testA"): 62.32,
        ("refcoco+", "testB"): 48.78,
    },
    "student": {
        ("refcoco", "val"): 61.49,
        ("refcoco", "testA"): 54.02,
        ("refcoco", "testB"): 58.26,
        ("refcoco+", "val"): 48.23,
        ("refcoco+", "testA"): 53.23,
        ("refcoco+", "testB"): 40.79,
    },
    "distill": {
        ("refcoco", "val"): 63.36,
        ("refcoco", "testA"): 65.91,
        ("refcoco", "testB"): 61.14,
        ("refcoco+", "val"): 51.82,
        ("refcoco+", "testA"): 54.76,
        ("refcoco+", "testB"): 44.41,
    },
}
PAPER_LABELS = {
    "teacher": "teacher ResNet-101 + BERT-12",
    "student": "student ResNet-18 + BERT-4",
    "distill": "student ResNet-18 + BERT-4 w/ distill",
}

_SEED_DIR = re.compile(r"^seed(\d+)$")
# The seed key of a run shared by every seed (launch.sh's teacher: <root>/<dataset>/<run>).
SHARED = -1


class TableError(ValueError):
    """Bad input to the table: names the file or argument and what was expected."""


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean and sample std (None for n < 2) of the values of n of `expected` seeds."""

    mean: float | None
    std: float | None
    n: int
    expected: int
    values: dict[int, float]

    @staticmethod
    def of(values: dict[int, float], expected: int) -> Stat:
        v = np.asarray(list(values.values()), np.float64)
        mean = float(v.mean()) if len(v) else None
        std = float(v.std(ddof=1)) if len(v) >= 2 else None
        return Stat(mean, std, len(v), expected, dict(values))


@dataclasses.dataclass
class Collected:
    """Everything read from a launch.sh root."""

    # (run, dataset, split, seed) -> the results file's "metrics" ({resolution: {name: value}})
    metrics: dict[tuple[str, str, str, int], dict]
    # (run, dataset, seed) -> config.json of the run
    configs: dict[tuple[str, str, int], dict]
    # one results payload (for the protocol block)
    example: dict | None
    seeds: set[int]
    runs: set[str]
    # runs found directly under <root>/<dataset>/ (one run shared by every seed)
    shared_runs: set[str]
    columns_found: set[tuple[str, str]]
    num_files: int


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TableError(f"{path}: not a readable JSON file ({e})") from None


def collect(root: Path) -> Collected:
    """Read every results file and config.json under `root` (the launch.sh layout)."""
    root = Path(root)
    if not root.is_dir():
        raise TableError(f"--root {root}: not a directory (expected a launch.sh run root)")
    out = Collected({}, {}, None, set(), set(), set(), set(), 0)
    for ds_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        found = []  # (seed, run directory)
        for sub in sorted(p for p in ds_dir.iterdir() if p.is_dir()):
            m = _SEED_DIR.match(sub.name)
            if m:
                out.seeds.add(int(m.group(1)))
                found += [(int(m.group(1)), p) for p in sorted(sub.iterdir()) if p.is_dir()]
            elif (sub / "results").is_dir() or (sub / "config.json").is_file():
                found.append((SHARED, sub))
                out.shared_runs.add(sub.name)
        for seed, run_dir in found:
            run = run_dir.name
            out.runs.add(run)
            if (run_dir / "config.json").is_file():
                out.configs[(run, ds_dir.name, seed)] = _read_json(run_dir / "config.json")
            prefix = f"{ds_dir.name}_"
            for f in sorted((run_dir / "results").glob(f"{prefix}*.json")):
                split = f.stem[len(prefix) :]
                payload = _read_json(f)
                metrics = payload.get("metrics")
                for name, resolution in METRICS:
                    try:
                        float(metrics[resolution][name])
                    except (KeyError, TypeError, ValueError):
                        raise TableError(
                            f"{f}: lacks metrics.{resolution}.{name} (expected a results "
                            "file of python -m rkd_jax.main)"
                        ) from None
                for fam, m in (metrics.get("families") or {}).items():
                    try:
                        float(m["mIoU"]), int(m["num_sentences"])
                    except (KeyError, TypeError, ValueError):
                        raise TableError(
                            f"{f}: metrics.families.{fam} lacks mIoU or num_sentences (expected "
                            "a results file of python -m rkd_jax.main)"
                        ) from None
                out.metrics[(run, ds_dir.name, split, seed)] = metrics
                out.columns_found.add((ds_dir.name, split))
                out.example = out.example or payload
                out.num_files += 1
    return out


def stat(
    c: Collected,
    run: str,
    column: tuple[str, str],
    metric: str,
    resolution: str,
    seeds: Sequence[int],
    family: str | None = None,
) -> Stat:
    """Stat of one cell in percent, over `seeds` (the seeds that should be there); a shared
    run (one run for every seed) is one value of one expected. With `family`: that expression
    family's score (metrics.families, network resolution) instead."""
    ds, split = column
    if run in c.shared_runs:
        seeds = [SHARED]
    values = {}
    for k in seeds:
        m = c.metrics.get((run, ds, split, k))
        if m is not None and family is not None:
            m = (m.get("families") or {}).get(family)
        elif m is not None:
            m = m[resolution]
        if m is not None:
            values[k] = 100.0 * float(m[metric])
    return Stat.of(values, len(seeds))


def paired_difference(a: Stat, b: Stat) -> Stat:
    """a - b over the seeds both have (seed k of a against seed k of b); a shared run's one
    value is paired with every seed of the other."""
    if set(a.values) == {SHARED} and SHARED not in b.values:
        return Stat.of({k: a.values[SHARED] - v for k, v in b.values.items()}, b.expected)
    if set(b.values) == {SHARED} and SHARED not in a.values:
        return Stat.of({k: v - b.values[SHARED] for k, v in a.values.items()}, a.expected)
    common = sorted(set(a.values) & set(b.values))
    return Stat.of({k: a.values[k] - b.values[k] for k in common}, a.expected)


def format_cell(s: Stat, signed: bool = False) -> str:
    """'62.00 ± 2.00 (n=3)'; 'n=2 of 3' when seeds are missing; '—' without values."""
    count = f"n={s.n}" if s.n == s.expected else f"n={s.n} of {s.expected}"
    if s.n == 0:
        return f"— ({count})"
    text = f"{s.mean:+.2f}" if signed else f"{s.mean:.2f}"
    if s.std is not None:
        text += f" ± {s.std:.2f}"
    return f"{text} ({count})"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _column_name(column: tuple[str, str]) -> str:
    return f"{column[0]} {column[1]}"


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def _model_text(m: dict) -> str:
    backbone = m.get("backbone", "?")
    text = backbone
    if backbone.startswith("resnet"):
        text += f" width {m.get('backbone_width', '?')}"
    stages = m.get("backbone_stage_sizes") or ()
    if stages:
        text += f" blocks {list(stages)}"
    weights = m.get("backbone_weights") or ""
    if weights:
        text += f" ({Path(weights).name} weights)"
    frozen = "fine-tuned" if m.get("text_trainable") else "frozen"
    text += (
        f"; BERT {m.get('text_num_layers', '?')} layers ({frozen}); "
        f"C'={m.get('fusion_dim', '?')}, FPN {m.get('fpn_dim', '?')}"
    )
    return text


def _loss_text(cfg: dict) -> str:
    if cfg.get("mode") != "distill":
        return "L_seg only"
    d = cfg.get("distill", {})
    method = d.get("method", "?")
    if method in ("vl_channel", "rkd"):  # "rkd": the paper's method before its rename
        return (
            f"L_seg + {d.get('lambda_vl', '?'):g} L_VL + {d.get('lambda_channel', '?'):g} L_C "
            f"(channel_norm {d.get('channel_norm', '?')})"
        )
    if method == "logit_kd":
        return f"logit KD: T={d.get('kd_temperature', '?')}, weight {d.get('kd_weight', '?')}"
    if method == "skd":
        return f"SKD: weight {d.get('skd_weight', '?')}, pool {d.get('skd_pool_scale', '?')}"
    if method == "cwd":
        return f"CWD: tau={d.get('cwd_tau', '?')}, weight {d.get('cwd_weight', '?')}"
    if method == "ickd":
        adapter = "1x1 conv + BN adapter" if d.get("ickd_adapter", False) else "no adapter"
        return f"ICKD: weight {d.get('ickd_weight', '?')}, {adapter}"
    return f"method {method}"


def hyperparameters(cfg: dict) -> list[str]:
    """[mode, model, epochs, lr schedule, batch, loss] of one run's config.json."""
    mode = cfg.get("mode", "?")
    sched = cfg.get("teacher_train" if mode == "teacher" else "train", {})
    model = cfg.get("teacher" if mode == "teacher" else "student", {})
    decay = list(sched.get("lr_decay_epochs") or [])
    lr = f"{sched.get('lr', '?')}"
    if decay:
        lr += f", x{sched.get('lr_decay_factor', '?')} at epoch {', '.join(map(str, decay))}"
    mult = sched.get("backbone_lr_mult", 1.0)
    if mult != 1.0:
        lr += f"; backbone x{mult:g}"
    lr += f"; wd {sched.get('weight_decay', '?')}"
    epochs = f"{sched.get('epochs', '?')}"
    max_steps = cfg.get("run", {}).get("max_steps", -1)
    if max_steps is not None and max_steps >= 0:
        epochs += f" (capped at {max_steps} steps)"
    return [
        mode,
        _model_text(model),
        epochs,
        lr,
        f"{sched.get('batch_size', '?')}",
        _loss_text(cfg),
    ]


# Keys that legitimately differ between the runs of one row.
_PER_RUN_KEYS = ("seed", "data.dataset", "teacher_checkpoint")


def config_differences(configs: Sequence[dict]) -> list[str]:
    """Keys whose values differ among the configs of one row (other than the seed)."""
    flat = [_flatten(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    out = []
    for k in keys:
        if k in _PER_RUN_KEYS:
            continue
        values = {repr(f.get(k)) for f in flat}
        if len(values) > 1:
            out.append(f"{k} ({', '.join(sorted(values))})")
    return out


def stage_times(root: Path) -> list[list[str]]:
    """Rows [stage, runs, failed, minutes] summed over <root>/stage_times.tsv."""
    path = Path(root) / "stage_times.tsv"
    if not path.is_file():
        return []
    totals: dict[str, list[float]] = {}
    with path.open() as f:
        for row in csv.reader(f, delimiter="\t"):
            if len(row) < 4:
                continue
            stage, _, seconds, status = row[:4]
            t = totals.setdefault(stage, [0, 0, 0.0])
            try:
                t[2] += float(seconds)
            except ValueError:
                continue
            t[0 if status == "ok" else 1] += 1
    order = [
        "data",
        "teacher",
        "student",
        "distill",
        "ablations",
        "baselines",
        "lite0",
        "eval",
        "report",
    ]
    stages = sorted(totals, key=lambda s: order.index(s) if s in order else len(order))
    rows = [
        [s, str(int(totals[s][0])), str(int(totals[s][1])), f"{totals[s][2] / 60:.1f}"]
        for s in stages
    ]
    total = sum(t[2] for t in totals.values())
    return rows + [
        [
            "total",
            str(int(sum(t[0] for t in totals.values()))),
            str(int(sum(t[1] for t in totals.values()))),
            f"{total / 60:.1f}",
        ]
    ]


def model_report_rows(out: Path) -> list[list[str]]:
    """Rows of <out>/model_report_*.json (python -m rkd_jax.report --json), duplicates once."""
    rows, seen = [], set()
    for f in sorted(Path(out).glob("model_report_*.json")):
        data = _read_json(f)
        if not isinstance(data, list):
            raise TableError(f"{f}: expected the list of rows python -m rkd_jax.report writes")
        for r in data:
            key = (
                r.get("role"),
                r.get("backbone"),
                r.get("text_layers"),
                r.get("input"),
                r.get("params_M"),
            )
            if key in seen:
                continue
            seen.add(key)
            latency = r.get("latency_ms_median")
            rows.append(
                [
                    f"{r.get('role')} {r.get('backbone')} + BERT-{r.get('text_layers')}",
                    str(r.get("input")),
                    f"{r.get('params_M', math.nan):.2f}",
                    f"{r.get('gflops', math.nan):.2f}",
                    "—" if latency is None else f"{latency:.1f}",
                    f.stem.removeprefix("model_report_"),
                ]
            )
    return rows


def plot(
    path: Path,
    c: Collected,
    rows: Sequence[tuple[str, str]],
    columns: Sequence[tuple[str, str]],
    seeds: Sequence[int],
) -> None:
    """Grouped bars: mIoU (network resolution) per split, one bar per row, std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = {
        run: [stat(c, run, col, "mIoU", "network", seeds) for col in columns] for run, _ in rows
    }
    present = [(run, label) for run, label in rows if any(s.n for s in stats[run])]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * max(1, len(present)) * len(columns) + 2), 4.5))
    x = np.arange(len(columns))
    width = 0.8 / max(1, len(present))
    cmap = plt.get_cmap("tab20")
    for i, (run, label) in enumerate(present):
        means = [s.mean if s.n else np.nan for s in stats[run]]
        errs = [s.std if s.std is not None else 0.0 for s in stats[run]]
        ax.bar(
            x + (i - (len(present) - 1) / 2) * width,
            means,
            width,
            yerr=errs,
            capsize=2,
            label=label,
            color=cmap(i % 20),
            error_kw={"elinewidth": 0.8},
        )
    ax.set_xticks(x, [f"{d}\n{s}" for d, s in columns])
    ax.set_ylabel("mIoU (%), network resolution")
    ax.set_title(f"Table I in miniature: mean ± std over seeds (of {len(seeds)})")
    if present:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def val_curve(run_dir: Path) -> list[tuple[float, float]]:
    """[(epoch, val mIoU)] of one run, from its metrics.jsonl (the last row per epoch wins:
    a resumed run may repeat a validation)."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        return []
    by_epoch: dict[float, float] = {}
    for line_no, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise TableError(f"{f}:{line_no}: not a JSON line") from None
        if "val_mIoU" in row and "epoch" in row:
            by_epoch[round(float(row["epoch"]), 3)] = float(row["val_mIoU"])
    return sorted(by_epoch.items())


def last_quarter_gain(curve: Sequence[tuple[float, float]]) -> float | None:
    """Val mIoU gained over the last quarter of a run's epochs (the plateau test: < 1 point).

    The value at the last epoch minus the value at the last validation at or before 3/4 of
    the run; None when the curve has fewer than two validations.
    """
    if len(curve) < 2:
        return None
    end = curve[-1][0]
    before = [v for e, v in curve if e <= 0.75 * end + 1e-9]
    if not before:
        return None
    return curve[-1][1] - before[-1]


def mean_curves(
    root: Path, rows: Sequence[tuple[str, str]], datasets: Sequence[str], seeds: Sequence[int]
) -> dict[tuple[str, str], dict]:
    """(run, dataset) -> {"epochs", "mean", "std", "n", "gain_last_quarter"} over seeds (the
    shared teacher: its one run), from every run's metrics.jsonl; epochs where not every
    found seed validated are left out."""
    out = {}
    for run, _ in rows:
        for ds in datasets:
            dirs = [Path(root) / ds / run]
            if not dirs[0].is_dir():
                dirs = [Path(root) / ds / f"seed{k}" / run for k in seeds]
            curves = [c for c in (val_curve(d) for d in dirs) if c]
            if not curves:
                continue
            common = sorted(set.intersection(*({e for e, _ in c} for c in curves)))
            values = np.array([[dict(c)[e] for e in common] for c in curves]) * 100
            gains = [g for g in (last_quarter_gain(c) for c in curves) if g is not None]
            out[(run, ds)] = {
                "epochs": common,
                "mean": values.mean(axis=0).tolist(),
                "std": (values.std(axis=0, ddof=1) if len(curves) > 1 else 0 * values[0]).tolist(),
                "n": len(curves),
                "gain_last_quarter": float(np.mean(gains)) * 100 if gains else None,
            }
    return out


def plot_curves(path: Path, curves: dict, rows: Sequence[tuple[str, str]], datasets) -> None:
    """One panel per dataset: each row's mean val mIoU over seeds against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(6 * max(1, len(datasets)), 4.2))
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap("tab20")
    for ax, ds in zip(axes, datasets):
        for i, (run, label) in enumerate(rows):
            c = curves.get((run, ds))
            if not c:
                continue
            e, m, sd = np.array(c["epochs"]), np.array(c["mean"]), np.array(c["std"])
            ax.plot(e, m, marker=".", label=f"{label} (n={c['n']})", color=cmap(i % 20))
            if c["n"] > 1:
                ax.fill_between(e, m - sd, m + sd, color=cmap(i % 20), alpha=0.15)
        ax.set_title(f"{ds}: val mIoU during training (mean ± std over seeds)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("val mIoU (%), network resolution")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _launch_info(root: Path) -> dict:
    f = Path(root) / "launch.json"
    return _read_json(f) if f.is_file() else {}


@dataclasses.dataclass
class _Report:
    """What every section of table1.md reads: the collected results, the rows and columns
    shown, the seeds counted."""

    c: Collected
    root: Path
    out: Path
    rows: list[tuple[str, str]]
    columns: list[tuple[str, str]]
    seeds: list[int]
    setting: str

    def stat(self, run: str, col: tuple[str, str], metric="mIoU", resolution="network") -> Stat:
        return stat(self.c, run, col, metric, resolution, self.seeds)

    def gain(self, run: str, ref: str, col: tuple[str, str]) -> Stat:
        """run - ref, mIoU at network resolution, paired by seed."""
        return paired_difference(self.stat(run, col), self.stat(ref, col))

    def header(self) -> list[str]:
        return [_column_name(col) for col in self.columns]

    def datasets(self) -> list[str]:
        return list(dict.fromkeys(d for d, _ in self.columns))


def _display_root(root: Path) -> str:
    """The root as the report names it: relative to the working directory when inside it (no
    machine path in committed reports), else as given."""
    try:
        return str(root.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(root)


def _metric_table(r: _Report, metric: str, resolution: str) -> list[str]:
    body = [
        [label] + [format_cell(r.stat(run, col, metric, resolution)) for col in r.columns]
        for run, label in r.rows
    ]
    return _md_table(["model", *r.header()], body)


def _section_intro(r: _Report) -> list[str]:
    stamp = time.strftime("%Y-%m-%d %H:%M")
    lines = [
        "# Table I" + ("" if r.setting == "paper" else " in miniature"),
        "",
        (
            f"Generated by `python -m rkd_jax.table --root {_display_root(r.root)}` on {stamp}"
            f" from {r.c.num_files} results files (setting: {r.setting}). Cells: mean ± sample"
            " standard deviation over seeds, in percent; n = seeds with a results file, out of"
            f" {len(r.seeds)} (seeds {', '.join(map(str, r.seeds)) or 'none'})."
        ),
        "",
    ]
    if r.c.shared_runs:
        lines += [
            (
                "One run per dataset, shared by every seed (n=1, no std; paired with each seed in "
                f"the differences): {', '.join(sorted(r.c.shared_runs))}."
            ),
            "",
        ]
    return lines + ["## mIoU (%), network resolution", "", *_metric_table(r, "mIoU", "network")]


def _section_paper(r: _Report) -> list[str]:
    paper_cols = [(d, s) for d in DATASETS for s in SPLITS]
    lines = ["", "## The paper's Table I (mIoU, %, 384x384, real RefCOCO / RefCOCO+)", ""]
    lines += _md_table(
        ["model"] + [_column_name(col) for col in paper_cols],
        [
            [PAPER_LABELS[k]] + [f"{PAPER_TABLE1[k][col]:.2f}" for col in paper_cols]
            for k in ("teacher", "student", "distill")
        ],
    )
    return lines + [
        "",
        (
            "The student's RefCOCO testA (54.02) is probably a typo in the paper (testA is "
            "above val in every other row)."
        ),
        "",
    ]


def _paper_difference(row: str, col: tuple[str, str]) -> float | None:
    if col not in PAPER_TABLE1["student"]:
        return None
    return PAPER_TABLE1[row][col] - PAPER_TABLE1["student"][col]


def _distilled_pairs(r: _Report) -> list[tuple[str, str, str]]:
    """(run, reference run, label) of every distilled row: the ResNet-18 rows against the
    student alone, the Lite0/B0 rows against the same backbone without distillation."""
    names = [run for run, _ in r.rows]
    labels = dict(r.rows)
    pairs = [(run, "student", label) for run, label in r.rows if run in DISTILLED_ROWS]
    pairs += [
        (f"{b}_distill", b, f"{labels[f'{b}_distill']} − {labels[b]}")
        for b in ("lite0", "b0")
        if f"{b}_distill" in names and b in names
    ]
    return pairs


def gap_closed(r: _Report, run: str, col: tuple[str, str]) -> float | None:
    """The share (%) of the teacher-student gap a ResNet-18 row closes
    (`comparison.gap_closed` of its mean gain and the teacher's mean margin, both paired by
    seed; None without runs)."""
    margin, gain = r.gain("teacher", "student", col), r.gain(run, "student", col)
    share = None if margin.n == 0 or gain.n == 0 else comparison.gap_closed(gain.mean, margin.mean)
    return None if share is None else 100.0 * share


def _section_gains(r: _Report) -> tuple[list[str], dict]:
    """Gains over the student baseline (paired by seed) beside the paper's, the share of the
    teacher-student gap each row closes, and the teacher's margin on each val split."""

    def cells(run, ref):
        return [format_cell(r.gain(run, ref, col), signed=True) for col in r.columns]

    def paper(row):
        return [
            "—" if (d := _paper_difference(row, col)) is None else f"{d:+.2f}" for col in r.columns
        ]

    pairs = _distilled_pairs(r)
    gain_rows = [["teacher − student (the margin)", *cells("teacher", "student")]]
    gain_rows += [[label, *cells(run, ref)] for run, ref, label in pairs]
    gain_rows += [
        ["paper: teacher − student", *paper("teacher")],
        ["paper: distilled − student", *paper("distill")],
    ]
    lines = [
        "## Gain over the student baseline (mIoU points, network resolution)",
        "",
        (
            "Student rows: the row minus the student without distillation, paired by seed "
            "(seed k against seed k); Lite0/B0 + distill against the same backbone without."
        ),
        "",
        *_md_table(["difference", *r.header()], gain_rows),
    ]

    closed_rows = [
        [
            label,
            *("—" if (v := gap_closed(r, run, col)) is None else f"{v:.0f}%" for col in r.columns),
        ]
        for run, ref, label in pairs
        if ref == "student"
    ]
    if closed_rows:
        paper_closed = [
            "—"
            if (m := _paper_difference("teacher", col)) is None
            or (share := comparison.gap_closed(_paper_difference("distill", col), m)) is None
            else f"{100.0 * share:.0f}%"
            for col in r.columns
        ]
        closed_rows.append(["paper: student + L_VL + L_C", *paper_closed])
        lines += [
            "",
            "## Share of the teacher-student gap closed (mIoU, network resolution)",
            "",
            (
                "(row − student) / (teacher − student), from the means over seeds of the paired "
                "differences above; 100% = the teacher's score, negative = below the student alone."
            ),
            "",
            *_md_table(["row", *r.header()], closed_rows),
        ]

    margin = {}
    for ds in r.datasets():
        col = (ds, "val")
        if col not in r.columns:
            continue
        t, s = r.stat("teacher", col), r.stat("student", col)
        d = paired_difference(t, s)
        margin[ds] = dataclasses.asdict(d)
        p = _paper_difference("teacher", col)
        paper_text = "" if p is None else f"; the paper: {p:+.2f}"
        lines += [
            "",
            (
                f"Teacher's margin over the student baseline on {ds} val (mIoU, network): "
                f"{format_cell(d, signed=True)} (teacher {format_cell(t)}, student "
                f"{format_cell(s)}){paper_text}."
            ),
        ]
    return lines, margin


def _section_other_metrics(r: _Report) -> list[str]:
    lines = []
    for metric, resolution in METRICS[1:]:
        lines += ["", f"## {metric} (%), {resolution} resolution", ""]
        lines += _metric_table(r, metric, resolution)
    return lines + [
        "",
        (
            "oIoU (overall IoU, also called cIoU) = sum of intersections / sum of unions "
            "over the split; mIoU = mean of per-sentence IoU (the paper's metric)."
        ),
    ]


def _section_hyperparameters(r: _Report) -> list[str]:
    lines = ["", "## Hyper-parameters (from each run's config.json)", ""]
    hp_rows, notes = [], []
    for run, label in r.rows:
        cfgs = [cfg for (name, _, _), cfg in sorted(r.c.configs.items()) if name == run]
        if not cfgs:
            continue
        hp_rows.append([label] + hyperparameters(cfgs[0]))
        diff = config_differences(cfgs)
        if diff:
            notes.append(f"- {label}: differs between its runs: {'; '.join(diff)}")
    if not hp_rows:
        return lines + ["No config.json found."]
    lines += _md_table(["model", "mode", "network", "epochs", "lr", "batch", "loss"], hp_rows)
    data = next(iter(sorted(r.c.configs.items())))[1].get("data", {})
    source = data.get("root") or (
        f"embedded synthetic data ({data.get('synthetic_num_images')}"
        f" images, generator seed {data.get('synthetic_seed')})"
    )
    lines += [
        "",
        (
            f"Data: {source}; input {data.get('image_size')}x{data.get('image_size')}, "
            f"at most {data.get('max_tokens')} tokens."
        ),
    ]
    return (
        lines + [""] + (notes or ["Every row's runs share one configuration apart from the seed."])
    )


def _section_model_report(r: _Report) -> list[str]:
    rep = model_report_rows(r.out)
    if not rep:
        return []
    return [
        "",
        "## Model report (python -m rkd_jax.report)",
        "",
        (
            "GFLOPs per image: XLA cost analysis of the jitted inference forward at batch 1 "
            "(multiply-add = 2 FLOPs); latency: median batch-1 call on the machine of the "
            "report stage."
        ),
        "",
        *_md_table(["model", "input", "params (M)", "GFLOPs", "latency (ms)", "report"], rep),
    ]


def _section_protocol(r: _Report) -> list[str]:
    if r.c.example is None:
        return []
    p = r.c.example.get("protocol", {})
    lines = [
        "",
        "## Protocol (from the results files)",
        "",
        (
            f"- sentences: {p.get('sentences')}; threshold {p.get('threshold')} "
            f"foreground probability; {p.get('empty_union')}"
        ),
        (
            f"- input {p.get('image_size')}x{p.get('image_size')} "
            f"({p.get('resize')}), at most {p.get('max_tokens')} tokens"
        ),
        f"- max_eval_examples {p.get('max_eval_examples')} (-1 = every sentence)",
    ]
    for res, text in (p.get("resolutions") or {}).items():
        lines.append(f"- {res} resolution: {text}")
    counts = []
    for col in r.columns:
        m = r.c.metrics
        n = {m[k]["network"].get("num_sentences") for k in m if k[1:3] == col}
        if n:
            counts.append(f"{_column_name(col)} {', '.join(map(str, sorted(n)))}")
    return lines + [f"- sentences scored per split: {'; '.join(counts)}"]


def _section_times(r: _Report) -> list[str]:
    times = stage_times(r.root)
    if not times:
        return []
    lines = ["", "## Wall time per stage (launch.sh, summed over runs and invocations)", ""]
    return lines + _md_table(["stage", "runs", "failed", "minutes"], times)


# How the report names the embedded data's expression families (the rest: "_" -> " ").
FAMILY_LABELS = {"colour_shape": "colour + shape"}


def family_stats(r: _Report) -> dict[tuple[str, str], dict[str, dict]]:
    """Per (dataset, split) with expression families (the embedded data's results files):
    {family: {"sentences": count, "rows": {run: Stat of its mIoU % at network resolution}}}."""
    found: dict[tuple[str, str], dict[str, dict]] = {}
    for col in r.columns:
        fams: dict[str, dict] = {}
        for (_, d, sp, _), metrics in r.c.metrics.items():
            if (d, sp) == col:
                for fam, m in (metrics.get("families") or {}).items():
                    fams.setdefault(fam, {"sentences": int(m["num_sentences"]), "rows": {}})
        for fam in fams:
            for run, _ in r.rows:
                st = stat(r.c, run, col, "mIoU", "network", r.seeds, family=fam)
                if st.n:
                    fams[fam]["rows"][run] = st
        if fams:
            found[col] = {f: fams[f] for f in sorted(fams)}
    return found


def _family_cell(s: Stat | None) -> str:
    """The seed mean to one decimal ('n=2 of 3' when seeds are missing)."""
    if s is None:
        return "—"
    return f"{s.mean:.1f}" + ("" if s.n == s.expected else f" (n={s.n} of {s.expected})")


def _section_families(r: _Report, fams: dict) -> list[str]:
    if not fams:
        return []
    lines = [
        "",
        "## Per expression family (mIoU %, network resolution, mean over seeds)",
        "",
        (
            "The embedded data's generator names each sentence's family; every results file "
            "scores them apart (`metrics.families`). Column heads give the family's sentences."
        ),
    ]
    for (ds, split), by_fam in fams.items():
        header = [
            f"{FAMILY_LABELS.get(f, f.replace('_', ' '))} ({v['sentences']})"
            for f, v in by_fam.items()
        ]
        body = [
            [label] + [_family_cell(v["rows"].get(run)) for v in by_fam.values()]
            for run, label in r.rows
            if any(run in v["rows"] for v in by_fam.values())
        ]
        lines += ["", f"### {ds} {split}", "", *_md_table(["model", *header], body)]
    return lines


def _section_curves(r: _Report, curves: dict) -> list[str]:
    if not curves:
        return []
    ds_list = r.datasets()

    def cell(run, d):
        got = curves.get((run, d))
        if got is None or got["gain_last_quarter"] is None:
            return "-"
        return f"{got['gain_last_quarter']:+.2f} ({got['epochs'][-1]:g} ep)"

    return [
        "",
        "## Learning curves (val mIoU per epoch, from each run's metrics.jsonl)",
        "",
        "![val mIoU curves](table1_curves.png)",
        "",
        (
            "Plateau test: the val mIoU gained over the last quarter of a run's epochs (mean "
            "over seeds, points); under 1 point counts as converged."
        ),
        "",
        *_md_table(
            ["model", *ds_list],
            [
                [label] + [cell(run, d) for d in ds_list]
                for run, label in r.rows
                if any((run, d) in curves for d in ds_list)
            ],
        ),
    ]


def _report(
    root: Path, out: Path, seeds: int | None, datasets: Sequence[str] | None, splits
) -> _Report:
    c = collect(root)
    launch = _launch_info(root)
    n_seeds = int(seeds if seeds is not None else launch.get("seeds", 0))
    if n_seeds < 0:
        raise TableError(f"--seeds {n_seeds}: expected a count >= 0")
    # Every seed that should exist or does exist counts: none is ever dropped.
    seed_list = sorted(set(range(n_seeds)) | c.seeds)
    if datasets or splits:
        columns = [(d, s) for d in (datasets or DATASETS) for s in (splits or SPLITS)]
    else:
        columns = [(d, s) for d in DATASETS for s in SPLITS]
        columns += sorted(c.columns_found - set(columns))
    known = {r for r, _ in ROWS + OPTIONAL_ROWS}
    rows = list(ROWS) + [r for r in OPTIONAL_ROWS if r[0] in c.runs]
    rows += [(r, r) for r in sorted(c.runs - known)]  # runs of no known row still show
    return _Report(c, root, out, rows, columns, seed_list, launch.get("setting", "?"))


def build(
    root: Path,
    out: Path,
    seeds: int | None = None,
    datasets: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
) -> dict:
    """Write <out>/table1.md, table1.json, table1_miou.png and table1_curves.png; returns the
    JSON written."""
    root, out = Path(root), Path(out)
    r = _report(root, out, seeds, datasets, splits)
    out.mkdir(parents=True, exist_ok=True)
    curves = mean_curves(root, r.rows, r.datasets(), r.seeds)
    gains, margin = _section_gains(r)
    fams = family_stats(r)
    lines = [
        *_section_intro(r),
        *_section_paper(r),
        *gains,
        *_section_other_metrics(r),
        *_section_families(r, fams),
        *_section_hyperparameters(r),
        *_section_model_report(r),
        *_section_protocol(r),
        *_section_times(r),
        *_section_curves(r, curves),
    ]
    if curves:
        plot_curves(out / "table1_curves.png", curves, r.rows, r.datasets())
    (out / "table1.md").write_text("\n".join(lines) + "\n")
    plot(out / "table1_miou.png", r.c, r.rows, r.columns, r.seeds)

    payload = {
        "root": _display_root(root),
        "seeds": r.seeds,
        "columns": [list(col) for col in r.columns],
        "rows": {
            run: {
                "label": label,
                **{
                    f"{m}_{res}": {
                        _column_name(col): dataclasses.asdict(r.stat(run, col, m, res))
                        for col in r.columns
                    }
                    for m, res in METRICS
                },
            }
            for run, label in r.rows
        },
        "teacher_margin_val": margin,
        "gap_closed_percent": {
            run: {_column_name(col): gap_closed(r, run, col) for col in r.columns}
            for run, ref, _ in _distilled_pairs(r)
            if ref == "student"
        },
        "curves": {f"{run}/{ds}": v for (run, ds), v in curves.items()},
        "families": {
            _column_name(col): {
                fam: {
                    "sentences": v["sentences"],
                    "mIoU_network": {run: dataclasses.asdict(st) for run, st in v["rows"].items()},
                }
                for fam, v in by_fam.items()
            }
            for col, by_fam in fams.items()
        },
        "paper": {k: {_column_name(c): v for c, v in t.items()} for k, t in PAPER_TABLE1.items()},
    }
    (out / "table1.json").write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    """The command; bad input: one `error:` line on stderr, exit code 2."""
    return cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(
        prog="python -m rkd_jax.table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", default="runs/table1", help="launch.sh run root")
    p.add_argument("--out", default="results", help="output directory")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds 0..N-1 expected per cell (default: <root>/launch.json, plus any "
        "seed directory found)",
    )
    p.add_argument("--datasets", nargs="+", default=None, help="columns: datasets")
    p.add_argument("--splits", nargs="+", default=None, help="columns: splits")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        raise TableError(f"--seeds {args.seeds}: expected a positive number of seeds")
    payload = build(Path(args.root), Path(args.out), args.seeds, args.datasets, args.splits)
    out = Path(args.out)
    print(
        f"wrote {out / 'table1.md'}, {out / 'table1.json'}, {out / 'table1_miou.png'} "
        f"({len(payload['rows'])} rows, seeds {payload['seeds']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
