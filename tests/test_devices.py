"""Devices, precision, several processes, mid-epoch checkpoints: what must hold on any machine.

The CPU tests are complete on their own; tests of CUDA code paths skip cleanly without a GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_hostile_runs import DIGITS, FAST, RUN, refused

from kdistill.cli import main
from kdistill.errors import KdistillError
from kdistill.train.devices import check_precision, resolve_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


# -- bad input: one line, exit code 2, nothing written -----------------------------------------

@no_cuda
@pytest.mark.parametrize("override, expected", [
    ("device=cuda", "no CUDA device is available"),
    ("device=cuda:7", "no CUDA device is available"),
    ("train.precision=fp16", "fp16 needs a CUDA device"),
    ("teacher.train.precision=fp16", "teacher.train.precision=fp16 needs a CUDA device"),
])
def test_what_this_machine_cannot_do_is_refused_before_any_work(capsys, tmp_path, override, expected):
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST, override], expected)
    assert not (tmp_path / RUN).exists()


@pytest.mark.parametrize("override, expected", [
    ("device=gpu", "device: 'gpu' is not a device"),
    ("device=cuda:x", "is not a device"),
    ("data.on_device=maybe", "data.on_device"),
    ("data.on_device=1", "data.on_device"),
    ("train.precision=fp8", "train.precision"),
    ("train.log_every_steps=0", "train.log_every_steps"),
    ("train.checkpoint_every_steps=0", "train.checkpoint_every_steps"),
])
def test_bad_device_settings_are_one_line(capsys, tmp_path, override, expected):
    refused(capsys, ["check", DIGITS, f"out_dir={tmp_path}", override], expected)


def test_nproc_zero_is_refused(capsys, tmp_path):
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST, "--nproc", "0"], "--nproc must be at least 1")
    assert not (tmp_path / RUN).exists()


def test_a_gpu_that_is_not_there_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(KdistillError, match=r"cuda:7 does not exist, this machine has 1 CUDA device \(cuda:0\)"):
        resolve_device("cuda:7")
    with pytest.raises(KdistillError, match="would put them all on one GPU"):
        resolve_device("cuda:0", local_rank=0)
    with pytest.raises(KdistillError, match="start at most that many processes"):
        resolve_device("cuda", local_rank=3)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)


def test_precision_is_checked_against_the_device():
    cpu = torch.device("cpu")
    check_precision("bf16", cpu)
    check_precision("fp32", cpu)
    with pytest.raises(KdistillError, match="fp16 needs a CUDA device"):
        check_precision("fp16", cpu)
    with pytest.raises(KdistillError, match="not on mps"):
        check_precision("bf16", torch.device("mps"))


def test_auto_is_the_cpu_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("kdistill.train.devices.mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


# -- the loop: no per-step sync, a named divergence, mid-epoch resume ------------------------

def test_the_loop_reads_the_loss_back_only_every_log_every_steps(monkeypatch):
    """Every way kdistill's code could wait for the device (item, tolist, bool, float, int of a tensor) is
    recorded; only the running sums' `read` may, every log_every_steps steps and at the end of an epoch."""
    import sys as _sys

    from kdistill.distill import Distiller

    waits = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def recording(self, *args, _real=real, **kwargs):
            caller = _sys._getframe(1)
            if "/kdistill/" in caller.f_code.co_filename:
                waits.append(caller.f_code.co_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recording)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 64, 4)]  # 16 steps
    Distiller(None, torch.nn.Linear(5, 3), {"ce": {}}).fit(batches, 1, progress="quiet", log_every_steps=5)
    assert waits.count("read") == 2 * 4, waits  # steps 5, 10, 15 and the epoch's end: the sums and the bad step
    assert set(waits) == {"read"}, waits


NAN_STUDENT = """
import torch
from torch import nn

class TurnsNaN(nn.Module):
    def __init__(self, hidden=(), after=6):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.after, self.calls = after, 0

    def forward(self, x):
        out = self.fc(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                out = out * float("nan")
        return out
"""


