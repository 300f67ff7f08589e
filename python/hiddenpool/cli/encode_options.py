"""``hiddenpool encode``'s options: the arguments it takes, their typed form, and the
checks of the strategies (or ``--tokens``/``--words`` layers) that both the single-file
path (``cli.encode``) and the Ray path (``cli.encode_ray``) make before loading."""

from __future__ import annotations

import argparse
import dataclasses

from hiddenpool.cli import checks
from hiddenpool.cli.checks import Accumulate, ModelOptions, UsageError
from hiddenpool.io.corpus import DEFAULT_CHUNK_SIZE, FORMATS


@dataclasses.dataclass(frozen=True)
class EncodeOptions(ModelOptions):
    input: list[str] = dataclasses.field(default_factory=list)
    output: str = ""
    normalize: bool = False
    dimensions: int | None = None
    field: str | None = None
    column: str | None = None
    id_column: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    format: str | None = None
    prompt: str | None = None
    exclude_prompt: bool = False
    tokens: bool = False
    words: bool = False
    layers: str | None = None
    word_pool: str | None = None
    ray: bool = False
    address: str | None = None
    actors: int | None = None
    cpus_per_actor: int | None = None

    @property
    def mode(self) -> str:
        """``pooled``, ``tokens`` or ``words``."""
        return "tokens" if self.tokens else "words" if self.words else "pooled"

    @property
    def include_prompt(self) -> bool | None:
        """``Encoder.encode``'s include_prompt: False with --exclude-prompt, else its default."""
        return False if self.exclude_prompt else None


def add_arguments(encode: argparse.ArgumentParser) -> None:
    encode.add_argument(
        "--input",
        required=True,
        nargs="+",
        action=Accumulate,
        help=".txt (a text a line), .jsonl, .json, .csv, .tsv or .parquet; with --ray, "
        "JSON-lines or Parquet shards (paths or globs)",
    )
    encode.add_argument(
        "--output",
        required=True,
        help=".npy, .npz (several strategies) or .parquet; .jsonl or .npz for --tokens and "
        "--words; a folder with --ray",
    )
    encode.add_argument(
        "--format",
        choices=list(FORMATS),
        help="the kind of --input file (default: from its extension; other extensions are "
        "refused: --format text reads any file as a text a line)",
    )
    encode.add_argument("--normalize", action="store_true", help="scale rows to unit length")
    encode.add_argument(
        "--dimensions",
        type=int,
        help="keep the first N values of each row, scaled back to unit length where rows "
        "are normalized (--normalize, or 'model' with a Normalize module), as the server does",
    )
    encode.add_argument("--field", help="JSON input: the text field (default: text)")
    encode.add_argument("--column", help="CSV/TSV/Parquet input: the text column (default: text)")
    encode.add_argument(
        "--id-column",
        help="an input field or column whose values are written as ids (default: row numbers)",
    )
    encode.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help="texts read, encoded and written at a time (memory follows it, not the corpus)",
    )
    encode.add_argument("--prompt", help="text put before every input text, e.g. 'query: '")
    encode.add_argument(
        "--exclude-prompt",
        action="store_true",
        help="leave the prompt's tokens out of pooling (as include_prompt=False)",
    )
    _add_span_arguments(encode)
    _add_ray_arguments(encode)


def _add_span_arguments(encode: argparse.ArgumentParser) -> None:
    spans = encode.add_mutually_exclusive_group()
    spans.add_argument(
        "--tokens", action="store_true", help="write every token's vector (.jsonl or .npz)"
    )
    spans.add_argument(
        "--words", action="store_true", help="write one vector per word (.jsonl or .npz)"
    )
    encode.add_argument(
        "--layers", help="--tokens/--words: the layers, e.g. last, -2, last4:mean (default: last)"
    )
    encode.add_argument(
        "--word-pool",
        help="--words: how subtokens become a word: mean, first, last, max (default: mean)",
    )


def _add_ray_arguments(encode: argparse.ArgumentParser) -> None:
    encode.add_argument(
        "--ray", action="store_true", help="encode shards on Ray Data, one output per shard"
    )
    encode.add_argument(
        "--address", help="--ray: an existing Ray cluster (default: start one here)"
    )
    encode.add_argument(
        "--actors", type=int, help="--ray: encoder actors (default: the cluster's CPUs less one)"
    )
    encode.add_argument(
        "--cpus-per-actor", type=int, help="--ray: CPUs (and threads) per actor (default: 1)"
    )


def encode_strategies(options: EncodeOptions, mode: str) -> list[str]:
    """The strategies to encode: ``--strategy`` (default ``model``) for pooled output, or
    the one strategy ``--tokens``/``--words`` pool with; every option that does not apply
    to ``mode`` is refused by name."""
    strategies = list(options.strategies) if options.strategies else None
    if options.exclude_prompt and options.prompt is None:
        raise UsageError("--exclude-prompt: needs --prompt")
    if mode == "pooled":
        if options.layers is not None:
            raise UsageError("--layers: applies to --tokens and --words")
        if options.word_pool is not None:
            raise UsageError("--word-pool: applies to --words")
        strategies = strategies or ["model"]
        checks.check_strategies(strategies)
        return strategies
    if strategies:
        raise UsageError(f"--strategy: does not apply to --{mode}; choose layers with --layers")
    if options.prompt is not None:
        raise UsageError(f"--prompt: applies to pooled embeddings, not --{mode}")
    if options.word_pool is not None and mode != "words":
        raise UsageError("--word-pool: applies to --words")
    if options.normalize:
        raise UsageError(f"--normalize: applies to pooled embeddings, not --{mode}")
    if options.dimensions is not None:
        raise UsageError(f"--dimensions: applies to pooled embeddings, not --{mode}")
    pool_name, layers = span_options(options, mode)
    return [f"{pool_name}@{layers}"]


# The pools a word can be made with: every pool that reads a span of tokens (eos finds
# one token per text).
WORD_POOLS = ("mean", "first", "last", "max", "sum", "mean_sqrt_len", "weighted_mean", "cls")


def span_options(options: EncodeOptions, mode: str) -> tuple[str, str]:
    """``--tokens``/``--words``' pool (``first`` for tokens) and layers, their syntax
    checked here (the layer count against the model's files in ``checks.preflight``),
    before anything loads."""
    from hiddenpool.strategy import Strategy

    pool_name = (options.word_pool or "mean") if mode == "words" else "first"
    layers = options.layers or "last"
    if pool_name.strip() not in WORD_POOLS:
        hint = "; eos finds one token per text" if pool_name.strip() == "eos" else ""
        raise UsageError(
            f"--word-pool {pool_name!r}: one pool of {', '.join(WORD_POOLS[:-1])} "
            f"(cls is first){hint}"
        )
    try:
        Strategy.parse(f"{pool_name}@{layers}")
    except ValueError as error:
        raise UsageError(f"--layers {layers!r}: {error}") from None
    return pool_name, layers
