"""Run a trained checkpoint on your own images: `rkd_jax.load(path).predict(images, texts)`.

    import rkd_jax
    model = rkd_jax.load("runs/distill")                  # the run's best checkpoint
    mask = model.predict("photo.jpg", "the cup on the left")   # bool [H, W], the photo's size

The checkpoint's own config (its meta) decides the model (teacher or student), the image size,
the token limit and the threshold. Images go through the same steps as evaluation: squashed to
image_size x image_size with PIL's bilinear resize (JPEG files decoded with the same DCT
scaling as the data pipeline), the model's stride-4 foreground margin resized bilinearly to the
image's original H x W (`evaluate.resize_margin`) and thresholded there. Batches have a fixed
shape (the last one is padded), so the jitted function compiles once per predictor.

Inputs:
- an image is a file path (str or Path; EXIF orientation applied, as an image viewer shows it)
  or a numpy array [H, W, 3] (also [H, W] grey or [H, W, 4], alpha dropped), uint8 or float in
  [0, 1] (floats are rounded to 8 bits, the precision the model was trained on), or a PIL image;
- an expression is a non-empty string; one longer than max_tokens word pieces ([CLS] and [SEP]
  included) is truncated with an `ExpressionTruncatedWarning`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ImageInput = str | os.PathLike | np.ndarray


class InputError(ValueError):
    """An image or expression given to the predictor (or a command) cannot be used."""


class ExpressionTruncatedWarning(UserWarning):
    """An expression has more word pieces than the model's token limit; the tail is dropped."""


def _is_pil(x) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "convert")


def _as_list(x, what: str) -> tuple[list, bool]:
    """(items, was_single): a str/Path/array/PIL image is one item; a list or tuple is many."""
    if isinstance(x, (str, os.PathLike, np.ndarray)) or _is_pil(x):
        return [x], True
    if isinstance(x, (list, tuple)):
        if not x:
            raise InputError(f"no {what} given (empty list)")
        return list(x), False
    raise InputError(
        f"{what}: expected a file path, a numpy array or a list of them, got {type(x).__name__}"
    )


def _image_name(image: ImageInput, index: int | None) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return "image" if index is None else f"image {index}"


def read_image(path: str | os.PathLike, size: int | None = None) -> tuple[np.ndarray, tuple]:
    """Read an image file -> (uint8 RGB array, (H, W) of the full image as displayed).

    With `size`, the array is the network input squashed to [size, size, 3], decoded as the data
    pipeline does (JPEG DCT scaling when the image is at least twice `size`, then PIL bilinear);
    without it, the full image [H, W, 3]. EXIF orientation is applied. InputError names the file
    when it is missing or unreadable.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: image file does not exist")
    if not path.is_file():
        raise InputError(f"{path}: not a file (expected an image file)")
    try:
        with Image.open(path) as im:
            width, height = im.size
            transpose = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation
            if transpose:
                width, height = height, width
            if size is not None and min(im.width, im.height) >= 2 * size:
                im.draft("RGB", (size, size))
            im.load()
            rgb = ImageOps.exif_transpose(im).convert("RGB")
            if size is not None:
                rgb = rgb.resize((size, size), Image.BILINEAR)
            array = np.asarray(rgb, np.uint8)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise InputError(
            f"{path}: cannot read the image ({type(e).__name__}: {e})".replace("\n", " ")
        ) from None
    return array, (height, width)


def image_to_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """A numpy image -> uint8 [H, W, 3] (grey repeated, alpha dropped, floats in [0, 1] rounded)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise InputError(
            f"{name}: expected an array [H, W, 3] (or [H, W], [H, W, 4]), got shape {a.shape}"
        )
    a = a[..., :3]
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"{name}: empty image of shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise InputError(f"{name}: float image has NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"{name}: float image values must lie in [0, 1], got min {lo:.4g}, max {hi:.4g}"
                " (uint8 images are taken as 0..255)"
            )
        return np.round(a * 255.0).astype(np.uint8)
    raise InputError(f"{name}: expected dtype uint8 or float in [0, 1], got {a.dtype}")


