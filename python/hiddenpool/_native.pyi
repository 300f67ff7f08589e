"""The Rust extension. Use the wrappers in ``hiddenpool`` rather than these directly."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "POOLS",
    "_panic_for_tests",
    "find_token",
    "get_num_threads",
    "pool",
    "pool_packed",
    "pool_spans",
    "set_num_threads",
]

POOLS: list[str]

def pool(
    hidden_states: Sequence[npt.NDArray[np.generic]],
    attention_mask: npt.NDArray[np.generic],
    pools: Sequence[str],
    combine: str = "sum",
    layer_weights: Sequence[float] | None = None,
    index: npt.NDArray[np.integer] | None = None,
    bfloat16: bool = False,
) -> npt.NDArray[np.floating]:
    """Pools ``[B, T, H]`` layers over the real tokens of ``attention_mask`` ``[B, T]``.

    Output ``[B, len(pools) * S * H]`` with S = number of layers for ``concat``, else 1;
    float32 (float64 for float64 input). ``index`` ``[B]`` (-1: none) feeds the ``index``
    pool. ``bfloat16`` reads 16-bit integer layers as bfloat16 bits."""

def pool_packed(
    hidden_states: Sequence[npt.NDArray[np.generic]],
    offsets: npt.NDArray[np.integer],
    pools: Sequence[str],
    combine: str = "sum",
    layer_weights: Sequence[float] | None = None,
    index: npt.NDArray[np.integer] | None = None,
    bfloat16: bool = False,
) -> npt.NDArray[np.floating]:
    """Pools packed ``[N, H]`` layers whose rows are delimited by ``offsets`` ``[B + 1]``."""

def pool_spans(
    hidden_states: Sequence[npt.NDArray[np.generic]],
    spans: npt.NDArray[np.integer],
    pools: Sequence[str],
    combine: str = "sum",
    layer_weights: Sequence[float] | None = None,
    attention_mask: npt.NDArray[np.generic] | None = None,
    offsets: npt.NDArray[np.integer] | None = None,
    bfloat16: bool = False,
) -> npt.NDArray[np.floating]:
    """Pools ``(row, start, end)`` spans ``[S, 3]`` of padded layers under ``attention_mask``
    or of packed layers under ``offsets``; returns ``[S, D]``."""

def find_token(
    input_ids: npt.NDArray[np.integer],
    attention_mask: npt.NDArray[np.generic],
    token_id: int,
) -> npt.NDArray[np.int64]:
    """First real position of ``token_id`` per row; -1 where a row has none."""

def set_num_threads(count: int) -> None:
    """Worker threads for large inputs (default: HIDDENPOOL_NUM_THREADS, else every core)."""

def get_num_threads() -> int:
    """The number of worker threads large inputs are spread over."""

def _panic_for_tests(on_workers: bool) -> None:
    """Panics inside the guarded kernel runner (tests only): raises RuntimeError."""
