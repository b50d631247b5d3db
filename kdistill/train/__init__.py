"""Training: the fit/evaluate loop, optimizers and schedules, checkpoints, progress output."""

from kdistill.train.checkpoint import load_model, load_tensors, save_model, save_tensors
from kdistill.train.loop import Evaluation, FitResult, autocast, evaluate, fit
from kdistill.train.progress import Progress

__all__ = [
    "Evaluation", "FitResult", "Progress", "autocast", "evaluate", "fit",
    "load_model", "load_tensors", "save_model", "save_tensors",
]
