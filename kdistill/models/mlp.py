"""A fully connected network: Hinton et al.'s 1200-1200 teacher and 800-800 student (2015)."""

import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from kdistill.models.args import MAX_WIDTH, fits_in_memory, positive_ints, probability
from kdistill.models.registry import register_model


class MLP(nn.Module):
    """flatten, then (Linear, ReLU[, Dropout]) per hidden width in `body`, then a Linear `head`.

    Layers are named for feature taps: `body.fc1`, `body.relu1`, `body.drop1`, `body.fc2`, ..., `head`.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (1200, 1200),
                 dropout: float = 0.0):
        super().__init__()
        layers: dict[str, nn.Module] = {}
        width = math.prod(input_shape)
        for i, size in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, size)
            layers[f"relu{i}"] = nn.ReLU()  # not in-place: a hook tapping fc{i} must keep fc{i}'s output
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            width = size
        self.body = nn.Sequential(OrderedDict(layers))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.flatten(1)))


@register_model("mlp", "fully connected net; hidden=[1200, 1200] is Hinton's teacher, [800, 800] his student")
def mlp(input_shape: tuple[int, int, int], num_classes: int, hidden: Sequence[int] = (1200, 1200),
        dropout: float = 0.0) -> MLP:
    hidden = positive_ints("mlp", "hidden", hidden, most=MAX_WIDTH)
    widths = [math.prod(input_shape), *hidden, num_classes]
    fits_in_memory("mlp", sum((n_in + 1) * n_out for n_in, n_out in itertools.pairwise(widths)))
    return MLP(input_shape, num_classes, hidden, probability("mlp", "dropout", dropout))
