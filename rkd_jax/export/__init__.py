"""Export a trained student for deployment: ONNX (onnxruntime) or serialized JAX (jax.export).

    python -m rkd_jax.export --checkpoint runs/default --format onnx --out export/student.onnx
    python -m rkd_jax.export --checkpoint runs/default --format jax --out export/student.jax
    python -m rkd_jax.export --checkpoint runs/default --format onnx --quantize int8 \\
        --out export/student.onnx        # also writes export/student.int8.onnx
    python -m rkd_jax.export --checkpoint runs/default --format params \\
        --out export/student.safetensors # the weights, config, model card: rkd_jax.export.params

The exported function (batch B dynamic unless --batch fixes it, S = image size, L = max tokens):
  inputs   image float32 [B, S, S, 3]: RGB squashed to S x S, pixels / 255 in [0, 1]; the
             backbone's mean/std normalisation is inside the graph (do not apply it yourself);
           tokens int32 [B, L]: [CLS] word pieces [SEP] [PAD]... (BERT uncased WordPiece);
           token_mask int32 [B, L]: 1 on [CLS]..[SEP], 0 on padding;
  outputs  prob float32 [B, S, S]: foreground probability at the input resolution;
           margin float32 [B, S/4, S/4]: foreground minus background logit at stride 4, for
             resizing to the original image size (threshold it at logit(threshold)).
The model's variables are constants of the exported graph. Beside the model go `vocab.txt` and
`<file>.json` (sizes, tokenisation, normalisation constants, threshold, names and shapes), so
a user of the file needs neither rkd_jax nor the checkpoint.

Modules: `student` (the checkpoint and the function to export), `jax_export`, `onnx`,
`quantize` (int8 ONNX), `sidecar` (vocab.txt, `<file>.json`, the parity check), `params`
(--format params), `run` (the whole export), `command` (the command line).
"""

from rkd_jax.export.command import main, parse_args
from rkd_jax.export.common import FORMATS, INPUT_NAMES, OUTPUT_NAMES, ExportError
from rkd_jax.export.jax_export import DEFAULT_PLATFORMS, export_jax, load_jax
from rkd_jax.export.onnx import DEFAULT_OPSET, export_onnx, onnx_session, run_onnx
from rkd_jax.export.quantize import (
    DEFAULT_CALIBRATION_EXAMPLES,
    DEFAULT_QUANT_OPS,
    TrainingImages,
    compare_int8,
    evaluate_margin_fn,
    int8_path,
    latency_ms,
    quantize_int8,
    text_only_nodes,
)
from rkd_jax.export.run import export
from rkd_jax.export.sidecar import (
    PARITY_SENTENCE,
    check_parity,
    margin_iou,
    photo_inputs,
    sidecar_path,
    tokenizer_for,
    vocab_text,
)
from rkd_jax.export.student import input_specs, load_student, make_serving_fn

__all__ = [
    "DEFAULT_CALIBRATION_EXAMPLES",
    "DEFAULT_OPSET",
    "DEFAULT_PLATFORMS",
    "DEFAULT_QUANT_OPS",
    "FORMATS",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "PARITY_SENTENCE",
    "ExportError",
    "TrainingImages",
    "check_parity",
    "compare_int8",
    "evaluate_margin_fn",
    "export",
    "export_jax",
    "export_onnx",
    "input_specs",
    "int8_path",
    "latency_ms",
    "load_jax",
    "load_student",
    "main",
    "make_serving_fn",
    "margin_iou",
    "onnx_session",
    "parse_args",
    "photo_inputs",
    "quantize_int8",
    "run_onnx",
    "sidecar_path",
    "text_only_nodes",
    "tokenizer_for",
    "vocab_text",
]
