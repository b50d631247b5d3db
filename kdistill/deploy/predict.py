"""`kdistill predict MODEL_DIR INPUT...`: a deployable folder's top classes for image files or .npy batches.

Inputs: PNG, JPEG or any image Pillow reads (resized to the model's input size, with a note), or an
.npy array of one image [C, H, W] / [H, W] or a batch [N, C, H, W] / [N, H, W]: uint8 pixels (0-255),
or floats (0-1). Arrays load with allow_pickle=False: no pickle is ever read. Preprocessing
(mean, std) comes from the folder's model.json, as in training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from kdistill.deploy.bundle import ONNX_FILE, ModelCard, load_bundle, read_card
from kdistill.errors import KdistillError

RUNTIMES = ("pytorch", "onnxruntime")
COLOUR_MODES = {1: "L", 3: "RGB"}  # Pillow's mode per channel count
CHANNEL_WORDS = {1: "greyscale", 3: "RGB"}


class Prediction(NamedTuple):
    source: str  # file name, with the row for a batch
    top: list[tuple[str, float]]  # (class, probability), most likely first


def predict(folder: Path, inputs: list[Path], runtime: str = "pytorch", top: int = 3,
            note: Callable[[str], None] = lambda _: None) -> list[Prediction]:
    if runtime not in RUNTIMES:
        raise KdistillError(f"--runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    card = read_card(folder)
    names, pixels = [], []
    for path in inputs:
        labels, batch = read_input(Path(path), card, note)
        names += labels
        pixels.append(batch)
    logits = _runner(Path(folder), card, runtime)(card.normalise(torch.cat(pixels)))
    probabilities = torch.softmax(logits.float(), dim=1)
    best = probabilities.topk(min(top, card.num_classes), dim=1)
    return [Prediction(name, [(card.classes[i], float(p)) for p, i in zip(values, indices, strict=True)])
            for name, values, indices in zip(names, best.values.tolist(), best.indices.tolist(), strict=True)]


def _runner(folder: Path, card: ModelCard, runtime: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if runtime == "onnxruntime":
        if not card.onnx or not (folder / ONNX_FILE).is_file():
            raise KdistillError(f"{folder} has no ONNX model: make one with `kdistill compress RUN --export onnx`, "
                                "or use --runtime pytorch")
        from kdistill.deploy.export import onnx_logits, onnx_session

        session = onnx_session(folder / ONNX_FILE)
        return lambda x: onnx_logits(session, x)
    if not card.weights_sha256:
        raise KdistillError(f"{folder} holds an int8 ONNX model only: use --runtime onnxruntime")
    model, _ = load_bundle(folder)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)
    return run


def read_input(path: Path, card: ModelCard, note: Callable[[str], None]) -> tuple[list[str], torch.Tensor]:
    """(a name per image, pixels [N, C, H, W]) of one file, checked against the model's input."""
    if not path.is_file():
        raise KdistillError(f"{path} not found")
    if path.suffix.lower() == ".npy":
        return _read_array(path, card)
    return [str(path)], _read_image(path, card, note)[None]


def _read_array(path: Path, card: ModelCard) -> tuple[list[str], torch.Tensor]:
    channels, height, width = card.input_shape
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise KdistillError(f"{path} is not a readable .npy array ({str(err).splitlines()[0][:120]}); save images "
                            "with numpy.save (no object arrays)") from None
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise KdistillError(f"{path} holds {array.dtype}; give uint8 pixels (0-255) or floats (0-1)")
    if array.ndim == 2 and channels == 1:  # one greyscale image [H, W]
        array = array[None, None]
    elif array.ndim == 3:  # greyscale: a batch [N, H, W] (one image [1, H, W] is the same); colour: [C, H, W]
        array = array[:, None] if channels == 1 else array[None]
    if array.ndim != 4 or tuple(array.shape[1:]) != (channels, height, width):
        raise KdistillError(f"{path} has shape {list(array.shape)}; the model takes [N, {channels}, {height}, {width}] "
                            f"(or one image [{channels}, {height}, {width}])")
    if np.issubdtype(array.dtype, np.floating) and (not np.isfinite(array).all() or array.min() < 0
                                                    or array.max() > 1):
        raise KdistillError(f"{path}: float pixels must lie in [0, 1] (uint8 arrays take 0-255)")
    return [f"{path}[{i}]" for i in range(len(array))], torch.from_numpy(np.ascontiguousarray(array))


def _read_image(path: Path, card: ModelCard, note: Callable[[str], None]) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    channels, height, width = card.input_shape
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            bands = [band for band in image.getbands() if band != "A"]
            if len(bands) != channels:
                raise KdistillError(f"{path} has {len(bands)} colour channel(s) ({image.mode}); the model takes "
                                    f"{channels} ({CHANNEL_WORDS.get(channels, channels)}): convert the image, e.g. "
                                    f"PIL's image.convert('{COLOUR_MODES.get(channels, 'RGB')}')")
            image = image.convert(COLOUR_MODES[channels])
            if image.size != (width, height):
                note(f"note: {path} is {image.size[0]}x{image.size[1]}; resized to the model's {width}x{height}")
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise KdistillError(f"{path} is not an image Pillow can read ({str(err).splitlines()[0][:120]}); give PNG "
                            "or JPEG files, or an .npy array") from None
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
