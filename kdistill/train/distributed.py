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
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist

from kdistill.errors import KdistillError
from kdistill.train.devices import resolve_device

# Rank 0 alone evaluates, and may wait for another run's soft-label build, while the others wait.
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
    """Leave the process group, after the others have reached this point too: a process that tears the
    group down while another still uses it can be aborted (SIGABRT; seen with gloo on CPUs). A process
    that failed may find the others gone or busy: then it waits at most 30 s and leaves anyway."""
    if not active():
        return
    if dist.get_backend() == "gloo":  # (NCCL's barrier has no timeout of its own: not risked there)
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
        except Exception:  # noqa: BLE001  the others are gone or stuck: nothing left to wait for
            pass
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


def from_main(value):
    """Rank 0's `value` on every process (a small picklable object; in one process, `value` itself)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every process's `value`, in rank order, on every process (small picklable objects)."""
    if not active():
        return [value]
    values: list = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) in every process: each updated them on its own shard, so
    validation, the best weights and the teacher a later step uses would otherwise differ between processes."""
    broadcast_tensors(list(module.buffers()))


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of `tensors` in every process."""
    if not active():
        return
    for tensor in tensors:
        dist.broadcast(tensor, src=0)


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
    gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, and
    OMP_NUM_THREADS=1 unless set), so that a run started one way resumes the other.

    Rank 0 prints; the others' output is kept back and shown only if one of them fails first. When a
    process fails the others are stopped (as torchrun does); the launcher's exit code is the first
    failure's. Killing the launcher (SIGTERM, or SIGKILL on Linux) stops the workers too.
    """
    port = _free_port()
    workers, logs = [], []
    base = {**os.environ, "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    base.setdefault("OMP_NUM_THREADS", "1")
    try:
        for rank in range(nproc):
            log = None if rank == 0 else tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "kdistill", *argv], env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=None if log is None else subprocess.DEVNULL, stderr=log, preexec_fn=die_with_parent))
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            first, codes = _wait_all(workers)
        except KeyboardInterrupt:
            _stop_all(workers)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        if first is None:
            return 0
        code = codes[first]
        if code < 0:  # killed by a signal: nobody printed why
            name = signal.Signals(-code).name
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            print(f"kdistill: error: the process of rank {first} was killed by {name}{hint}; the others were "
                  "stopped; continue with --resume", file=sys.stderr)
            return 1
        if logs[first] is not None:  # rank 0 prints its own error; another rank's is shown here
            logs[first].seek(0)
            for line in [line for line in logs[first].read().splitlines() if line.strip()][-3:]:
                print(f"[rank {first}] {line}", file=sys.stderr)
        return code
    finally:
        for log in logs:
            if log is not None:
                log.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def die_with_parent() -> None:
    """In the child, before exec: on Linux, have the kernel send SIGTERM if the thread that started it dies (the
    launcher, a sweep), even by SIGKILL, so no worker is left running on its own."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


BAD_INPUT_PATIENCE_S = 20.0


def _wait_all(workers: list[subprocess.Popen]) -> tuple[int | None, list[int]]:
    """Wait for every worker; returns (the rank that failed first or None, every exit code).

    One thread per worker waits on it, so ranks are seen failing in the order they died: when one is
    killed its peers' collectives fail (gloo aborts the process) a few milliseconds later, and polling
    them all at once would blame whichever rank number is lowest.
    """
    ended: queue.SimpleQueue[int] = queue.SimpleQueue()
    for rank, worker in enumerate(workers):
        threading.Thread(target=lambda r=rank, w=worker: (w.wait(), ended.put(r)), daemon=True).start()
    for _ in workers:
        rank = None
        while rank is None:  # a timeout, so that SIGTERM's KeyboardInterrupt reaches this thread
            with contextlib.suppress(queue.Empty):
                rank = ended.get(timeout=0.5)
        if workers[rank].returncode == 0:
            continue
        # Bad input (exit 2) stops every rank alike: give rank 0, perhaps slower to get there on a busy
        # machine, time to print its own line (it ends at once, or waits in a collective until stopped).
        patience = BAD_INPUT_PATIENCE_S if workers[rank].returncode == 2 else 1.0
        deadline = time.monotonic() + patience
        while workers[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if workers[0].poll() == 2:
            rank = 0
        _stop_all(workers)  # the others would wait for it at their next collective forever
        return rank, [w.wait() for w in workers]
    return None, [w.returncode for w in workers]


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
