"""The one fit/evaluate loop, for teachers, baselines and distilled students alike.

`fit` trains anything that looks like a `Distiller` (a `training_step`, the model to select
on, its trainable parameters). Model selection uses the validation loader only. Every
epoch appends a line to metrics.jsonl and writes a resumable training state atomically.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kdistill.data.sets import UNLABELLED
from kdistill.errors import KdistillError
from kdistill.storage import atomic_write_text
from kdistill.train import distributed
from kdistill.train.averaging import WeightAverage
from kdistill.train.checkpoint import (
    load_optimizer,
    load_tensors,
    save_optimizer,
    save_tensors,
)
from kdistill.train.compiling import Compilation
from kdistill.train.devices import autocast, check_precision, device_of
from kdistill.train.optim import build_optimizer, learning_rate
from kdistill.train.progress import Progress

STATE_FILE = "train_state.safetensors"  # resumable state (and best weights so far), rewritten every epoch
METRICS_FILE = "metrics.jsonl"
# Train settings that change neither the result nor the path to it: a resume may change them.
# compile is among them: compiled kernels may round differently, but they compute the same training.
NEUTRAL_TRAIN_KEYS = ("epochs", "log_every_steps", "checkpoint_every_steps", "compile")


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
class Position:
    """Where a training stands: go on with epoch `epoch` (0-based) at its step `step`; mid-epoch
    (step > 0) also the epoch's running sums, random state and seconds so far."""

    epoch: int = 0
    step: int = 0
    since_best: int = 0
    meter: dict[str, Tensor] | None = None  # RunningSums.totals(), over every process
    rng: list | dict | None = None  # saved: every process's random state; restored: this process's
    seconds: float = 0.0


@dataclass
class Evaluation:
    accuracy: float
    nll: float
    logits: Tensor  # [N, C], fp32, on the CPU, in loader order
    labels: Tensor  # [N], on the CPU


def unpack(batch) -> tuple[Tensor, Tensor, Tensor | None]:
    """Accept kdistill's Batch (inputs, labels, index) and plain (inputs, labels) pairs."""
    inputs, labels, *rest = batch
    return inputs, labels, (rest[0] if rest else None)


def class_of(labels: Tensor) -> Tensor:
    """Class indices [N] from labels that are indices [N] or, for mixed batches, probabilities [N, C]."""
    return labels.argmax(1) if labels.ndim == 2 else labels


def _on(device: torch.device, inputs: Tensor, labels: Tensor, index: Tensor | None):
    """The batch on `device`: a no-op for kdistill's loaders (they build batches there), a copy for others."""
    return (inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True),
            None if index is None else index.to(device, non_blocking=True))


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, precision: str = "fp32") -> Evaluation:
    """Every sample's logits, on the model's device; for the final, one-process evaluation."""
    device = device_of(model)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in loader:
            inputs, target, _ = _on(device, *unpack(batch))
            with autocast(precision, device):
                logits.append(model(inputs).float())
            labels.append(target)
    finally:
        model.train(was_training)
    all_logits, all_labels = torch.cat(logits).cpu(), torch.cat(labels).cpu()
    return Evaluation(
        accuracy=(all_logits.argmax(1) == all_labels).float().mean().item(),
        nll=F.cross_entropy(all_logits, all_labels).item(),
        logits=all_logits,
        labels=all_labels,
    )


@torch.inference_mode()
def validate(model: nn.Module, loader: Iterable) -> tuple[float, float]:
    """(accuracy, mean NLL) over the loader, summed across processes when each holds a shard of it.

    In fp32 whatever the training precision, so model selection sees the numbers the final
    evaluation will; one host sync, at the end.
    """
    device = device_of(model)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=_sum_dtype(device), device=device)  # correct, NLL
    samples = 0  # counted on the host: a tensor made from a number per batch would be a copy to the device
    try:
        for batch in loader:
            inputs, labels, _ = _on(device, *unpack(batch))
            logits = model(inputs).float()
            sums += torch.stack([(logits.argmax(1) == labels).sum().to(sums.dtype),
                                 F.cross_entropy(logits, labels, reduction="sum").to(sums.dtype)])
            samples += labels.shape[0]
    finally:
        model.train(was_training)
    correct, nll, samples = distributed.sum_(torch.cat([sums, sums.new_tensor([samples])])).tolist()
    return correct / samples, nll / samples


