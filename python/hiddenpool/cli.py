"""Command line: ``hiddenpool demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(_: argparse.Namespace) -> int:
    import numpy as np

    import hiddenpool

    rng = np.random.default_rng(0)
    states = [rng.standard_normal((4, 16, 8)).astype(np.float32) for _ in range(7)]
    mask = np.zeros((4, 16), dtype=np.int64)
    for row, length in enumerate([16, 9, 3, 12]):
        mask[row, 16 - length :] = 1  # left padding
    strategies = ["mean@last", "cls@last", "max@last", "mean@last4:sum", "mean+max@-2"]
    results = hiddenpool.pool(states, mask, strategies)
    print(f"hidden states: {len(states)} x {list(states[0].shape)} float32, left-padded mask")
    for strategy, result in results.items():
        print(f"  {strategy:<16} -> {list(result.shape)}  row 0: {np.round(result[0, :3], 4)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hiddenpool", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo", help="pool random hidden states with a few strategies"
    ).set_defaults(run=_demo)
    arguments = parser.parse_args(argv)
    result: int = arguments.run(arguments)
    return result


if __name__ == "__main__":
    sys.exit(main())
