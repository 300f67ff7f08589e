"""The Encoder as an MTEB model: ``model()`` gives an object ``mteb.evaluate`` takes as it
is (MTEB's encoder protocol, with its ``ModelMeta`` filled from what the folder and runner
say), the strategy, runtime and precision recorded as MTEB experiment arguments so results of
different strategies land side by side."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.model_meta import ModelMeta, ScoringFunction

from hiddenpool._version import __version__

if TYPE_CHECKING:
    from hiddenpool.encoder import Encoder
    from hiddenpool.mteb.shared import SharedPass

# Files above this size are hashed by their size and first and last MiB (a revision must
# change when the weights do, not cost a read of a 7B model's 14 GB).
_WHOLE_HASH_LIMIT = 64 << 20
_FRAMEWORKS = {"torch": ["PyTorch", "Transformers"], "onnx": ["ONNX"], "openvino": ["OpenVINO"]}


class HiddenpoolModel(AbsEncoder):
    """One strategy of one loaded ``Encoder``, under MTEB's encoder protocol: ``encode``
    gets MTEB's batches (dicts with a ``"text"`` list) and returns ``[N, D]`` float32 rows.
    Made by ``hiddenpool.mteb.model``; ``texts_encoded`` counts the texts put through the
    model (a shared pass counts there instead)."""

    def __init__(
        self,
        encoder: Encoder,
        *,
        strategy: str,
        normalize: bool,
        prompts: Mapping[str, str] | None,
        include_prompt: bool | None,
        batch_size: int | None,
        max_batch_tokens: int | None,
        layer_weights: Sequence[float] | None = None,
        layer_scale: float = 1.0,
    ) -> None:
        self.model = encoder
        self.encoder = encoder
        self.strategy = strategy
        self.normalize = normalize
        self.model_prompts = dict(prompts) if prompts else None
        self.include_prompt = include_prompt
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.layer_weights = list(layer_weights) if layer_weights is not None else None
        self.layer_scale = layer_scale
        self.shared: SharedPass | None = None
        self.texts_encoded = 0

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        prompt = self.prompt_for(task_metadata, prompt_type)
        if self.shared is not None:
            return self.shared.rows(self.strategy, texts, prompt)
        self.texts_encoded += len(texts)
        return self.encode_texts(texts, [self.strategy], prompt)[self.strategy]

    def prompt_for(self, task_metadata: Any, prompt_type: Any) -> str | None:
        """The prompt MTEB's rules pick for the task and input kind (task name with query or
        document, task name, task type, query or document), or None."""
        name = get_prompt_name(self.model_prompts, task_metadata, prompt_type)
        return self.model_prompts.get(name) if self.model_prompts and name else None

    def encode_texts(
        self, texts: list[str], strategies: Sequence[str], prompt: str | None
    ) -> dict[str, np.ndarray]:
        """Every strategy's rows of ``texts`` from one forward pass per batch."""
        limits: dict[str, Any] = {"batch_size": self.batch_size}
        if self.max_batch_tokens is not None:
            limits["max_batch_tokens"] = self.max_batch_tokens
        rows = self.encoder.encode(
            texts,
            list(strategies),
            **limits,
            normalize=self.normalize,
            prompt=prompt,
            include_prompt=self.include_prompt,
            layer_weights=self.layer_weights,
            layer_scale=self.layer_scale,
            progress=False,
        )
        return {strategy: np.asarray(rows[strategy], np.float32) for strategy in strategies}

    def variant(self, strategy: str) -> HiddenpoolModel:
        """The same loaded model and options under another strategy, with its own
        ``ModelMeta`` (experiment ``strategy_...``); nothing is reloaded."""
        meta = self.mteb_model_meta
        if meta is None:
            raise ValueError("model: has no mteb_model_meta; make it with hiddenpool.mteb.model")
        base = {k: v for k, v in (meta.experiment_kwargs or {}).items() if k != "strategy"}
        width = _width(self.encoder, strategy)
        base_meta = meta.model_copy(update={"experiment_kwargs": base or None, "embed_dim": width})
        variant = base_meta.load_model(strategy=strategy)
        assert isinstance(variant, HiddenpoolModel)
        return variant


