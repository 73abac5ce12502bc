"""The OpenAPI 3.0 document of the API, served at /openapi.json. `model` lists the model this
cluster serves now, so generated clients (and schemathesis) see what is really accepted."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from appliance.panel.api import CHARS_PER_TOKEN, NUMBERS

openapi = Blueprint("openapi", __name__)

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": "string", "nullable": True}, "code": {"nullable": True}}}}}


def _errors(*codes: int) -> dict:
    text = {400: "Invalid request", 401: "Missing or wrong bearer token", 404: "Unknown model or route",
            409: "Conflict with the cluster's state", 413: "The body is over the server's size limit (max_body_bytes)",
            503: "The cluster cannot serve now"}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {str(c): {"description": text[c], "content": error} for c in codes}


def _number(name: str) -> dict:
    """A numeric field as api.NUMBERS checks it (a finite number: JSON has no NaN or Infinity)."""
    spec = NUMBERS[name]
    bounds = {"minimum": spec.lo} if spec.lo is not None else {}
    bounds |= {"maximum": spec.hi} if spec.hi is not None else {}
    return {"type": "integer" if spec.kind is int else "number", **bounds, "nullable": True}


def _sampling(model: dict) -> dict:
    stop = {"oneOf": [{"type": "string", "minLength": 1},
                      {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}], "nullable": True}
    return {
        "model": model,
        **{name: _number(name) for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "n")},
        "stop": stop,
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "nullable": True,
                           "properties": {"include_usage": {"type": "boolean"}}},
    }


def _post(summary: str, schema: str, *errors: int, auth: str = "apiKey") -> dict:
    return {"summary": summary, "security": [{auth: []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}},
                                                                   "text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(*errors)}}


def document(model_id: str | None, context: int | None = None) -> dict:
    """`context`: the served model's, in tokens; it bounds a prompt's length in characters."""
    model = {"type": "string", **({"enum": [model_id]} if model_id else {})}
    prompt = {"type": "string", **({"maxLength": context * CHARS_PER_TOKEN} if context else {})}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]}}}
    completion = {"type": "object", "required": ["model"], "properties": {
        **_sampling(model), "prompt": prompt, "logprobs": _number("logprobs")}}
    chat = {"type": "object", "required": ["model", "messages"], "properties": {
        **_sampling(model), "messages": {"type": "array", "minItems": 1, "items": message},
        "max_completion_tokens": _number("max_completion_tokens"),
        "logprobs": {"type": "boolean", "nullable": True}, "top_logprobs": _number("top_logprobs"),
        "enable_thinking": {"type": "boolean", "nullable": True},
        "chat_template_kwargs": {"type": "object", "nullable": True,
                                 "properties": {"enable_thinking": {"type": "boolean", "nullable": True}}}}}
    model_body = {"type": "object", "required": ["model"], "properties": {"model": {"type": "string", "minLength": 1}}}
    ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "exo appliance API", "version": "1", "description": "OpenAI-style API of an exo cluster"},
        "paths": {
            "/v1/models": {"get": {"summary": "Models served", "security": [{"apiKey": []}],
                                   "responses": {"200": ok, **_errors(401)}}},
            "/v1/completions": {"post": _post("Text completion", "CompletionRequest", 400, 401, 404, 413, 503)},
            "/v1/chat/completions": {"post": _post("Chat completion", "ChatCompletionRequest", 400, 401, 404, 413, 503)},
            "/healthz": {"get": {"summary": "Liveness and plan", "security": [], "responses": {"200": ok}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [],
                                 "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/api/models/load": {"post": _post("Load a model", "ModelBody", 400, 401, 404, 409, 413, auth="admin")},
            "/api/models/unload": {"post": {"summary": "Unload the model", "security": [{"admin": []}],
                                            "responses": {"200": ok, **_errors(401, 409)}}},
            "/api/models/delete": {"post": _post("Delete a cached model", "ModelBody", 400, 401, 404, 409, 413, auth="admin")},
            "/api/replan": {"post": {"summary": "Plan again", "security": [{"admin": []}],
                                     "responses": {"202": ok, **_errors(401, 409)}}},
        },
        "components": {
            "schemas": {"Error": ERROR, "CompletionRequest": completion, "ChatCompletionRequest": chat,
                        "ModelBody": model_body},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"},
                                "admin": {"type": "http", "scheme": "bearer"}},
        },
    }


@openapi.get("/openapi.json")
def serve():
    model = current_app.config["coordinator"].model
    if model is None:
        return jsonify(document(None))
    return jsonify(document(model.id, model.config.max_position_embeddings))
