"""Admin actions (need the admin token): load, unload or delete a model, and re-plan.

    POST /api/models/load    {"model": "<folder or hub id>"}   fetch config/tokenizer, plan; nodes download and load
    POST /api/models/unload                                     every node drops its shard
    POST /api/models/delete  {"model": "<hub id>"}             remove it from this machine's model cache
    POST /api/replan                                            plan again now
"""
from __future__ import annotations

import shutil

from flask import Blueprint, current_app, jsonify

from appliance.models.download import HubFailed, HubUnreachable
from appliance.panel.api import ApiError, json_body
from appliance.panel.auth import check_admin
from appliance.panel.schema import Invalid, ModelBody, validate

admin = Blueprint("admin", __name__)
admin.before_request(check_admin)


@admin.errorhandler(ApiError)
def _api_error(e: ApiError):
    return e.response()


def _coordinator():
    return current_app.config["coordinator"]


def _leader_only():
    cluster = _coordinator().cluster
    if not cluster.is_leader:
        raise ApiError(409, f"this coordinator is a standby; send admin actions to the leader ({cluster.leader()})",
                       kind="conflict_error")


def _model_arg() -> str:
    try:
        return validate(ModelBody, json_body()).model.strip()
    except Invalid as e:
        raise ApiError(400, e.message, e.param) from None


@admin.post("/api/models/load")
def load():
    _leader_only()
    model = _model_arg()
    try:
        loaded = _coordinator().load_model(model)
    except HubUnreachable as e:         # no network: the hub is the upstream that did not answer
        raise ApiError(504, str(e), "model", "upstream_unreachable") from e
    except HubFailed as e:
        raise ApiError(502, str(e), "model", "upstream_error") from e
    except FileNotFoundError as e:      # not a folder, not on the hub, or offline with nothing cached
        raise ApiError(404, str(e), "model", "not_found_error") from e
    except (ValueError, OSError) as e:  # a folder or config that is not a model we can run
        raise ApiError(400, f"cannot load {model}: {e}", "model") from e
    return jsonify({"model": loaded.id, "status": "planning"}), 202


@admin.post("/api/models/unload")
def unload():
    _leader_only()
    _coordinator().unload_model()
    return jsonify({"model": None, "status": "unloaded"})


@admin.post("/api/models/delete")
def delete():
    from appliance.models.store import models_dir

    model = _model_arg()
    current = _coordinator().model
    if current is not None and current.id == model:
        raise ApiError(409, f"{model} is loaded; unload it first", "model", "conflict_error")
    if "/" not in model or model.startswith(("/", ".")) or ".." in model:
        raise ApiError(400, "'model' must be a hub id like org/name", "model")
    folder = models_dir(_coordinator().config.models_dir) / ("models--" + model.replace("/", "--"))
    if not folder.is_dir():
        raise ApiError(404, f"{model} is not in the model cache", "model", "not_found_error")
    shutil.rmtree(folder)
    return jsonify({"model": model, "deleted": True})


@admin.post("/api/replan")
def replan():
    _leader_only()
    cluster = _coordinator().cluster
    if cluster.model_config is None:
        raise ApiError(409, "no model is loaded: nothing to plan", kind="conflict_error")
    cluster.replan(force=True)
    return jsonify({"status": "planning"}), 202
