"""Bearer tokens: optional API keys (`api_keys` in the config) on /v1/*, the panel's data and
/metrics, and the admin token that the admin actions need (`admin_token` in the config, as
Ansible writes it; otherwise generated once, kept in the state dir with mode 0600; printed by
`exo`)."""
from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from flask import current_app, jsonify, request

from appliance.config import Config

ADMIN_TOKEN_FILE = "admin_token"


def admin_token(config: Config) -> str:
    """The admin token: the config's, else read from the state dir, or made and stored there (0600)
    the first time."""
    if config.admin_token:
        return config.admin_token
    path = Path(config.state_dir) / ADMIN_TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, allowed) -> bool:
    return token is not None and any(hmac.compare_digest(token.encode(), a.encode()) for a in allowed)


def unauthorized(message: str, status: int = 401):
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return jsonify(body), status, {"WWW-Authenticate": "Bearer"}


# What the API keys guard beside /v1/*: the panel's data (node names and hosts, request history).
# The pages themselves hold no data; they ask for a key when /api/state says 401.
PANEL_DATA = ("/api/state", "/api/events")
KEY_COOKIE = "exo_api_key"   # a browser's EventSource cannot send a header: the panel sets this cookie


def guarded(path: str, metrics_public: bool) -> bool:
    return path.startswith("/v1/") or path in PANEL_DATA or (path == "/metrics" and not metrics_public)


def check_api_key():
    """before_request: None lets the request through. With `api_keys` set, /v1/*, the panel's data
    and /metrics (unless `metrics_public`, for a Prometheus without the key) need one of them, as a
    bearer token, or for the panel's own GETs of its data, as the cookie the panel sets."""
    config = current_app.config["coordinator"].config
    if not config.api_keys or not guarded(request.path, config.metrics_public):
        return None
    if _matches(bearer(), config.api_keys):
        return None
    if request.method == "GET" and request.path in PANEL_DATA and _matches(request.cookies.get(KEY_COOKIE), config.api_keys):
        return None
    return unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")


def check_admin():
    """before_request for the admin blueprint."""
    if _matches(bearer(), [current_app.config["admin_token"]]):
        return None
    return unauthorized("this action needs the admin token (printed by exo at start, kept in the state dir)")
