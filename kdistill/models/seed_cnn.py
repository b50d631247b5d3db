"""The teacher and student CNNs of the seed article (two conv layers, two linear layers).

On 1x28x28 MNIST they are exactly the seed's `TeacherModel` and `StudentModel`: same layers,
same attribute names, same parameter counts (421,642 and 105,866).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import KdistillError
from kdistill.models.args import fits_in_memory
from kdistill.models.registry import register_model


class SeedCNN(nn.Module):
    """conv3x3-relu-maxpool2, twice, then flatten-fc-relu-fc.

    `spatial` is the input (height, width); each max-pool halves it (rounding down), so `fc1`
    sees `width2 * (H // 4) * (W // 4)` features. The forward pass runs in channels-last
    memory format (see `forward`): same function, faster; tapped conv features are
    channels-last tensors (use `.reshape`/`.flatten`, not `.view`).
    """

    def __init__(self, in_channels: int, width1: int, width2: int, hidden: int, num_classes: int,
                 spatial: tuple[int, int]):
        super().__init__()
        height, width = spatial
        self.conv1 = nn.Conv2d(in_channels, width1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(width1, width2, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(width2 * (height // 4) * (width // 4), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # Channels-last makes conv1, the ReLUs and the max-pools several times faster on CPU
        # (training step -26 % teacher, -38 % student on 1x28x28). `.to()`, not `.contiguous()`:
        # a 1-channel NCHW tensor already counts as channels-last-contiguous, so only `.to()`
        # gives it the strides that make oneDNN pick the channels-last kernels.
        x = x.to(memory_format=torch.channels_last)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)  # copies back to (C, H, W) order, the order fc1 was defined in
        return self.fc2(F.relu(self.fc1(x)))


def _seed_cnn(name: str, input_shape: tuple[int, int, int], num_classes: int,
              width1: int, width2: int, hidden: int) -> SeedCNN:
    channels, height, width = input_shape
    if height < 4 or width < 4:
        raise KdistillError(f"model {name!r} needs images of at least 4x4 pixels (it max-pools twice by 2), "
                            f"got {height}x{width}; use 'mlp' or 'resnet' for smaller inputs")
    fc1_inputs = width2 * (height // 4) * (width // 4)  # grows with the image: large images make a huge fc1
    fits_in_memory(name, 9 * channels * width1 + width1 + 9 * width1 * width2 + width2
                   + (fc1_inputs + 1) * hidden + (hidden + 1) * num_classes)
    return SeedCNN(channels, width1, width2, hidden, num_classes, (height, width))


@register_model("seed_teacher", "seed article's teacher CNN: conv 32, conv 64, fc 128 (421,642 params on MNIST)")
def seed_teacher(input_shape: tuple[int, int, int], num_classes: int) -> SeedCNN:
    return _seed_cnn("seed_teacher", input_shape, num_classes, width1=32, width2=64, hidden=128)


@register_model("seed_student", "seed article's student CNN: conv 16, conv 32, fc 64 (105,866 params on MNIST)")
def seed_student(input_shape: tuple[int, int, int], num_classes: int) -> SeedCNN:
    return _seed_cnn("seed_student", input_shape, num_classes, width1=16, width2=32, hidden=64)


class ShallowCNN(nn.Module):
    """Seed 002's shallow student: conv 3x3 (valid), max-pool, conv 3x3 (valid), global average pooling,
    dense + ReLU, dense.

    Seed 002 (Keras, 224x224 Flowers) pools by 4 (222 -> 55): kept here, so on 28x28 the second
    conv sees 6x6 maps. The convs have a ReLU, as Keras students usually do (the seed's summary
    shows no activations). 145,674 parameters for 10 classes on 1x28x28.
    """

    def __init__(self, in_channels: int, num_classes: int, width1: int = 64, width2: int = 128, hidden: int = 512,
                 pool: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width1, kernel_size=3)
        self.pool = nn.MaxPool2d(pool)
        self.conv2 = nn.Conv2d(width1, width2, kernel_size=3)
        self.fc1 = nn.Linear(width2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(memory_format=torch.channels_last)  # as SeedCNN: faster convolutions on CPU
        x = F.relu(self.conv2(self.pool(F.relu(self.conv1(x)))))
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))


@register_model("shallow_cnn", "seed 002's shallow student: conv 64, max-pool 4, conv 128, global average "
                               "pooling, fc 512 (145,674 params on MNIST)")
def shallow_cnn(input_shape: tuple[int, int, int], num_classes: int, width1: int = 64, width2: int = 128,
                hidden: int = 512, pool: int = 4) -> ShallowCNN:
    channels, height, width = input_shape
    if min(height, width) < 3 * pool + 2:
        raise KdistillError(f"model 'shallow_cnn' needs images of at least {3 * pool + 2}x{3 * pool + 2} pixels "
                            f"with pool={pool} (two valid 3x3 convs around the max-pool), got {height}x{width}; "
                            "lower pool, or use 'mlp' for smaller inputs")
    return ShallowCNN(channels, num_classes, width1, width2, hidden, pool)