def _logged_terms(distiller) -> list[str]:
    """The labels of the terms a training step reports: those with a weight (a weight-0 term is not computed)."""
    objective = getattr(distiller, "objective", None)
    return [label for label, weight in getattr(objective, "weights", {}).items() if weight > 0]


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class RunningSums:
    """An epoch's sums of the loss, each term's value and the correct predictions, kept on the device.

    Adding a step queues a few small kernels and never waits for the device; `read` (a host sync,
    reduced over processes) happens every `train.log_every_steps` steps and at the end of an epoch.
    Each value's first non-finite step is tracked too, so `read` can name the term and step that went bad.
    """

    NEVER = torch.iinfo(torch.int64).max

    def __init__(self, names: list[str], device: torch.device, unlabelled: bool = False):
        self.names = names
        # loss, correct, terms; and, when some rows have no label (an unlabelled pool), the labelled rows' count:
        # the training accuracy is then over those.
        self.unlabelled = unlabelled
        self.sums = torch.zeros(2 + len(names) + unlabelled, dtype=_sum_dtype(device), device=device)
        self.first_bad = torch.full((1 + len(names),), self.NEVER, dtype=torch.int64, device=device)
        self._never = self.first_bad.clone()  # made once: `add` runs every step
        self.samples = 0  # on the host: a tensor made from a number each step would be a copy to the device

    def add(self, step: int, loss: Tensor, logits: Tensor, labels: Tensor, terms: dict[str, Tensor]) -> None:
        values = torch.stack([loss.detach().float(), *(terms[name].detach().float() for name in self.names)])
        n = labels.shape[0]
        correct = (logits.detach().argmax(1) == class_of(labels)).sum().to(values.dtype).reshape(1)
        counted = [(labels != UNLABELLED).sum().to(values.dtype).reshape(1)] if self.unlabelled else []
        self.sums += torch.cat([values[:1] * n, correct, values[1:] * n, *counted])
        self.first_bad = torch.minimum(self.first_bad, torch.where(torch.isfinite(values), self._never, step))
        self.samples += n

    def totals(self) -> dict[str, Tensor]:
        """The sums over every process (a collective: every process calls it at the same step)."""
        return {"sums": distributed.sum_(torch.cat([self.sums, self.sums.new_tensor([self.samples])])),
                "first_bad": distributed.min_(self.first_bad.clone())}

    def read(self, where) -> dict[str, float]:
        """The epoch's means so far, over every process; raises FloatingPointError at a non-finite value.

        `where(step)` names a global step for the message.
        """
        totals = self.totals()
        sums, bad = totals["sums"], totals["first_bad"].tolist()
        step = min(bad)
        if step != self.NEVER:
            culprits = [name for name, at in zip(self.names, bad[1:], strict=True) if at == step] or ["the total loss"]
            raise FloatingPointError(f"{where(step)}: the loss became NaN or inf (in {', '.join(culprits)}); the "
                                     "last checkpoint stays: lower the learning rate or set train.grad_clip")
        loss, correct, *terms, samples = sums.tolist()
        labelled = terms.pop() if self.unlabelled else samples
        return {"samples": int(samples), "train_loss": loss / samples, "train_accuracy": correct / max(labelled, 1),
                **{f"train_{name}": value / samples for name, value in zip(self.names, terms, strict=True)}}

    def load(self, totals: dict[str, Tensor]) -> None:
        """Go on from `totals()` saved mid-epoch: rank 0 carries them, the other processes start from zero."""
        if distributed.is_main():
            self.sums.copy_(totals["sums"][:-1])
            self.samples = int(totals["sums"][-1])
            self.first_bad.copy_(totals["first_bad"])


class _TrainingStep(nn.Module):
    """The distiller's training step as a module's forward, for DistributedDataParallel to wrap: DDP
    syncs the gradients of the student and of the loss terms' parameters; the teacher is not a
    submodule, so it stays out."""

    def __init__(self, distiller):
        super().__init__()
        self.distiller = distiller

    def forward(self, inputs: Tensor, labels: Tensor, index: Tensor | None):
        return self.distiller.training_step(inputs, labels, index)


