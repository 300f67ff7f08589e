"""``hiddenpool export``: a transformers model folder written as an ONNX folder (every
hidden state, the tokenizer, a manifest) for the torch-free runner."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable

from hiddenpool.cli import checks
from hiddenpool.cli.checks import UsageError


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    model: str | None
    output: str
    quantize: str | None = None
    project: bool = False
    max_length: int | None = None
    calibration: str | None = None

    @classmethod
    def from_arguments(cls, arguments: argparse.Namespace) -> ExportOptions:
        return cls(
            model=arguments.model,
            output=arguments.output,
            quantize=arguments.quantize,
            project=arguments.project,
            max_length=arguments.max_length,
            calibration=arguments.calibration,
        )


def add_arguments(export: argparse.ArgumentParser) -> None:
    export.add_argument(
        "model", nargs="?", help="a local transformers model folder (default: all-MiniLM-L6-v2)"
    )
    export.add_argument("--output", required=True, help="a new (or empty) folder")
    export.add_argument(
        "--quantize",
        choices=["int8", "int8-static"],
        help="int8: dynamically quantized (runs on ONNX Runtime); int8-static: calibrated on "
        "sample texts (runs fastest on OpenVINO)",
    )
    export.add_argument(
        "--calibration",
        metavar="TEXTS",
        help="with --quantize int8-static: a UTF-8 text file, one text per line, like the "
        "texts you will encode (default: ~150 varied texts packaged with hiddenpool)",
    )
    export.add_argument("--project", action="store_true", help="CLIP: keep the text projection")
    export.add_argument("--max-length", type=int, help="token limit (default: the model's)")


def run(arguments: argparse.Namespace) -> int:
    return export(ExportOptions.from_arguments(arguments))


def export(options: ExportOptions) -> int:
    model = options.model or checks.default_model_path("MODEL")
    checks.check_model("MODEL", model)
    output = options.output
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise UsageError(f"--output {output}: exists and is not an empty folder; choose a new one")
    # The export is staged beside the output folder (whose missing parents it makes) and
    # renamed into place: the nearest folder that exists must take new files.
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--output {output}: {parent} is a file, not a folder")
    checks.check_writable("--output", output, parent)
    calibration = read_calibration(options.calibration, options.quantize)
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
            quantize=options.quantize,  # type: ignore[arg-type]
            project=options.project,
            max_length=options.max_length,
            calibration=calibration,
            progress=_phase_printer(),
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
    weights = options.quantize or "float32"
    print(f"exported {model} ({weights}) -> {folder} ({size / 1e6:.1f} MB)")
    print(f"use it: hiddenpool encode --model {folder} --input TEXTS --output OUT.npy")
    return 0


def read_calibration(path: str | None, quantize: str | None) -> list[str] | None:
    """The texts of ``--calibration`` (one per line, blank lines skipped), checked before the
    model loads; None without the flag (the packaged texts then)."""
    if path is None:
        return None
    if quantize != "int8-static":
        raise UsageError(
            "--calibration: applies to --quantize int8-static only (dynamic int8 measures "
            "its activations at run time)"
        )
    if not os.path.isfile(path):
        raise UsageError(f"--calibration {path}: no such file")
    try:
        with open(path, encoding="utf-8") as handle:
            texts = [line.strip() for line in handle if line.strip()]
    except UnicodeDecodeError as error:
        raise UsageError(f"--calibration {path}: not UTF-8 text ({error.reason})") from None
    except OSError as error:
        raise UsageError(f"--calibration {path}: cannot read it ({error.strerror})") from None
    if not texts:
        raise UsageError(f"--calibration {path}: no texts in it (one text per line)")
    return texts


def _phase_printer() -> Callable[[str], None]:
    """Prints each export phase on stderr as it starts, with the seconds since the first:
    an export is silent for half a minute otherwise."""
    started = time.perf_counter()

    def say(phase: str) -> None:
        print(
            f"hiddenpool export: {phase} ({time.perf_counter() - started:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    return say
