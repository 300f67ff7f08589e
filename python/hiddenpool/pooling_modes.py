"""sentence-transformers' pooling modes and how hiddenpool names them: the one table that
the strategy language (``Strategy.from_sentence_transformers``) and the pipeline reader
(``hiddenpool.pipelines``) both read. It imports nothing of the package, so neither of
them needs the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# sentence-transformers' modes in the order it concatenates them, each with its legacy
# boolean key and hiddenpool's pool.
MODES = [
    ("cls", "pooling_mode_cls_token", "cls"),
    ("max", "pooling_mode_max_tokens", "max"),
    ("mean", "pooling_mode_mean_tokens", "mean"),
    ("mean_sqrt_len_tokens", "pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
    ("weightedmean", "pooling_mode_weightedmean_tokens", "weighted_mean"),
    ("lasttoken", "pooling_mode_lasttoken", "last"),
]


def config_pools(config: Mapping[str, Any]) -> list[str]:
    """hiddenpool's pools, in output order, of a sentence-transformers Pooling config in
    either format: ``pooling_mode`` as a string or a list (5.4+), or one boolean per mode.

    >>> config_pools({"pooling_mode": ["mean", "max"]})
    ['mean', 'max']
    >>> config_pools({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True})
    ['cls', 'mean']
    """
    mode = config.get("pooling_mode")
    if mode is not None:
        chosen = [mode] if isinstance(mode, str) else list(mode)
        known = {name for name, _, _ in MODES}
        unknown = [name for name in chosen if name not in known]
        if unknown:
            raise ValueError(
                f"pooling_mode: unknown mode {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        # The compact format concatenates in the order written; the legacy flags in MODES'.
        pool_of = {name: pool for name, _, pool in MODES}
        pools = [pool_of[name] for name in dict.fromkeys(chosen)]
    else:
        pools = [pool for _, flag, pool in MODES if config.get(flag)]
    if not pools:
        raise ValueError("pooling config: no pooling mode is switched on")
    return pools
