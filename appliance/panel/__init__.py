"""The panel: a Flask application factory serving the API (and, later, the pages)."""
from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from appliance.coordinator.coordinator import Coordinator

log = logging.getLogger(__name__)


def create_app(coordinator: Coordinator) -> Flask:
    from appliance.panel import metrics, openapi
    from appliance.panel.admin import admin
    from appliance.panel.api import api
    from appliance.panel.auth import admin_token, check_api_key
    from appliance.panel.events import attach as attach_events
    from appliance.panel.pages import pages

    app = Flask(__name__)
    app.config["coordinator"] = coordinator
    app.config["admin_token"] = admin_token(coordinator.config)
    app.config["MAX_CONTENT_LENGTH"] = coordinator.config.max_body_bytes   # 413 before the body is read
    app.before_request(check_api_key)
    app.register_blueprint(api)
    app.register_blueprint(admin)
    app.register_blueprint(openapi.openapi)
    metrics.install(app, coordinator)
    app.register_blueprint(pages)
    attach_events(app, coordinator)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        kind = "not_found_error" if e.code == 404 else "invalid_request_error"
        return jsonify({"error": {"message": e.description, "type": kind, "param": None, "code": None}}), e.code

    @app.errorhandler(Exception)
    def server_error(e: Exception):
        log.exception("unhandled error")
        return jsonify({"error": {"message": f"internal error: {e}", "type": "server_error", "param": None, "code": None}}), 500

    return app
