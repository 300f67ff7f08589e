"""The comparison report: the tables ``hiddenpool compare`` prints and the charts it
draws, usable from Python on the results of ``evaluate.compare`` and
``retrieval.compare_retrieval``.

>>> print(percent(0.8203))
   82.03
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from hiddenpool.evaluation import retrieval
from hiddenpool.io import corpus
from hiddenpool.strategy import Strategy


def sweep_grid(results: Sequence[Any]) -> str:
    """Spearman by hidden state (rows) and pool (columns); '*' the best, '=' tied with it."""
    cells: dict[tuple[int, str], Any] = {}
    for result in results:
        parsed = Strategy.parse(result.strategy)
        cells[(int(parsed.layers[0]), result.strategy.split("@")[0])] = result
    present = {pool for _, pool in cells}
    pools: list[str] = [pool for pool in ("mean", "max", "cls", "eos") if pool in present]
    pools += sorted(present - set(pools))
    best = max(
        results, key=lambda result: result.spearman if result.spearman == result.spearman else -2
    )
    lines = [
        "Spearman x 100 by hidden state (0 = embedding output, i = after layer i) and pool; "
        "* best, = tied with it",
        f"{'state':>5}" + "".join(f"  {pool:>9}" for pool in pools),
    ]
    for state in sorted({state for state, _ in cells}):
        row = f"{state:>5}"
        for pool in pools:
            result = cells.get((state, pool))
            if result is None:
                row += f"  {'':>9}"
                continue
            mark = "*" if result is best else ("=" if result.tied_with_best else " ")
            row += f"  {percent(result.spearman, 8)}{mark}"
        lines.append(row)
    return "\n".join(lines)


def average_table(average: list[dict[str, Any]], paths: Sequence[str]) -> str:
    width = max(len("strategy"), *(len(row["strategy"]) for row in average))
    names = [os.path.basename(path)[:12] for path in paths]
    lines = [
        f"{'rank':>4}  {'strategy':<{width}}  {'mean':>8}" + "".join(f"  {n:>12}" for n in names)
    ]
    for position, row in enumerate(average, start=1):
        values = "".join(
            f"  {percent(float('nan') if v is None else v, 12)}" for v in row["spearman"]
        )
        mean = row["mean_spearman"]
        lines.append(
            f"{position:>4}  {row['strategy']:<{width}}  "
            f"{percent(float('nan') if mean is None else mean)}{values}"
        )
    return "\n".join(lines)


def percent(value: float, width: int = 8) -> str:
    return f"{value * 100:>{width}.2f}" if value == value else f"{'n/a':>{width}}"


def similarity_table(comparison: Any) -> str:
    """The ranking; with bootstrap intervals, a column with each 95% interval, the paired
    p-value against the best and '=' where the two cannot be told apart (p >= 0.05)."""
    width = max(len("strategy"), *(len(result.strategy) for result in comparison.results))
    intervals = comparison.resamples > 0
    head = f"{'rank':>4}  {'strategy':<{width}}  {'dim':>5}  {'Spearman':>8}"
    if intervals:
        head += f"  {'95% interval':>15}  {'p vs best':>9}   "
    lines = [head + f"  {'Pearson':>8}  {'seconds':>8}"]
    for position, result in enumerate(comparison.results, start=1):
        line = f"{position:>4}  {result.strategy:<{width}}  {result.dim:>5}  "
        line += percent(result.spearman)
        if intervals:
            interval = f"{percent(result.ci_low, 6).strip()}-{percent(result.ci_high, 6).strip()}"
            p_value = f"{result.p_vs_best:.3f}" if result.p_vs_best == result.p_vs_best else "n/a"
            line += f"  {interval:>15}  {p_value:>9} {'=' if result.tied_with_best else ' ':>2}"
        lines.append(line + f"  {percent(result.pearson)}  {result.seconds:>8.3f}")
    if intervals:
        lines.append(
            f"\n95% intervals: {comparison.resamples} bootstrap resamples of the pairs (seed "
            f"{comparison.seed}); '=' marks strategies the paired test cannot tell from the "
            "best (p >= 0.05)"
        )
    lines += [gain_line(result) for result in comparison.results if result.fitted]
    return "\n".join(lines)


def gain_line(result: Any, metric: str = "Spearman") -> str:
    """What a fitted mix gains over the best fixed strategy, and whether the paired
    interval of that gain (same resamples) leaves out zero."""
    gain = f"{result.gain * 100:+.2f}" if result.gain == result.gain else "n/a"
    text = (
        f"{result.strategy} against the best fixed strategy, {result.reference}: {gain} "
        f"{metric} points"
    )
    if result.gain_low != result.gain_low:
        return text + " (no interval: --bootstrap 0)"
    low, high = result.gain_low * 100, result.gain_high * 100
    verdict = (
        "larger than its interval: a real gain"
        if low > 0
        else "a real loss"
        if high < 0
        else "the interval includes 0: not shown to differ"
    )
    return text + f", 95% interval {low:+.2f} to {high:+.2f}: {verdict}"


def plot_formats() -> tuple[str, ...]:
    """File extensions matplotlib writes (png, pdf, svg, jpg, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    return tuple(f".{extension}" for extension in sorted(formats))


def plot_ranking(
    comparisons: Sequence[Any], average: list[dict[str, Any]] | None, path: str
) -> None:
    """Bars of Spearman per strategy (the mean over files when there are several), with the
    95% interval as an error bar; the axis starts at 0 and the title names the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if average is None:
        comparison = comparisons[0]
        rows = [(r.strategy, r.spearman, r.ci_low, r.ci_high) for r in reversed(comparison.results)]
        title = f"{comparison.model}\n{os.path.basename(comparison.data)}: {comparison.pairs} pairs"
    else:
        nan = float("nan")
        rows = [
            (
                row["strategy"],
                nan if row["mean_spearman"] is None else row["mean_spearman"],
                nan,
                nan,
            )
            for row in reversed(average)
        ]
        names = ", ".join(os.path.basename(c.data) for c in comparisons)
        title = f"{comparisons[0].model}\nmean over {len(comparisons)} files: {names}"
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    values = [value * 100 for _, value, _, _ in rows]
    errors = [
        [max(0.0, (value - low) * 100) if low == low else 0.0 for _, value, low, _ in rows],
        [max(0.0, (high - value) * 100) if high == high else 0.0 for _, value, _, high in rows],
    ]
    axes.barh([name for name, _, _, _ in rows], values, xerr=errors, color="#3b75af", capsize=3)
    for index, value in enumerate(values):
        axes.text(value, index, f" {value:.2f}", va="center")
    axes.set_xlabel("Spearman x 100 (cosine similarity vs gold scores; bars: 95% interval)")
    axes.set_title(title, fontsize=10)
    axes.set_xlim(0, 100)
    figure.tight_layout()
    save_figure(figure, path)


def plot_sweep(comparisons: Sequence[Any], path: str) -> None:
    """Spearman against hidden-state index, one line per pool, the 95% interval as a band
    (for several files: the mean, without bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, list[tuple[float, float, float]]]] = {}
    for comparison in comparisons:
        for result in comparison.results:
            pool = result.strategy.split("@")[0]
            state = int(Strategy.parse(result.strategy).layers[0])
            series.setdefault(pool, {}).setdefault(state, []).append(
                (result.spearman, result.ci_low, result.ci_high)
            )
    figure, axes = plt.subplots(figsize=(8, 4.5))
    order = [pool for pool in ("mean", "max", "cls", "eos") if pool in series]
    for pool in order + sorted(set(series) - set(order)):
        by_state = series[pool]
        states = sorted(by_state)
        means = np.array([np.mean([v[0] for v in by_state[s]]) for s in states]) * 100
        axes.plot(states, means, marker="o", label=pool)
        if len(comparisons) == 1:
            lows = np.array([by_state[s][0][1] for s in states]) * 100
            highs = np.array([by_state[s][0][2] for s in states]) * 100
            axes.fill_between(states, lows, highs, alpha=0.2)
    axes.set_xlabel("hidden state (0 = embedding output, i = after layer i)")
    axes.set_ylabel("Spearman x 100")
    names = ", ".join(os.path.basename(c.data) for c in comparisons)
    band = "band: 95% bootstrap interval" if len(comparisons) == 1 else "mean over the files"
    axes.set_title(f"{comparisons[0].model}\n{names} ({band})", fontsize=10)
    axes.set_xticks(sorted({s for by_state in series.values() for s in by_state}))
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def save_figure(figure: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    with corpus.atomic_path(path) as temporary:
        figure.savefig(temporary, format=os.path.splitext(path)[1][1:].lower(), dpi=120)
    plt.close(figure)


def retrieval_table(comparison: Any) -> str:
    """The retrieval ranking: each metric x 100, with the MRR interval and the paired
    p-value against the best where bootstrap resamples were drawn."""
    width = max(len("strategy"), *(len(r.strategy) for r in comparison.results))
    names = retrieval.METRICS
    lines = [
        f"{'rank':>4}  {'strategy':<{width}}  {'dim':>5}"
        + "".join(f"  {name:>9}" for name in names)
        + (f"  {'MRR 95% interval':>16}  {'p vs best':>9}" if comparison.resamples else "")
    ]
    for position, result in enumerate(comparison.results, start=1):
        line = f"{position:>4}  {result.strategy:<{width}}  {result.dim:>5}"
        line += "".join(f"  {percent(result.metrics[name], 9)}" for name in names)
        if comparison.resamples:
            interval = f"{percent(result.ci_low, 6).strip()}-{percent(result.ci_high, 6).strip()}"
            mark = "=" if result.tied_with_best else " "
            line += f"  {interval:>16}  {result.p_vs_best:>9.3f} {mark}"
        lines.append(line)
    lines += [gain_line(result, "MRR@10") for result in comparison.results if result.fitted]
    return (
        "\n".join(lines)
        + "\n"
        + (
            "\nx 100; ranked by MRR@10; cosine similarity, exact search"
            + (
                f"; 95% intervals over {comparison.resamples} bootstrap resamples of the queries "
                f"(seed {comparison.seed}); '=' tied with the best (p >= 0.05)"
                if comparison.resamples
                else ""
            )
        )
    )
