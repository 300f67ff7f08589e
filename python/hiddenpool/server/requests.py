"""Reading request bodies: strict JSON (no NaN or Infinity, bounded nesting, UTF-8 only)
and each route's fields, every problem a ``RequestError`` naming the field. Nothing here
touches the model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class RequestError(Exception):
    """A response other than 200: status, a one-line message naming the field, and
    OpenAI's error ``type`` and ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 429:
            return "rate_limit_error"
        if self.status >= 500:
            return "server_error"
        if self.status == 404:
            return "not_found_error"
        return "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# Integer literals longer than this are kept as their digit count: no field takes such a
# number, and int() of one past Python's limit (4,300 digits) raises inside json.loads,
# where no field can be named.
LONGEST_INTEGER = 40


class LongInteger(float):
    """An integer literal of more than ``LONGEST_INTEGER`` digits, as a number no field
    accepts; ``digits`` says how long it was for the error naming the field."""

    digits: int


def _integer(text: str) -> int | LongInteger:
    if len(text.lstrip("-")) <= LONGEST_INTEGER:
        return int(text)
    value = LongInteger("-inf" if text.startswith("-") else "inf")
    value.digits = len(text.lstrip("-"))
    return value


def _constant(name: str) -> Any:
    raise RequestError(400, f"body: {name} is not JSON (numbers must be finite)", "body")


