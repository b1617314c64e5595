"""Pictures of what distillation transfers, for one image and one expression.

    python -m rkd_jax.visualize --teacher runs/distill/teacher --student runs/distill \\
        [--student-before runs/student_baseline] --image photo.jpg --text "the red cup" \\
        --out-dir pictures/

writes
- attention.png: the vision-language attention A (what L_VL distils) of every real word piece
  ([CLS] and [SEP] included; one row each) at V3, V4 and V5 (strides 8, 16, 32) as heatmaps
  over the image, teacher and student side by side (and the student before distillation). One
  colour scale per stage, shared by all models, so the maps compare directly; the header of a
  student column gives its L_VL term against the teacher (mean squared difference over pixels
  and real words, Eq. 6).
- channel_correlation.png: the channel correlation A_c = D^T D / HW of the decoder output D
  (what L_C distils, Eq. 7; the run's distill.channel_norm) of teacher and student, and
  student - teacher with its L_C (mean squared difference, Eq. 8); with --student-before both
  students and both differences.

Bad input ends with one line on stderr and exit code 2, as `rkd_jax.demo`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rkd_jax import cli, platform
from rkd_jax.demo import DPI
from rkd_jax.inference import predictor as predictor_lib

STAGES = ("V3", "V4", "V5")
STRIDES = (8, 16, 32)

# Pixel geometry of attention.png (exact: no tight bounding box).
LABEL_W = 96
TITLE_H = 34
HEADER_H = 44
BLOCK_GAP = 14
MARGIN = 8
# ... and of channel_correlation.png.
PANEL_GAP = 20
PANEL_TITLE_H = 40
COLORBAR_W = 64


def cell_size(height: int, width: int, cell: int) -> tuple[int, int]:
    """(h, w) of one heatmap: `cell` pixels wide, the image's aspect ratio (within 1:2..2:1)."""
    return round(cell * min(2.0, max(0.5, height / width))), cell


def attention_figure_size(
    num_tokens: int, num_models: int, image_hw: tuple[int, int], cell: int = 96
) -> tuple[int, int]:
    """(height, width) in pixels of attention.png."""
    ch, cw = cell_size(*image_hw, cell)
    width = LABEL_W + num_models * len(STAGES) * cw + (num_models - 1) * BLOCK_GAP + MARGIN
    return TITLE_H + HEADER_H + num_tokens * ch + MARGIN, width


def channel_figure_size(num_models: int, panel: int = 256) -> tuple[int, int]:
    """(height, width) in pixels of channel_correlation.png (num_models = 2 or 3)."""
    n_corr, n_diff = num_models, num_models - 1
    width = (n_corr + n_diff) * (panel + PANEL_GAP) + 2 * COLORBAR_W + MARGIN
    return TITLE_H + PANEL_TITLE_H + panel + MARGIN, width


def _grey(image: np.ndarray) -> np.ndarray:
    """A dimmed grey copy of the photo, so the heatmap colours stand out."""
    g = image.astype(np.float32).mean(axis=2, keepdims=True) / 255.0
    return np.repeat(0.1 + 0.9 * g, 3, axis=2)


def attention_mse(a: predictor_lib.Attention, b: predictor_lib.Attention) -> list[float | None]:
    """Per stage: mean over pixels and real words of (A_a - A_b)^2 (Eq. 6), None if shapes
    differ (models of different image sizes)."""
    return [
        float(np.mean((x - y) ** 2)) if x.shape == y.shape else None for x, y in zip(a.maps, b.maps)
    ]


