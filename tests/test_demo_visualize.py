"""`python -m rkd_jax.demo` and `python -m rkd_jax.visualize`: PNGs of the right size from the
tiny checkpoint, and bad input ending with one line and exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from test_predictor import cached_predictor, earliest_checkpoint, scored_sentences

from rkd_jax import demo, visualize
from rkd_jax.inference import predictor as predictor_lib

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

LONG = "the small red circle on the left of the big blue square next to the yellow star"


@pytest.fixture
def cached_load(monkeypatch):
    """The commands' `load` served from the session's predictors (each load + compile costs
    seconds here); the real load runs in test_predictor and in the subprocess test below."""
    monkeypatch.setattr(
        predictor_lib, "load", lambda path, **kwargs: cached_predictor(str(Path(path)))
    )


@pytest.fixture(scope="module")
def item(tiny_run):
    return scored_sentences("val", 1)[0]


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_demo_one_panel_per_expression(tiny_run, item, cached_load, tmp_path, capsys):
    out = tmp_path / "sub" / "overlay.png"
    texts = [item["text"], LONG]
    argv = ["--checkpoint", str(tiny_run), "--image", item["image"], "--out", str(out)]
    assert demo.main(argv + ["--text", texts[0], "--text", texts[1]]) == 0
    h, w = item["mask"].shape
    ph, pw = demo.panel_size(h, w, 512)
    assert max(ph, pw) == 512
    assert png_size(out) == (2 * pw, demo.figure_size(h, w, texts, 512)[0])
    captured = capsys.readouterr()
    # The over-long expression: one warning line naming it; the picture is still made.
    (warning,) = captured.err.strip().splitlines()
    assert warning.startswith("warning: expression") and LONG in warning
    assert "truncated to 12" in warning
    assert f"wrote {out}" in captured.out


def test_render_draws_the_mask_in_colour(tmp_path):
    image = np.full((60, 80, 3), 128, np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[20:40, 10:30] = True
    out = tmp_path / "render.png"
    fig_h, fig_w = demo.render(
        image, [mask, np.zeros_like(mask)], ["the box", "nothing"], out, long_side=160
    )
    assert png_size(out) == (fig_w, fig_h) == (320, demo.figure_size(60, 80, ["x"], 160)[0])
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)
    top = fig_h - 120  # the panels (120 x 160) sit under the title band
    inside, outside = pixels[top + 60, 40], pixels[top + 100, 140]
    assert inside[2] > inside[0] + 40  # the first panel's colour is blue
    assert np.abs(outside - 128).max() <= 3
    assert np.abs(pixels[top + 60, 160 + 40] - 128).max() <= 3  # second panel: no mask
    assert (pixels[:top] < 100).any()  # the titles are written


def test_visualize_attention_and_channel_correlation(tiny_run, item, cached_load, tmp_path, capsys):
    before = earliest_checkpoint(tiny_run)
    argv = [
        "--teacher",
        str(tiny_run / "teacher"),
        "--student",
        str(tiny_run),
        "--student-before",
        str(before),
        "--image",
        item["image"],
        "--text",
        item["text"],
        "--out-dir",
        str(tmp_path / "pics"),
        "--cell",
        "64",
    ]
    assert visualize.main(argv) == 0
    n = len(cached_predictor(str(tiny_run)).tokenizer.tokenize(item["text"])) + 2
    fig_h, fig_w = visualize.attention_figure_size(n, 3, item["mask"].shape, 64)
    assert png_size(tmp_path / "pics" / "attention.png") == (fig_w, fig_h)
    fig_h, fig_w = visualize.channel_figure_size(3)
    assert png_size(tmp_path / "pics" / "channel_correlation.png") == (fig_w, fig_h)
    assert capsys.readouterr().err == ""


def test_channel_figure_refuses_different_widths(tmp_path):
    d = {"teacher": np.ones((16, 8), np.float32), "student": np.ones((16, 4), np.float32)}
    with pytest.raises(predictor_lib.InputError, match="teacher: 8, student: 4"):
        visualize.channel_figure(d, tmp_path / "c.png")


def test_bad_inputs_exit_2_with_one_line(tiny_run, item, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "empty").mkdir()
    ckpt, image = str(tiny_run), item["image"]
    cases = [
        (["--image", str(tmp_path / "none.jpg"), "--text", "a"], "none.jpg: image file does not"),
        (["--image", str(broken), "--text", "a"], "broken.png: cannot read the image"),
        (["--image", str(tmp_path), "--text", "a"], "not a file"),
        (["--image", image, "--text", " "], "expression is empty"),
        (["--image", image, "--text", "a", "--text", ""], "expression 1 is empty"),
    ]
    for args, message in cases:
        assert demo.main(["--checkpoint", ckpt, "--out", str(tmp_path / "o.png")] + args) == 2
        (line,) = stderr_lines(capsys)
        assert line.startswith("error: ") and message in line, line
        if args.count("--text") == 1:  # visualize takes one expression
            tool = ["--teacher", ckpt, "--student", ckpt, "--out-dir", str(tmp_path)]
            assert visualize.main(tool + args) == 2
            (line,) = stderr_lines(capsys)
            assert line.startswith("error: ") and message in line, line
    empty = str(tmp_path / "empty")
    assert demo.main(["--checkpoint", empty, "--image", image, "--text", "a"]) == 2
    (line,) = stderr_lines(capsys)
    assert f"{empty}: no checkpoint found" in line
    assert (
        visualize.main(
            [
                "--teacher",
                str(tiny_run / "teacher"),
                "--student",
                ckpt,
                "--student-before",
                empty,
                "--image",
                image,
                "--text",
                "a",
                "--out-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    (line,) = stderr_lines(capsys)
    assert "no checkpoint found" in line
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "attention.png").exists()
    with pytest.raises(SystemExit) as e:
        demo.main(["--image", image, "--text", "a"])
    assert e.value.code == 2
    (line,) = stderr_lines(capsys)
    assert "--checkpoint" in line


def single_device_env() -> dict:
    """The environment of a user's shell: one CPU device, not the 8 fake ones of the tests."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)
    return env


def test_demo_command_in_a_fresh_process(tiny_run, item, tmp_path):
    out = tmp_path / "overlay.png"
    cmd = [
        sys.executable,
        "-m",
        "rkd_jax.demo",
        "--checkpoint",
        str(tiny_run),
        "--image",
        item["image"],
        "--text",
        item["text"],
        "--out",
        str(out),
        "--size",
        "300",
    ]
    # The command runs on one device, as on a laptop (not on the test session's 8).
    res = subprocess.run(
        cmd, cwd=ROOT, env=single_device_env(), capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    h, w = item["mask"].shape
    _, pw = demo.panel_size(h, w, 300)
    assert png_size(out) == (pw, demo.figure_size(h, w, [item["text"]], 300)[0])
    missing = [
        sys.executable,
        "-m",
        "rkd_jax.demo",
        "--checkpoint",
        str(tiny_run),
        "--image",
        str(tmp_path / "x.jpg"),
        "--text",
        "the cup",
    ]
    res = subprocess.run(
        missing, cwd=ROOT, env=single_device_env(), capture_output=True, text=True, check=False
    )
    assert res.returncode == 2
    expected = f"error: {tmp_path / 'x.jpg'}: image file does not exist"
    assert res.stderr.strip().splitlines() == [expected]
