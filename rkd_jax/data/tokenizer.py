"""BERT WordPiece tokenization: `[CLS] pieces [SEP] [PAD]...` rows of a fixed length.

The tokenizer is the fast WordPiece tokenizer of a Hugging Face BERT directory (the text
encoder's; `rkd_jax.pretrained.resolve_text_encoder_dir` finds it from a model config).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rkd_jax.convert.common import ConversionError

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def load_tokenizer(directory: str | Path):
    """The fast WordPiece tokenizer of an HF BERT directory (offline, lower-casing as saved).

    Uses tokenizer.json when present, else vocab.txt (+ tokenizer_config.json's do_lower_case).
    """
    from transformers import BertTokenizerFast

    directory = Path(directory)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise ConversionError(
            f"{directory}: no tokenizer files; looked for {', '.join(TOKENIZER_FILES)}"
        )
    try:
        return BertTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for broken files
        raise ConversionError(f"{directory}: cannot load the BERT tokenizer ({e})") from e


def _word_pieces(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Word-piece ids of each text without special tokens, truncation or padding."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"expression {text!r}: expected a string, got {type(text).__name__}")
    # Explicit padding/truncation: the call must not pick up tokenizer.json's own settings
    # (all-MiniLM-L6-v2's pads everything to 128).
    pieces = tokenizer(
        list(texts),
        add_special_tokens=False,
        padding=False,
        truncation=False,
        verbose=False,
    )["input_ids"]
    unk = tokenizer.unk_token_id
    for text, ids in zip(texts, pieces):
        if all(t == unk for t in ids):
            what = "no word pieces" if not ids else "only unknown word pieces ([UNK])"
            raise ValueError(f"expression {text!r} tokenises to {what}; nothing to encode")
    return pieces


def count_tokens(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Untruncated length of each text with [CLS] and [SEP] -> int [N] (> max_len: truncated)."""
    return np.array([len(ids) + 2 for ids in _word_pieces(tokenizer, texts)], dtype=np.int64)


def tokenize(tokenizer, texts: Sequence[str], max_len: int, return_lengths: bool = False):
    """Texts -> (ids int32 [N, max_len], mask int32 [N, max_len]) as `[CLS] pieces [SEP] [PAD]..`.

    Pieces beyond `max_len - 2` are dropped, keeping [SEP] last; padding is always to exactly
    `max_len`. With `return_lengths`, also returns the untruncated lengths int [N] (what
    `count_tokens` gives), so callers can warn about truncated expressions. An expression with no
    known word piece raises ValueError naming it.
    """
    if max_len < 3:
        raise ValueError(f"max_len={max_len}: need at least 3 ([CLS], one word piece, [SEP])")
    pieces = _word_pieces(tokenizer, texts)
    ids = np.full((len(pieces), max_len), tokenizer.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(pieces), max_len), dtype=np.int32)
    for row, p in enumerate(pieces):
        seq = [tokenizer.cls_token_id, *p[: max_len - 2], tokenizer.sep_token_id]
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    if return_lengths:
        return ids, mask, np.array([len(p) + 2 for p in pieces], dtype=np.int64)
    return ids, mask