def parse_json(body: bytes) -> Any:
    """The body as JSON, strictly: UTF-8, no NaN/Infinity literals, no lone surrogates."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(400, f"body: not UTF-8 ({error.reason})", "body") from None
    try:
        value = json.loads(text, parse_constant=_constant, parse_int=_integer)
    except RecursionError:
        raise RequestError(400, "body: JSON nested too deeply", "body") from None
    except json.JSONDecodeError as error:
        raise RequestError(
            400, f"body: not valid JSON ({error.msg} at character {error.pos})", "body"
        ) from None
    return value


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(422, f"body: expected a JSON object, got {_kind(value)}", "body")
    return value


def _fields(value: Any, known: tuple[str, ...], required: str) -> dict[str, Any]:
    """The body as an object holding only ``known`` fields (an unknown one is an error: a
    typo would otherwise pass silently) and the ``required`` one."""
    body = _object(value)
    unknown = [name for name in body if name not in known]
    if unknown:
        raise RequestError(
            422, f"{unknown[0]!r}: unknown field; known: {', '.join(known)}", unknown[0]
        )
    if required not in body:
        raise RequestError(422, f"{required}: required", required)
    return body


def _encoding(body: dict[str, Any], null_is_default: bool) -> str:
    """``encoding_format``: float (absent, or null where OpenAI's clients may send it) or
    base64."""
    encoding = body.get("encoding_format", "float")
    if encoding is None and null_is_default:
        return "float"
    if encoding not in ("float", "base64"):
        raise RequestError(
            422,
            f"encoding_format: expected 'float' or 'base64', got {encoding!r}",
            "encoding_format",
        )
    return str(encoding)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, LongInteger):
        return f"an integer of {value.digits} digits"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(422, f"{where}: expected a string, got {_kind(value)}", where)
    if not value:
        raise RequestError(422, f"{where}: is empty; give a non-empty string", where)
    # Lone surrogates (from \ud800 escapes) cannot be tokenized as UTF-8.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(
            422, f"{where}: holds a lone surrogate; not valid Unicode", where
        ) from None
    return value


def _int(value: Any, where: str, low: int = 1) -> int:
    if isinstance(value, LongInteger):
        raise RequestError(422, f"{where}: {_kind(value)} is out of range", where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(422, f"{where}: expected an integer, got {_kind(value)}", where)
    if value < low:
        raise RequestError(422, f"{where}: must be at least {low}, got {value}", where)
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(422, f"{where}: expected true or false, got {_kind(value)}", where)
    return value


Inputs = list[str] | list[list[int]]


def _inputs(value: Any, where: str, max_items: int, allow_ids: bool) -> Inputs:
    """A string or a list of strings; with ``allow_ids`` also a list of token ids or a list
    of such lists (OpenAI's four forms)."""
    if isinstance(value, str):
        return [_check_text(value, where)]
    if not isinstance(value, list):
        kinds = "a string, a list of strings or token ids" if allow_ids else "a string or a list"
        raise RequestError(422, f"{where}: expected {kinds}, got {_kind(value)}", where)
    if not value:
        raise RequestError(422, f"{where}: is an empty list; give at least one input", where)
    if len(value) > max_items:
        raise RequestError(
            413,
            f"{where}: {len(value)} inputs is more than this server's limit of {max_items} "
            "(--max-client-batch-size); split the request",
            where,
        )
    if allow_ids and all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return [_ids(value, where)]
    if allow_ids and isinstance(value[0], list):
        return [_ids(item, f"{where}[{index}]") for index, item in enumerate(value)]
    return [_check_text(item, f"{where}[{index}]") for index, item in enumerate(value)]


def _ids(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise RequestError(422, f"{where}: expected a non-empty list of token ids", where)
    for index, item in enumerate(value):
        if isinstance(item, LongInteger):
            raise RequestError(422, f"{where}[{index}]: {_kind(item)} is not a token id", where)
        if isinstance(item, bool) or not isinstance(item, int):
            raise RequestError(
                422, f"{where}[{index}]: expected a token id (integer), got {_kind(item)}", where
            )
    return list(value)


@dataclass
class EmbedRequest:
    """What any embedding route asks: inputs, strategies and the output's form."""

    inputs: Inputs
    strategies: list[str] | None  # None: the server's default
    normalize: bool = False
    prompt: str | None = None
    include_prompt: bool | None = None
    truncate: bool = True
    dimensions: int | None = None
    encoding_format: str = "float"
    model: str | None = None
    several: bool = False  # strategy given as a list: a result per strategy


OPENAI_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")


def openai_request(value: Any, max_items: int, served: str) -> EmbedRequest:
    """``POST /v1/embeddings``: OpenAI's fields, as OpenAI's API takes them: ``model`` and
    ``input`` required, an unknown field (``dimension`` for ``dimensions``) a 400 naming it
    rather than ignored; ``user`` accepted and unused. ``served`` is the model name a
    missing ``model`` is told to give."""
    body = _object(value)
    unknown = [name for name in body if name not in OPENAI_FIELDS]
    if unknown:
        raise RequestError(
            400,
            f"{unknown[0]!r}: unrecognized request argument; known: {', '.join(OPENAI_FIELDS)}",
            unknown[0],
        )
    if "model" not in body:
        raise RequestError(400, f"model: required (this server serves {served!r})", "model")
    if "input" not in body:
        raise RequestError(422, "input: required", "input")
    inputs = _inputs(body["input"], "input", max_items, allow_ids=True)
    model = body["model"]
    if not isinstance(model, str):
        raise RequestError(422, f"model: expected a string, got {_kind(model)}", "model")
    encoding = _encoding(body, null_is_default=True)
    dimensions = body.get("dimensions")
    if dimensions is not None:
        dimensions = _int(dimensions, "dimensions")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError(422, f"user: expected a string, got {_kind(user)}", "user")
    return EmbedRequest(inputs, None, dimensions=dimensions, encoding_format=encoding, model=model)


EMBED_FIELDS = (
    "inputs",
    "strategy",
    "normalize",
    "prompt",
    "include_prompt",
    "truncate",
    "dimensions",
    "encoding_format",
)


def embed_request(value: Any, max_items: int) -> EmbedRequest:
    """``POST /embed``: hiddenpool's own fields; an unknown field is an error (a typo
    would otherwise pass silently)."""
    body = _fields(value, EMBED_FIELDS, "inputs")
    inputs = _inputs(body["inputs"], "inputs", max_items, allow_ids=False)
    strategy = body.get("strategy")
    several = isinstance(strategy, list)
    strategies: list[str] | None = None
    if strategy is not None:
        items = strategy if several else [strategy]
        if not items:
            raise RequestError(422, "strategy: is an empty list", "strategy")
        for index, item in enumerate(items):
            if not isinstance(item, str):
                where = f"strategy[{index}]" if several else "strategy"
                raise RequestError(422, f"{where}: expected a string, got {_kind(item)}", where)
        strategies = list(items)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError(422, f"prompt: expected a string, got {_kind(prompt)}", "prompt")
    include_prompt = body.get("include_prompt")
    if include_prompt is not None:
        include_prompt = _bool(include_prompt, "include_prompt")
    dimensions = body.get("dimensions")
    encoding = _encoding(body, null_is_default=False)
    return EmbedRequest(
        inputs,
        strategies,
        normalize=_bool(body.get("normalize", False), "normalize"),
        prompt=prompt,
        include_prompt=include_prompt,
        truncate=_bool(body.get("truncate", True), "truncate"),
        dimensions=None if dimensions is None else _int(dimensions, "dimensions"),
        encoding_format=encoding,
        several=several,
    )


@dataclass
class TokensRequest:
    inputs: list[str]
    layers: str


def tokens_request(value: Any, max_items: int) -> TokensRequest:
    """``POST /embed_tokens``: ``{"inputs": str | [str], "layers": "last"}``."""
    body = _fields(value, ("inputs", "layers"), "inputs")
    inputs = _inputs(body["inputs"], "inputs", max_items, allow_ids=False)
    layers = body.get("layers", "last")
    if not isinstance(layers, str):
        raise RequestError(422, f"layers: expected a string, got {_kind(layers)}", "layers")
    return TokensRequest([str(item) for item in inputs], layers)


@dataclass
class ChunksRequest:
    input: str
    spans: list[tuple[int, int]] | None
    chunk_tokens: int | None
    strategy: str | None  # None: the server's --strategy
    normalize: bool


CHUNK_FIELDS = ("input", "spans", "chunk_tokens", "strategy", "normalize")


def chunks_request(value: Any, max_items: int) -> ChunksRequest:
    """``POST /embed_chunks``: one long text and its chunks as character ``spans`` or as
    ``chunk_tokens``."""
    body = _fields(value, CHUNK_FIELDS, "input")
    text = _check_text(body["input"], "input")
    spans_value = body.get("spans")
    chunk_tokens = body.get("chunk_tokens")
    if (spans_value is None) == (chunk_tokens is None):
        raise RequestError(422, "spans: give either spans or chunk_tokens", "spans")
    spans: list[tuple[int, int]] | None = None
    if spans_value is not None:
        if not isinstance(spans_value, list) or not spans_value:
            raise RequestError(422, "spans: expected a non-empty list of [start, end]", "spans")
        if len(spans_value) > max_items:
            raise RequestError(
                413,
                f"spans: {len(spans_value)} chunks is more than the limit of {max_items}",
                "spans",
            )
        spans = []
        for index, span in enumerate(spans_value):
            if (
                not isinstance(span, list)
                or len(span) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in span)
            ):
                raise RequestError(422, f"spans[{index}]: expected [start, end] integers", "spans")
            start, end = span
            if not 0 <= start < end <= len(text):
                raise RequestError(
                    422,
                    f"spans[{index}]: [{start}, {end}] needs 0 <= start < end <= {len(text)}",
                    "spans",
                )
            spans.append((start, end))
    else:
        chunk_tokens = _int(chunk_tokens, "chunk_tokens")
    strategy = body.get("strategy")
    if strategy is not None and not isinstance(strategy, str):
        raise RequestError(422, f"strategy: expected a string, got {_kind(strategy)}", "strategy")
    return ChunksRequest(
        text, spans, chunk_tokens, strategy, _bool(body.get("normalize", False), "normalize")
    )
