"""Serving the panel: gunicorn (gthread) for `exo panel` and the systemd unit; an in-process
threaded server for the all-in-one `exo`.

One worker process with many threads: the worker holds the cluster's one coordinator, and each
streaming response holds one thread.
"""
from __future__ import annotations

import logging
import subprocess
import threading

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker
from werkzeug.serving import make_server

from appliance.config import Config
from appliance.coordinator.coordinator import Coordinator
from appliance.panel import create_app

log = logging.getLogger(__name__)
THREADS = 32


class PanelWorker(ThreadWorker):
    """A gthread worker that ends the panel's open live-update streams when told to stop, so
    an open browser tab does not hold the shutdown for gunicorn's whole grace period."""

    def handle_exit(self, sig, frame):
        self.wsgi.extensions["exo_events"].close_all()
        super().handle_exit(sig, frame)


class PanelApplication(BaseApplication):
    def __init__(self, config: Config):
        self.exo_config = config
        super().__init__()

    def load_config(self):
        options = {"bind": f"{self.exo_config.host}:{self.exo_config.port}", "workers": 1,
                   "worker_class": "appliance.panel.server.PanelWorker", "threads": THREADS, "timeout": 120,
                   "accesslog": "-", "loglevel": self.exo_config.log_level.lower()}
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        # Runs in the worker after the fork, so the coordinator's MQTT thread lives there.
        return create_app(Coordinator(self.exo_config).start())


def serve_gunicorn(config: Config) -> None:
    PanelApplication(config).run()


def serve_in_process(config: Config, coordinator: Coordinator, watch: list[subprocess.Popen] = ()) -> None:
    """Serve until interrupted, saying so when one of the watched processes (local nodes) exits."""
    server = make_server(config.host, config.port, create_app(coordinator), threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="api", daemon=True)
    thread.start()
    watch = list(watch)
    try:
        while thread.is_alive():
            thread.join(1.0)
            for process in [p for p in watch if p.poll() is not None]:
                log.warning("local node process %d exited with code %d", process.pid, process.returncode)
                watch.remove(process)
    finally:
        server.shutdown()
