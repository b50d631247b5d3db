"""`kdistill compress`: a run's distilled student pruned (and fine-tuned with distillation), quantised to int8
and exported, every result a deployable folder, all measured side by side with the run's teacher and baseline.

    <run>/compressed/
        teacher/ baseline/ student/    the run's models as deployable folders (+ model.onnx when exported)
        channels50/ ...                a pruned student after its fine-tuning (its metrics.jsonl; train state
                                       while it trains): pruning steps apply in turn, each to the one before
        student_int8_static/ ...       int8 ONNX of every fp32 model, per quantisation mode
        metrics.json, report.md, frontier.png

A step is reused while what it was made from (source weights, step, fine-tuning) is unchanged, so
`compress` again after adding a step only does the new work. Fine-tuning goes through the one
training loop: device, precision, resume and checkpoints work as for any training.
"""

from __future__ import annotations

import functools
import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdistill.deploy.bundle import ONNX_FILE, WEIGHTS_FILE, ModelCard, load_bundle, read_card, save_bundle, write_card
from kdistill.deploy.export import FP32_TOLERANCE, export_onnx, onnx_logits, onnx_session
from kdistill.deploy.frontier import write_compression_report
from kdistill.deploy.prune import Pruning, bake_masks, parse_pruning, prune, sparsity
from kdistill.deploy.quantize import MODES, int8_layers_of, quantize_onnx
from kdistill.deploy.timing import deployment_latency
from kdistill.distill import Distiller
from kdistill.distill.signals import weights_digest
from kdistill.errors import KdistillError
from kdistill.losses import build_objective
from kdistill.models import count_parameters
from kdistill.models.probe import count_macs
from kdistill.report import ROLES
from kdistill.storage import atomic_write_text, file_digest
from kdistill.train import fit
from kdistill.train.loop import STATE_FILE

FOLDER = "compressed"
FINETUNE_LOSSES = {"ce": {"weight": 0.1}, "kd": {"weight": 0.9}}
TEACHERS = ("student", "teacher")


def check_compress(cfg: DictConfig) -> None:
    """The `compress` section's values, each error one line naming the key (called by config validation)."""
    c = cfg.compress
    if wants_compression(cfg) and cfg.scheme != "offline":
        raise KdistillError(f"compress: scheme {cfg.scheme} makes several run folders; compress the one you want "
                            "with `kdistill compress FOLDER` (a scheme's parts are ordinary run folders)")
    for text in c.prune:
        parse_pruning(str(text), "compress.prune")
    for key in ("source", "teacher"):
        if c[key] not in TEACHERS:
            raise KdistillError(f"compress.{key}: {c[key]!r} is not one of {', '.join(TEACHERS)}")
    for mode in c.quantize:
        if mode not in (*MODES, "qat"):
            raise KdistillError(f"compress.quantize: {mode!r} is not one of {', '.join(MODES)}, qat")
    if not 13 <= c.opset <= 21:
        raise KdistillError(f"compress.opset: give an ONNX opset from 13 to 21, got {c.opset}")
    if not 1 <= c.calibration_images <= 100_000:
        raise KdistillError(f"compress.calibration_images: give 1 to 100,000, got {c.calibration_images}")
    if not 5 <= c.latency_repeats <= 10_000:
        raise KdistillError(f"compress.latency_repeats: give 5 to 10,000, got {c.latency_repeats}")
    from kdistill.config.loading import check_training

    check_training(c.finetune, "compress.finetune")
    build_objective(c.losses or FINETUNE_LOSSES, c.temperature)


def steps_of(cfg: DictConfig) -> list[Pruning]:
    return [parse_pruning(str(text)) for text in cfg.compress.prune]


def wants_compression(cfg: DictConfig) -> bool:
    c = cfg.compress
    return bool(c.prune or c.quantize or c.export)


class Made(NamedTuple):
    """A model of the comparison: fp32 in PyTorch (and ONNX when exported), or int8 in ONNX only."""

    folder: Path
    card: ModelCard
    model: nn.Module | None  # None for an int8 ONNX model


