"""A deployable model folder: weights, and what it takes to use them without the recipe.

    model.safetensors   the weights (the only file PyTorch loads; never a pickle)
    model.json          architecture (registered name and arguments; layer widths come from the
                        weights), input shape, preprocessing, class names, the weights' SHA-256
    model.onnx          the same network for onnxruntime, when exported (opset in model.json)

`kdistill predict FOLDER IMAGE...` needs nothing else. The digest catches a truncated or swapped
weights file before it gives wrong answers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from kdistill.errors import KdistillError
from kdistill.models import create_model
from kdistill.models.resize import fit_to_weights
from kdistill.storage import atomic_write_text, file_digest
from kdistill.train.checkpoint import load_model, load_tensors, save_model

FORMAT = "kdistill-model-1"
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "model.json"
ONNX_FILE = "model.onnx"


@dataclass
class ModelCard:
    """What model.json holds. Inputs are uint8 pixels: x = (pixels / 255 - mean) / std, per channel."""

    model: str  # registered name or module.path:ClassName
    kwargs: dict
    input_shape: list[int]  # C, H, W
    mean: list[float]
    std: list[float]
    classes: list[str]
    weights_sha256: str = ""
    onnx: dict | None = None  # {"file", "opset", "sha256"} once exported
    made_from: dict = field(default_factory=dict)  # where it came from: run folder, step, its teacher

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalise(self, pixels: Tensor) -> Tensor:
        """Pixels [N, C, H, W], uint8 (0-255) or float (0-1), -> the model's input, with the training loader's
        arithmetic."""
        shift = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        scale = torch.tensor([1 / s for s in self.std], dtype=torch.float32).view(1, -1, 1, 1)
        unit = pixels.float().div(255) if pixels.dtype == torch.uint8 else pixels.float()
        return unit.sub(shift).mul(scale)


def save_bundle(folder: Path, model: nn.Module, card: ModelCard) -> ModelCard:
    """Write the weights and model.json into `folder` (model.json last: a folder without it is incomplete)."""
    folder = Path(folder)
    save_model(folder / WEIGHTS_FILE, model, {"model": card.model, "format": FORMAT})
    card.weights_sha256 = file_digest(folder / WEIGHTS_FILE)
    write_card(folder, card)
    return card


def write_card(folder: Path, card: ModelCard) -> None:
    atomic_write_text(Path(folder) / INFO_FILE, json.dumps({"format": FORMAT, **asdict(card)}, indent=2))


def read_card(folder: Path) -> ModelCard:
    """model.json of a bundle, checked; any problem is one KdistillError naming the file."""
    folder = Path(folder)
    path = folder / INFO_FILE
    if not folder.is_dir():
        raise KdistillError(f"model folder {folder} not found; give a folder made by `kdistill compress` "
                            "(it holds model.json and model.safetensors)")
    if not path.is_file():
        raise KdistillError(f"{folder} has no {INFO_FILE}: it is not a kdistill model folder, or its writing was "
                            "interrupted; make it again with `kdistill compress`")
    try:
        record = json.loads(path.read_text())
        if record.pop("format") != FORMAT:
            raise ValueError("unknown format")
        card = ModelCard(**record)
        channels, height, width = (int(v) for v in card.input_shape)
        if len(card.mean) != channels or len(card.std) != channels or min(card.std) <= 0 or not card.classes:
            raise ValueError("preprocessing does not fit the input shape")
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise KdistillError(f"{path} is not a readable kdistill model description ({err}); "
                            "make the folder again with `kdistill compress`") from None
    return card


def load_bundle(folder: Path) -> tuple[nn.Module, ModelCard]:
    """The model of a bundle, in eval mode on the CPU, with its card; a damaged folder is a KdistillError."""
    folder = Path(folder)
    card = read_card(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise KdistillError(f"{folder} has no {WEIGHTS_FILE}; make the folder again with `kdistill compress`")
    if file_digest(weights) != card.weights_sha256:
        raise KdistillError(f"{weights} is not the file {INFO_FILE} describes (its SHA-256 differs): it was "
                            "truncated or replaced; make the folder again with `kdistill compress`")
    model = create_model(card.model, tuple(card.input_shape), card.num_classes, **card.kwargs)
    tensors, _ = load_tensors(weights)
    fit_to_weights(model, tensors)
    load_model(weights, model, what=f"model '{card.model}' of {folder}")
    return model.eval(), card