def attention_figure(
    attentions: dict[str, predictor_lib.Attention],
    image: np.ndarray,
    expression: str,
    out: Path,
    cell: int = 96,
) -> tuple[int, int]:
    """Write attention.png: rows = word pieces, columns = model x stage. Returns (h, w) in px.

    attentions: model name -> its Attention for (image, expression); the first is the
      reference the others are compared with (the teacher). All must have the same tokens.
    image: the original photo, uint8 [H, W, 3].
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    names = list(attentions)
    first = attentions[names[0]]
    tokens = first.tokens
    for name in names[1:]:
        if attentions[name].tokens != tokens:
            raise predictor_lib.InputError(
                f"{names[0]} and {name} split the expression into different word pieces "
                f"({tokens} vs {attentions[name].tokens}): their attention cannot be compared"
            )
    h, w = image.shape[:2]
    ch, cw = cell_size(h, w, cell)
    fig_h, fig_w = attention_figure_size(len(tokens), len(names), (h, w), cell)
    backdrop = _grey(np.asarray(Image.fromarray(image).resize((cw, ch), Image.BILINEAR)))
    vmax = [
        max(float(attentions[n].maps[s].max()) for n in names) or 1.0 for s in range(len(STAGES))
    ]
    mse = {n: attention_mse(first, attentions[n]) for n in names[1:]}
    cmap = plt.get_cmap("turbo")

    fig = plt.figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    fig.text(
        0.5,
        1 - 8 / fig_h,
        f'vision-language attention A for "{expression}"',
        ha="center",
        va="top",
        fontsize=12,
    )

    def axes(x: int, y: int) -> plt.Axes:  # pixel position, origin top-left
        # 2 px less than the cell: a thin white line between neighbouring heatmaps.
        return fig.add_axes(
            (x / fig_w, 1 - (y + ch - 2) / fig_h, (cw - 2) / fig_w, (ch - 2) / fig_h)
        )

    for m, name in enumerate(names):
        x0 = LABEL_W + m * (len(STAGES) * cw + BLOCK_GAP)
        fig.text(
            (x0 + 1.5 * cw) / fig_w,
            1 - (TITLE_H + 4) / fig_h,
            name,
            ha="center",
            va="top",
            fontsize=11,
            weight="bold",
        )
        for s, stage in enumerate(STAGES):
            grid = attentions[name].maps[s]
            label = f"{stage} {grid.shape[0]}x{grid.shape[1]}"
            if m == 0:  # the top of the stage's colour scale (the bottom is 0)
                label += f"\nmax {vmax[s]:.2f}"
            elif mse[name][s] is not None:
                label += f"\nL_VL {mse[name][s]:.2g}"
            fig.text(
                (x0 + (s + 0.5) * cw) / fig_w,
                1 - (TITLE_H + 20) / fig_h,
                label,
                ha="center",
                va="top",
                fontsize=8 if cw >= 90 else 7,
            )
            for t in range(len(tokens)):
                ax = axes(x0 + s * cw, TITLE_H + HEADER_H + t * ch)
                ax.imshow(backdrop, extent=(0, 1, 1, 0), interpolation="nearest", aspect="auto")
                ax.imshow(
                    grid[:, :, t],
                    extent=(0, 1, 1, 0),
                    cmap=cmap,
                    vmin=0.0,
                    vmax=vmax[s],
                    alpha=0.55,
                    interpolation="nearest",
                    aspect="auto",
                )
                ax.set_xlim(0, 1)
                ax.set_ylim(1, 0)
                ax.axis("off")
    for t, token in enumerate(tokens):
        y = TITLE_H + HEADER_H + (t + 0.5) * ch
        fig.text(
            (LABEL_W - 6) / fig_w,
            1 - y / fig_h,
            token,
            ha="right",
            va="center",
            fontsize=10,
            family="monospace",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return fig_h, fig_w


def channel_correlation(decoder: np.ndarray, norm: str = "hw") -> np.ndarray:
    """A_c of one example's D [HW, C] -> [C, C] float32 (losses.channel_correlation)."""
    from rkd_jax import losses

    return np.asarray(losses.channel_correlation(decoder[None], norm)[0], np.float32)


