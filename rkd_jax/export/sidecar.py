"""What goes beside an exported model: vocab.txt and `<file>.json` (sizes, tokenisation,
normalisation constants, threshold, names and shapes), and the parity check against the Flax
predict function on a real photo that every artifact passes before it is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rkd_jax.export.common import ExportError
from rkd_jax.files import write_bytes_atomic

PARITY_SENTENCE = "the cat on the left"


def tokenizer_for(model_cfg):
    """(tokenize(texts, max_len) -> (ids, mask), HF tokenizer, text encoder directory)."""
    import functools

    from rkd_jax.data.tokenizer import load_tokenizer, tokenize
    from rkd_jax.pretrained import resolve_text_encoder_dir

    directory = resolve_text_encoder_dir(model_cfg["text_encoder_dir"])
    tok = load_tokenizer(directory)
    return functools.partial(tokenize, tok), tok, directory


def photo_inputs(image_size: int, tokenize, max_tokens: int, sentence: str = PARITY_SENTENCE):
    """A real photo (skimage's chelsea) squashed like the pipeline + one expression, batch 1."""
    from PIL import Image
    from skimage import data

    rgb = Image.fromarray(data.chelsea()).resize((image_size, image_size), Image.BILINEAR)
    image = np.asarray(rgb, np.float32)[None] * np.float32(1 / 255)
    ids, mask = tokenize([sentence], max_tokens)
    return image, np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def backbone_normalisation(backbone: str) -> tuple[list[float], list[float]]:
    """(mean, std) the backbone applies inside the model to [0, 1] pixels."""
    from rkd_jax.models.layers import input_normalisation

    mean, std = input_normalisation(backbone)
    return list(mean), list(std)


def vocab_text(tok, text_dir: Path) -> bytes:
    """The vocab.txt that goes beside the model: the text encoder's own file, else the
    tokenizer's vocabulary one word piece a line, in id order."""
    source = Path(text_dir) / "vocab.txt"
    if source.is_file():
        return source.read_bytes()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return "".join(f"{w}\n" for w, _ in vocab).encode("utf-8")


def write_vocab(tok, text_dir: Path, out_dir: Path) -> Path:
    """Write vocab.txt (`vocab_text`) into out_dir, atomically."""
    target = out_dir / "vocab.txt"
    write_bytes_atomic(target, vocab_text(tok, text_dir))
    return target


def sidecar_path(path: Path) -> Path:
    """student.onnx -> student.onnx.json"""
    return path.with_name(path.name + ".json")


# A correct export differs from the Flax function by float reordering only (measured: 8e-7 for
# ONNX, 3e-7 for jax.export, docs/export.md); a thousand times that is a broken graph, not rounding.
PARITY_MAX_PROB_DIFF = 1e-3

PARITY_MIN_MASK_IOU = 0.99


def check_parity(parity: dict, out: Path) -> None:
    """ExportError unless the exported model reproduces the Flax predict function."""
    if (
        not parity["max_abs_prob_diff"] <= PARITY_MAX_PROB_DIFF
        or not parity["mask_iou"] >= PARITY_MIN_MASK_IOU
    ):
        raise ExportError(
            f"--out {out}: the exported model fails the parity check against the Flax predict "
            f"function (max |prob diff| {parity['max_abs_prob_diff']:.3g}, expected <= "
            f"{PARITY_MAX_PROB_DIFF:g}; mask IoU {parity['mask_iou']:.4f}, expected >= "
            f"{PARITY_MIN_MASK_IOU:g}); nothing was written: try --format jax"
        )


def margin_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of the masks margin_a >= 0 and margin_b >= 0 (1.0 when both are empty)."""
    ma, mb = np.asarray(a) >= 0, np.asarray(b) >= 0
    union = np.count_nonzero(ma | mb)
    return 1.0 if union == 0 else float(np.count_nonzero(ma & mb) / union)


def parity_report(prob, margin, ref_prob, ref_margin, what: str) -> dict:
    """How far an artifact's outputs are from the Flax reference's on the inputs `what`."""
    return {
        "inputs": what,
        "max_abs_prob_diff": float(np.max(np.abs(prob - ref_prob))),
        "max_abs_margin_diff": float(np.max(np.abs(margin - ref_margin))),
        "mask_iou": margin_iou(prob - 0.5, ref_prob - 0.5),
    }


def sidecar(fmt: str, out: Path, meta: dict, config, tok, batch: int | None) -> dict:
    """Everything a user of the exported file needs to feed it and read its outputs."""
    size, max_tokens = int(meta["image_size"]), int(meta["max_tokens"])
    b = "B" if batch is None else int(batch)
    mean, std = backbone_normalisation(meta["model"]["backbone"])
    threshold = float(config.run.threshold) if "run" in config else 0.5
    lower = bool(getattr(tok, "do_lower_case", True))
    return {
        "format": fmt,
        "file": out.name,
        "role": meta.get("role"),
        "checkpoint": f"{meta.get('directory')}/{meta.get('step')}",
        "model": meta.get("model"),
        "val_metrics_at_selection": meta.get("metrics", {}),
        "batch": "dynamic" if batch is None else int(batch),
        "inputs": [
            {
                "name": "image",
                "shape": [b, size, size, 3],
                "dtype": "float32",
                "layout": "NHWC, RGB",
            },
            {"name": "tokens", "shape": [b, max_tokens], "dtype": "int32"},
            {"name": "token_mask", "shape": [b, max_tokens], "dtype": "int32"},
        ],
        "outputs": [
            {
                "name": "prob",
                "shape": [b, size, size],
                "dtype": "float32",
                "meaning": "foreground probability at the input resolution",
            },
            {
                "name": "margin",
                "shape": [b, size // 4, size // 4],
                "dtype": "float32",
                "meaning": "foreground minus background logit at stride 4",
            },
        ],
        "image": {
            "image_size": size,
            "resize": "squash the whole RGB image to image_size x image_size (bilinear), "
            "aspect ratio not kept",
            "scale": "pixel / 255, float32 in [0, 1]",
            "mean": mean,
            "std": std,
            "normalisation": "(x - mean) / std is applied INSIDE the exported graph: feed the "
            "[0, 1] image, do not normalise it yourself",
        },
        "text": {
            "vocab": "vocab.txt",
            "tokenizer": "BERT WordPiece with this vocab.txt, e.g. "
            "tokenizers.BertWordPieceTokenizer("
            "'vocab.txt', lowercase=lower_case) with enable_truncation(max_length=max_tokens) and "
            "enable_padding(length=max_tokens, pad_id=pad_id): ids -> tokens, attention_mask -> "
            "token_mask",
            "lower_case": lower,
            "max_tokens": max_tokens,
            "format": "[CLS] word pieces [SEP], the pieces cut to max_tokens - 2, then [PAD] up "
            "to max_tokens; token_mask 1 on [CLS] .. [SEP], 0 on padding",
            "cls_id": int(tok.cls_token_id),
            "sep_id": int(tok.sep_token_id),
            "pad_id": int(tok.pad_token_id),
            "unk_id": int(tok.unk_token_id),
        },
        "threshold": threshold,
        "postprocess": "mask = prob >= threshold at image_size; for the original H x W resize "
        "margin bilinearly (half-pixel centres, edge clamp) to H x W and keep margin >= "
        "log(threshold / (1 - threshold))",
    }


def write_json(path: Path, payload: dict) -> None:
    write_bytes_atomic(path, json.dumps(payload, indent=2, default=json_default).encode())


def json_default(x):
    """JSON for numpy scalars, ConfigDicts and anything else (its str)."""
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "to_dict"):
        return x.to_dict()
    return str(x)
