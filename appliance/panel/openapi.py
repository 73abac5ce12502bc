"""The OpenAPI 3.1 document of the API, served at /openapi.json. The request bodies are the
pydantic models that validate requests (schema.py); `model` lists the model this cluster serves
now, and `prompt` its length limit, so generated clients (and schemathesis) see what is really
accepted."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from appliance.panel.api import CHARS_PER_TOKEN
from appliance.panel.schema import ChatCompletionRequest, CompletionRequest, ModelBody

openapi = Blueprint("openapi", __name__)

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {}}}}}


def _errors(*codes: int) -> dict:
    text = {400: "Invalid request", 401: "Missing or wrong bearer token", 404: "Unknown model or route",
            409: "Conflict with the cluster's state", 413: "The body is over the server's size limit (max_body_bytes)",
            429: "The cluster is full and its queue too (Retry-After)", 502: "The model hub answered with an error",
            503: "The cluster cannot serve now", 504: "The model hub cannot be reached"}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {str(c): {"description": text[c], "content": error} for c in codes}


def request_schemas(model_id: str | None, context: int | None) -> dict:
    """The request bodies' JSON Schemas, by name, with what this cluster serves now filled in."""
    schemas: dict = {}
    for body in (CompletionRequest, ChatCompletionRequest, ModelBody):
        schema = body.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[body.__name__] = schema
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        if model_id:
            schemas[name]["properties"]["model"]["enum"] = [model_id]
    if context:
        prompt = schemas["CompletionRequest"]["properties"]["prompt"]
        for branch in prompt.get("anyOf", [prompt]):
            if branch.get("type") == "string":
                branch["maxLength"] = context * CHARS_PER_TOKEN
    return schemas


def _post(summary: str, schema: str, *errors: int, auth: str = "apiKey") -> dict:
    return {"summary": summary, "security": [{auth: []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}},
                                                                   "text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(*errors)}}


def document(model_id: str | None, context: int | None = None) -> dict:
    """`context`: the served model's, in tokens; it bounds a prompt's length in characters."""
    ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "exo appliance API", "version": "1", "description": "OpenAI-style API of an exo cluster"},
        "paths": {
            "/v1/models": {"get": {"summary": "Models served", "security": [{"apiKey": []}],
                                   "responses": {"200": ok, **_errors(401)}}},
            "/v1/completions": {"post": _post("Text completion", "CompletionRequest", 400, 401, 404, 413, 429, 503)},
            "/v1/chat/completions": {"post": _post("Chat completion", "ChatCompletionRequest", 400, 401, 404, 413, 429, 503)},
            "/healthz": {"get": {"summary": "Ready to serve (200), or not yet and why (503, `reason`)", "security": [],
                                 "responses": {"200": ok, "503": {**ok, "description": "Not ready: `reason` says why"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (an API key when api_keys are set, unless metrics_public)",
                                 "security": [{"apiKey": []}, {}],
                                 "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               **_errors(401)}}},
            "/api/models/load": {"post": _post("Load a model", "ModelBody", 400, 401, 404, 409, 413, 502, 504, auth="admin")},
            "/api/models/unload": {"post": {"summary": "Unload the model", "security": [{"admin": []}],
                                            "responses": {"200": ok, **_errors(401, 409)}}},
            "/api/models/delete": {"post": _post("Delete a cached model", "ModelBody", 400, 401, 404, 409, 413, auth="admin")},
            "/api/replan": {"post": {"summary": "Plan again", "security": [{"admin": []}],
                                     "responses": {"202": ok, **_errors(401, 409)}}},
        },
        "components": {
            "schemas": {"Error": ERROR, **request_schemas(model_id, context)},
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