def _step_function(distiller, device: torch.device):
    if distributed.world_size() == 1:
        return distiller.training_step
    from torch.nn.parallel import DistributedDataParallel

    # Terms switched off for some epochs (two-stage FitNets: only the hint's layers learn at first) leave
    # parameters without gradients, which DDP must be told to expect.
    windows = any(s.from_epoch > 1 or s.until_epoch is not None
                  for s in getattr(getattr(distiller, "objective", None), "schedules", {}).values())
    return DistributedDataParallel(_TrainingStep(distiller), device_ids=[device.index] if device.type == "cuda"
                                   else None, find_unused_parameters=windows)


def _epoch_batches(loader, epoch: int, start_step: int):
    """The loader's batches of `epoch` from `start_step` on: kdistill's loaders seek there, others skip batches."""
    set_epoch = getattr(loader, "set_epoch", None)
    if set_epoch is not None and "start_step" in inspect.signature(set_epoch).parameters:
        set_epoch(epoch, start_step=start_step)
        return loader
    if set_epoch is not None:
        set_epoch(epoch)
    sampler = getattr(loader, "sampler", None)  # a DataLoader with a DistributedSampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    # Skipped now, before the caller restores the random state of the step it resumes at: a shuffling
    # DataLoader draws its order from the epoch's seed at the first batch, as it did in the first run.
    batches = iter(loader)
    for _ in range(start_step):
        next(batches, None)
    return batches


def _optimizers(distiller, cfg) -> list[tuple[torch.optim.Optimizer, object]]:
    """(optimizer, its TrainConfig) per group of parameters: one for a Distiller; one per model for
    a scheme that trains several together (`optimizer_groups(cfg)`: each its own optimizer, learning
    rate, schedule and gradient clipping, over the loop's epochs)."""
    groups = getattr(distiller, "optimizer_groups", None)
    pairs = groups(cfg) if groups is not None else [(distiller.trainable_parameters(), cfg)]
    return [(build_optimizer(params, group_cfg), group_cfg) for params, group_cfg in pairs]


def _optimize(loss: Tensor, optimizers: list[tuple[torch.optim.Optimizer, object]],
              scaler: torch.amp.GradScaler) -> None:
    """One optimisation step; the scaler (fp16) scales the loss and skips steps whose gradients overflowed."""
    for optimizer, _ in optimizers:
        optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    for optimizer, group_cfg in optimizers:
        if group_cfg.grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], group_cfg.grad_clip)
        scaler.step(optimizer)
    scaler.update()


