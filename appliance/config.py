"""One typed config: defaults <- /etc/exo/config.yaml (or --config) <- env EXO_* <- flags.

Every key is a field of `Config`; the YAML file, the EXO_<KEY> variables and the command-line flags
all use the same names (upper-cased for the environment).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SYSTEM_CONFIG = Path("/etc/exo/config.yaml")


def _default_state_dir() -> str:
    if os.geteuid() == 0 and Path("/var/lib").is_dir():
        return "/var/lib/exo"
    return str(Path.home() / ".local/share/exo")


@dataclass
class Config:
    cluster: str = "default"
    broker: str = ""                    # host:port; empty means "start an embedded broker" for `exo`
    broker_username: str = ""
    broker_password: str = ""
    broker_tls: bool = False
    broker_ca_file: str = ""
    cluster_key: str = ""               # the cluster's secret (see cluster_key.py); empty with `open`
    open: bool = False                  # no key: an anonymous broker, for a trusted LAN only
    name: str = ""                      # node name; also salts the node id so one host can run several
    engine: str = "auto"                # auto: tinygrad where a GPU backend is present, else onnxruntime
    quant: str = ""                     # q4 | q8 | f16 | f32; empty: the engine's own default
    model: str = ""                     # a local folder or a catalog id
    models_dir: str = ""                # default: the huggingface_hub cache
    state_dir: str = field(default_factory=_default_state_dir)
    host: str = "0.0.0.0"              # where the panel/API listens
    port: int = 52415
    max_body_bytes: int = 4 * 1024 * 1024   # a larger request body is refused (413) before it is read
    queue_limit: int = 64               # requests that may wait for a place; more get 429
    max_context: int = 2048             # node: positions one request may hold
    max_requests: int = 0               # node: requests whose caches it holds at once; 0: as its memory allows
    local_nodes: int = 1
    api_keys: list[str] = field(default_factory=list)
    metrics_public: bool = False        # with api_keys: let /metrics be scraped without a key
    admin_token: str = ""               # panel: the admin actions' token; empty: made once, kept in the state dir
    log_level: str = "INFO"

    @property
    def broker_address(self) -> tuple[str, int]:
        return parse_address(self.broker)


def parse_address(text: str, default_port: int = 1883) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"broker address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port or default_port)


def _coerce(kind, raw):
    if kind in (bool, "bool"):
        return raw if isinstance(raw, bool) else str(raw).strip().lower() in ("1", "true", "yes", "on")
    if kind in (int, "int"):
        return int(raw)
    if kind in ("list[str]",):
        return [s for s in (raw.split(",") if isinstance(raw, str) else raw) if s]
    return str(raw)


def _engine(name: str) -> None:
    from appliance.engines import ENGINES

    if name != "auto" and name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose auto, {', '.join(ENGINES)}")


def _quant(name: str) -> None:
    if not name:
        return
    from appliance.engines.footprint import QUANTS

    if name not in QUANTS:
        raise ValueError(f"unknown quant {name!r}; choose {', '.join(QUANTS)}")


def _positive(value: int) -> None:
    if value <= 0:
        raise ValueError(f"must be a positive number, not {value}")


def _not_negative(value: int) -> None:
    if value < 0:
        raise ValueError(f"must be 0 or more, not {value}")


# Checked when the config is built, so a bad value in a flag, an EXO_ variable or the file stops
# the command before anything starts. The names come from the engines, not from a copy here.
CHECKS = {"engine": _engine, "quant": _quant, "max_body_bytes": _positive, "max_context": _positive,
          "max_requests": _not_negative, "queue_limit": _positive}


def _check(values: dict, origins: dict) -> None:
    for name, check in CHECKS.items():
        if name in values:
            try:
                check(values[name])
            except ValueError as e:
                raise ValueError(f"{origins[name]}: {e}") from None


def load_config(path: str | os.PathLike | None = None, env: dict | None = None, **flags) -> Config:
    """Build the config from its four layers. Flags whose value is None are not given."""
    env = os.environ if env is None else env
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    values: dict = {}
    origins: dict = {}      # key -> where its value came from, for error messages
    path = path or env.get("EXO_CONFIG") or (SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None)
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        unknown = set(data) - set(fields)
        if unknown:
            raise ValueError(f"{path}: unknown config keys: {', '.join(sorted(unknown))}")
        values.update(data)
        origins.update({k: f"{path}: {k}" for k in data})
    for name in fields:
        if f"EXO_{name.upper()}" in env:
            values[name] = env[f"EXO_{name.upper()}"]
            origins[name] = f"EXO_{name.upper()}"
    given = {k: v for k, v in flags.items() if v is not None and k in fields}
    values.update(given)
    origins.update({k: "--" + k.replace("_", "-") for k in given})
    values = {k: _coerce(fields[k], v) for k, v in values.items() if v is not None}
    _check(values, origins)
    return Config(**values)
