"""The one fit/evaluate loop, for teachers, baselines and distilled students alike.

`fit` trains anything that looks like a `Distiller` (a `training_step`, the model to select
on, its trainable parameters). Model selection uses the validation loader only. Every
epoch appends a line to metrics.jsonl and writes a resumable training state atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kdistill.errors import KdistillError
from kdistill.storage import atomic_write_text
from kdistill.train.checkpoint import (
    load_optimizer,
    load_tensors,
    save_optimizer,
    save_tensors,
)
from kdistill.train.optim import build_optimizer, learning_rate
from kdistill.train.progress import Progress

STATE_FILE = "train_state.safetensors"  # resumable state (and best weights so far), rewritten every epoch
METRICS_FILE = "metrics.jsonl"


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float | None = None
    train_seconds: float = 0.0
    train_samples: int = 0
    stopped_early: bool = False

    @property
    def samples_per_second(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds else 0.0


@dataclass
class Evaluation:
    accuracy: float
    nll: float
    logits: Tensor  # [N, C], fp32, in loader order
    labels: Tensor  # [N]


def autocast(precision: str):
    """bf16 autocast on the CPU (AVX-512 BF16 pays off here), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unpack(batch) -> tuple[Tensor, Tensor, Tensor | None]:
    """Accept kdistill's Batch (inputs, labels, index) and plain (inputs, labels) pairs."""
    inputs, labels, *rest = batch
    return inputs, labels, (rest[0] if rest else None)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, precision: str = "fp32") -> Evaluation:
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in loader:
            inputs, target, _ = unpack(batch)
            with autocast(precision):
                logits.append(model(inputs).float())
            labels.append(target)
    finally:
        model.train(was_training)
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    return Evaluation(
        accuracy=(all_logits.argmax(1) == all_labels).float().mean().item(),
        nll=F.cross_entropy(all_logits, all_labels).item(),
        logits=all_logits,
        labels=all_labels,
    )


def fit(distiller, train_loader, cfg, *, val_loader=None, out_dir: Path | None = None,
        resume: bool = False, seed: int = 0, progress: Progress | None = None, inputs: dict | None = None,
        label: str = "train") -> FitResult:
    """Train `distiller.student` for `cfg.epochs` epochs; returns the history and timing.

    With `out_dir`, writes metrics.jsonl and a resumable train state there after every epoch;
    `resume=True` continues from that state, if it was started with the same training config,
    seed, `inputs` (what else the result depends on, e.g. the teacher's digest) and numerics.
    Validation runs in fp32 whatever the training precision, so model selection sees the
    numbers the final evaluation will. The best
    validation epoch's weights end up in the student (the last epoch's without a validation loader).
    """
    progress = progress or Progress()
    model = distiller.student
    optimizer = build_optimizer(distiller.trainable_parameters(), cfg)
    steps_per_epoch = len(train_loader)
    result = FitResult()
    best_state: dict[str, Tensor] | None = None
    start_epoch, since_best = 0, 0
    # What the run's result depends on besides its state; epochs may grow on a resume.
    started_from = {"seed": seed, "train": {k: v for k, v in _plain(cfg).items() if k != "epochs"}, **(inputs or {})}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume and (out_dir / STATE_FILE).exists():
            start_epoch, since_best, best_state = _restore(distiller, optimizer, out_dir, result, started_from)
            progress.line(f"[{label}] resuming after epoch {start_epoch}")
        else:
            (out_dir / METRICS_FILE).unlink(missing_ok=True)

    for epoch in range(start_epoch, cfg.epochs):
        if result.stopped_early:  # resumed after the last epoch of an early-stopped run
            break
        torch.manual_seed(seed * 100_003 + epoch)  # dropout etc.: reproducible after a resume
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        distiller.train()
        totals = {"loss": 0.0, "correct": 0, "samples": 0}
        term_sums: dict[str, float] = {}
        started = time.perf_counter()
        batches = progress.batches(train_loader, steps_per_epoch, f"{label} {epoch + 1}/{cfg.epochs}")
        for step_in_epoch, batch in enumerate(batches):
            lr = learning_rate(cfg, epoch * steps_per_epoch + step_in_epoch, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, labels, index = unpack(batch)
            with autocast(cfg.precision):
                loss, logits, terms = distiller.training_step(inputs, labels, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
            optimizer.step()

            n = labels.shape[0]
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"[{label}] loss became {loss_value} at epoch {epoch + 1}, step {step_in_epoch + 1}; "
                    "lower the learning rate or set train.grad_clip"
                )
            totals["loss"] += loss_value * n
            totals["correct"] += (logits.detach().argmax(1) == labels).sum().item()
            totals["samples"] += n
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + value.item() * n
            progress.update(loss=totals["loss"] / totals["samples"], acc=totals["correct"] / totals["samples"])
        seconds = time.perf_counter() - started

        samples = totals["samples"]
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": totals["loss"] / samples,
            "train_accuracy": totals["correct"] / samples,
            **{f"train_{name}": value / samples for name, value in term_sums.items()},
            "epoch_seconds": seconds,
            "samples_per_second": samples / seconds,
        }
        result.train_seconds += seconds
        result.train_samples += samples
        improved = True
        if val_loader is not None:
            val = evaluate(model, val_loader)
            record.update(val_accuracy=val.accuracy, val_loss=val.nll)
            improved = result.best_val_accuracy is None or val.accuracy > result.best_val_accuracy
        if improved:
            result.best_epoch, result.best_val_accuracy = epoch + 1, record.get("val_accuracy")
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            since_best = 0
        else:
            since_best += 1
        result.history.append(record)
        result.stopped_early = cfg.early_stop_patience is not None and since_best >= cfg.early_stop_patience
        progress.line(_epoch_line(label, record, cfg.epochs))
        if out_dir is not None:
            with open(out_dir / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            _save_state(distiller, optimizer, out_dir, result, epoch + 1, since_best, best_state, started_from)
        if result.stopped_early:
            progress.line(f"[{label}] early stop: no better val accuracy for {since_best} epochs")
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    return result


def _epoch_line(label: str, record: dict, epochs: int) -> str:
    text = (f"[{label}] epoch {record['epoch']}/{epochs} loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f}")
    if "val_accuracy" in record:
        text += f" val_acc {record['val_accuracy']:.4f} val_loss {record['val_loss']:.4f}"
    return text + f" ({record['epoch_seconds']:.1f}s, {record['samples_per_second']:.0f} samples/s)"


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(vars(cfg))


def _save_state(distiller, optimizer, out_dir: Path, result: FitResult, epoch: int, since_best: int,
                best_state: dict[str, Tensor], started_from: dict) -> None:
    """One atomic file: weights, loss-term parameters, optimizer, best weights, history."""
    tensors = {f"model.{k}": v for k, v in distiller.student.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best_state.items()})
    tensors.update({f"objective.{k}": v for k, v in distiller.objective.state_dict().items()})
    optim_tensors, optim_meta = save_optimizer(optimizer)
    tensors.update(optim_tensors)
    meta = {
        "numerics": json.dumps(_numerics()),
        "started_from": json.dumps(started_from, sort_keys=True),
        "epoch": str(epoch),
        "since_best": str(since_best),
        "optimizer": optim_meta,
        "result": json.dumps({k: getattr(result, k) for k in ("history", "best_epoch", "best_val_accuracy",
                                                              "train_seconds", "train_samples", "stopped_early")}),
    }
    save_tensors(out_dir / STATE_FILE, tensors, meta)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _valid_result(restored) -> bool:
    """The FitResult fields a state stores, of the types the loop will use them as."""
    number = (int, float)
    return (isinstance(restored, dict)
            and isinstance(restored.get("history"), list) and all(isinstance(r, dict) for r in restored["history"])
            and isinstance(restored.get("best_epoch"), int)
            and (restored.get("best_val_accuracy") is None or isinstance(restored["best_val_accuracy"], number))
            and isinstance(restored.get("train_seconds"), number) and isinstance(restored.get("train_samples"), int)
            and isinstance(restored.get("stopped_early"), bool))