def channel_figure(
    decoders: dict[str, np.ndarray], out: Path, norm: str = "hw", panel: int = 256
) -> tuple[int, int]:
    """Write channel_correlation.png: A_c of every model, then (model - first) for the others.

    decoders: model name -> D [HW, C]; the first is the reference (the teacher).
    Returns (h, w) in pixels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(decoders)
    widths = {n: decoders[n].shape[-1] for n in names}
    if len(set(widths.values())) > 1:
        raise predictor_lib.InputError(
            f"decoder widths differ ({', '.join(f'{n}: {c}' for n, c in widths.items())}): "
            "channel correlations compare only models of equal fpn_dim"
        )
    corr = {n: channel_correlation(decoders[n], norm) for n in names}
    ref = names[0]
    diffs = {n: corr[n] - corr[ref] for n in names[1:]}
    fig_h, fig_w = channel_figure_size(len(names), panel)
    lo = min(float(c.min()) for c in corr.values())
    hi = max(float(c.max()) for c in corr.values())
    span = max(float(np.abs(d).max()) for d in diffs.values()) or 1.0
    scale = "D^T D / HW" if norm == "hw" else "cosine of D's channels"

    fig = plt.figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    c = widths[ref]
    fig.text(
        0.5,
        1 - 8 / fig_h,
        f"channel correlation A_c = {scale} of the decoder output D ({c} channels)",
        ha="center",
        va="top",
        fontsize=12,
    )
    top = TITLE_H + PANEL_TITLE_H
    x = 0
    panels = [(f"{n}", corr[n], "viridis", lo, hi) for n in names]
    panels += [
        (f"{n} - {ref}\nL_C {float(np.mean(diffs[n] ** 2)):.3g}", diffs[n], "RdBu_r", -span, span)
        for n in names[1:]
    ]
    for i, (title, matrix, cmap, vmin, vmax) in enumerate(panels):
        ax = fig.add_axes((x / fig_w, 1 - (top + panel) / fig_h, panel / fig_w, panel / fig_h))
        im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.text(
            (x + panel / 2) / fig_w,
            1 - (TITLE_H + 4) / fig_h,
            title,
            ha="center",
            va="top",
            fontsize=10,
        )
        x += panel + PANEL_GAP
        if i in (len(names) - 1, len(panels) - 1):
            cax = fig.add_axes((x / fig_w, 1 - (top + panel) / fig_h, 12 / fig_w, panel / fig_h))
            fig.colorbar(im, cax=cax)
            cax.tick_params(labelsize=8)
            x += COLORBAR_W
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return fig_h, fig_w


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m rkd_jax.visualize", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher run or checkpoint directory")
    p.add_argument("--student", required=True, help="distilled student run or checkpoint")
    p.add_argument(
        "--student-before",
        default="",
        help="the student before distillation (e.g. trained without a teacher)",
    )
    p.add_argument("--image", required=True, help="the photo")
    p.add_argument("--text", required=True, help="the referring expression")
    p.add_argument(
        "--out-dir", required=True, help="where attention.png and channel_correlation.png go"
    )
    p.add_argument("--cell", type=int, default=96, help="width of one heatmap in pixels")
    return p


def check_role(name: str, model) -> None:
    """CheckpointError unless the checkpoint passed as `name` holds that model: the teacher for
    "teacher", a student for the others (the role its meta records)."""
    from rkd_jax.checkpoint import check_role as check_meta_role

    flag = {"teacher": "--teacher", "student before": "--student-before"}.get(name, "--student")
    expected = "teacher" if name == "teacher" else "student"
    check_meta_role(model.meta, expected, f"{flag} {model.checkpoint}")


def run(args: argparse.Namespace) -> dict[str, Path]:
    if args.cell < 16:
        raise predictor_lib.InputError(f"--cell={args.cell}: expected at least 16 pixels")
    predictor_lib.check_inputs([args.image], [args.text])
    paths = {"teacher": args.teacher, "student": args.student}
    if args.student_before:
        paths = {
            "teacher": args.teacher,
            "student before": args.student_before,
            "student after": args.student,
        }
    models = {}
    for name, path in paths.items():
        models[name] = predictor_lib.load(path, batch_size=1)
        check_role(name, models[name])
    attentions = {name: m.attention(args.image, args.text) for name, m in models.items()}
    image, _ = predictor_lib.read_image(args.image)
    out_dir = Path(args.out_dir)
    student = models[list(models)[-1]]
    norm = str(student.config.get("distill", {}).get("channel_norm", "hw"))
    written = {
        "attention": out_dir / "attention.png",
        "channel_correlation": out_dir / "channel_correlation.png",
    }
    attention_figure(attentions, image, args.text, written["attention"], args.cell)
    channel_figure(
        {n: a.decoder for n, a in attentions.items()}, written["channel_correlation"], norm
    )
    for name, model in models.items():
        print(f"{name}: {model!r}")
    for path in written.values():
        print(f"wrote {path}")
    return written


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    platform.configure_cpu_flags_for_cpu_backend()
    with predictor_lib.cli_warnings():
        run(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command; bad input: one `error:` line on stderr, exit code 2."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
