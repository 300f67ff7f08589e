"""The JSON-lines reader shared by the corpus reader and the evaluation data readers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


class DataError(ValueError):
    """A data file that cannot be read as asked: the message names the file and line."""


def read_json_lines(path: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON-lines file; a line that is
    not JSON raises DataError naming file and line.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "rows.jsonl")
    >>> _ = open(path, "w").write('{"text": "a"}\\n\\n[1, 2]\\n')
    >>> list(read_json_lines(path))
    [(1, {'text': 'a'}), (3, [1, 2])]
    """
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
