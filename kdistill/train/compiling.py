"""`train.compile`: torch.compile the models of one training, in place, with a way back to eager.

`nn.Module.compile()` compiles a module where it stands: its state_dict keys, forward hooks (feature
taps) and DDP wrapping are unchanged. Compilation happens at the first call; if it fails there (no
C++ compiler, an operation the compiler does not support), the models go back to eager with one
warning and the step runs again. When the training ends the models are given back uncompiled.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from kdistill.models.registry import describe_error


class Compilation:
    def __init__(self, modules: list[nn.Module | None], enabled: bool):
        self.modules = [m for m in modules if m is not None] if enabled else []
        self._before = {}
        self._settings = contextlib.ExitStack()

    @property
    def active(self) -> bool:
        return bool(self._before)

    def __enter__(self) -> "Compilation":
        if self.modules:
            # Guard on hooks: a graph traced without a tap must not serve a model that has one (models of
            # one class share graphs). Room for the recompiles of several trainings in one process. The
            # backward compiled with the forward, so that its failure reaches `call` too.
            self._settings.enter_context(torch._dynamo.config.patch(skip_nnmodule_hook_guards=False,
                                                                    recompile_limit=64))
            self._settings.enter_context(torch._functorch.config.patch(force_non_lazy_backward_lowering=True))
        for module in self.modules:
            self._before[module] = module._compiled_call_impl  # what nn.Module.compile() sets
            module.compile()
        return self

    def __exit__(self, *exc) -> None:
        self._undo()
        self._settings.close()

    def call(self, function, *args):
        """`function(*args)`; a failure while compiled sends the models back to eager, and it runs again.

        If it fails in eager mode too, the fault is the model's, not the compiler's: that error is raised,
        without a word about compilation.
        """
        if not self.active:
            return function(*args)
        try:
            return function(*args)
        except (KeyboardInterrupt, FloatingPointError):
            raise
        except Exception as error:  # noqa: BLE001  the compiler's errors have no common type
            self._undo()
            result = function(*args)
            warnings.warn(f"train.compile: torch.compile failed ({describe_error(error)[:300]}); training on without "
                          "it", stacklevel=2)
            return result

    def _undo(self) -> None:
        for module, before in self._before.items():
            module._compiled_call_impl = before
        self._before = {}
