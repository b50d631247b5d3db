"""Several processes, one result: torchrun's environment, the reductions the loop needs, and `--nproc`.

Under torchrun (WORLD_SIZE > 1 in the environment) `start` joins the process group: gloo on the
CPU, NCCL on CUDA, one device per process. Outside it every helper here is a no-op for one
process, so the loop reads the same either way. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from kdistill.errors import KdistillError
from kdistill.train.devices import resolve_device

# Rank 0 alone builds the soft-label cache and evaluates while the others wait at a barrier.
TIMEOUT = datetime.timedelta(hours=2)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or `kdistill ... --nproc N`) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device_spec: str = "auto", key: str = "device") -> torch.device:
    """This process's device; under torchrun, joins the process group first (once)."""
    if not launched():
        return resolve_device(device_spec, key=key)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank=local_rank, key=key)
    if not active():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, **({"device_id": device} if device.type == "cuda" else {}))
    return device


def stop() -> None:
    if active():
        dist.destroy_process_group()


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over processes (in place); no-op in one process."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def min_(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (building a cache, say); the others run it once rank 0 is through."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def from_main(value):
    """Rank 0's `value` on every process (a small picklable object; in one process, `value` itself)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(text: str, what: str) -> None:
    """Refuse to go on unless every process holds the same `text` (its config, say)."""
    if not active():
        return
    digest = hashlib.sha256(text.encode()).hexdigest()
    digests: list[str] = [""] * world_size()
    dist.all_gather_object(digests, digest)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise KdistillError(f"the processes were started with different {what}s (rank {differing[0]} differs from "
                            f"rank 0): give every process the same recipe and overrides")


def launch(argv: list[str], nproc: int) -> int:
    """Run `python -m kdistill ARGV` in `nproc` processes on this machine, with the environment torchrun
    gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Rank 0 prints; the others' output is kept back and shown only if one of them fails. When one
    process fails the others are stopped (as torchrun does) and its exit code is returned.
    """
    port = _free_port()
    workers, logs = [], []
    for local_rank in range(nproc):
        env = {**os.environ, "RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        log = None if local_rank == 0 else tempfile.TemporaryFile(mode="w+")
        logs.append(log)
        workers.append(subprocess.Popen([sys.executable, "-m", "kdistill", *argv], env=env,
                                        stdout=None if log is None else subprocess.DEVNULL, stderr=log))
    try:
        codes = _wait_all(workers)
    except KeyboardInterrupt:
        _stop_all(workers)
        raise
    try:
        if codes[0] > 0:  # rank 0 failed and said why
            return codes[0]
        failed = [r for r, code in enumerate(codes) if code != 0]
        if not failed:
            return 0
        first = next((r for r in failed if r != 0), 0)  # rank 0 is stopped by us when another fails
        if logs[first] is not None:
            logs[first].seek(0)
            for line in [line for line in logs[first].read().splitlines() if line.strip()][-3:]:
                print(f"[rank {first}] {line}", file=sys.stderr)
        return codes[first] if codes[first] > 0 else 1
    finally:
        for log in logs:
            if log is not None:
                log.close()


def _wait_all(workers: list[subprocess.Popen]) -> list[int]:
    while True:
        codes = [w.poll() for w in workers]
        if all(code is not None for code in codes):
            return codes
        if any(code not in (None, 0) for code in codes):  # one failed: the others would wait for it forever
            time.sleep(1.0)  # let rank 0 print its own error first if it has one
            _stop_all(workers)
            return [w.wait() for w in workers]
        time.sleep(0.1)


def _stop_all(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for worker in workers:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
