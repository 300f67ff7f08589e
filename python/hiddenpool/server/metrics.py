"""The server's metrics in Prometheus' text format (version 0.0.4), kept by hand: counters,
gauges and histograms with fixed buckets, each safe to update from any thread."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence


class Counter:
    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        if not labels:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, *label_values: str) -> None:
        with self._lock:
            self._values[label_values] = self._values.get(label_values, 0.0) + amount

    def value(self, *label_values: str) -> float:
        with self._lock:
            return self._values.get(label_values, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            for values, number in sorted(self._values.items()):
                lines.append(f"{self.name}{_labels(self.labels, values)} {_number(number)}")
        return lines


class Gauge:
    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def value(self) -> float:
        return self._value

    def render(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {_number(self._value)}",
        ]


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.buckets = sorted(buckets)
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._count = 0
        self._max = 0.0
        # Reentrant: the collector's pauses are observed from a gc callback, which can run
        # on a thread that is inside this histogram already (an allocation in render).
        self._lock = threading.RLock()

    def observe(self, value: float) -> None:
        with self._lock:
            index = 0
            while index < len(self.buckets) and value > self.buckets[index]:
                index += 1
            self._counts[index] += 1
            self._sum += value
            self._count += 1
            self._max = max(self._max, value)

    @property
    def count(self) -> int:
        return self._count

    @property
    def maximum(self) -> float:
        return self._max

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            running = 0
            for bound, count in zip(self.buckets, self._counts, strict=False):
                running += count
                lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
            lines.append(f'{self.name}_bucket{{le="+Inf"}} {self._count}')
            lines.append(f"{self.name}_sum {_number(self._sum)}")
            lines.append(f"{self.name}_count {self._count}")
        return lines


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "}"


_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Every metric ``/metrics`` shows."""

    def __init__(self) -> None:
        self.requests = Counter(
            "hiddenpool_requests_total",
            "requests answered, by route and status",
            ("route", "status"),
        )
        self.queue_texts = Gauge("hiddenpool_queue_texts", "texts waiting for a forward pass")
        self.requests_in_flight = Gauge(
            "hiddenpool_requests_in_flight",
            "embedding requests accepted and not yet answered (--max-concurrent-requests caps it)",
        )
        self.batch_texts = Histogram(
            "hiddenpool_batch_texts", "texts per forward pass", (1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.batch_tokens = Histogram(
            "hiddenpool_batch_tokens",
            "padded tokens per forward pass",
            (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
        )
        self.forward_texts = Counter(
            "hiddenpool_forward_texts_total", "texts that went through the model"
        )
        self.cancelled_texts = Counter(
            "hiddenpool_cancelled_texts_total",
            "queued texts dropped without a forward pass (client gone, deadline passed)",
        )
        self.batch_failures = Counter(
            "hiddenpool_batch_failures_total", "forward passes that raised"
        )
        self.truncated_texts = Counter(
            "hiddenpool_truncated_texts_total", "texts cut to the model's max_length"
        )
        self.queue_seconds = Histogram(
            "hiddenpool_queue_seconds", "seconds from queued to the first batch", _SECONDS
        )
        self.inference_seconds = Histogram(
            "hiddenpool_inference_seconds", "seconds per forward pass", _SECONDS
        )
        self.collector_pause_seconds = Histogram(
            "hiddenpool_collector_pause_seconds",
            "seconds per collection of Python's cyclic garbage collector, while serving "
            "(the thread it runs on, often the event loop's, waits that long)",
            (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )

    def render(self) -> str:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.requests_in_flight,
            self.queue_texts,
            self.batch_texts,
            self.batch_tokens,
            self.forward_texts,
            self.cancelled_texts,
            self.batch_failures,
            self.truncated_texts,
            self.queue_seconds,
            self.inference_seconds,
            self.collector_pause_seconds,
        ):
            lines += metric.render()
        return "\n".join(lines) + "\n"


def labelled(text: str, name: str, value: str) -> str:
    """Prometheus text with ``name="value"`` added to every sample (a replica's label).

    >>> print(labelled('# TYPE a counter\\na{route="/x"} 1\\nb 2\\n', "replica", "r1"), end="")
    # TYPE a counter
    a{route="/x",replica="r1"} 1
    b{replica="r1"} 2
    """
    pair = _labels((name,), (value,))[1:-1]
    out: list[str] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            out.append(line)
            continue
        metric, _, number = line.rpartition(" ")
        grown = f"{metric[:-1]},{pair}}}" if metric.endswith("}") else f"{metric}{{{pair}}}"
        out.append(f"{grown} {number}")
    return "\n".join(out) + "\n"


def merge(texts: Sequence[str]) -> str:
    """Several renders of the same metrics (one per replica, labelled apart) as one
    exposition: each family's HELP and TYPE once, then every render's samples of it."""
    order: list[str] = []
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ")[2]
                if family not in heads:
                    order.append(family)
                    heads[family], samples[family] = [], []
                if len(heads[family]) < 2 and line not in heads[family]:
                    heads[family].append(line)
            elif line:
                samples.setdefault(family, []).append(line)
    lines = [line for family in order for line in heads[family] + samples[family]]
    return "\n".join(lines) + "\n"
