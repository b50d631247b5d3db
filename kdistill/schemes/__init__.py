"""Schemes: how teachers and students are arranged, each an arrangement of the same parts.

A recipe's `scheme` picks one (`kdistill list schemes`). Offline distillation is the `Pipeline`
(one run folder: teacher, baseline, distilled student). Every other scheme is a function of a
`SchemeRun` (its folder) that makes ordinary run folders or trains with the one `fit`, and ends
with every model it made measured side by side. From Python:

    from kdistill.config import load_config
    from kdistill.schemes import run_recipe
    metrics = run_recipe(load_config("recipes/assistant_fashion_mnist.yaml"))

The building blocks work on plain modules too: `kdistill.models.ensemble.Ensemble` (several teachers as
one), `kdistill.schemes.online.MutualDistiller` (peers trained together).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from omegaconf import DictConfig

from kdistill.errors import KdistillError


class SchemeInfo(NamedTuple):
    run: Callable | None  # fn(SchemeRun) -> metrics; None for offline (the Pipeline itself)
    check: Callable | None  # fn(cfg) -> None: what the recipe's scheme section must satisfy (before any work)
    description: str
    plan: Callable | None = None  # fn(cfg) -> lines saying what `run` will train (`kdistill check`)


SCHEMES: dict[str, SchemeInfo] = {
    "offline": SchemeInfo(None, None, "a trained (or loaded) teacher teaches the student; the default (Hinton et "
                                      "al. 2015)"),
}


def register_scheme(name: str, description: str, check: Callable | None = None,
                    plan: Callable | None = None) -> Callable:
    def add(run: Callable) -> Callable:
        SCHEMES[name] = SchemeInfo(run, check, description, plan)
        return run
    return add


def check_scheme(cfg: DictConfig) -> None:
    """The scheme's name and section, checked when the config is loaded."""
    _load_all()
    info = SCHEMES.get(cfg.scheme)
    if info is None:
        raise KdistillError(f"scheme: {cfg.scheme!r} is not one of {', '.join(SCHEMES)} (`kdistill list schemes`)")
    if info.check is not None:
        info.check(cfg)


def run_recipe(cfg: DictConfig, *, resume: bool = False, force: bool = False, progress: str = "auto") -> dict:
    """Run a loaded recipe whatever its scheme; returns the metrics of every model it made."""
    from kdistill.pipeline import ROLES, Pipeline
    from kdistill.schemes.run import SchemeRun

    check_scheme(cfg)
    if cfg.scheme == "offline":
        with Pipeline(cfg, resume=resume, discard=ROLES if force else (), progress=progress) as pipeline:
            return pipeline.run()
    with SchemeRun(cfg, resume=resume, force=force, progress=progress) as run:
        return SCHEMES[cfg.scheme].run(run)


def _load_all() -> None:
    """Import the modules that register the schemes (here, not at the top: they import the pipeline)."""
    from kdistill.schemes import chain, multi_teacher, online  # noqa: F401


def scheme_descriptions() -> dict[str, str]:
    _load_all()
    return {name: info.description for name, info in SCHEMES.items()}
