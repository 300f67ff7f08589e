"""Which runtime and precision to deploy, measured on this machine (``hiddenpool bench
--tiers``): each tier this install and CPU can run encodes the same packaged sentences,
timed for sentences per second, and its rows are compared with fp32's by cosine.

Which tier wins depends on the CPU: on the 2-core development machine (AVX512_BF16, no
AMX) static int8 ran 2.7-3.0x fp32; on a Xeon with AMX bf16 beat it at fp32's quality
(BENCHMARKS.md "Precision tiers"). A user cannot know without measuring, so this measures.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hiddenpool.encoder import Encoder, default_model_path
from hiddenpool.pipelines import normalize_rows

# The cosine bounds the picks use: fp32 tiers agree to ~1e-7 (exact up to summation
# order); bf16 kept 0.99999 on MiniLM; the int8 tiers are tested at 0.98 (tests/test_onnx.py).
FP32_QUALITY = 0.9999
INT8_BOUND = 0.98


@dataclass(frozen=True)
class Tier:
    """One way to run a model: a name for people, the ``Encoder.from_pretrained``
    arguments, and how to ask for it on the command line."""

    name: str
    backend: str
    precision: str
    quantize: str | None = None
    how: str = ""

    @property
    def exact(self) -> bool:
        return self.precision == "fp32"


@dataclass
class TierResult:
    tier: Tier
    sentences_per_second: float | None = None
    worst_cosine: float | None = None  # against the reference tier's rows
    load_seconds: float = 0.0  # loading, and exporting into the cache on a first run
    skipped: str | None = None  # why it did not run


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cpu_has_bf16() -> bool:
    from hiddenpool.runners.openvino_runner import BF16_FEATURES, cpu_flags

    return any(feature in cpu_flags() for feature in BF16_FEATURES)


def tiers_for(model: str) -> list[tuple[Tier, str | None]]:
    """The tiers of ``model`` (a transformers folder or an ONNX folder), each with the
    reason it cannot run here, or None where it can."""
    from hiddenpool.runners.onnx_runner import MANIFEST, is_onnx_folder, read_manifest

    onnx_folder = os.path.isdir(model) and is_onnx_folder(model)
    weights = "float32"
    if onnx_folder and os.path.isfile(os.path.join(model, MANIFEST)):
        weights = read_manifest(model).weights
    exporting = [] if onnx_folder else ["torch", "transformers", "onnx"]

    def missing(*modules: str) -> str | None:
        absent = [module for module in (*exporting, *modules) if not _installed(module)]
        return f"needs {', '.join(absent)} (not installed)" if absent else None

    no_bf16 = None if _cpu_has_bf16() else "this CPU has neither AVX512_BF16 nor AMX"
    found: list[tuple[Tier, str | None]] = []
    if not onnx_folder:
        torch_missing = [m for m in ("torch", "transformers") if not _installed(m)]
        reason = f"needs {', '.join(torch_missing)} (not installed)" if torch_missing else None
        found.append((Tier("torch fp32", "torch", "fp32", how="--backend torch"), reason))
    if weights == "float32":
        found += [
            (Tier("ONNX Runtime fp32", "onnx", "fp32", how="--backend onnx"),
             missing("onnxruntime")),
            (Tier("OpenVINO fp32", "openvino", "fp32", how="--backend openvino"),
             missing("openvino")),
            (Tier("OpenVINO bf16", "openvino", "bf16", how="--precision bf16"),
             missing("openvino") or no_bf16),
        ]  # fmt: skip
    if weights == "int8" or not onnx_folder:
        how = "--precision int8" if not onnx_folder else "(the folder's weights)"
        found.append(
            (Tier("ONNX Runtime int8 (dynamic)", "onnx", "int8", how=how), missing("onnxruntime"))
        )
    if weights == "int8-static" or not onnx_folder:
        quantize = None if onnx_folder else "int8-static"
        how = "export --quantize int8-static" if not onnx_folder else "(the folder's weights)"
        needs = ("openvino",) if onnx_folder else ("openvino", "nncf")
        found.append(
            (Tier("OpenVINO int8 (static)", "openvino", "int8", quantize, how), missing(*needs))
        )
    return found


def _load(model: str, tier: Tier) -> Encoder:
    from hiddenpool.runners.onnx_runner import is_onnx_folder

    backend: Any = tier.backend
    if tier.quantize is not None:  # a transformers folder: its static export, cached
        return Encoder.from_pretrained(model, backend=backend, quantize=tier.quantize)  # type: ignore[arg-type]
    if tier.precision == "int8" and os.path.isdir(model) and is_onnx_folder(model):
        return Encoder.from_pretrained(model, backend=backend)  # the folder's own weights
    precision: Any = tier.precision
    return Encoder.from_pretrained(model, backend=backend, precision=precision)


def sample_texts() -> list[str]:
    """The distinct sentences of the pairs shipped with hiddenpool (not the calibration
    texts, which static int8 was fitted on)."""
    from hiddenpool.evaluation.evaluate import default_data_path, read_pairs

    pairs = read_pairs(default_data_path())
    return list(dict.fromkeys([*pairs.first, *pairs.second]))


def measure(
    model: str | None = None,
    *,
    texts: Sequence[str] | None = None,
    seconds: float = 2.0,
    on_tier: Callable[[TierResult], None] | None = None,
) -> list[TierResult]:
    """Every tier of ``model`` (default: the embedded default model) on ``texts`` (default:
    ``sample_texts()``): each encodes them once untimed (loading, warm-up, the rows for
    the cosine), then again for at least ``seconds`` and twice, timed. The reference rows
    are the first exact tier's; ``on_tier`` sees each result as it is made."""
    path = default_model_path() if model is None else os.fspath(model)
    sentences = list(texts) if texts is not None else sample_texts()
    if not sentences:
        raise ValueError("texts: empty; give at least one text")
    reference: np.ndarray | None = None
    results = []
    for tier, reason in tiers_for(path):
        result = TierResult(tier, skipped=reason)
        if reason is None:
            reference = _run(path, tier, sentences, seconds, result, reference)
        results.append(result)
        if on_tier is not None:
            on_tier(result)
    return results


