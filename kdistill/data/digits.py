"""scikit-learn's bundled 8x8 handwritten digits: tiny, offline, good for smoke tests."""

import torch

from kdistill.data.registry import DataRequest, LoadedData, register_dataset
from kdistill.data.sets import ImageSet

TEST_SIZE = 297  # about 1/6 of the 1797 samples
TEST_SEED = 12345  # fixed apart from split_seed so the test split never moves


@register_dataset("digits", "scikit-learn 8x8 greyscale handwritten digits, 10 classes, 1500 train / 297 test")
def load_digits(request: DataRequest) -> LoadedData:
    """Ignores root and download: the data ships inside scikit-learn."""
    import sklearn
    from sklearn.datasets import load_digits as sklearn_digits  # slow import, only when asked for

    bunch = sklearn_digits()
    # Pixel values are 0..16; stretch them to the 0..255 range the other data sets use.
    images = torch.from_numpy(bunch.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    everything = ImageSet(images, labels)

    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(TEST_SEED))
    test = everything.subset(order[:TEST_SIZE].sort().values)
    train = everything.subset(order[TEST_SIZE:].sort().values)
    return LoadedData(train, test, [str(d) for d in range(10)],
                      sources=[f"scikit-learn {sklearn.__version__} bundled digits"])
