"""Datasets in memory as uint8 tensors, and the device loader."""
from .datasets import Data, cache_path, canonical_name, data_root, load, prepare, store  # noqa: F401
from .loader import DeviceLoader, derive_seed  # noqa: F401
from .readers import DataError  # noqa: F401
