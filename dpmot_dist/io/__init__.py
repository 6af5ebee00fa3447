"""Reading and writing data, anywhere fsspec reaches (local disk, S3, ...).

:mod:`~dpmot_dist.io.storage` is the plumbing (URIs, atomic writes, ``_SUCCESS``, one-line
errors for every storage failure), :mod:`~dpmot_dist.io.datasets` the layout of our own
folders (targets, fit outputs, samples: Parquet data sets that standard readers open as they
are), :mod:`~dpmot_dist.io.readers` the user's inputs (.npy/.npz, Parquet, image folders), and
:mod:`~dpmot_dist.io.images` pixel conventions (layouts, value ranges, PNG).
"""

from dpmot_dist.io import datasets, images, readers, storage
from dpmot_dist.io.datasets import load_targets, read_samples, targets_shape, write_targets

__all__ = [
    "datasets",
    "images",
    "load_targets",
    "read_samples",
    "readers",
    "storage",
    "targets_shape",
    "write_targets",
]