def prepare_image(image: ImageInput, size: int, index: int | None = None):
    """Any accepted image -> (float32 [size, size, 3] in [0, 1], (H, W) original size)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        small, hw = read_image(image, size)
    elif isinstance(image, np.ndarray) or _is_pil(image):
        if _is_pil(image):
            image = np.asarray(image.convert("RGB"))
        rgb = image_to_uint8(image, _image_name(image, index))
        hw = rgb.shape[:2]
        small = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), np.uint8)
    else:
        raise InputError(
            f"{_image_name(image, index)}: expected a file path or a numpy array, "
            f"got {type(image).__name__}"
        )
    return small.astype(np.float32) * np.float32(1 / 255), (int(hw[0]), int(hw[1]))


def check_expression(text: Any, index: int | None = None) -> str:
    """The expression itself, or InputError when it is not a string or is empty."""
    where = "expression" if index is None else f"expression {index}"
    if not isinstance(text, str):
        raise InputError(f"{where}: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"{where} is empty: give the words that describe the object")
    return text


@dataclass
class Attention:
    """What one model attends to for one (image, expression).

    tokens: the real word pieces, [CLS] and [SEP] included (n of them).
    maps: A of V3, V4, V5 as [h_i, w_i, n] float32 (strides 8, 16, 32 of the network input;
      softmax over the words of each pixel under the default attention_norm).
    decoder: D [HW, C] float32, the FPN output at stride 4 (hw = (S/4, S/4)).
    margin: [S/4, S/4] float32 foreground logit margin.
    image_hw: (H, W) of the original image.
    """

    tokens: list[str]
    maps: list[np.ndarray]
    decoder: np.ndarray
    decoder_hw: tuple[int, int]
    margin: np.ndarray
    image_hw: tuple[int, int]


class Predictor:
    """A restored model with its tokenizer and preprocessing (made by `load`).

    Attributes: role ('teacher' | 'student'), config (the run's whole config), model_config,
    image_size, max_tokens, threshold, batch_size, step and checkpoint (where it came from).
    """

    def __init__(
        self,
        config,
        model_config,
        role: str,
        variables,
        meta: dict,
        batch_size: int = 8,
        threshold: float | None = None,
        dtype: Any = None,
    ):
        from rkd_jax.data.tokenizer import load_tokenizer
        from rkd_jax.models import build
        from rkd_jax.pretrained import resolve_text_encoder_dir

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive integer")
        self.config = config
        self.model_config = model_config
        self.role = role
        self.meta = meta
        self.image_size = int(meta.get("image_size", config.data.image_size))
        self.max_tokens = int(meta.get("max_tokens", config.data.max_tokens))
        self.threshold = float(config.run.threshold if threshold is None else threshold)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold={self.threshold}: expected a probability in (0, 1)")
        self.batch_size = int(batch_size)
        self.step = int(meta.get("step", -1))
        self.checkpoint = f"{meta.get('directory', '?')}/{self.step}"
        if dtype is None:
            dtype = build.resolve_dtype(config.run.compute_dtype)
        self.model = build.build_model(model_config, dtype)
        self.variables = variables
        self.tokenizer = load_tokenizer(resolve_text_encoder_dir(model_config.text_encoder_dir))
        self._predict_fn = _jitted_predict(self.model, self.threshold)

    def __repr__(self) -> str:
        m = self.model_config
        return (
            f"Predictor({self.role}: {m.backbone} w{m.backbone_width}, image_size "
            f"{self.image_size}, max_tokens {self.max_tokens}, from {self.checkpoint})"
        )

    def tokenize(self, expressions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Expressions -> (ids int32 [N, max_tokens], mask int32 [N, max_tokens]).

        Empty expressions raise InputError; over-long ones are truncated with an
        ExpressionTruncatedWarning naming them.
        """
        from rkd_jax.data.tokenizer import tokenize

        texts = [
            check_expression(t, i if len(expressions) > 1 else None)
            for i, t in enumerate(expressions)
        ]
        try:
            ids, mask, lengths = tokenize(
                self.tokenizer, texts, self.max_tokens, return_lengths=True
            )
        except ValueError as e:
            raise InputError(str(e)) from None
        for text, n in zip(texts, lengths):
            if n > self.max_tokens:
                warnings.warn(
                    f"expression {text!r} has {int(n)} word pieces with [CLS] and [SEP], more "
                    f"than this model's max_tokens={self.max_tokens}: truncated to "
                    f"{self.max_tokens}",
                    ExpressionTruncatedWarning,
                    stacklevel=3,
                )
        return ids, mask

    def _pairs(self, images, expressions) -> tuple[list, list[int], list[str], bool]:
        """Pair images with expressions; see `predict` for the rules."""
        imgs, one_image = _as_list(images, "images")
        if isinstance(expressions, str):
            texts, one_text = [expressions], True
        elif isinstance(expressions, (list, tuple)):
            texts, one_text = list(expressions), False
            if not texts:
                raise InputError("no expressions given (empty list)")
        else:
            raise InputError(
                f"expressions: expected a string or a list of strings, got "
                f"{type(expressions).__name__}"
            )
        if one_image:
            index = [0] * len(texts)
        elif one_text:
            index, texts = list(range(len(imgs))), texts * len(imgs)
        elif len(imgs) != len(texts):
            raise InputError(
                f"{len(imgs)} images but {len(texts)} expressions: give one expression per "
                "image, one expression for all images, or one image with several expressions"
            )
        else:
            index = list(range(len(imgs)))
        return imgs, index, texts, one_image and one_text

    def margins(self, images, expressions) -> list[tuple[np.ndarray, tuple[int, int]]]:
        """Stride-4 foreground margins: [(float32 [S/4, S/4], (H, W) original size)] per pair.

        Pairs images and expressions as `predict` does. The margin is logit_fg - logit_bg of
        the network at image_size; `evaluate.resize_margin` brings it to any resolution.
        """
        imgs, index, texts, _ = self._pairs(images, expressions)
        ids, mask = self.tokenize(texts)
        prepared = [
            prepare_image(im, self.image_size, i if len(imgs) > 1 else None)
            for i, im in enumerate(imgs)
        ]
        s, b = self.image_size, self.batch_size
        out = []
        for start in range(0, len(texts), b):
            rows = list(range(start, min(start + b, len(texts))))
            batch_images = np.zeros((b, s, s, 3), np.float32)
            # Padding rows repeat a real expression: no model ever sees an empty text.
            batch_ids = np.repeat(ids[rows[:1]], b, axis=0)
            batch_mask = np.repeat(mask[rows[:1]], b, axis=0)
            for r, k in enumerate(rows):
                batch_images[r] = prepared[index[k]][0]
                batch_ids[r], batch_mask[r] = ids[k], mask[k]
            result = self._predict_fn(self.variables, batch_images, batch_ids, batch_mask)
            margin = np.asarray(result["margin"], np.float32)
            out.extend((margin[r], prepared[index[k]][1]) for r, k in enumerate(rows))
        return out

    def predict(self, images, expressions, return_probs: bool = False):
        """Boolean masks at each image's original size.

        Args:
          images: one image (path or array) or a list of them.
          expressions: one string or a list of strings. One image with a list of expressions
            gives one mask per expression; a list of images takes one expression per image
            (same length) or a single string used for every image.
          return_probs: also return the foreground probabilities (float32, same sizes).

        Returns:
          bool [H, W] when given one image and one string, else a list of bool [H_i, W_i] in
          the order of the expressions; with `return_probs`, a pair (masks, probs) shaped alike.
        """
        from rkd_jax.evaluate import margin_threshold, resize_margin

        single = self._pairs(images, expressions)[3]
        cut = margin_threshold(self.threshold)
        masks, probs = [], []
        for margin, (h, w) in self.margins(images, expressions):
            big = resize_margin(margin, h, w)
            masks.append(big >= cut)
            if return_probs:
                probs.append((1.0 / (1.0 + np.exp(-big))).astype(np.float32))
        if single:
            return (masks[0], probs[0]) if return_probs else masks[0]
        return (masks, probs) if return_probs else masks

    def attention(self, image: ImageInput, expression: str) -> Attention:
        """The vision-language attention A at V3, V4, V5 and the decoder features D of one
        (image, expression), for pictures of what the model attends to."""
        import jax

        ids, mask = self.tokenize([expression])
        pixels, hw = prepare_image(image, self.image_size)
        taps = _jitted_taps(self.model)
        out = jax.device_get(taps(self.variables, pixels[None], ids, mask))
        n = int(mask[0].sum())
        maps = []
        for a in out["vl_attention"]:
            side = math.isqrt(a.shape[1])
            maps.append(np.asarray(a[0, :, :n]).reshape(side, side, n))
        margin = np.asarray(out["margin"][0])
        return Attention(
            tokens=self.tokenizer.convert_ids_to_tokens([int(t) for t in ids[0, :n]]),
            maps=maps,
            decoder=np.asarray(out["decoder"][0]),
            decoder_hw=tuple(margin.shape),
            margin=margin,
            image_hw=hw,
        )


# Compiled functions per architecture (flax modules hash by their fields):
# predictors of one architecture (two checkpoints of a run, a reloaded one) compile once.
@functools.lru_cache(maxsize=8)
def _jitted_predict(model, threshold: float):
    from rkd_jax import evaluate

    return evaluate.make_predict_fn(model, threshold)


@functools.lru_cache(maxsize=8)
def _jitted_taps(model):
    """jit (variables, images [1,S,S,3], tokens [1,L], mask [1,L]) -> A, D and the margin."""
    import jax
    import jax.numpy as jnp

    from rkd_jax.evaluate import foreground_margin

    def taps(variables, images, tokens, token_mask):
        out = model.apply(variables, images, tokens, token_mask, train=False)
        return {
            "vl_attention": [a.astype(jnp.float32) for a in out["vl_attention"]],
            "decoder": out["decoder"].astype(jnp.float32),
            "margin": foreground_margin(out["logits"]),
        }

    return jax.jit(taps)


def load(
    path: str | os.PathLike,
    role: str | None = None,
    batch_size: int = 8,
    threshold: float | None = None,
    dtype: Any = None,
) -> Predictor:
    """Restore a checkpoint as a Predictor.

    Args:
      path: a run directory (its best checkpoint), its checkpoints/ directory or one
        checkpoints/<step> directory.
      role: which model of the checkpoint's config the variables belong to; default the
        checkpoint's own meta['role'] ('teacher' or 'student').
      batch_size: rows per call of the jitted function (fixed; the last batch is padded).
      threshold: foreground probability threshold; default the run's run.threshold.
      dtype: compute dtype; default the run's run.compute_dtype (bfloat16 on GPU/TPU under
        'auto', float32 on CPU).

    Raises:
      CheckpointError: no checkpoint at `path`, or variables that do not fit the model its
        config describes (another architecture).
    """
    import jax

    from rkd_jax import checkpoint as ckpt_lib

    loaded = ckpt_lib.load_model(path, role)
    # One device does the predicting: variables restored replicated over a training mesh would
    # make every call run once per device.
    variables = jax.device_put(loaded.variables, jax.local_devices()[0])
    config, model_config, meta = loaded.config, loaded.model_config, loaded.meta
    role = loaded.role
    return Predictor(config, model_config, role, variables, meta, batch_size, threshold, dtype)


def one_line(message: Any) -> str:
    """A message on one line (what the commands print before exit code 2): `cli.one_line`."""
    from rkd_jax import cli

    return cli.one_line(message)


@contextlib.contextmanager
def cli_warnings():
    """Within: warnings print as one `warning: ...` line on stderr; absl's chatter is quiet."""
    import logging

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {one_line(message)}", file=sys.stderr)

    absl = logging.getLogger("absl")
    level = absl.level
    with warnings.catch_warnings():
        warnings.simplefilter("always", ExpressionTruncatedWarning)
        warnings.showwarning = show
        absl.setLevel(logging.ERROR)
        try:
            yield
        finally:
            absl.setLevel(level)


def check_inputs(images: Sequence[str], expressions: Sequence[str]) -> None:
    """Fail fast, before any model is loaded: every image readable, every expression present."""
    for path in images:
        read_image(path, size=8)
    for i, text in enumerate(expressions):
        check_expression(text, i if len(expressions) > 1 else None)