def model(
    model: str | os.PathLike[str] | None = None,
    strategy: str = "model",
    *,
    backend: str = "auto",
    precision: str | None = None,
    prompts: Mapping[str, str] | None = None,
    include_prompt: bool | None = None,
    normalize: bool = False,
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
    max_length: int | None = None,
    layer_weights: Sequence[float] | None = None,
    layer_scale: float = 1.0,
    name: str | None = None,
    encoder: Encoder | None = None,
) -> HiddenpoolModel:
    """Loads ``model`` (a folder, a name in the local Hugging Face cache, or None for the
    default all-MiniLM-L6-v2) with ``Encoder.from_pretrained`` and wraps it for
    ``mteb.evaluate``, pooling with ``strategy`` (a strategy string; ``"model"`` is the
    model's own pipeline). ``prompts`` maps MTEB's prompt keys (``"query"``,
    ``"document"``, a task type, a task name, ``"TaskName-query"``) to the text put before
    each input; without it the model's sentence-transformers ``prompts`` are used.
    ``include_prompt=False`` leaves the prompt's tokens out of pooling. ``normalize`` scales
    rows to unit length (cosine scores do not change; classifiers and k-means do).
    ``layer_weights`` and ``layer_scale`` run ``:weighted`` strategies (``Encoder.encode``'s).
    ``encoder`` wraps an already loaded Encoder instead of loading ``model``.

    The ``ModelMeta`` (``.mteb_model_meta``) holds the name (``name``, else the model id or
    the folder's name), a revision (the folder's content hash, so a changed folder is a new
    revision), the width, max tokens, parameter count (torch), framework, cosine similarity
    (the model's ``similarity_fn_name`` where its config gives one), and experiment arguments
    ``strategy``, ``backend`` and ``precision`` (``normalize`` and ``prompts`` when set).

    >>> import mteb, hiddenpool.mteb  # doctest: +SKIP
    >>> minilm = hiddenpool.mteb.model(strategy="mean@last")  # doctest: +SKIP
    >>> mteb.evaluate(minilm, mteb.get_tasks(["STSBenchmark"]))  # doctest: +SKIP
    """
    from hiddenpool.encoder import Encoder, default_model_path

    _check_options(strategy, prompts, include_prompt, normalize)
    path = os.fspath(model) if model is not None else default_model_path()
    if encoder is None:
        encoder = Encoder.from_pretrained(
            path,
            backend=cast(Any, backend),
            precision=cast(Any, precision),
            max_length=max_length,
        )
    folder = path if os.path.isdir(path) else None
    config = _st_config(folder)
    if prompts is None:
        prompts = _config_prompts(config)
    encoder.check([strategy], layer_weights=layer_weights)
    options = {
        "prompts": dict(prompts) if prompts else None,
        "include_prompt": include_prompt,
        "normalize": normalize,
        "batch_size": batch_size,
        "max_batch_tokens": max_batch_tokens,
        "layer_weights": layer_weights,
        "layer_scale": layer_scale,
    }
    experiment: dict[str, Any] = {"backend": encoder.backend, "precision": encoder.precision}
    if normalize:
        experiment["normalize"] = True
    if prompts and config.get("prompts") != prompts:
        experiment["prompts"] = dict(prompts)
    if include_prompt is not None:
        experiment["include_prompt"] = include_prompt
    if layer_weights is not None:
        experiment["layer_weights"] = [float(weight) for weight in layer_weights]
        experiment["layer_scale"] = float(layer_scale)
    meta = ModelMeta.create_empty(
        {
            "loader": _Loader(encoder, options),
            "name": name or _model_name(model, path),
            "revision": _revision(folder),
            "max_tokens": float(encoder.max_length),
            "n_parameters": _parameter_count(encoder),
            "framework": _FRAMEWORKS.get(encoder.backend, ["PyTorch"]),
            "similarity_fn_name": _similarity(config),
            "open_weights": True,
            "experiment_kwargs": experiment,
            "embed_dim": _width(encoder, strategy),
        }
    )
    loaded = meta.load_model(strategy=strategy)
    assert isinstance(loaded, HiddenpoolModel)
    return loaded


class _Loader:
    """MTEB's loader (``loader(name, revision=..., **experiment)``) over the loaded encoder.
    ``ModelMeta.load_model`` deep-copies its meta, loader included: this loader copies as
    itself, so every strategy shares the one loaded model instead of a copy each."""

    __name__ = "hiddenpool.mteb.model"

    def __init__(self, encoder: Encoder, options: dict[str, Any]) -> None:
        self.encoder, self.options = encoder, options

    def __deepcopy__(self, memo: dict[int, Any]) -> _Loader:
        return self

    def __call__(
        self, name: str, revision: str | None = None, *, strategy: str = "model", **_: Any
    ) -> HiddenpoolModel:
        # The other experiment arguments (backend, precision, ...) describe the encoder.
        return HiddenpoolModel(self.encoder, strategy=strategy, **self.options)


