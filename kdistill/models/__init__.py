"""Models by name: `create_model("resnet", (1, 28, 28), 10, width=64)`, or any nn.Module.

Registered names are in `MODELS`; a name with a colon, `"module.path:ClassName"`, builds a
user's own nn.Module subclass instead.
"""

from kdistill.models import cifar, ensemble, mlp, resnet, seed_cnn  # noqa: F401  (imported to run their @register_model)
from kdistill.models.probe import count_parameters, output_classes
from kdistill.models.registry import MODELS, ModelInfo, create_model, register_model

__all__ = ["MODELS", "ModelInfo", "count_parameters", "create_model", "output_classes", "register_model"]