def _run(
    path: str,
    tier: Tier,
    sentences: list[str],
    seconds: float,
    result: TierResult,
    reference: np.ndarray | None,
) -> np.ndarray | None:
    """Measures one tier into ``result``; returns the reference rows (these, for the first
    exact tier)."""
    started = time.perf_counter()
    try:
        encoder = _load(path, tier)
        rows = normalize_rows(encoder.encode(sentences, "mean@last"))
    except (ValueError, ImportError, OSError, RuntimeError) as error:
        result.skipped = f"failed: {str(error).splitlines()[0][:160]}"
        return reference
    result.load_seconds = time.perf_counter() - started
    passes, elapsed = 0, 0.0
    while passes < 2 or elapsed < seconds:
        began = time.perf_counter()
        encoder.encode(sentences, "mean@last")
        elapsed += time.perf_counter() - began
        passes += 1
    result.sentences_per_second = passes * len(sentences) / elapsed
    if reference is None and tier.exact:
        reference = rows
    if reference is not None:
        result.worst_cosine = float(np.min(np.sum(reference * rows, axis=1)))
    return reference


def picks(results: Sequence[TierResult]) -> dict[str, TierResult | None]:
    """The fastest tier for each need: ``exact`` (fp32), ``fp32 quality`` (worst cosine at
    least ``FP32_QUALITY``) and ``int8 bound`` (at least ``INT8_BOUND``)."""
    ran = [r for r in results if r.sentences_per_second is not None]

    def fastest(candidates: list[TierResult]) -> TierResult | None:
        return max(candidates, key=lambda r: r.sentences_per_second or 0.0, default=None)

    def within(bound: float) -> list[TierResult]:
        return [r for r in ran if r.worst_cosine is not None and r.worst_cosine >= bound]

    return {
        "exact": fastest([r for r in ran if r.tier.exact]),
        "fp32 quality": fastest(within(FP32_QUALITY)),
        "int8 bound": fastest(within(INT8_BOUND)),
    }


def cpu_name() -> str:
    """The CPU's model name as Linux gives it, else the platform's word for it."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def table(results: Sequence[TierResult]) -> str:
    """The tiers as a table a person reads: sentences/s, the ratio to the exact tier that
    ran fastest, the worst cosine against the reference, how to ask for it."""
    exact = [r.sentences_per_second for r in results if r.tier.exact and r.sentences_per_second]
    base = max(exact, default=None)
    lines = [
        f"{'tier':<28} {'sentences/s':>11} {'x fp32':>7} {'worst cosine':>13}  how",
    ]
    for result in results:
        if result.sentences_per_second is None:
            continue
        ratio = f"{result.sentences_per_second / base:.2f}" if base else "-"
        cosine = f"{result.worst_cosine:.6f}" if result.worst_cosine is not None else "-"
        lines.append(
            f"{result.tier.name:<28} {result.sentences_per_second:>11,.0f} {ratio:>7} "
            f"{cosine:>13}  {result.tier.how}"
        )
    for result in results:
        if result.skipped is not None:
            lines.append(f"not run: {result.tier.name}: {result.skipped}")
    return "\n".join(lines)


def pick_lines(results: Sequence[TierResult]) -> list[str]:
    """One line per need naming the tier to deploy (or why none qualifies)."""
    words = {
        "exact": "exact rows (fp32)",
        "fp32 quality": f"fp32 quality (worst cosine >= {FP32_QUALITY})",
        "int8 bound": f"fastest within the int8 bound (worst cosine >= {INT8_BOUND})",
    }
    lines = []
    for need, result in picks(results).items():
        chosen = "none ran" if result is None else f"{result.tier.name} ({result.tier.how})"
        lines.append(f"pick for {words[need]}: {chosen}")
    return lines


def describe(model: str | None, threads: int, count: int) -> str:
    """The header: what ran where."""
    name = model or "all-MiniLM-L6-v2 (the default model)"
    return f"tiers of {name} on {cpu_name()}, {threads} threads, {count} packaged sentences"
