"""SIGKILL at random moments of a real run, then `--resume`: the results of a run never killed.

Each scenario kills `kdistill run` (a separate process) while it trains the teacher, the
baseline, while it writes the soft labels and while it distils the student, at a random delay
after a phase begins, resumes after every kill, and compares what the finished run wrote with
an uninterrupted run: metrics.json (all but the timings) and every model's weights, bit for bit.
KDISTILL_CRASH_SCENARIOS=N runs more random scenarios.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Batches of 8 make each epoch last about 0.2 s here, long enough to be killed in.
# Mid-epoch checkpoints every 40 of an epoch's 150 steps, so most kills resume at a batch inside an epoch;
# student dropout checks that its random state resumes too. On the CPU: bit for bit needs deterministic
# kernels, and CUDA's are not (on an H200 the resumed run's metrics differed from the uninterrupted run's).
ARGS = ["recipes/digits_quick.yaml", "device=cpu", "threads=1", "teacher.train.epochs=4", "train.epochs=4",
        "teacher.train.batch_size=8", "train.batch_size=8", "eval.latency_repeats=1", "eval.latency_batches=[1]",
        "teacher.train.checkpoint_every_steps=40", "train.checkpoint_every_steps=40", "student.kwargs.dropout=0.1"]
ROLES = ("teacher", "baseline", "student")
TIMINGS = ("latency_ms", "train_seconds", "train_samples_per_second", "median_epoch_seconds", "latency_spread")
# Where to kill: a line the run prints as a phase starts, then a random delay (seconds).
PHASES = ("[teacher] epoch 1/", "[teacher] epoch 3/", "[baseline] epoch 2/", "[baseline] epoch 4/",
          "[student] soft labels", "[student] epoch 2/")


def launch(out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "KDISTILL_CACHE_DIR": str(cache), "MALLOC_MMAP_THRESHOLD_": "1073741824",
           "MALLOC_TRIM_THRESHOLD_": "1073741824"}
    return subprocess.Popen([sys.executable, "-m", "kdistill.cli", "run", *ARGS, f"out_dir={out}", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def kill_after(proc: subprocess.Popen, markers: str | tuple[str, ...], delay: float) -> int | None:
    """SIGKILL `delay` seconds after the run prints a line containing one of `markers`; returns that
    marker's index, or None if the run ended first."""
    markers = (markers,) if isinstance(markers, str) else markers
    for line in proc.stderr:
        hit = next((i for i, marker in enumerate(markers) if marker in line), None)
        if hit is not None:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return hit
            break
    proc.communicate(timeout=300)  # ended on its own: it must have finished
    assert proc.returncode == 0
    return None


def outcome(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    for role in ROLES:
        for key in TIMINGS:
            metrics[role].pop(key)
    metrics.pop("distill_overhead", None)
    metrics.pop("latency_machine", None)  # the load average when it was timed
    weights = {role: hashlib.sha256((run / role / "model.safetensors").read_bytes()).hexdigest() for role in ROLES}
    return {"metrics": metrics, "weights": weights}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference")
    finish(launch(root / "runs", root / "cache"))
    return outcome(root / "runs" / "digits_quick")


def scenarios() -> list[int]:
    return list(range(int(os.environ.get("KDISTILL_CRASH_SCENARIOS", 1))))


@pytest.mark.parametrize("scenario", scenarios())
def test_killed_and_resumed_runs_end_like_an_uninterrupted_one(tmp_path, reference, scenario):
    rng = random.Random(scenario)
    out, cache = tmp_path / "runs", tmp_path / "cache"
    kills, remaining = 0, PHASES
    while remaining:  # a resumed run may start past a phase (a killed epoch 3 resumes at 3): kill at the next one
        hit = kill_after(launch(out, cache, "--resume"), remaining, delay=rng.uniform(0.0, 0.3))
        if hit is None:
            break
        kills, remaining = kills + 1, remaining[hit + 1:]
    finish(launch(out, cache, "--resume"))
    assert kills >= 3  # most kill points were reached before the run ended
    assert outcome(out / "digits_quick") == reference


def test_a_run_killed_before_resuming_says_so(tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    assert kill_after(launch(out, cache), "[teacher] epoch 2/", delay=0.0) == 0
    proc = launch(out, cache)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "pass --resume" in err, err
