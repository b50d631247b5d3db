"""Quantisation-aware training: int8 fake-quantisation in the forward pass, trained with distillation.

The PyTorch 2 export flow of torchao (the maintained successor of torch.ao.quantization): the model
is captured with torch.export, `prepare_qat_pt2e` inserts fake-quantisers where X86InductorQuantizer
puts int8 (weights int8 per channel, activations uint8, BatchNorm folded into its conv), the
prepared graph trains through the one loop like any student, and `convert_pt2e` turns it into
quantise/dequantise pairs around the layers, which export to ONNX as QuantizeLinear /
DequantizeLinear: onnxruntime runs them with its int8 kernels, as it does a statically quantised
model, but with weights and ranges the training adapted to the rounding.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch
from torch import nn

from kdistill.errors import KdistillError

EXAMPLE_BATCH = 8  # the captured graph's batch axis is dynamic; the example only has to be a valid batch


@contextlib.contextmanager
def _quiet_torchao():
    """torchao reports optional GPU kernels it cannot load on every import, and registers an Enum that
    torch's pytree warns about; neither matters here."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch._dynamo", "torch.export", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def prepare_qat(model: nn.Module, input_shape: tuple[int, int, int]) -> nn.Module:
    """A fake-quantised copy of `model` (on the CPU), ready to train in kdistill's loop.

    A graph captured by torch.export ignores `.train()` / `.eval()` (BatchNorm and dropout keep the mode
    they were captured in); torchao's `allow_exported_model_train_eval` makes them switch, as the loop needs.
    """
    import copy

    model = copy.deepcopy(model).cpu().train()
    example = torch.randn(EXAMPLE_BATCH, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        with _quiet_torchao():
            from torchao.quantization.pt2e import allow_exported_model_train_eval
            from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

            graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False).module()
            quantizer = x86.X86InductorQuantizer()
            quantizer.set_global(x86.get_default_x86_inductor_quantization_config(is_qat=True))
            prepared = prepare_qat_pt2e(graph, quantizer)
    except Exception as error:  # noqa: BLE001  torch.export and torchao raise many kinds
        from kdistill.deploy.export import untraceable_module

        raise KdistillError(f"cannot prepare {type(model).__name__} for quantisation-aware training: "
                            f"{untraceable_module(model.eval(), example)}; use --quantize static instead") from error
    return allow_exported_model_train_eval(prepared)


def convert_qat(model: nn.Module) -> nn.Module:
    """The trained graph with its fake-quantisers turned into quantise/dequantise pairs (eval mode)."""
    with _quiet_torchao():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        model.cpu()
        model.eval()  # torchao's replacement returns None, so no chaining
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        return allow_exported_model_train_eval(convert_pt2e(model))