def compress(pipe, *, resume: bool = False) -> dict:
    """Make every step's folder under <run>/compressed for the open run `pipe`, measure all; the metrics."""
    cfg, c = pipe.cfg, pipe.cfg.compress
    if not pipe.done("student"):
        raise KdistillError(f"{pipe.run_dir} has no distilled student: run `kdistill run` on its recipe first")
    out = pipe.run_dir / FOLDER
    out.mkdir(exist_ok=True)
    made: dict[str, Made] = {}
    for role in ROLES:
        if pipe.available(role):
            model = pipe.model(role)
            made[role] = _fp32_folder(out / role, model, _card(pipe, role, {"run": str(pipe.run_dir), "role": role}))
    source = c.source
    for step in steps_of(cfg):
        name = step.name if source == "student" else f"{source}_{step.name}"
        made[name] = _pruned(pipe, name, step, made[source], made[c.teacher].model, resume=resume)
        source = name
    test_images, test_labels = _images(pipe.loader("test"))
    if c.export or c.quantize:
        for name in list(made):
            made[name] = _exported(made[name], test_images, c.opset, pipe)
    if c.quantize:
        calibration = _calibration_images(pipe, made["student"].card, c.calibration_images, cfg.seed)
        for name in [n for n, m in made.items() if m.model is not None]:
            for mode in c.quantize:
                if mode == "qat":  # trained: only the students, not the run's teacher and baseline
                    if name not in ("teacher", "baseline"):
                        made[f"{name}_int8_qat"] = _quantisation_aware(pipe, made[name], made[c.teacher].model,
                                                                       resume=resume)
                else:
                    made[f"{name}_int8_{mode}"] = _quantized(out / f"{name}_int8_{mode}", made[name], mode,
                                                             calibration)
    metrics = _measure(pipe, made, test_images, test_labels)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    write_compression_report(out, metrics)
    if (pipe.run_dir / "metrics.json").is_file():
        try:
            pipe.report()  # the run's report gains a row per compressed model
        except KdistillError as err:
            pipe.progress.line(f"the run's report.md is left as it was: {err}")
    return metrics


def _card(pipe, role: str, made_from: dict) -> ModelCard:
    spec = pipe.specs["teacher" if role == "teacher" else "student"]
    data = pipe.data
    return ModelCard(model=spec.name, kwargs=OmegaConf.to_container(spec.kwargs, resolve=True),
                     input_shape=list(data.input_shape), mean=list(data.mean), std=list(data.std),
                     classes=list(data.classes), made_from=made_from)


def _fp32_folder(folder: Path, model: nn.Module, card: ModelCard) -> Made:
    """A deployable folder of `model`, rewritten only when its weights differ from the folder's."""
    card.made_from["weights"] = weights_digest(model)
    try:
        existing = read_card(folder)
        if existing.made_from == card.made_from and (folder / WEIGHTS_FILE).is_file():
            return Made(folder, existing, model)
    except KdistillError:
        pass
    _clear(folder)
    cpu = model if next(model.parameters()).device.type == "cpu" else _cpu_copy(model)
    return Made(folder, save_bundle(folder, cpu, card), model)


def _fine_tuning_inputs(pipe, source: Made, teacher: nn.Module) -> dict:
    """What a fine-tuned step depends on besides its own step: its source, its teacher, its training."""
    c = pipe.cfg.compress
    return {"run": str(pipe.run_dir), "source": source.folder.name, "source_weights": weights_digest(source.model),
            "teacher": c.teacher, "teacher_weights": weights_digest(teacher),
            "finetune": OmegaConf.to_container(c.finetune),
            "losses": OmegaConf.to_container(c.losses) or FINETUNE_LOSSES, "temperature": c.temperature}


def _unchanged(folder: Path, made_from: dict) -> ModelCard | None:
    """The folder's card if the folder was made from exactly `made_from` (and is complete), else None."""
    try:
        card = read_card(folder)
    except KdistillError:
        return None
    complete = (folder / (WEIGHTS_FILE if card.weights_sha256 else ONNX_FILE)).is_file()
    return card if complete and {key: card.made_from.get(key) for key in made_from} == made_from else None


def _fine_tune(pipe, folder: Path, model: nn.Module, teacher: nn.Module, *, resume: bool) -> dict:
    """Train `model` in `folder` with the fine-tuning objective through the one loop; what the card records."""
    c = pipe.cfg.compress
    objective = build_objective(c.losses or FINETUNE_LOSSES, c.temperature)
    distiller = Distiller(teacher, model, objective, device=pipe.device)
    loader = pipe.loader("train", c.finetune)
    result = fit(distiller, loader, c.finetune, val_loader=pipe.loader("val"), out_dir=folder, resume=resume,
                 seed=pipe.cfg.seed, progress=pipe.progress, label=folder.name, inputs=distiller.fingerprint(loader))
    return {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
            "train_seconds": result.train_seconds}


def _claim_step(folder: Path, resume: bool) -> None:
    """An interrupted fine-tuning continues only with --resume; anything else in the folder is redone."""
    if (folder / STATE_FILE).exists():
        if not resume:
            raise KdistillError(f"{folder} holds an interrupted fine-tuning: pass --resume to continue it, or "
                                "delete the folder to start it over")
        return
    _clear(folder)


