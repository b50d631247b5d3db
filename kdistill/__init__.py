"""kdistill: knowledge distillation for PyTorch: teacher -> small student, measured honestly."""

from kdistill import functional
from kdistill.compare import Comparison, compare
from kdistill.distill import Distiller
from kdistill.errors import KdistillError

__version__ = "0.1.0"
__all__ = ["Comparison", "Distiller", "KdistillError", "compare", "functional", "__version__"]
