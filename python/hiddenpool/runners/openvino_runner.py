"""Hidden states from an ONNX folder on OpenVINO's CPU plugin: ``openvino``, the
``tokenizers`` package and numpy only (neither torch, transformers nor onnxruntime).

It reads the same folders as the ONNX runner (``hiddenpool export``'s, and foreign
``model.onnx`` folders), compiles one model per set of hidden states asked for (so a
strategy on the last layer copies out nothing else), and always sets its precision:
OpenVINO on a CPU with bf16 computes in bf16 unless told otherwise, which made its "fp32"
differ from ONNX Runtime by 8.6e-3 here (issue "Precision tiers"); with
``INFERENCE_PRECISION_HINT`` f32 the difference is 1.6e-6.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hiddenpool import _native
from hiddenpool.runners.onnx_runner import GraphRunner

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
# CPU features that run bf16 matrix products natively (/proc/cpuinfo flag names).
BF16_FEATURES = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def check_precision(precision: str, flags: frozenset[str] | None = None) -> None:
    """A ValueError naming what is missing when this CPU cannot run ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16":
        present = cpu_flags() if flags is None else flags
        if not any(feature in present for feature in BF16_FEATURES):
            raise ValueError(
                "precision: bf16 needs a CPU with AVX512_BF16 or AMX (AMX-BF16); this one has "
                "neither, so bf16 would be emulated and slower than fp32; use precision='fp32'"
            )


class OpenVinoRunner(GraphRunner):
    """Runs an ONNX folder on OpenVINO's CPU plugin at ``precision`` ("fp32", exact to
    ONNX Runtime within 1e-5; "bf16" where the CPU has AVX512_BF16 or AMX), with
    ``hiddenpool.get_num_threads()`` threads (recompiled when that changes)."""

    backend = "openvino"
    runtime = "OpenVINO"

    def __init__(
        self,
        folder: str,
        *,
        max_length: int | None = None,
        project: bool = False,
        precision: str = "fp32",
    ):
        try:
            import openvino
        except ImportError as error:
            raise ImportError(
                f"the OpenVINO runner needs openvino and tokenizers ({error.name} is missing): "
                'pip install ".[openvino]" in a hiddenpool checkout'
            ) from None
        check_precision(precision)
        self.precision = precision
        self._core = openvino.Core()
        self._model: Any = None
        self._compiled: dict[tuple[str, ...], Any] = {}
        self._threads = 0
        super().__init__(folder, max_length=max_length, project=project)

    def _open(self) -> None:
        self._model = self._core.read_model(self.graph_path)

    def _graph_inputs(self) -> dict[str, str]:
        types = {}
        for port in self._model.inputs:
            kind = str(port.get_element_type())
            types[port.get_any_name()] = "tensor(int32)" if "i32" in kind else "tensor(int64)"
        return types

    def _graph_outputs(self) -> list[str]:
        return [port.get_any_name() for port in self._model.outputs]

    def _compiled_for(self, names: list[str]) -> Any:
        """The model reduced to ``names``' outputs, compiled at the runner's precision and
        thread count (kept per set of names)."""
        import openvino

        threads = _native.get_num_threads()
        if threads != self._threads:
            self._compiled.clear()
            self._threads = threads
        key = tuple(names)
        compiled = self._compiled.get(key)
        if compiled is None:
            outputs = [self._model.output(name) for name in names]
            model = openvino.Model(outputs, self._model.get_parameters(), "hiddenpool")
            config = {
                "INFERENCE_PRECISION_HINT": PRECISIONS[self.precision],
                "INFERENCE_NUM_THREADS": threads,
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
            }
            compiled = self._core.compile_model(model, "CPU", config)
            self._compiled[key] = compiled
        return compiled

    def _compute(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        compiled = self._compiled_for(names)
        results = compiled(feed)
        return [np.array(results[compiled.output(index)]) for index in range(len(names))]