def fit(distiller, train_loader, cfg, *, val_loader=None, out_dir: Path | None = None,
        resume: bool = False, seed: int = 0, progress: Progress | None = None, inputs: dict | None = None,
        label: str = "train") -> FitResult:
    """Train `distiller.student` for `cfg.epochs` epochs on the device its weights are on; returns the history.

    With `out_dir`, writes metrics.jsonl and a resumable train state there after every epoch (and
    every `cfg.checkpoint_every_steps` steps); `resume=True` continues from that state at the exact
    next batch, if it was started with the same training config, seed, `inputs` (what else the
    result depends on, e.g. the teacher's digest) and numerics. Under torchrun the student is
    wrapped in DistributedDataParallel, every process trains on its shard of each global batch,
    metrics are reduced over processes and only rank 0 writes or prints. The best validation
    epoch's weights end up in the student (the last epoch's without a validation loader).
    """
    main = distributed.is_main()
    progress = (progress or Progress()) if main else Progress("quiet")
    model = distiller.student
    device = device_of(model)
    check_precision(cfg.precision, device)
    batch = getattr(train_loader, "batch_size", None)  # BatchLoader's is global (a DataLoader's per process)
    if getattr(train_loader, "world_size", 1) > 1 and batch < distributed.world_size():
        raise KdistillError(f"a global batch of {batch} cannot be split across {distributed.world_size()} processes: "
                            "raise the batch size or start fewer processes")
    prepare = getattr(distiller, "prepare", None)  # terms' connectors exist before the optimizer and DDP see them
    if prepare is not None:
        prepare(val_loader if val_loader is not None else train_loader, train_loader)
    step_function = _step_function(distiller, device)
    optimizers = _optimizers(distiller, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")  # a no-op unless fp16
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None  # what is validated and kept
    steps_per_epoch = len(train_loader)
    labels = getattr(getattr(train_loader, "data", None), "labels", None)  # kdistill's loader: rows without a label?
    unlabelled = labels is not None and bool((labels == UNLABELLED).any())
    result = FitResult()
    best_state: dict[str, Tensor] | None = None
    position = Position()
    # What the run's result depends on besides its state; epochs may grow on a resume.
    # Rank 0's view of the inputs: each process saw the teacher on its own shard's first batch.
    started_from = {"seed": seed, "train": {k: v for k, v in _plain(cfg).items() if k not in NEUTRAL_TRAIN_KEYS},
                    **distributed.from_main(inputs or {})}
    if out_dir is not None:
        out_dir = Path(out_dir)
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
        if resume and (out_dir / STATE_FILE).exists():
            position, best_state = _restore(distiller, optimizers, scaler, out_dir, result, started_from,
                                            steps_per_epoch, device, average)
            where = f"epoch {position.epoch}" if not position.step else \
                f"step {position.step} of epoch {position.epoch + 1}"
            progress.line(f"[{label}] resuming after {where}")
        elif main:
            (out_dir / METRICS_FILE).unlink(missing_ok=True)
    distributed.barrier()  # no process reads the folder while rank 0 still clears it

    def where(step: int) -> str:
        return f"[{label}] epoch {step // steps_per_epoch + 1}, step {step % steps_per_epoch + 1}"

    # The teacher runs live (a cached one has no model here); compiled for inference with the student.
    with Compilation([model, getattr(distiller, "teacher", None)], cfg.compile) as compilation:
        for epoch in range(position.epoch, cfg.epochs):
            if result.stopped_early:  # resumed after the last epoch of an early-stopped run
                break
            first_step = position.step if epoch == position.epoch else 0
            meter = RunningSums(_logged_terms(distiller), device, unlabelled)
            seconds_before = 0.0
            # Dropout etc.: reproducible after a resume, and each process draws its own masks.
            torch.manual_seed(seed * 100_003 + epoch + 7_919 * distributed.rank())
            epoch_batches = _epoch_batches(train_loader, epoch, first_step)  # under the epoch's seed, as before
            if first_step:
                meter.load(position.meter)
                _set_rng_state(position.rng, device)
                seconds_before = position.seconds
            objective = getattr(distiller, "objective", None)
            if hasattr(objective, "set_epoch"):
                objective.set_epoch(epoch)  # terms with an epoch window or a warm-up
            distiller.train()
            started = time.perf_counter()
            batches = progress.batches(epoch_batches, steps_per_epoch - first_step, f"{label} {epoch + 1}/{cfg.epochs}")
            for step_in_epoch, batch in enumerate(batches, start=first_step):
                step = epoch * steps_per_epoch + step_in_epoch
                lr = learning_rate(cfg, step, steps_per_epoch)  # the logged one; each optimizer follows its own
                for optimizer, group_cfg in optimizers:
                    group_lr = lr if group_cfg is cfg else learning_rate(group_cfg, step, steps_per_epoch)
                    for group in optimizer.param_groups:
                        group["lr"] = group_lr
                inputs, labels, index = _on(device, *unpack(batch))
                with autocast(cfg.precision, device):
                    loss, logits, terms = compilation.call(step_function, inputs, labels, index)
                # Each process's share of an unevenly split global batch weighs its mean loss, so that
                # DDP's mean of the processes' gradients is the gradient of the global batch's mean loss.
                share = getattr(batch, "share", 1.0)
                _optimize(loss if share == 1.0 else loss * share, optimizers, scaler)
                if average is not None:
                    average.update(step)
                meter.add(step, loss, logits, labels, terms)
                done = step_in_epoch + 1
                if done % cfg.log_every_steps == 0 and done < steps_per_epoch:
                    running = meter.read(where)
                    progress.update(loss=running["train_loss"], acc=running["train_accuracy"])
                if (out_dir is not None and cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0
                        and done < steps_per_epoch):
                    meter.read(where)  # nothing non-finite goes into a checkpoint
                    elapsed = seconds_before + time.perf_counter() - started
                    totals, rng = meter.totals(), distributed.gather(_rng_state(device))  # every process's
                    if main:
                        _save_state(distiller, optimizers, out_dir, result, Position(
                            epoch, done, since_best=position.since_best, meter=totals, rng=rng, seconds=elapsed),
                            best_state, started_from, scaler, average)
            running = meter.read(where)  # a host sync: the epoch's work is done when the clock stops
            seconds = seconds_before + time.perf_counter() - started

            samples = running.pop("samples")
            record = {"epoch": epoch + 1, "lr": lr, **running, "epoch_seconds": seconds,
                      "samples_per_second": samples / seconds}
            result.train_seconds += seconds
            result.train_samples += samples
            distributed.broadcast_buffers(model)  # BatchNorm statistics: each process saw its own shard
            if average is not None:
                distributed.broadcast_tensors(list(average.shadow.values()))  # so did their averages
            improved = True
            with average.applied() if average is not None else contextlib.nullcontext():
                if val_loader is not None:
                    accuracy, nll = compilation.call(validate, model, val_loader)
                    record.update(val_accuracy=accuracy, val_loss=nll)
                    improved = result.best_val_accuracy is None or accuracy > result.best_val_accuracy
                if improved:
                    result.best_epoch, result.best_val_accuracy = epoch + 1, record.get("val_accuracy")
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            position.since_best = 0 if improved else position.since_best + 1
            result.history.append(record)
            patience = cfg.early_stop_patience
            result.stopped_early = patience is not None and position.since_best >= patience
            progress.line(_epoch_line(label, record, cfg.epochs))
            if out_dir is not None and main:
                with open(out_dir / METRICS_FILE, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                _save_state(distiller, optimizers, out_dir, result,
                            Position(epoch + 1, 0, since_best=position.since_best), best_state, started_from, scaler,
                            average)
            if result.stopped_early:
                progress.line(f"[{label}] early stop: no better val accuracy for {position.since_best} epochs")
                break

    if best_state is not None:
        model.load_state_dict(best_state)
    distributed.barrier()  # rank 0's files are complete before any process moves on
    return result


def _epoch_line(label: str, record: dict, epochs: int) -> str:
    text = (f"[{label}] epoch {record['epoch']}/{epochs} loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f}")
    if "val_accuracy" in record:
        text += f" val_acc {record['val_accuracy']:.4f} val_loss {record['val_loss']:.4f}"
    return text + f" ({record['epoch_seconds']:.1f}s, {record['samples_per_second']:.0f} samples/s)"


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(vars(cfg))


def _optimizer_keys(number: int) -> tuple[str, str]:
    """(tensor prefix, metadata key) of the state of optimizer `number`: the first keeps the names of
    states written before there could be several."""
    return ("optim.", "optimizer") if number == 0 else (f"optim{number}.", f"optimizer{number}")


def _save_state(distiller, optimizers, out_dir: Path, result: FitResult, position: Position,
                best_state: dict[str, Tensor] | None, started_from: dict, scaler,
                average: WeightAverage | None = None) -> None:
    """One atomic file: weights, loss-term parameters, optimizer, best weights, history, position."""
    tensors = {f"model.{k}": v for k, v in distiller.student.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in (best_state or {}).items()})
    tensors.update({f"objective.{k}": v for k, v in distiller.objective.state_dict().items()})
    tensors.update({f"average.{k}": v for k, v in (average.state_dict() if average is not None else {}).items()})
    tensors.update({f"meter.{k}": v for k, v in (position.meter or {}).items()})
    tensors.update({f"rng.{rank}.{k}": v for rank, state in enumerate(position.rng or []) for k, v in state.items()})
    optim_meta = {}
    for number, (optimizer, _) in enumerate(optimizers):
        prefix, key = _optimizer_keys(number)
        optim_tensors, optim_meta[key] = save_optimizer(optimizer, prefix)
        tensors.update(optim_tensors)
    meta = {
        "numerics": json.dumps(_numerics(device_of(distiller.student))),
        "started_from": json.dumps(started_from, sort_keys=True),
        "epoch": str(position.epoch),
        "step": str(position.step),
        "seconds": repr(position.seconds),
        "since_best": str(position.since_best),
        **optim_meta,
        "scaler": json.dumps(scaler.state_dict() if scaler.is_enabled() else {}),
        "result": json.dumps({k: getattr(result, k) for k in ("history", "best_epoch", "best_val_accuracy",
                                                              "train_seconds", "train_samples", "stopped_early")}),
    }
    save_tensors(out_dir / STATE_FILE, tensors, meta)


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


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


def _numerics(device: torch.device) -> dict:
    """What changes floating-point results besides the config: a resume under other values would
    end with other weights than an uninterrupted run, so it is refused."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "device": device.type,
            "processes": distributed.world_size()}


NUMERICS_FIXES = {"threads": "set threads={}", "torch": "use torch {}", "device": "set device={}",
                  "processes": "run it in {} process(es) (--nproc)"}


def _restore(distiller, optimizers, scaler, out_dir: Path, result: FitResult, started_from: dict,
             steps_per_epoch: int, device: torch.device,
             average: WeightAverage | None = None) -> tuple[Position, dict[str, Tensor]]:
    path = out_dir / STATE_FILE
    tensors, meta = load_tensors(path)
    try:
        saved_numerics, saved_from = json.loads(meta["numerics"]), json.loads(meta["started_from"])
        restored = json.loads(meta["result"])
        position = Position(int(meta["epoch"]), int(meta.get("step", "0")), since_best=int(meta["since_best"]),
                            seconds=float(meta.get("seconds", "0")))
        scaler_state = json.loads(meta.get("scaler", "{}"))
        if not (isinstance(saved_numerics, dict) and isinstance(saved_numerics.get("threads"), int)
                and isinstance(saved_numerics.get("torch"), str) and isinstance(saved_from, dict)
                and _valid_result(restored) and isinstance(scaler_state, dict)
                and 0 <= position.step < steps_per_epoch and position.epoch >= 0):
            raise ValueError("metadata of the wrong shape")
    except (KeyError, ValueError, TypeError) as err:
        raise KdistillError(f"{path} is not a kdistill training state ({_first_line(err)}); delete it, or start the "
                            "training over (--force)") from None
    now = _numerics(device)
    saved_numerics.setdefault("device", "cpu")  # states written before devices were a setting
    saved_numerics.setdefault("processes", 1)
    changed = [key for key in now if saved_numerics.get(key) != now[key]]
    if changed:  # checked first: other numerics also change the teacher's outputs in the fingerprint below
        listed = ", ".join(f"{key} {saved_numerics.get(key)} -> {now[key]}" for key in changed)
        hint = NUMERICS_FIXES[changed[0]].format(saved_numerics.get(changed[0]))
        raise KdistillError(f"{out_dir} was trained so far under other numerics ({listed}), so resuming "
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
        return {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}

    try:
        distiller.student.load_state_dict(part("model."))
        distiller.objective.load_state_dict(part("objective."))
        if average is not None:
            average.load_state_dict(part("average."))
        for number, (optimizer, _) in enumerate(optimizers):
            prefix, key = _optimizer_keys(number)
            load_optimizer(optimizer, tensors, meta[key], prefix)
        if scaler.is_enabled() and scaler_state:
            scaler.load_state_dict(scaler_state)
        if position.step:
            position.meter = part("meter.")
            position.rng = {k: v.cpu() for k, v in part(f"rng.{distributed.rank()}.").items()} or None
            terms = len(_logged_terms(distiller))  # totals(): loss, correct, terms, samples; each one's first bad step
            # (and the labelled rows' count with an unlabelled pool)
            sums, first_bad = position.meter["sums"], position.meter["first_bad"]
            if sums.shape[0] not in (3 + terms, 4 + terms) or first_bad.shape != (1 + terms,) or position.rng is None:
                raise ValueError("the running sums of another objective")
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:  # another model, or not our file
        raise KdistillError(f"{path} does not fit this training ({_first_line(err)[:200]}); did the model "
                            "change? Start the training over (--force)") from None
    for key, value in restored.items():
        setattr(result, key, value)
    # metrics.jsonl may hold lines of an epoch that finished after the state was saved.
    metrics = out_dir / METRICS_FILE
    if metrics.exists() and distributed.is_main():
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        atomic_write_text(metrics, "".join(line + "\n" for line in lines[:position.epoch]))
    best = part("best.")
    return position, (best or None)
