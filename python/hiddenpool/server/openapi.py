"""The OpenAPI 3.1 description of the server's routes (``GET /openapi.json``), written
out: the request fields each route reads (``server.requests``) and the shapes it answers."""

from __future__ import annotations

from typing import Any

from hiddenpool._version import __version__

_STRINGS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERRORS = {
    str(status): {
        "description": text,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for status, text in (
        (400, "malformed JSON"),
        (401, "missing or wrong API key"),
        (404, "model not served here"),
        (408, "body not received in time"),
        (413, "too many inputs or too large a body"),
        (415, "not application/json"),
        (422, "a field is wrong (named in param)"),
        (429, "too many requests in flight (Retry-After)"),
        (500, "the forward pass failed"),
        (503, "starting, draining, or the worker stopped"),
        (504, "request timeout"),
    )
}


def _post(summary: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": properties,
                            "required": required,
                        }
                    }
                },
            },
            "responses": {"200": {"description": "the vectors"}, **_ERRORS},
        }
    }


def _get(summary: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": summary}}}}


def document() -> dict[str, Any]:
    """The OpenAPI document.

    >>> sorted(document()["paths"])[:3]
    ['/embed', '/embed_chunks', '/embed_tokens']
    """
    encoding = {"type": "string", "enum": ["float", "base64"]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "hiddenpool serve", "version": __version__},
        "paths": {
            "/v1/embeddings": _post(
                "OpenAI's embeddings: vectors of the server's default strategy",
                {
                    "input": {
                        "oneOf": [*_STRINGS["oneOf"], _IDS, {"type": "array", "items": _IDS}]
                    },
                    "model": {"type": "string"},
                    "encoding_format": encoding,
                    "dimensions": {"type": "integer", "minimum": 1},
                    "user": {"type": "string"},
                },
                ["input"],
            ),
            "/embed": _post(
                "hiddenpool's embeddings: any strategies, from one forward pass",
                {
                    "inputs": _STRINGS,
                    "strategy": _STRINGS,
                    "normalize": {"type": "boolean"},
                    "prompt": {"type": "string"},
                    "include_prompt": {"type": "boolean"},
                    "truncate": {"type": "boolean"},
                    "dimensions": {"type": "integer", "minimum": 1},
                    "encoding_format": encoding,
                },
                ["inputs"],
            ),
            "/embed_tokens": _post(
                "every token's vector with its id and character offsets",
                {"inputs": _STRINGS, "layers": {"type": "string"}},
                ["inputs"],
            ),
            "/embed_chunks": _post(
                "late chunking of one text over character spans or chunk_tokens",
                {
                    "input": {"type": "string"},
                    "spans": {
                        "type": "array",
                        "items": {"type": "array", "items": {"type": "integer"}},
                    },
                    "chunk_tokens": {"type": "integer", "minimum": 1},
                    "strategy": {"type": "string"},
                    "normalize": {"type": "boolean"},
                },
                ["input"],
            ),
            "/health": _get("200 when ready, 503 while starting or draining"),
            "/info": _get("model, backend, precision, quantization, width, limits, version"),
            "/v1/models": _get("the served model, as OpenAI lists models"),
            "/metrics": _get("Prometheus metrics"),
        },
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
