"""int8 ONNX models with onnxruntime's quantisation tools (the maintained stack for what runs in onnxruntime).

- `static`: weights int8 per channel, activations uint8 with ranges calibrated on training images
  (min-max over the calibration batches), QDQ format, which onnxruntime fuses into int8 kernels
  (QLinearConv, QGemm). U8S8 is what onnxruntime recommends for x86 CPUs.
- `dynamic`: weights int8, activation ranges computed per batch at run time; no calibration.

Operators onnxruntime cannot run in int8 stay in fp32, layer by layer: `quantize_onnx` names them
(by the PyTorch module each came from) so a user sees what was left out, and refuses a model none
of whose layers can be quantised.
"""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from kdistill.errors import KdistillError
from kdistill.storage import atomic_write

MODES = ("static", "dynamic")
# The layers that carry weights and cost MACs: what int8 is for.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "LSTM", "GRU", "Attention")
INT8_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM")


class Quantized(NamedTuple):
    quantized: list[str]  # the layers (module paths) that run in int8
    kept_fp32: list[str]  # those left in fp32: onnxruntime has no int8 kernel for them


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over normalised float images, in batches."""

    def __init__(self, input_name: str, images: torch.Tensor, batch_size: int):
        self.batches = iter([{input_name: images[i:i + batch_size].float().cpu().numpy()}
                             for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def quantize_onnx(source: Path, target: Path, mode: str, calibration: torch.Tensor | None = None,
                  batch_size: int = 100) -> Quantized:
    """Write an int8 version of the ONNX model `source` to `target`; which layers are int8 and which not."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in MODES:
        raise KdistillError(f"quantisation mode {mode!r}: use one of {', '.join(MODES)}")
    layers = _layer_names(onnx.load(str(source)))
    if not layers:
        raise KdistillError(f"{source} has no layer with weights ({', '.join(WEIGHTED_OPS)}): nothing to quantise")
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference and graph optimisation first, as onnxruntime's documentation asks.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        written = Path(scratch) / "int8.onnx"
        if mode == "static":
            if calibration is None or len(calibration) == 0:
                raise KdistillError("static int8 needs calibration images; give some training images")
            input_name = onnx.load(str(prepared)).graph.input[0].name
            quantize_static(str(prepared), str(written), _Calibration(input_name, calibration, batch_size),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        else:
            quantize_dynamic(str(prepared), str(written), weight_type=QuantType.QInt8)
        int8 = _int8_layers(onnx.load(str(written)), layers, mode)
        if not int8:
            raise KdistillError(f"none of the layers of {source} ({', '.join(sorted(set(layers.values()))[:5])}) has "
                                f"an int8 kernel in onnxruntime ({mode}); deploy this model in fp32")
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(written.read_bytes()))
    kept = sorted({name for node, name in layers.items() if name not in int8})
    return Quantized(sorted(int8), kept)


def int8_layers_of(path: Path) -> Quantized:
    """Which layers of a QDQ ONNX model (quantisation-aware training's) run in int8, and which do not."""
    import onnx

    model = onnx.load(str(path))
    layers = _layer_names(model)
    int8 = _int8_layers(model, layers, "static")
    return Quantized(sorted(int8), sorted(set(layers.values()) - int8))


def _layer_names(model) -> dict[str, str]:
    """Weighted nodes of an exported graph -> where in the PyTorch model each came from."""
    names = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
        try:
            path = ".".join(s for s in ast.literal_eval(scopes)[:-1] if s) if scopes else ""
        except (ValueError, SyntaxError):
            path = ""
        names[node.name] = f"module '{path}'" if path else f"{node.op_type} in the model's own forward"
    return names


def _int8_layers(model, layers: dict[str, str], mode: str) -> set[str]:
    """The layers of a quantised graph that run in int8. Static (QDQ): the weighted node reads a
    dequantised weight, which onnxruntime fuses into an int8 kernel; dynamic: the node was replaced by an
    integer one (a weighted float node of the original name is left)."""
    produced_by = {output: node.op_type for node in model.graph.node for output in node.output}
    weighted = {node.name: node for node in model.graph.node if node.op_type in WEIGHTED_OPS}
    int8, fp32 = set(), set()
    for node_name, layer in layers.items():
        node = weighted.get(node_name)
        if mode == "static":
            quantized = node is not None and len(node.input) > 1 and \
                produced_by.get(node.input[1]) == "DequantizeLinear"
        else:
            quantized = node is None
        (int8 if quantized else fp32).add(layer)
    return int8 - fp32  # a layer with any float node left counts as fp32