def _check_options(
    strategy: str, prompts: Mapping[str, str] | None, include_prompt: bool | None, normalize: bool
) -> None:
    from hiddenpool.strategy import Strategy

    if not isinstance(strategy, str):
        raise TypeError(f"strategy: expected a strategy string, got {type(strategy).__name__}")
    if strategy != "model":
        Strategy.parse(strategy)
    if prompts is not None:
        if not isinstance(prompts, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
        ):
            raise TypeError('prompts: expected a dict of str to str, as {"query": "query: "}')
        unknown = [key for key in prompts if not _is_prompt_key(key)]
        if unknown:
            raise ValueError(
                f"prompts: {unknown[0]!r} is not a key MTEB looks up; give query, document, a "
                "task type (STS, Retrieval, ...), a task name, or TaskName-query / "
                "TaskName-document"
            )
    for flag, value in (("include_prompt", include_prompt), ("normalize", normalize)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{flag}: expected True or False, got {value!r}")


def _st_config(folder: str | None) -> dict[str, Any]:
    path = os.path.join(folder, "config_sentence_transformers.json") if folder else ""
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _config_prompts(config: Mapping[str, Any]) -> dict[str, str] | None:
    """The model's own prompts, under MTEB's keys (sentence-transformers' ``passage`` is
    MTEB's ``document``); empty prompts dropped."""
    prompts = config.get("prompts")
    if not isinstance(prompts, dict):
        return None
    given = {k: v for k, v in prompts.items() if isinstance(k, str) and isinstance(v, str) and v}
    if "passage" in given and "document" not in given:
        given["document"] = given.pop("passage")
    valid = {key: value for key, value in given.items() if _is_prompt_key(key)}
    return valid or None


@functools.cache
def _prompt_names() -> frozenset[str]:
    from typing import get_args

    import mteb
    from mteb.abstasks.task_metadata import TaskType

    tasks = {task.metadata.name for task in mteb.get_tasks(exclude_superseded=False)}
    return frozenset(tasks | set(get_args(TaskType)))


def _is_prompt_key(key: str) -> bool:
    """A key MTEB's prompt lookup can match: query, document, a task type or task name,
    either of the last two with -query or -document (local tasks' names are allowed as
    any unknown name followed by those suffixes)."""
    if key in ("query", "document") or key in _prompt_names():
        return True
    stem, _, kind = key.rpartition("-")
    return bool(stem) and kind in ("query", "document")


def _similarity(config: Mapping[str, Any]) -> Any:
    named = config.get("similarity_fn_name")
    if named == "dot":
        return ScoringFunction.DOT_PRODUCT
    return ScoringFunction.COSINE


def _model_name(given: str | os.PathLike[str] | None, path: str) -> str:
    """``org/name`` as MTEB keys results: the model id as given, or the folder's last two
    parts (``hiddenpool/<folder>`` for a folder at the top); the default model's id."""
    if given is None:
        return "sentence-transformers/all-MiniLM-L6-v2"
    text = os.fspath(given)
    if not os.path.isdir(text) and text.count("/") == 1:
        return text
    parts = os.path.normpath(os.path.abspath(text)).split(os.sep)
    return f"hiddenpool/{parts[-1]}"


def _revision(folder: str | None) -> str:
    """A content hash of the folder's files (names, sizes, bytes), so results of a changed
    folder never mix with the old ones; the package version where there is no folder."""
    if folder is None:
        return f"hiddenpool-{__version__}"
    digest = hashlib.sha256()
    for root, directories, files in os.walk(folder):
        directories.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            digest.update(f"{os.path.relpath(path, folder)}\0{size}\0".encode())
            with open(path, "rb") as handle:
                if size <= _WHOLE_HASH_LIMIT:
                    digest.update(handle.read())
                else:
                    digest.update(handle.read(1 << 20))
                    handle.seek(-(1 << 20), os.SEEK_END)
                    digest.update(handle.read())
    return digest.hexdigest()[:16]


def _parameter_count(encoder: Encoder) -> int | None:
    torch_model = encoder.model
    if torch_model is None:
        return None
    return int(sum(parameter.numel() for parameter in torch_model.parameters()))


def _width(encoder: Encoder, strategy: str) -> int:
    return int(encoder.encode([], strategy).shape[1])
