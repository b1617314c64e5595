"""Segment what an expression refers to in one photo and draw it.

    python -m rkd_jax.demo --checkpoint runs/distill --image photo.jpg \\
        --text "the cup on the left" [--text "the red mug" ...] --out overlay.png

One panel per --text: the photo with the predicted mask as a semi-transparent colour and its
contour, the expression as the panel's title. The mask is computed at the photo's own
resolution (as `rkd_jax.load(...).predict` gives it). Bad input (missing or unreadable image,
empty expression, a directory without a checkpoint) ends with one line on stderr and exit
code 2; an expression longer than the model's token limit is truncated with a warning.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rkd_jax import cli, platform
from rkd_jax.inference import predictor as predictor_lib

DPI = 100
COLOURS = (
    (0.12, 0.47, 0.71),
    (1.0, 0.5, 0.05),
    (0.17, 0.63, 0.17),
    (0.84, 0.15, 0.16),
    (0.58, 0.4, 0.74),
    (0.09, 0.75, 0.81),
)
TITLE_PT = 12


def title_lines(text: str, width_px: int, font_pt: float = TITLE_PT) -> list[str]:
    """Wrap a title to the panel width (average glyph ~0.55 em)."""
    chars = max(8, int(width_px / (0.55 * font_pt * DPI / 72)))
    return textwrap.wrap(text, chars) or [text]


def panel_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) of a panel: the image scaled so its longer side is `long_side` pixels."""
    s = long_side / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def figure_size(height: int, width: int, texts: Sequence[str], long_side: int) -> tuple[int, int]:
    """(height, width) in pixels of the demo PNG for an image of height x width."""
    ph, pw = panel_size(height, width, long_side)
    lines = max(len(title_lines(t, pw)) for t in texts)
    return ph + _band(lines), pw * len(texts)


def _band(lines: int) -> int:
    return round(lines * 1.35 * TITLE_PT * DPI / 72) + 12


def draw_mask(ax, image: np.ndarray, mask: np.ndarray, colour, alpha: float = 0.45) -> None:
    """Photo [H, W, 3] with mask [H, W] as a translucent colour and its contour, on `ax`."""
    h, w = mask.shape
    ax.imshow(image, extent=(0, w, h, 0), interpolation="antialiased")
    overlay = np.zeros((h, w, 4), np.float32)
    overlay[..., :3] = colour
    overlay[..., 3] = mask * alpha
    ax.imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
    # contour needs a 2 x 2 grid at least: a 1-pixel-high or -wide photo gets the fill only.
    if mask.any() and not mask.all() and min(h, w) >= 2:
        ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
        from matplotlib import patheffects

        # A white rim keeps the contour visible on objects of the mask's own colour.
        ax.contour(
            xs,
            ys,
            mask.astype(np.float32),
            levels=[0.5],
            colors=[colour],
            linewidths=2.0,
            path_effects=[patheffects.withStroke(linewidth=3.5, foreground="white")],
        )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")


def render(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    texts: Sequence[str],
    out: Path,
    long_side: int = 512,
) -> tuple[int, int]:
    """Write the panels to `out` (PNG, Agg); returns the (height, width) written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[:2]
    ph, pw = panel_size(h, w, long_side)
    wrapped = [title_lines(t, pw) for t in texts]
    band = _band(max(len(x) for x in wrapped))
    fig_h, fig_w = ph + band, pw * len(texts)
    fig = plt.figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    for i, (mask, lines) in enumerate(zip(masks, wrapped)):
        ax = fig.add_axes((i * pw / fig_w, 0.0, pw / fig_w, ph / fig_h))
        draw_mask(ax, image, mask, COLOURS[i % len(COLOURS)])
        if not mask.any():
            ax.text(
                0.5,
                0.04,
                "empty mask",
                transform=ax.transAxes,
                ha="center",
                va="bottom",
                color="white",
                fontsize=10,
                clip_on=True,
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 3, "linewidth": 0},
            )
        fig.text(
            (i + 0.5) * pw / fig_w,
            1.0 - 6 / fig_h,
            "\n".join(lines),
            ha="center",
            va="top",
            fontsize=TITLE_PT,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # format= keeps matplotlib from appending ".png" to a name without it: the file written is
    # exactly the path reported.
    fig.savefig(out, dpi=DPI, format="png")
    plt.close(fig)
    return fig_h, fig_w


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m rkd_jax.demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory (best checkpoint), checkpoints/ or checkpoints/<step>",
    )
    p.add_argument("--image", required=True, help="the photo (any format PIL reads)")
    p.add_argument(
        "--text",
        action="append",
        required=True,
        help="referring expression; repeat for one panel each",
    )
    p.add_argument("--out", default="overlay.png", help="output image (PNG)")
    p.add_argument(
        "--size", type=int, default=512, help="longer side of each panel in pixels (default 512)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="foreground probability threshold (default: the run's)",
    )
    return p


def run(args: argparse.Namespace) -> tuple[int, int]:
    if args.size < 16:
        raise predictor_lib.InputError(f"--size={args.size}: expected at least 16 pixels")
    if Path(args.out).is_dir():
        raise predictor_lib.InputError(
            f"--out {args.out}: is a directory; expected a PNG file name"
        )
    predictor_lib.check_inputs([args.image], args.text)
    model = predictor_lib.load(args.checkpoint, threshold=args.threshold, batch_size=len(args.text))
    masks = model.predict(args.image, list(args.text))
    image, _ = predictor_lib.read_image(args.image)
    out = Path(args.out)
    size = render(image, masks, args.text, out, args.size)
    for text, mask in zip(args.text, masks):
        print(f"{text!r}: {100.0 * mask.mean():.1f}% of the image")
    print(f"wrote {out} ({size[1]}x{size[0]} px) with {model!r}")
    return size


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