def _pruned(pipe, name: str, step: Pruning, source: Made, teacher: nn.Module, *, resume: bool) -> Made:
    """`source`'s model pruned by `step`, fine-tuned by distillation from `teacher`, in its own folder."""
    c = pipe.cfg.compress
    folder = pipe.run_dir / FOLDER / name
    made_from = {**_fine_tuning_inputs(pipe, source, teacher), "pruning": f"{step.method}:{step.amount:g}"}
    if (card := _unchanged(folder, made_from)) is not None:
        model, _ = load_bundle(folder)
        pipe.progress.line(f"[{name}] using {folder} (its source, pruning and fine-tuning are unchanged)")
        return Made(folder, card, model.to(pipe.device))
    _claim_step(folder, resume)
    model = prune(source.model, step, pipe.data.input_shape).to(pipe.device)
    before, after = count_parameters(source.model), count_parameters(model)
    pipe.progress.line(f"[{name}] {step.method} pruning of {step.amount:g}: {before:,} -> {after:,} parameters, "
                       f"{100 * sparsity(model):.1f} % of the weights zero; fine-tuning "
                       f"{c.finetune.epochs} epochs from the {c.teacher}")
    trained = _fine_tune(pipe, folder, model, teacher, resume=resume)
    model = bake_masks(model).eval()
    card = ModelCard(**{**source.card.__dict__, "onnx": None, "made_from": {**made_from, **trained}})
    card.made_from["weights"] = weights_digest(model)
    save_bundle(folder, _cpu_copy(model), card)
    (folder / STATE_FILE).unlink(missing_ok=True)
    return Made(folder, card, model)


def _quantisation_aware(pipe, source: Made, teacher: nn.Module, *, resume: bool) -> Made:
    """`source` fine-tuned with int8 fake-quantisation and distillation from `teacher`, as an int8 ONNX model."""
    from kdistill.deploy.qat import convert_qat, prepare_qat

    c = pipe.cfg.compress
    folder = pipe.run_dir / FOLDER / f"{source.folder.name}_int8_qat"
    made_from = {**_fine_tuning_inputs(pipe, source, teacher), "int8": "qat", "opset": c.opset}
    if (card := _unchanged(folder, made_from)) is not None:
        pipe.progress.line(f"[{folder.name}] using {folder} (its source and fine-tuning are unchanged)")
        return Made(folder, card, None)
    _claim_step(folder, resume)
    model = prepare_qat(source.model, pipe.data.input_shape).to(pipe.device)
    pipe.progress.line(f"[{folder.name}] quantisation-aware training, {c.finetune.epochs} epochs from the {c.teacher}")
    trained = _fine_tune(pipe, folder, model, teacher, resume=resume)
    export_onnx(convert_qat(model), tuple(source.card.input_shape), folder / ONNX_FILE, c.opset)
    layers = int8_layers_of(folder / ONNX_FILE)
    if layers.kept_fp32:
        pipe.progress.line(f"[{folder.name}] left in fp32 by the quantiser: {', '.join(layers.kept_fp32)}")
    card = ModelCard(**{**source.card.__dict__, "weights_sha256": "", "made_from": {
        **made_from, **trained, "int8_layers": layers.quantized, "fp32_layers": layers.kept_fp32}})
    card.onnx = {"file": ONNX_FILE, "opset": c.opset, "sha256": file_digest(folder / ONNX_FILE), "int8": "qat"}
    write_card(folder, card)
    (folder / STATE_FILE).unlink(missing_ok=True)
    return Made(folder, card, None)


def _exported(made: Made, test_images: torch.Tensor, opset: int, pipe) -> Made:
    """`made` with model.onnx written (unless current) and checked against PyTorch on the test set."""
    card, folder = made.card, made.folder
    if made.model is None or (card.onnx and card.onnx.get("opset") == opset and (folder / ONNX_FILE).is_file()
                              and card.onnx.get("sha256") == file_digest(folder / ONNX_FILE)
                              and card.onnx.get("weights_sha256") == card.weights_sha256):
        return made
    model = _cpu_copy(made.model).eval()
    export_onnx(model, tuple(card.input_shape), folder / ONNX_FILE, opset)
    reference = _torch_logits(model)(test_images)
    difference = float((onnx_logits(onnx_session(folder / ONNX_FILE), test_images) - reference).abs().max())
    if difference > FP32_TOLERANCE:
        raise KdistillError(f"{folder / ONNX_FILE} differs from the PyTorch model by up to {difference:.2e} in a logit "
                            f"on the test set (allowed: {FP32_TOLERANCE:g}); the export is wrong, do not deploy it")
    card.onnx = {"file": ONNX_FILE, "opset": opset, "sha256": file_digest(folder / ONNX_FILE),
                 "weights_sha256": card.weights_sha256, "max_abs_logit_difference": difference}
    write_card(folder, card)
    pipe.progress.line(f"[{folder.name}] ONNX opset {opset}: {folder / ONNX_FILE} (largest logit difference from "
                       f"PyTorch on the test set {difference:.1e})")
    return made


