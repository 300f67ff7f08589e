"""``hiddenpool encode``: one corpus file in, pooled embeddings (.npy, .npz, Parquet) or
token and word vectors (JSON lines, .npz) out, read, encoded and written chunk by chunk;
``--ray`` hands shards to ``cli.encode_ray``."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from hiddenpool.cli import checks
from hiddenpool.cli.checks import UsageError
from hiddenpool.cli.encode_options import EncodeOptions, encode_strategies, span_options
from hiddenpool.io import corpus


def run(arguments: argparse.Namespace) -> int:
    return encode(EncodeOptions.from_arguments(arguments))


def encode(options: EncodeOptions) -> int:
    if options.ray:
        from hiddenpool.cli import encode_ray

        return encode_ray.encode_shards(options)
    mode = options.mode
    strategies = encode_strategies(options, mode)
    checks.check_layer_weights(options, strategies)
    _check_single_file(options, mode, strategies)
    chunks = corpus.read_chunks(
        options.input[0],
        field=options.field,
        column=options.column,
        id_column=options.id_column,
        chunk_size=options.chunk_size,
        format=options.format,
    )
    model = checks.preflight(options, strategies, options.layers if mode != "pooled" else None)
    encoder, model_name = checks.load_encoder(options, model)
    if mode == "pooled":
        checks.check_against_model(encoder, options, strategies)
        _check_dimensions(encoder, options, strategies)
        count, widths = _encode_pooled(encoder, options, strategies, chunks)
        shapes = ", ".join(f"{key} [{count}, {widths[key]}]" for key in strategies)
    else:
        count, width = _encode_spans(encoder, options, mode, chunks)
        shapes = f"{mode} of width {width}"
    print(f"encoded {count} texts with {model_name}: {shapes} -> {options.output}")
    return 0


def _check_single_file(options: EncodeOptions, mode: str, strategies: list[str]) -> None:
    """One input, no --ray options, an output whose kind fits the mode and the strategies."""
    if len(options.input) != 1:
        raise UsageError("--input: one file (several files or globs need --ray)")
    for flag, value in (
        ("address", options.address),
        ("actors", options.actors),
        ("cpus_per_actor", options.cpus_per_actor),
    ):
        if value is not None:
            raise UsageError(f"--{flag.replace('_', '-')}: applies to --ray")
    output = options.output
    if mode != "pooled":
        extensions: tuple[str, ...] = (".jsonl", ".npz")
    elif len(strategies) > 1:
        extensions = (".npz", ".parquet")
    else:
        extensions = (".npy", ".npz", ".parquet")
    checks.check_output("--output", output, extensions)
    if output.lower().endswith(".parquet"):
        corpus.pyarrow_parquet("--output: Parquet output")  # before the model loads
    if options.id_column and output.lower().endswith((".npy", ".npz")) and mode == "pooled":
        raise UsageError("--id-column: .npy and .npz hold no ids; write .parquet")


def _check_dimensions(encoder: Any, options: EncodeOptions, strategies: list[str]) -> None:
    """``--dimensions`` against each strategy's width, before the first text runs."""
    if options.dimensions is None:
        return
    probe = encoder.encode([], strategies, layer_weights=options.layer_weights)
    for key, rows in (probe if isinstance(probe, dict) else {strategies[0]: probe}).items():
        if options.dimensions > rows.shape[1]:
            raise UsageError(
                f"--dimensions {options.dimensions}: more than the {rows.shape[1]} values of {key}"
            )


def _encode_pooled(
    encoder: Any, options: EncodeOptions, strategies: list[str], chunks: Any
) -> tuple[int, dict[str, int]]:
    """Encodes chunk by chunk into the output; returns rows and each strategy's width."""
    keywords = {
        "batch_size": options.batch_size,
        "max_batch_tokens": options.max_batch_tokens,
        "normalize": options.normalize,
        "missing_eos": options.missing_eos,
        "layer_weights": options.layer_weights,
        "layer_scale": options.layer_scale,
        "prompt": options.prompt,
        "include_prompt": options.include_prompt,
        "dimensions": options.dimensions,
    }
    widths: dict[str, int] = {}
    with (
        corpus.EmbeddingWriter(
            options.output, strategies, id_name=options.id_column or "id"
        ) as writer,
        corpus_progress() as progress,
    ):
        for chunk in chunks:
            result = encoder.encode(chunk.texts, strategies, progress=progress, **keywords)
            widths = {key: value.shape[1] for key, value in result.items()}
            writer.append(chunk.ids, result)
        if not writer.rows:
            empty = encoder.encode([], strategies, **keywords)
            widths = {key: value.shape[1] for key, value in empty.items()}
            writer.close(widths)
            return 0, widths
    return writer.rows, widths


def _encode_spans(encoder: Any, options: EncodeOptions, mode: str, chunks: Any) -> tuple[int, int]:
    """``--tokens`` / ``--words``: per-text vectors chunk by chunk into JSON lines or .npz."""
    pool_name, layers = span_options(options, mode)
    keywords: dict[str, Any] = {
        "batch_size": options.batch_size,
        "max_batch_tokens": options.max_batch_tokens,
    }
    # Checked on the model (an ONNX graph may lack the layers) before the output is opened.
    probe = encoder._layer_strategy(pool_name, layers)
    width = encoder.encode([], probe).shape[1]
    writer = corpus.SpanWriter(options.output)
    try:
        with corpus_progress() as progress:
            keywords["progress"] = progress
            _write_spans(encoder, mode, pool_name, layers, chunks, writer, keywords)
    except BaseException:
        writer.abort()
        raise
    writer.close(width)
    return writer.rows, width


def _write_spans(
    encoder: Any,
    mode: str,
    pool_name: str,
    layers: str,
    chunks: Any,
    writer: Any,
    keywords: dict[str, Any],
) -> None:
    for chunk in chunks:
        if mode == "tokens":
            vectors = encoder.encode_tokens(chunk.texts, layers, **keywords)
            writer.append(chunk.ids, vectors)
        else:
            pairs = encoder.encode_words(
                chunk.texts, pool_name, layers, return_offsets=True, **keywords
            )
            writer.append(
                chunk.ids,
                [vectors for vectors, _ in pairs],
                chunk.texts,
                [offsets for _, offsets in pairs],
            )


@contextlib.contextmanager
def corpus_progress() -> Iterator[Callable[[int], None] | bool]:
    """One progress bar for the whole corpus (texts done and texts/s, across the reader's
    chunks) where stderr is a terminal and tqdm is installed; else False, which keeps the
    Encoder's own per-call bar off too (it would restart with every chunk)."""
    if not sys.stderr.isatty():
        yield False
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield False
        return
    bar = tqdm(desc="encoding", unit=" texts", smoothing=0.1)
    try:
        yield bar.update
    finally:
        bar.close()
