"""Reads a valgrind log of the Python smoke run and fails on any error whose stack passes
through hiddenpool's extension. Errors entirely inside CPython, numpy or libc (valgrind
flags some of CPython's start-up code) are counted and reported, not failed on.

    python scripts/valgrind_report.py build/valgrind-python.log
"""

import re
import sys


def main(path: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    blocks = [
        block
        for block in re.split(r"\n==\d+== \n", text)
        if re.search(
            r"==\d+== (Invalid|Conditional|Use of|Mismatched|Source and destination|Syscall param)",
            block,
        )
    ]
    ours = [block for block in blocks if "_native" in block or "hiddenpool" in block]
    print(f"valgrind: {len(blocks)} error contexts outside hiddenpool, {len(ours)} in hiddenpool")
    for block in ours:
        print(block)
    if "valgrind smoke run finished" not in text and "ERROR SUMMARY" not in text:
        print("valgrind: the log does not show a finished run")
        return 1
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
