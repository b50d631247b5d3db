"""Data sets held in memory, split train/val/test, and served as fast normalised batches.

    splits = load_data("fashion_mnist")
    loader = BatchLoader(splits.train, 128, mean=splits.mean, std=splits.std, shuffle=True,
                         augment=Augment(crop_padding=2, hflip=True))
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for inputs, labels, index in loader: ...
"""

from kdistill.data import cifar, digits, image_folder, mnist, npz  # noqa: F401  (importing registers the data sets)
from kdistill.data.augment import Augment
from kdistill.data.loader import Batch, BatchLoader
from kdistill.data.registry import DATASETS, DataRequest, DatasetInfo, LoadedData, load_data, register_dataset
from kdistill.data.sets import DataSplits, ImageSet

__all__ = ["DATASETS", "Augment", "Batch", "BatchLoader", "DataRequest", "DataSplits", "DatasetInfo", "ImageSet",
           "LoadedData", "load_data", "register_dataset"]
