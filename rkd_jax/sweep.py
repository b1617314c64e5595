"""The loss-weight sweep of Table I: every distillation method gets the same tuning budget.

Before the seeds run, launch.sh trains each distillation row once (seed 0) per factor of a grid
(default x0.1, x1, x10 of the method's default weight) and scores it on val only; `choose`
keeps the factor with the best val mIoU per (dataset, row) and writes the sweep and the choice
to <out>/sweep.json and <out>/sweep.md. The table's runs then train with the chosen weights
(`chosen` prints their overrides). Nothing is chosen on testA/testB.

    python -m rkd_jax.sweep fields ROW                          # the weights a row scales
    python -m rkd_jax.sweep overrides ROW FACTOR                # --config.distill.X=V lines
    python -m rkd_jax.sweep choose --root R --out O --datasets D... --factors F...
    python -m rkd_jax.sweep chosen --out O --dataset D ROW      # overrides of the choice
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from rkd_jax import cli

# Table I row (launch.sh run name) -> the config.distill weights its method's strength is.
# The paper's rows scale both lambdas together; the ablations scale the one they keep.
WEIGHTS: dict[str, tuple[str, ...]] = {
    "distill": ("lambda_vl", "lambda_channel"),
    "vl_only": ("lambda_vl",),
    "channel_only": ("lambda_channel",),
    "logit_kd": ("kd_weight",),
    "skd": ("skd_weight",),
    "cwd": ("cwd_weight",),
    "ickd": ("ickd_weight",),
    "lite0_distill": ("lambda_vl", "lambda_channel"),
}
DEFAULT_FACTORS = (0.1, 1.0, 10.0)


def default_weights() -> dict[str, float]:
    """The config.distill weights of configs/distill.py (the authors' settings)."""
    from rkd_jax import config_loader

    d = config_loader.load_config_file("distill").distill
    return {k: float(d[k]) for fields in WEIGHTS.values() for k in fields}


def fields(row: str) -> tuple[str, ...]:
    if row not in WEIGHTS:
        raise cli.UserError(f"row {row!r} has no loss weight to sweep; rows: {', '.join(WEIGHTS)}")
    return WEIGHTS[row]


def overrides(row: str, factor: float) -> list[str]:
    """`--config.distill.<weight>=<default x factor>` for each weight of `row`."""
    if not (math.isfinite(factor) and factor > 0):
        raise cli.UserError(f"factor {factor}: expected a positive number")
    base = default_weights()
    return [f"--config.distill.{k}={base[k] * factor:g}" for k in fields(row)]


def run_name(row: str, factor: float) -> str:
    """Directory of one sweep run: <root>/<dataset>/sweep/<row>_x<factor>."""
    return f"{row}_x{factor:g}"


def choose(
    root: Path, out: Path, datasets: Sequence[str], factors: Sequence[float], rows=None
) -> dict:
    """Read every sweep run's val mIoU, keep the best factor per (dataset, row); write
    <out>/sweep.json and sweep.md. A row with a missing run is not chosen (listed as such).
    Besides `datasets`, every dataset with sweep runs under `root` is read again: a table
    finished in several sittings (one dataset each) keeps the earlier datasets' choices."""
    rows = list(rows or WEIGHTS)
    result: dict = {"factors": list(factors), "defaults": default_weights(), "datasets": {}}
    swept = (
        {d.name for d in Path(root).iterdir() if (d / "sweep").is_dir()}
        if Path(root).is_dir()
        else set()
    )
    for ds in sorted(set(datasets) | swept):
        per_row = {}
        for row in rows:
            if not (Path(root) / ds / "sweep").is_dir():
                continue
            scores = {}
            for f in factors:
                path = Path(root) / ds / "sweep" / run_name(row, f) / "results" / f"{ds}_val.json"
                if path.is_file():
                    try:
                        scores[f"{f:g}"] = float(
                            json.loads(path.read_text())["metrics"]["network"]["mIoU"]
                        )
                    except (ValueError, KeyError, TypeError):
                        raise cli.UserError(
                            f"{path}: lacks metrics.network.mIoU (a results file of "
                            "python -m rkd_jax.main)"
                        ) from None
            if not scores:
                continue
            complete = len(scores) == len(factors)
            best = max(scores, key=lambda k: (scores[k], -abs(math.log(float(k)))))
            per_row[row] = {
                "val_mIoU": scores,
                "chosen_factor": float(best) if complete else None,
                "overrides": overrides(row, float(best)) if complete else [],
            }
        result["datasets"][ds] = per_row
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Loss-weight sweep (seed 0, val mIoU %, network resolution)",
        "",
        "Each distillation row trained once per factor of its default weight(s) "
        f"({', '.join(f'x{f:g}' for f in factors)}); the best val mIoU is chosen before the "
        "seeds run (ties: the factor nearest x1). Defaults: "
        + ", ".join(f"{k} {v:g}" for k, v in result["defaults"].items())
        + ".",
        "",
    ]
    for ds, per_row in result["datasets"].items():
        lines += [
            f"## {ds}",
            "",
            "| row | " + " | ".join(f"x{f:g}" for f in factors) + " | chosen |",
        ]
        lines.append("|---" * (len(factors) + 2) + "|")
        for row, r in per_row.items():
            cells = [
                f"{100 * r['val_mIoU'][f'{f:g}']:.2f}" if f"{f:g}" in r["val_mIoU"] else "-"
                for f in factors
            ]
            pick = "(incomplete)" if r["chosen_factor"] is None else f"x{r['chosen_factor']:g}"
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {pick} |")
        lines.append("")
    (out / "sweep.md").write_text("\n".join(lines))
    return result


