"""hiddenpool: pool transformer hidden states into embeddings, fast and correctly.

>>> import numpy as np, hiddenpool
>>> hidden = np.ones((2, 3, 4), dtype=np.float32)
>>> hiddenpool.pool(hidden, np.array([[1, 1, 0], [0, 1, 1]]), "mean@last").shape
(2, 4)
"""

from hiddenpool._native import get_num_threads, set_num_threads
from hiddenpool._version import __version__
from hiddenpool.encoder import Encoder, TokenReport
from hiddenpool.export import export_onnx
from hiddenpool.ops import (
    cls,
    eos,
    first,
    gather,
    last,
    max,
    mean,
    mean_sqrt_len,
    pool,
    pool_packed,
    pool_spans,
    sum,
    use_backend,
    weighted_mean,
)
from hiddenpool.strategy import Strategy

__all__ = [
    "Encoder",
    "Strategy",
    "TokenReport",
    "__version__",
    "cls",
    "eos",
    "export_onnx",
    "first",
    "gather",
    "get_num_threads",
    "last",
    "max",
    "mean",
    "mean_sqrt_len",
    "pool",
    "pool_packed",
    "pool_spans",
    "set_num_threads",
    "sum",
    "use_backend",
    "weighted_mean",
]