def _numerics() -> dict:
    """What changes floating-point results besides the config: a resume under other values would
    end with other weights than an uninterrupted run, so it is refused."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__}


def _restore(distiller, optimizer, out_dir: Path, result: FitResult,
             started_from: dict) -> tuple[int, int, dict[str, Tensor]]:
    path = out_dir / STATE_FILE
    tensors, meta = load_tensors(path)
    try:
        saved_numerics, saved_from = json.loads(meta["numerics"]), json.loads(meta["started_from"])
        restored = json.loads(meta["result"])
        epoch, since_best = int(meta["epoch"]), int(meta["since_best"])
        if not (isinstance(saved_numerics, dict) and isinstance(saved_numerics.get("threads"), int)
                and isinstance(saved_numerics.get("torch"), str) and isinstance(saved_from, dict)
                and _valid_result(restored)):
            raise ValueError("metadata of the wrong shape")
    except (KeyError, ValueError, TypeError) as err:
        raise KdistillError(f"{path} is not a kdistill training state ({_first_line(err)}); delete it, or start the "
                            "training over (--force)") from None
    now = _numerics()
    changed = [f"{key} {saved_numerics.get(key)} -> {now[key]}" for key in now if saved_numerics.get(key) != now[key]]
    if changed:  # checked first: other numerics also change the teacher's outputs in the fingerprint below
        hint = f"set threads={saved_numerics.get('threads')}" if saved_numerics.get("threads") != now["threads"] \
            else f"use torch {saved_numerics.get('torch')}"
        raise KdistillError(f"{out_dir} was trained so far under other numerics ({', '.join(changed)}), so resuming "
                            f"would not give the weights of an uninterrupted run: {hint} to resume, "
                            "or --force to start this training over")
    if saved_from != json.loads(json.dumps(started_from, sort_keys=True)):
        changed = sorted(k for k in started_from.keys() | saved_from.keys() if saved_from.get(k) != started_from.get(k))
        if "train" in changed:
            old, new = saved_from.get("train") or {}, started_from["train"]
            changed = [c for c in changed if c != "train"] + sorted(
                f"train.{k}" for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise KdistillError(f"{out_dir} holds a training started with other settings (changed: {', '.join(changed)}):"
                            " resume with the same ones, or start it over (--force)")

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        distiller.student.load_state_dict(part("model."))
        distiller.objective.load_state_dict(part("objective."))
        load_optimizer(optimizer, tensors, meta["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:  # another model, or not our file
        raise KdistillError(f"{path} does not fit this training ({_first_line(err)[:200]}); did the model "
                            "change? Start the training over (--force)") from None
    for key, value in restored.items():
        setattr(result, key, value)
    # metrics.jsonl may hold lines of an epoch that finished after the state was saved.
    metrics = out_dir / METRICS_FILE
    if metrics.exists():
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        atomic_write_text(metrics, "".join(line + "\n" for line in lines[:epoch]))
    return epoch, since_best, part("best.")

