"""The strategy language: ``POOL[+POOL...]@LAYERS[:COMBINE]``.

Examples: ``mean@last``, ``cls@last``, ``eos@last``, ``mean@-2``, ``mean@first_last:mean``,
``mean@last4:sum``, ``mean@last4:concat``, ``mean+max@last``, ``mean@-4..-1:concat``,
``mean@1,-1:concat``. ``@LAYERS`` may be left out and means ``@last``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from hiddenpool.pooling_modes import config_pools

POOLS = ("mean", "sum", "max", "mean_sqrt_len", "weighted_mean", "first", "last", "eos")
POOL_ALIASES = {"cls": "first"}
COMBINES = ("sum", "mean", "concat", "weighted")

_INDEX = r"[+-]?\d+"
_ITEM = re.compile(
    rf"^(?:(?P<last>last)(?P<count>\d+)?|(?P<name>all|embeddings|first_last)"
    rf"|(?P<start>{_INDEX})\.\.(?P<stop>{_INDEX})|(?P<index>{_INDEX}))$"
)


@dataclass(frozen=True)
class Strategy:
    """A parsed strategy: which pools, over which hidden states, combined how.

    ``pools`` are canonical pool names (``cls`` becomes ``first``), ``layers`` the layer
    items as written in canonical form (``last``, ``last4``, ``all``, ``embeddings``,
    ``first_last``, ``-2``, ``1..4``), ``combine`` one of ``sum``, ``mean``, ``concat``,
    ``weighted`` or None for a single layer.

    >>> s = Strategy.parse("CLS + max @ last4 : concat")
    >>> str(s)
    'first+max@last4:concat'
    >>> s.resolve_layers(7)
    [3, 4, 5, 6]
    """

    pools: tuple[str, ...]
    layers: tuple[str, ...] = ("last",)
    combine: str | None = None

    def __post_init__(self) -> None:
        if not self.pools:
            raise ValueError("strategy: needs at least one pool")
        for pool in self.pools:
            if pool not in POOLS:
                raise ValueError(
                    f"strategy: unknown pool {pool!r}; valid pools: {', '.join(POOLS)} "
                    "(and 'cls' for 'first')"
                )
        if self.combine is not None and self.combine not in COMBINES:
            raise ValueError(
                f"strategy: unknown combine {self.combine!r}; valid: {', '.join(COMBINES)}"
            )
        if not self.layers:
            raise ValueError("strategy: needs at least one layer")
        for item in self.layers:
            if not _ITEM.match(item):
                raise ValueError(
                    f"strategy: malformed layer spec {item!r}; expected last, lastN, all, "
                    "embeddings, first_last, an index like -2, or a range like 1..4"
                )
        if self.selects_several_layers and self.combine is None:
            raise ValueError(
                f"strategy {self}: several layers are chosen, so a combine is required; "
                f"append one of :{', :'.join(COMBINES[:3])}"
            )

    @classmethod
    def parse(cls, text: str | Strategy) -> Strategy:
        """Parses ``POOL[+POOL...]@LAYERS[:COMBINE]`` (case and spaces ignored)."""
        if isinstance(text, Strategy):
            return text
        if not isinstance(text, str):
            raise TypeError(f"strategy: expected a string or Strategy, got {type(text).__name__}")
        return _parse_text(text)

    @classmethod
    def _parse_uncached(cls, text: str) -> Strategy:
        compact = re.sub(r"\s+", "", text).lower()
        if not compact:
            raise ValueError("strategy: empty string; expected e.g. 'mean@last'")
        pool_part, _, rest = compact.partition("@")
        layer_part, _, combine = rest.partition(":")
        if compact.count("@") > 1 or rest.count(":") > 1:
            raise ValueError(f"strategy {text!r}: expected POOL[+POOL...]@LAYERS[:COMBINE]")
        pools = tuple(POOL_ALIASES.get(pool, pool) for pool in pool_part.split("+"))
        if "" in pools:
            raise ValueError(f"strategy {text!r}: empty pool name")
        layers = tuple(layer_part.split(",")) if layer_part else ("last",)
        if "@" in compact and not layer_part:
            raise ValueError(f"strategy {text!r}: nothing after '@'; expected e.g. @last")
        if ":" in rest and not combine:
            raise ValueError(f"strategy {text!r}: nothing after ':'; expected e.g. :sum")
        return cls(pools, tuple(_canonical_item(item) for item in layers), combine or None)

    def __str__(self) -> str:
        text = "+".join(self.pools) + "@" + ",".join(self.layers)
        return text + (f":{self.combine}" if self.combine else "")

    @property
    def selects_several_layers(self) -> bool:
        """Whether the layer spec can name more than one hidden state."""
        if len(self.layers) > 1:
            return True
        match = _ITEM.match(self.layers[0])
        assert match is not None
        if match["name"] in ("all", "first_last"):
            return True
        if match["last"]:
            return int(match["count"] or 1) > 1
        if match["start"] is not None:
            return int(match["start"]) != int(match["stop"])
        return False

    @classmethod
    def from_sentence_transformers(cls, config: Mapping[str, Any]) -> Strategy:
        """The strategy of a sentence-transformers Pooling config (``1_Pooling/config.json``),
        either format: one boolean per mode, or ``pooling_mode`` as a string or a list.

        >>> str(Strategy.from_sentence_transformers({"pooling_mode": "lasttoken"}))
        'last@last'
        """
        return cls.parse("+".join(config_pools(config)) + "@last")

    def resolve_layers(self, state_count: int) -> list[int]:
        """Indices into ``state_count`` hidden states (index 0 = embeddings output when the
        full ``output_hidden_states`` sequence is given; a single array counts as one state).

        Raises ValueError naming the spec and the number of states when out of range.
        """
        if state_count < 1:
            raise ValueError("hidden_states: no hidden states given")
        indices: list[int] = []
        for item in self.layers:
            indices.extend(_resolve_item(item, state_count, self))
        return indices


@functools.lru_cache(maxsize=512)
def _parse_text(text: str) -> Strategy:
    # Strategies are immutable, so a parsed string can be shared by every call that uses it.
    return Strategy._parse_uncached(text)


def strategy_list(
    strategy: str | Strategy | Sequence[str | Strategy],
) -> tuple[bool, list[str], list[Strategy]]:
    """Whether several strategies were given, each one's key (the string as given, or the
    canonical form of a Strategy) and each one parsed."""
    several = not isinstance(strategy, (str, Strategy))
    given: list[str | Strategy] = (
        list(cast(Sequence[str | Strategy], strategy))
        if several
        else [cast(str | Strategy, strategy)]
    )
    if not given:
        raise ValueError("strategy: empty list of strategies")
    keys = [item if isinstance(item, str) else str(item) for item in given]
    return several, keys, [Strategy.parse(item) for item in given]


def _canonical_item(item: str) -> str:
    match = _ITEM.match(item)
    if match is None:
        raise ValueError(
            f"strategy: malformed layer spec {item!r}; expected last, lastN, all, embeddings, "
            "first_last, an index like -2, or a range like 1..4"
        )
    if match["last"]:
        count = int(match["count"] or 1)
        if count < 1:
            raise ValueError(f"strategy: layer spec {item!r} must choose at least one layer")
        return "last" if count == 1 else f"last{count}"
    if match["start"] is not None:
        return f"{int(match['start'])}..{int(match['stop'])}"
    if match["index"] is not None:
        return str(int(match["index"]))
    return item


def _resolve_index(index: int, state_count: int, strategy: Strategy, item: str) -> int:
    if not -state_count <= index < state_count:
        raise ValueError(
            f"strategy {strategy}: layer {index} (in {item!r}) is out of range for "
            f"{state_count} hidden state(s); valid indices are {-state_count}..{state_count - 1}"
        )
    return index % state_count


def _resolve_item(item: str, state_count: int, strategy: Strategy) -> list[int]:
    match = _ITEM.match(item)
    assert match is not None
    if match["last"]:
        count = int(match["count"] or 1)
        if count > state_count:
            raise ValueError(
                f"strategy {strategy}: {item!r} needs {count} hidden states but "
                f"hidden_states has {state_count}"
            )
        return list(range(state_count - count, state_count))
    name = match["name"]
    if name is not None:
        if state_count < 2:
            raise ValueError(
                f"strategy {strategy}: {item!r} needs the full hidden_states sequence "
                "(embeddings + every layer); a single array was given"
            )
        if name == "all":
            return list(range(1, state_count))
        if name == "embeddings":
            return [0]
        return [1, state_count - 1]
    if match["start"] is not None:
        start = _resolve_index(int(match["start"]), state_count, strategy, item)
        stop = _resolve_index(int(match["stop"]), state_count, strategy, item)
        if start > stop:
            raise ValueError(
                f"strategy {strategy}: range {item!r} runs backwards "
                f"(from state {start} to {stop} of {state_count})"
            )
        return list(range(start, stop + 1))
    return [_resolve_index(int(match["index"]), state_count, strategy, item)]
