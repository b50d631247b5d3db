"""Checkpoints as safetensors, written atomically; loading never unpickles anything.

A file appears under its final name only once it is complete (see kdistill.storage), so a crash
never leaves a half-written checkpoint that a later run would trust.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from kdistill.errors import KdistillError
from kdistill.storage import atomic_write


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses views of shared storage and non-contiguous tensors: store clean copies.
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata))


def load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file; anything else (a pickle, a truncated file) is a KdistillError."""
    path = Path(path)
    if not path.is_file():
        raise KdistillError(f"checkpoint {path} not found")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise KdistillError(
            f"checkpoint {path} is not a readable safetensors file ({_first_line(err)}); "
            "kdistill never loads pickles: convert it with safetensors.torch.save_file"
        ) from None
    return tensors, metadata


def save_model(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    save_tensors(path, model.state_dict(), metadata)


def load_model(path: Path, model: nn.Module, what: str = "model") -> dict[str, str]:
    """Load weights into `model`, checking that every key and shape fits; returns the metadata."""
    tensors, metadata = load_tensors(path)
    state = model.state_dict()
    missing = [k for k in state if k not in tensors]
    unexpected = [k for k in tensors if k not in state]
    wrong = [k for k in state if k in tensors and tensors[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        saved_as = f" (saved from model '{metadata['model']}')" if "model" in metadata else ""
        details = "; ".join(
            part
            for part in (
                _some("missing", missing),
                _some("unexpected", unexpected),
                _some("wrong shape", [f"{k} {tuple(tensors[k].shape)} vs {tuple(state[k].shape)}" for k in wrong]),
            )
            if part
        )
        raise KdistillError(
            f"checkpoint {path}{saved_as} does not fit the {what}'s architecture: {details}; "
            "point to a checkpoint of the same model and kwargs"
        )
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # found now, not as a "diverged" training or NaN soft labels after hours of other work
        raise KdistillError(f"checkpoint {path} holds NaN or inf in {_some('', broken).strip()}; "
                            "it comes from a diverged training: use another checkpoint")
    model.load_state_dict(tensors)
    return metadata


def save_optimizer(optimizer: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict[str, Tensor], str]:
    """Split an optimizer state into tensors (for safetensors) and JSON (for the metadata)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta_json: str,
                   prefix: str = "optim.") -> None:
    meta = json.loads(meta_json)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _some(label: str, keys: list[str], limit: int = 3) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{label} {', '.join(keys[:limit])}{more}"


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