def _quantized(folder: Path, source: Made, mode: str, calibration: torch.Tensor) -> Made:
    source_onnx = source.folder / ONNX_FILE
    made_from = {"source": source.folder.name, "source_onnx_sha256": file_digest(source_onnx), "int8": mode,
                 "calibration_images": len(calibration) if mode == "static" else 0}
    try:
        card = read_card(folder)
        if {k: card.made_from.get(k) for k in made_from} == made_from and (folder / ONNX_FILE).is_file():
            return Made(folder, card, None)
    except KdistillError:
        pass
    _clear(folder)
    result = quantize_onnx(source_onnx, folder / ONNX_FILE, mode, calibration if mode == "static" else None)
    if result.kept_fp32:
        warnings.warn(f"{folder.name}: onnxruntime has no int8 kernel for {', '.join(result.kept_fp32)}; "
                      "they stay in fp32", stacklevel=2)
    card = ModelCard(**{**source.card.__dict__, "weights_sha256": "", "made_from": {**made_from,
                        "int8_layers": result.quantized, "fp32_layers": result.kept_fp32}})
    card.onnx = {"file": ONNX_FILE, "opset": source.card.onnx["opset"], "sha256": file_digest(folder / ONNX_FILE),
                 "int8": mode}
    write_card(folder, card)
    return Made(folder, card, None)


def _measure(pipe, made: Mapping[str, Made], test_images: torch.Tensor, test_labels: torch.Tensor) -> dict:
    """Accuracy (validation and test), size, MACs of every model in each of its runtimes; latency of all, timed
    together. The validation accuracy is what the headline chooses by; the test accuracy is reported."""
    c, shape = pipe.cfg.compress, pipe.data.input_shape
    threads = torch.get_num_threads()
    splits = {"val": _images(pipe.loader("val")), "test": (test_images, test_labels)}
    rows, runners = {}, {}
    for name, (folder, card, model) in made.items():
        # An int8 model has its fp32 source's parameters and MACs (run in int8).
        source = made[card.made_from["source"]].model if model is None else model
        row = {"folder": str(folder), "made_from": card.made_from, **_size_figures(_cpu_copy(source), shape),
               "bytes": {kind: (folder / file).stat().st_size for kind, file in
                         (("safetensors", WEIGHTS_FILE), ("onnx", ONNX_FILE)) if (folder / file).is_file()},
               "runtimes": {}}
        if model is not None:
            runner = runners[f"{name}|pytorch"] = _cpu_copy(model).eval()
            row["runtimes"]["pytorch"] = _accuracies(_torch_logits(runner), splits)
        if (folder / ONNX_FILE).is_file():
            session = runners[f"{name}|onnxruntime"] = onnx_session(folder / ONNX_FILE, threads)
            row["runtimes"]["onnxruntime"] = _accuracies(functools.partial(onnx_logits, session), splits)
        rows[name] = row
    pipe.progress.line(f"timing {len(runners)} model-runtime pairs, {c.latency_repeats} rounds, {threads} threads")
    timing = deployment_latency(runners, shape, list(pipe.cfg.eval.latency_batches), c.latency_repeats, threads)
    for key, latency in timing["models"].items():
        name, runtime = key.split("|")
        rows[name]["runtimes"][runtime]["latency_ms"] = latency
    return {"data": pipe.data.summary(), "threads": threads, "latency_repeats": c.latency_repeats,
            "latency_machine": timing["machine"], "rows": list(rows), "models": rows}


def _torch_logits(model: nn.Module):
    @torch.inference_mode()
    def logits(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(images[i:i + 1000]) for i in range(0, len(images), 1000)])
    return logits


def _accuracies(logits_of, splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    return {f"{split}_accuracy": float((logits_of(images).argmax(1) == labels).float().mean())
            for split, (images, labels) in splits.items()}


def _size_figures(model: nn.Module, input_shape) -> dict:
    return {"params": count_parameters(model),
            "nonzero_params": sum(int((p != 0).sum()) for p in model.parameters()),
            "sparsity": sparsity(model), "macs": count_macs(model, input_shape)}


def _images(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's normalised images and labels, on the CPU."""
    images, labels = [], []
    for batch in loader:
        images.append(batch[0].float().cpu())
        labels.append(batch[1].cpu())
    return torch.cat(images), torch.cat(labels)


def _calibration_images(pipe, card: ModelCard, count: int, seed: int) -> torch.Tensor:
    """`count` training images (a fixed seeded choice), normalised: what static int8's ranges are set on."""
    train = pipe.data.train.images
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
    return card.normalise(train[chosen].cpu())


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu()


def _clear(folder: Path) -> None:
    if folder.is_symlink() or folder.is_file():
        raise KdistillError(f"{folder} is not a folder kdistill made; move it away")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


