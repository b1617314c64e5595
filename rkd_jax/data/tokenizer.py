"""BERT WordPiece tokenization: `[CLS] pieces [SEP] [PAD]...` rows of a fixed length.

The tokenizer is the WordPiece tokenizer of a Hugging Face BERT directory (the text encoder's;
`rkd_jax.pretrained.resolve_text_encoder_dir` finds it from a model config), built with the
`tokenizers` library from the directory's vocabulary and tokenizer_config.json: the pipeline
transformers' BertTokenizerFast runs (BERT's normaliser, pre-tokeniser and WordPiece model, the
special tokens matched before normalisation). transformers itself is not imported: that costs
about 1.5 s of start-up in every process that tokenises. tests/test_bert.py checks that the ids
equal BertTokenizerFast's on 12 kinds of text and 7 directory layouts and settings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rkd_jax.convert.common import ConversionError

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
SPECIAL_TOKENS = ("unk", "sep", "pad", "cls", "mask")


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer: `vocab` (word piece -> id) and BertTokenizer's settings."""

    def __init__(
        self,
        vocab: dict[str, int],
        lowercase: bool = True,
        strip_accents: bool | None = None,
        chinese_chars: bool = True,
        special: dict[str, str] | None = None,
    ):
        from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import WordPiece

        special = {k: f"[{k.upper()}]" for k in SPECIAL_TOKENS} | (special or {})
        missing = [special[k] for k in ("unk", "sep", "pad", "cls") if special[k] not in vocab]
        if missing:
            raise ValueError(f"the vocabulary has no {', '.join(missing)}")
        self._tok = Tokenizer(WordPiece(vocab, unk_token=special["unk"]))
        self._tok.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=chinese_chars,
            strip_accents=strip_accents,
            lowercase=lowercase,
        )
        self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tok.decoder = decoders.WordPiece(prefix="##")
        # Special tokens written in a text are matched whole, before lower-casing.
        self._tok.add_special_tokens([t for t in special.values() if t in vocab])
        for k in ("unk", "sep", "pad", "cls"):
            setattr(self, f"{k}_token_id", vocab[special[k]])

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text, without special tokens, truncation or padding."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def tokenize(self, text: str) -> list[str]:
        """The word pieces of one text (`##` marks a piece that continues a word)."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Word pieces back to text: continuation pieces join their word (BERT's decoder, which
        also drops the space before punctuation)."""
        return self._tok.decoder.decode(list(tokens))

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]


def _read_vocab(directory: Path) -> dict[str, int]:
    """vocab.txt (one word piece a line, the line number its id), else tokenizer.json's."""
    if (directory / "vocab.txt").is_file():
        lines = (directory / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return {w: i for i, w in enumerate(lines)}
    model = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if model.get("type") != "WordPiece":
        raise ValueError(f"tokenizer.json holds a {model.get('type')} model, not WordPiece")
    return dict(model["vocab"])


def _settings(directory: Path) -> dict:
    """BertTokenizer's settings from tokenizer_config.json (its defaults where absent)."""
    path = directory / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    # A special token is a string or an AddedToken dict ({"content": ...}).
    given = {k: cfg.get(f"{k}_token") for k in SPECIAL_TOKENS}
    given = {k: v.get("content") if isinstance(v, dict) else v for k, v in given.items()}
    return dict(
        lowercase=bool(cfg.get("do_lower_case", True)),
        strip_accents=cfg.get("strip_accents"),
        chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
        special={k: v for k, v in given.items() if v},
    )


def load_tokenizer(directory: str | Path) -> WordPieceTokenizer:
    """The WordPiece tokenizer of an HF BERT directory (offline, lower-casing as configured).

    Reads vocab.txt (else tokenizer.json's vocabulary) and tokenizer_config.json's
    do_lower_case, strip_accents, tokenize_chinese_chars and special tokens.
    """
    directory = Path(directory)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise ConversionError(
            f"{directory}: no tokenizer files; looked for {', '.join(TOKENIZER_FILES)}"
        )
    try:
        return WordPieceTokenizer(_read_vocab(directory), **_settings(directory))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{directory}: cannot load the BERT tokenizer ({e})") from e


def _word_pieces(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Word-piece ids of each text without special tokens, truncation or padding."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"expression {text!r}: expected a string, got {type(text).__name__}")
    pieces = tokenizer.encode(texts)
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