def _chosen_record(out: Path, dataset: str, row: str) -> dict | None:
    """sweep.json's record of (dataset, row) when a factor was chosen, else None."""
    f = Path(out) / "sweep.json"
    if not f.is_file():
        return None
    try:
        r = json.loads(f.read_text())["datasets"].get(dataset, {}).get(row)
    except (ValueError, KeyError, AttributeError):
        raise cli.UserError(f"{f}: not a sweep file of python -m rkd_jax.sweep choose") from None
    return r if r and r.get("chosen_factor") is not None else None


def chosen(out: Path, dataset: str, row: str) -> list[str]:
    """The overrides of the chosen factor, or [] when no sweep was run for this row."""
    r = _chosen_record(out, dataset, row)
    return list(r["overrides"]) if r else []


def chosen_run(out: Path, dataset: str, row: str) -> str:
    """The sweep run (`run_name`) of the chosen factor, or "" when none was chosen: seed 0 of
    the row trains exactly that run."""
    r = _chosen_record(out, dataset, row)
    return run_name(row, float(r["chosen_factor"])) if r else ""


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(prog="python -m rkd_jax.sweep", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("fields")
    s.add_argument("row")
    for name in ("overrides", "run-name"):
        s = sub.add_parser(name)
        s.add_argument("row")
        s.add_argument("factor", type=float)
    s = sub.add_parser("choose")
    s.add_argument("--root", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--datasets", nargs="+", required=True)
    s.add_argument("--factors", nargs="+", type=float, default=list(DEFAULT_FACTORS))
    s.add_argument("--rows", nargs="+", default=None)
    for name in ("chosen", "chosen-run"):
        s = sub.add_parser(name)
        s.add_argument("--out", type=Path, required=True)
        s.add_argument("--dataset", required=True)
        s.add_argument("row")
    a = p.parse_args(argv)
    if a.cmd == "fields":
        print(" ".join(fields(a.row)))
    elif a.cmd == "overrides":
        print("\n".join(overrides(a.row, a.factor)))
    elif a.cmd == "run-name":
        print(run_name(a.row, a.factor))
    elif a.cmd == "choose":
        r = choose(a.root, a.out, a.datasets, a.factors, a.rows)
        for ds, per_row in r["datasets"].items():
            for row, v in per_row.items():
                print(f"sweep {ds} {row}: {v['val_mIoU']} -> x{v['chosen_factor']}")
    elif a.cmd == "chosen-run":
        print(chosen_run(a.out, a.dataset, a.row))
    else:
        out = chosen(a.out, a.dataset, a.row)
        if out:
            print("\n".join(out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
