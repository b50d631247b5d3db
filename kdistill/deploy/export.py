"""ONNX export (torch.export based, the maintained exporter) and its check in onnxruntime.

The graph takes normalised float images [batch, C, H, W] (batch dynamic) and returns logits, like
the PyTorch model; the bundle's model.json holds the preprocessing. A model whose control flow
torch.export cannot trace is refused with the smallest module that fails, found by exporting each
submodule on the inputs it saw in one ordinary forward pass.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdistill.errors import KdistillError
from kdistill.storage import atomic_write

OPSET = 18  # onnxruntime 1.17+ runs it; the opset torch.onnx's exporter targets by default
FP32_TOLERANCE = 1e-4  # largest |logit difference| between onnxruntime and PyTorch accepted for fp32


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: Path, opset: int = OPSET) -> None:
    """Write `model` (on the CPU, eval mode) as ONNX to `path`, atomically."""
    model.eval()  # not `model = model.eval()`: an exported graph's eval (torchao's) returns None
    example = torch.randn(2, *input_shape, device="cpu")
    try:
        with _quiet():
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes=({0: "batch"},), verbose=False)
    except Exception as error:  # noqa: BLE001  torch.export raises many kinds; name the module instead
        raise KdistillError(f"cannot export {type(model).__name__} to ONNX: {untraceable_module(model, example)}; "
                            "rewrite that module's forward without Python control flow on tensor values "
                            "(torch.cond, torch.where) or deploy it with the PyTorch runtime") from error
    atomic_write(path, lambda tmp: program.save(tmp))


def untraceable_module(model: nn.Module, example: torch.Tensor) -> str:
    """Which module torch.export cannot trace: the deepest one that fails on its own inputs."""
    inputs: dict[str, tuple] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args))
             for name, module in model.named_modules()]
    try:
        with torch.no_grad():
            model(example)
    except Exception as error:  # noqa: BLE001
        return f"its forward pass fails ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    finally:
        for hook in hooks:
            hook.remove()
    failing = None
    for name, module in model.named_modules():  # parents before children: the last failure is the deepest
        if name not in inputs:
            continue
        try:
            with _quiet():
                torch.export.export(module, inputs[name], strict=False)
        except Exception as error:  # noqa: BLE001
            failing = (name or "the model itself", type(module).__name__, str(error).strip().splitlines()[0][:200])
    if failing is None:
        return "torch.export fails on the whole model though each module traces alone"
    name, kind, reason = failing
    return f"module '{name}' ({kind}) cannot be traced ({reason})"


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines and warnings of its own; kdistill says what matters in one line."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def onnx_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session; `threads` intra-op threads (None: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: the int8 graphs otherwise warn per node
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001  onnxruntime raises its own exception types
        raise KdistillError(f"onnxruntime cannot load {path} ({str(error).splitlines()[0][:200]}); "
                            "export it again with `kdistill compress --export onnx`") from None


def onnx_logits(session, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits [N, classes] of normalised float `images` [N, C, H, W], in batches."""
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: images[i:i + batch_size].float().cpu().numpy()})[0]
             for i in range(0, len(images), batch_size)]
    return torch.from_numpy(np.concatenate(parts))
