"""The OpenAPI 3.0 document of the API, served at /openapi.json. `model` lists the model this
cluster serves now, so generated clients (and schemathesis) see what is really accepted."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

openapi = Blueprint("openapi", __name__)

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": "string", "nullable": True}, "code": {"nullable": True}}}}}


def _errors(*codes: int) -> dict:
    text = {400: "Invalid request", 401: "Missing or wrong bearer token", 404: "Unknown model or route",
            409: "Conflict with the cluster's state", 503: "The cluster cannot serve now"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for c in codes}


def _sampling(model: dict) -> dict:
    stop = {"oneOf": [{"type": "string", "minLength": 1},
                      {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}], "nullable": True}
    return {
        "model": model,
        "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "nullable": True},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
        "top_k": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1, "nullable": True},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "nullable": True},
        "n": {"type": "integer", "enum": [1], "nullable": True},
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


def document(model_id: str | None) -> dict:
    model = {"type": "string", **({"enum": [model_id]} if model_id else {})}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]}}}
    completion = {"type": "object", "required": ["model"], "properties": {
        **_sampling(model), "prompt": {"type": "string"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 5, "nullable": True}}}
    chat = {"type": "object", "required": ["model", "messages"], "properties": {
        **_sampling(model), "messages": {"type": "array", "minItems": 1, "items": message},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        "logprobs": {"type": "boolean", "nullable": True},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 5, "nullable": True}}}
    model_body = {"type": "object", "required": ["model"], "properties": {"model": {"type": "string", "minLength": 1}}}
    ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "exo appliance API", "version": "1", "description": "OpenAI-style API of an exo cluster"},
        "paths": {
            "/v1/models": {"get": {"summary": "Models served", "security": [{"apiKey": []}],
                                   "responses": {"200": ok, **_errors(401)}}},
            "/v1/completions": {"post": _post("Text completion", "CompletionRequest", 400, 401, 404, 503)},
            "/v1/chat/completions": {"post": _post("Chat completion", "ChatCompletionRequest", 400, 401, 404, 503)},
            "/healthz": {"get": {"summary": "Liveness and plan", "security": [], "responses": {"200": ok}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [],
                                 "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/api/models/load": {"post": _post("Load a model", "ModelBody", 400, 401, 404, 409, auth="admin")},
            "/api/models/unload": {"post": {"summary": "Unload the model", "security": [{"admin": []}],
                                            "responses": {"200": ok, **_errors(401, 409)}}},
            "/api/models/delete": {"post": _post("Delete a cached model", "ModelBody", 400, 401, 404, 409, auth="admin")},
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
    return jsonify(document(model.id if model else None))
