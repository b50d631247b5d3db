"""Where training runs and in what precision: device names resolved, and checked before any work.

`device: auto | cpu | cuda | cuda:N | mps`; `auto` takes CUDA if there is one, else MPS, else the CPU.
Under torchrun each process takes the CUDA device of its LOCAL_RANK. Precision: fp32 anywhere, bf16
autocast on CPU and CUDA, fp16 autocast (with a gradient scaler, see the loop) on CUDA only.
"""

from __future__ import annotations

import contextlib
import re

import torch

from kdistill.errors import KdistillError

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d{1,4})?")
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(spec: str = "auto", *, local_rank: int | None = None, key: str = "device") -> torch.device:
    """The torch.device a `device` setting names on this machine; raises KdistillError when it has none such.

    `local_rank` (set under torchrun) picks the process's own GPU for `auto` and `cuda`; an explicit
    `cuda:N` would put every process on one GPU, so it is refused then.
    """
    spec = str(spec).strip().lower()
    if not DEVICE_PATTERN.fullmatch(spec):
        raise KdistillError(f"{key}: {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if mps_available() and local_rank is None else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not mps_available():
            raise KdistillError(f"{key}=mps but this machine has no usable MPS (Apple GPU) device; use {key}=auto "
                                "or cpu")
        if local_rank is not None:
            raise KdistillError(f"{key}=mps runs in one process only: drop --nproc (torchrun) or use cuda/cpu")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise KdistillError(f"{key}={spec} but no CUDA device is available (torch {torch.__version__}, "
                            f"CUDA build: {torch.version.cuda or 'no'}); use {key}=auto or {key}=cpu")
    count = torch.cuda.device_count()
    if spec == "cuda":
        index = local_rank if local_rank is not None else torch.cuda.current_device()
    else:
        index = int(spec.split(":")[1])
        if local_rank is not None:
            raise KdistillError(f"{key}={spec} with several processes would put them all on one GPU: use "
                                f"{key}=cuda and each process takes the GPU of its LOCAL_RANK")
    if index >= count:
        raise KdistillError(f"{key}: cuda:{index} does not exist, this machine has {count} CUDA device"
                            f"{'s' if count != 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})"
                            + ("; start at most that many processes per node" if local_rank is not None else ""))
    return torch.device("cuda", index)


def check_precision(precision: str, device: torch.device, key: str = "train.precision") -> None:
    """Refuse a precision the device cannot train in, with the fix."""
    if precision not in PRECISIONS:
        raise KdistillError(f"{key}: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise KdistillError(f"{key}=fp16 needs a CUDA device (fp16 autocast with a gradient scaler) and this run "
                            f"trains on {device.type}; use bf16 on a CPU, fp32 elsewhere")
    if precision == "bf16":
        if device.type == "mps":
            raise KdistillError(f"{key}=bf16 is supported on CPU and CUDA, not on mps; use fp32")
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise KdistillError(f"{key}=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support; "
                                "use fp16 or fp32")


def autocast(precision: str, device: torch.device | str = "cpu"):
    """Autocast to bf16/fp16 on `device`'s type, or nothing for fp32. Loss terms upcast to fp32 themselves."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights live (the CPU for a module without any)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): for timing only, never in the training loop."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device: torch.device) -> str:
    """What to call a device in a report: the GPU's model name, or the device type."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
