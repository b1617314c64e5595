"""Hugging Face BERT directories -> our Flax `Bert` params (the tokenizer: rkd_jax.data.tokenizer).

A BERT directory holds config.json, one weights file (model.safetensors, pytorch_model.bin or
flax_model.msgpack) and vocab.txt and/or tokenizer.json. Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rkd_jax.convert.common import ConversionError, read_state_dict, take
from rkd_jax.models.bert import BertConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack")

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
