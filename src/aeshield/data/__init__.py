"""Datasets for aeshield: fetched, checksum-verified, loaded as float tensors in [0, 1].

>>> from aeshield.data import load_dataset
>>> test = load_dataset("mnist", "test")  # doctest: +SKIP
>>> test.images.shape, test.labels.dtype, test.source  # doctest: +SKIP
(torch.Size([10000, 1, 28, 28]), torch.int64, 'canonical')

Every :class:`LabeledImages` carries ``source`` and ``sha256`` to stamp on results. Figures
measured on the CIFAR-10 JPEG stand-in carry ``source == "CIFAR-10 (JPEG q75 stand-in)"``
and are not comparable to published CIFAR-10 numbers.
"""

from .cifar import CIFAR10_CLASSES, read_image_folder, read_pickle_batches, stable_permutation
from .datasets import DATASETS, SPLITS, DatasetInfo, LabeledImages, load_dataset, split_indices
from .fetch import (
    CIFAR10_STANDIN_SOURCE,
    DataError,
    FetchResult,
    cache_dir,
    dataset_dir,
    fetch,
    fetch_info,
)
from .idx import parse_idx, read_idx, read_idx_tensor

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_STANDIN_SOURCE",
    "DATASETS",
    "SPLITS",
    "DataError",
    "DatasetInfo",
    "FetchResult",
    "LabeledImages",
    "cache_dir",
    "dataset_dir",
    "fetch",
    "fetch_info",
    "load_dataset",
    "parse_idx",
    "read_idx",
    "read_idx_tensor",
    "read_image_folder",
    "read_pickle_batches",
    "split_indices",
    "stable_permutation",
]