def test_a_loss_that_turns_nan_names_the_term_and_step_and_keeps_the_last_checkpoint(capsys, tmp_path, monkeypatch,
                                                                                  soft_label_cache):
    (tmp_path / "nan_student.py").write_text(NAN_STUDENT)
    monkeypatch.syspath_prepend(str(tmp_path))
    capsys.readouterr()
    code = main(["train", DIGITS, f"out_dir={tmp_path}", *FAST, "teacher.name=nan_student:TurnsNaN",
                 "teacher.train.log_every_steps=2", "teacher.train.checkpoint_every_steps=4",
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err == ("kdistill: training diverged: [teacher] epoch 1, step 6: the loss became NaN or inf (in ce); "
                   "the last checkpoint stays: lower the learning rate or set train.grad_clip"), err
    state = tmp_path / RUN / "teacher" / "train_state.safetensors"
    from safetensors import safe_open
    with safe_open(state, "pt") as handle:
        assert handle.metadata()["step"] == "4"
        assert all(torch.isfinite(handle.get_tensor(k)).all() for k in handle.keys() if k.startswith("model."))


def _outcome(run: Path) -> dict:
    lines = [json.loads(line) for line in (run / "teacher" / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        del line["epoch_seconds"], line["samples_per_second"]
    return {"weights": (run / "teacher" / "model.safetensors").read_bytes(), "history": lines}


def test_a_training_interrupted_mid_epoch_resumes_at_the_next_batch(tmp_path, soft_label_cache, monkeypatch):
    """Dropout, augmentation and a learning-rate schedule: all of them must pick up where they were."""
    from kdistill.train import loop

    args = ["train", DIGITS, "threads=1", "teacher.train.epochs=2", "teacher.kwargs.dropout=0.2",
            "teacher.train.augment.crop_padding=1", "teacher.train.schedule=cosine",
            "teacher.train.checkpoint_every_steps=5", "--quiet"]
    assert main([*args, f"out_dir={tmp_path / 'whole'}"]) == 0
    real_save, saves = loop._save_state, []

    def save_then_die(*a, **k):
        real_save(*a, **k)
        saves.append(a[4])
        if a[4].epoch == 1 and a[4].step == 10:  # inside the second epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_state", save_then_die)
    assert main([*args, f"out_dir={tmp_path / 'cut'}"]) == 130
    assert (saves[-1].epoch, saves[-1].step) == (1, 10)
    monkeypatch.setattr(loop, "_save_state", real_save)
    assert main([*args, f"out_dir={tmp_path / 'cut'}", "--resume"]) == 0
    assert _outcome(tmp_path / "cut" / RUN) == _outcome(tmp_path / "whole" / RUN)


# -- several processes ---------------------------------------------------------------------

def _kdistill(*argv: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(env or {})
    if "PYTHONPATH" in env and os.environ.get("PYTHONPATH"):  # keep the caller's (kdistill run from a checkout)
        env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824", **env}
    return subprocess.run([sys.executable, "-m", "kdistill", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


# Several processes on the CPU (gloo), also where there is a GPU: NCCL needs one GPU per process.
CPU = "device=cpu"
# Two epochs each; the last batch of every epoch (1197 training images, batch 64) splits unevenly.
DDP_ARGS = ["run", DIGITS, CPU, "threads=1", "teacher.train.epochs=2", "train.epochs=2", "eval.latency_repeats=1",
            "eval.latency_batches=[1]", "--quiet"]
# Float sums in another order (two processes' gradients averaged) move the last bits; Adam
# carries them along. Measured here: at most 2.3e-7 (weights of magnitude up to 0.36) after 2 + 2 + 2 epochs.
DDP_TOLERANCE = 1e-5


def test_two_processes_train_what_one_process_trains(tmp_path):
    # Each with its own soft-label cache: the two processes build their entry together.
    one = _kdistill(*DDP_ARGS, f"out_dir={tmp_path / 'one'}", env={"KDISTILL_CACHE_DIR": str(tmp_path / "cache1")})
    assert one.returncode == 0, one.stderr
    two = _kdistill(*DDP_ARGS, f"out_dir={tmp_path / 'two'}", "--nproc", "2",
                    env={"KDISTILL_CACHE_DIR": str(tmp_path / "cache2")})
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("gap recovered") == 1  # rank 0 alone reports
    (entry1,), (entry2,) = (tmp_path / "cache1").glob("*.safetensors"), (tmp_path / "cache2").glob("*.safetensors")
    # (Different keys: the two teachers' weights differ in their last bits, see DDP_TOLERANCE.)
    torch.testing.assert_close(load_file(entry2)["logits"], load_file(entry1)["logits"], rtol=0, atol=1e-5)
    for role in ("teacher", "baseline", "student"):
        a = load_file(tmp_path / "one" / RUN / role / "model.safetensors")
        b = load_file(tmp_path / "two" / RUN / role / "model.safetensors")
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < DDP_TOLERANCE, (role, worst)
    m1, m2 = (json.loads((tmp_path / d / RUN / "metrics.json").read_text()) for d in ("one", "two"))
    for role in ("teacher", "baseline", "student"):
        for key in ("test_accuracy", "val_accuracy", "agreement", "params", "best_epoch"):
            assert m1[role][key] == m2[role][key], (role, key)
        assert m1[role]["test_nll"] == pytest.approx(m2[role]["test_nll"], abs=1e-4)


def test_processes_started_with_different_configs_are_refused(tmp_path):
    """What torchrun would start if one node's command line differed: every process stops with one line."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "KDISTILL_CACHE_DIR": str(tmp_path / "cache")}
        procs.append(subprocess.Popen([sys.executable, "-m", "kdistill", "run", DIGITS, f"out_dir={tmp_path}", *FAST,
                                       CPU, f"train.lr={0.001 * (rank + 1)}", "--quiet"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert err.strip() == ("kdistill: error: the processes were started with different configs (rank 1 differs "
                               "from rank 0): give every process the same recipe and overrides"), err
    assert not (tmp_path / RUN).exists()


def test_a_resume_with_another_process_count_is_refused(tmp_path, monkeypatch):
    from kdistill.train import loop

    real_save = loop._save_state

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_state", save_then_die)
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    args = ["train", DIGITS, f"out_dir={tmp_path}", CPU, "threads=1", "teacher.train.epochs=2", "--quiet"]
    assert main(args) == 130
    two = _kdistill(*args, "--resume", "--nproc", "2")
    assert two.returncode == 2, two.stderr
    assert two.stderr.strip().splitlines() == [
        f"kdistill: error: {tmp_path / RUN / 'teacher'} was trained so far under other numerics (processes 1 -> 2), "
        "so resuming would not give the weights of an uninterrupted run: run it in 1 process(es) (--nproc) to resume, "
        "or --force to start this training over"], two.stderr


@needs_cuda
def test_fp16_on_cuda_trains_and_records_gpu_latency(tmp_path, soft_label_cache):
    assert main(["run", DIGITS, f"out_dir={tmp_path}", *FAST, "device=cuda", "train.precision=fp16",
                 "teacher.train.precision=bf16", "--quiet"]) == 0
    metrics = json.loads((tmp_path / RUN / "metrics.json").read_text())
    assert metrics["latency_device"] == "cpu" and "cuda" in metrics["gpu_latency_device"]
    assert set(metrics["student"]["gpu_latency_ms"]) == set(metrics["student"]["latency_ms"])


# -- train.compile ---------------------------------------------------------------------------

def _tiny_fit(**options):
    from kdistill.distill import Distiller

    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    student = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    keys = list(student.state_dict())
    result = Distiller(None, student, {"ce": {}}).fit([(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)], 2,
                                                       progress="quiet", **options)
    assert list(student.state_dict()) == keys and student._compiled_call_impl is None  # given back uncompiled
    return student, result


def test_compile_trains_the_same_model_and_gives_it_back_uncompiled():
    eager, _ = _tiny_fit()
    compiled, _ = _tiny_fit(compile=True)
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_compiler_that_fails_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(self, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("inductor: no C++ compiler found\nlong details")
        self._compiled_call_impl = fail

    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    with pytest.warns(UserWarning, match=r"train.compile: torch.compile failed \(.*no C\+\+ compiler found"):
        student, result = _tiny_fit(compile=True)
    eager, reference = _tiny_fit()
    assert result.history[-1]["train_loss"] == reference.history[-1]["train_loss"]


# -- found in review ---------------------------------------------------------------------------

def test_a_loss_term_of_weight_zero_trains(tmp_path, soft_label_cache):
    assert main(["run", DIGITS, f"out_dir={tmp_path}", *FAST, "distill.losses.kd.weight=0", "--quiet"]) == 0
    line = json.loads((tmp_path / RUN / "student" / "metrics.jsonl").read_text().splitlines()[0])
    assert "train_ce" in line and "train_kd" not in line


def test_a_global_batch_smaller_than_the_process_count_is_refused(tmp_path):
    done = _kdistill("train", DIGITS, f"out_dir={tmp_path}", *FAST, CPU, "teacher.train.batch_size=1", "--nproc", "2",
                     "--quiet", env={"KDISTILL_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("kdistill: error: teacher.train.batch_size=1 is the global batch, split across 2 "
                                   "processes: it must be at least 2; raise it or start fewer processes")


def test_a_killed_worker_is_named(tmp_path):
    """An out-of-memory kill of one process: the launcher says which rank died of what."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, signal, threading\n"
        "if os.environ.get('RANK') == '1':\n"
        "    threading.Timer(4.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()\n")
    done = _kdistill("train", DIGITS, f"out_dir={tmp_path / 'runs'}", CPU, "threads=1", "teacher.train.epochs=500",
                     "--nproc", "2", "--quiet",
                     env={"PYTHONPATH": str(tmp_path), "KDISTILL_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 1, done.stderr
    assert "the process of rank 1 was killed by SIGKILL (out of memory?)" in done.stderr, done.stderr


def test_the_launcher_blames_the_rank_that_died_first_not_the_lowest():
    """Rank 1 is killed; rank 0 sees its connection close and aborts 30 ms later, as gloo makes it do:
    the launcher names rank 1."""
    from kdistill.train.distributed import _wait_all

    for _ in range(3):
        read_end, write_end = os.pipe()
        killed = subprocess.Popen([sys.executable, "-c", "import os, time; time.sleep(0.3); os.kill(os.getpid(), 9)"],
                                  pass_fds=(write_end,))
        os.close(write_end)
        aborts = subprocess.Popen([sys.executable, "-c", f"import os, time; os.read({read_end}, 1); time.sleep(0.03); "
                                   "os.abort()"], pass_fds=(read_end,))
        os.close(read_end)
        assert _wait_all([aborts, killed]) == (1, [-6, -9])


def test_two_processes_resume_mid_epoch_with_the_metrics_of_an_uninterrupted_run(tmp_path):
    cache = {"KDISTILL_CACHE_DIR": str(tmp_path / "cache")}
    args = ["train", DIGITS, CPU, "threads=1", "teacher.train.epochs=2", "teacher.kwargs.dropout=0.2",
            "teacher.train.checkpoint_every_steps=5", "--nproc", "2", "--quiet"]
    assert _kdistill(*args, f"out_dir={tmp_path / 'whole'}", env=cache).returncode == 0
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(
        "import os\n"
        "from kdistill.train import loop\n"
        "real = loop._save_state\n"
        "def save_then_die(*a, **k):\n"
        "    real(*a, **k)\n"
        "    if (a[4].epoch, a[4].step) == (1, 10):\n"
        "        os._exit(137)\n"
        "loop._save_state = save_then_die\n")
    cut = _kdistill(*args, f"out_dir={tmp_path / 'cut'}", env={**cache, "PYTHONPATH": str(tmp_path / "hook")})
    assert cut.returncode != 0
    assert _kdistill(*args, f"out_dir={tmp_path / 'cut'}", "--resume", env=cache).returncode == 0
    assert _outcome(tmp_path / "cut" / RUN) == _outcome(tmp_path / "whole" / RUN)


def test_a_plain_dataloader_resumes_mid_epoch_exactly(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from kdistill.distill import Distiller
    from kdistill.train import loop

    def train(out, die_at=None):
        torch.manual_seed(0)
        x, y = torch.randn(96, 5), torch.randint(0, 3, (96,))
        student = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
        batches = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
        Distiller(None, student, {"ce": {}}).fit(batches, 2, out_dir=out, progress="quiet", checkpoint_every_steps=4,
                                                 resume=die_at is None and (out / "train_state.safetensors").exists())
        return student.state_dict()

    whole = train(tmp_path / "whole")
    real = loop._save_state

    def save_then_die(*a, **k):
        real(*a, **k)
        if (a[4].epoch, a[4].step) == (1, 8):
            raise KeyboardInterrupt

    loop._save_state = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tmp_path / "cut", die_at=(1, 8))
    finally:
        loop._save_state = real
    resumed = train(tmp_path / "cut")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)


def test_a_models_own_error_under_compile_is_its_error_alone(recwarn):
    from kdistill.distill import Distiller

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x[:, :4])  # 4 features into a layer of 5

    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,)))]
    with pytest.raises(KdistillError, match="the student \\(Broken\\) failed on a training batch"):
        Distiller(None, Broken(), {"ce": {}}).fit(batches, 1, progress="quiet", compile=True)
    assert not [w for w in recwarn if "train.compile" in str(w.message)]


BN_TEACHER = """
from torch import nn

class BNTeacher(nn.Module):
    def __init__(self, hidden=()):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.body(x)
"""


def test_batchnorm_statistics_agree_across_processes(tmp_path):
    """Each process updates BatchNorm statistics on its own shard; rank 0's are given to all after every epoch,
    so the processes validate, select and distil from one and the same teacher (one soft-label entry)."""
    (tmp_path / "bn_teacher.py").write_text(BN_TEACHER)
    cache = tmp_path / "cache"
    done = _kdistill("run", DIGITS, f"out_dir={tmp_path / 'runs'}", *FAST, CPU, "teacher.name=bn_teacher:BNTeacher",
                     "eval.latency_batches=[1]", "--nproc", "2", "--quiet",
                     env={"PYTHONPATH": str(tmp_path), "KDISTILL_CACHE_DIR": str(cache)})
    assert done.returncode == 0, done.stderr
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_crd_trains_under_two_processes(tmp_path):
    """CRD's memory banks under torchrun: every process applies every process's updates (the banks' equality
    is tested in test_functional_vid_crd_review.py); here the whole run goes through."""
    done = _kdistill("run", DIGITS, f"out_dir={tmp_path}", *FAST, CPU, "--nproc", "2", "--quiet",
                     "eval.latency_batches=[1]",
                     "distill.losses={ce: {}, crd: {student: body.fc1, teacher: body.fc1, negatives: 8}}",
                     env={"KDISTILL_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    metrics = json.loads(next(tmp_path.glob("*/metrics.json")).read_text())
    assert 0 <= metrics["student"]["test_accuracy"] <= 1
