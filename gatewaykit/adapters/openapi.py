"""OpenAPI path items for the gateway routes, for an app that publishes a schema.

The adapters are plain ASGI endpoints, so FastAPI (which documents only its own
``APIRoute`` objects) leaves them out of ``/openapi.json``. :func:`openapi_paths`
describes them — what they accept at the gateway's level, the streaming and JSON answers,
and the error envelopes the gateway itself sends — to merge into the app's schema
(docs/mounting.md shows how). The request and response bodies are the providers' own;
the descriptions point to their references rather than copy them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_paths"]

_FORMATS = (
    # path, summary, provider reference, error envelope
    (
        "/chat/completions",
        "OpenAI chat completions",
        "https://platform.openai.com/docs/api-reference/chat/create",
        "openai",
    ),
    (
        "/messages",
        "Anthropic messages",
        "https://docs.anthropic.com/en/api/messages",
        "anthropic",
    ),
    (
        "/responses",
        "OpenAI responses",
        "https://platform.openai.com/docs/api-reference/responses/create",
        "openai",
    ),
    (
        "/embeddings",
        "OpenAI embeddings",
        "https://platform.openai.com/docs/api-reference/embeddings/create",
        "openai",
    ),
    (
        "/messages/count_tokens",
        "Anthropic token counting (not metered)",
        "https://docs.anthropic.com/en/api/messages-count-tokens",
        "anthropic",
    ),
)
_ERRORS = {
    "400": "Malformed request, or a model without a price",
    "401": "Missing, unknown, revoked or expired API key",
    "402": "A budget that applies cannot hold the request's estimated cost",
    "403": "The key may not use this model",
    "404": "No upstream serves this model",
    "413": "Request body too large",
    "429": "Rate limited (see Retry-After)",
    "502": "The upstream failed or could not be reached",
    "503": "The ledger (or control plane) is unavailable",
    "504": "The upstream timed out",
}
_ENVELOPES: dict[str, dict[str, Any]] = {
    "openai": {
        "type": "object",
        "required": ["error"],
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
    },
    "anthropic": {
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}


def openapi_paths(prefix: str = "/v1") -> dict[str, Any]:
    """OpenAPI 3.1 ``paths`` entries for :func:`gateway_routes` under ``prefix`` (all but
    its catch-all 404)."""
    prefix = prefix.rstrip("/")
    paths: dict[str, Any] = {}
    openai_error = {"content": {"application/json": {"schema": _ENVELOPES["openai"]}}}
    for path, summary, reference, envelope in _FORMATS:
        error = {"content": {"application/json": {"schema": _ENVELOPES[envelope]}}}
        paths[f"{prefix}{path}"] = {
            "post": {
                "tags": ["gateway"],
                "summary": summary,
                "description": (
                    f"Forwarded upstream in the provider's own format ({reference}), after "
                    "the key is authenticated and the estimated cost is held against its "
                    "budgets. Errors use the provider's envelope."
                ),
                "security": [{"gatewaykitKey": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["model"],
                                "properties": {
                                    "model": {"type": "string"},
                                    "stream": {"type": "boolean"},
                                },
                                "additionalProperties": True,
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "The provider's answer: JSON, or a stream of events",
                        "content": {
                            "application/json": {"schema": {"type": "object"}},
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    **{
                        status: {"description": description, **error}
                        for status, description in _ERRORS.items()
                    },
                },
            }
        }
    listing = {
        "tags": ["gateway"],
        "security": [{"gatewaykitKey": []}],
        "responses": {
            "200": {
                "description": "The models the gateway serves, in OpenAI's list format",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "401": {"description": _ERRORS["401"], **openai_error},
        },
    }
    paths[f"{prefix}/models"] = {"get": {"summary": "Models the key may use", **listing}}
    paths[f"{prefix}/models/{{model_id}}"] = {
        "get": {
            "summary": "One model",
            "parameters": [
                {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            **listing,
        }
    }
    return paths
