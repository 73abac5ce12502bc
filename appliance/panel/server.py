"""Serving the panel and the API with waitress, the same way for `exo panel` (and its systemd
unit) and for the all-in-one `exo`.

waitress reads each request whole (request line, headers, body) in its one event-loop thread,
and only a complete request takes one of the worker threads. So a slow or idle connection (a
slowloris) costs a socket and never a thread; a thread-per-connection server (gunicorn's gthread,
werkzeug's) is stalled by as many slow connections as it has threads. A body over
`max_body_bytes` is refused with 413 from its Content-Length, or as soon as a chunked body
passes it, before the application sees it, with the same OpenAI-style JSON error body as the
API's own errors. docs/architecture.md says more.
"""
from __future__ import annotations

import json
import logging
import subprocess
import threading
from typing import Callable

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask

from appliance.config import Config
from appliance.coordinator.coordinator import Coordinator
from appliance.panel import create_app

log = logging.getLogger(__name__)
# waitress says at INFO each time a client goes mid-response: every closed panel tab (its event
# stream) and every stopped chat. That is how streams end, not news.
logging.getLogger("waitress").setLevel(logging.WARNING)
THREADS = 32                # requests served at once: each streaming response holds one
CONNECTIONS = 500           # open sockets at most (idle ones included); more wait to be accepted
STOP_WAIT_S = 5             # at a stop, how long responses under way (a chat streaming) may take to end
IDLE_TIMEOUT_S = 30         # a connection that sends nothing for this long, between requests, is closed


class JSONErrorTask(ErrorTask):
    """waitress's own refusals (a body over the limit, a malformed request line) as an OpenAI-style
    JSON error, like every error the app sends, instead of waitress's plain text."""

    def execute(self):
        error = self.request.error
        message = f"{error.reason}: {error.body}" + (
            f" (max_body_bytes {self.channel.adj.max_request_body_size})" if error.code == 413 else "")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "request_too_large" if error.code == 413 else None}}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class Channel(HTTPChannel):
    error_task_class = JSONErrorTask


def make_server(config: Config, coordinator: Coordinator):
    app = create_app(coordinator)
    sockets = {}
    server = create_server(app, sockets, host=config.host, port=config.port, threads=THREADS, connection_limit=CONNECTIONS,
                           channel_timeout=IDLE_TIMEOUT_S, cleanup_interval=5, asyncore_use_poll=True,
                           max_request_body_size=config.max_body_bytes, ident="exo")
    for listener in [s for s in sockets.values() if isinstance(s, BaseWSGIServer)]:   # one per address
        listener.channel_class = Channel
    return app, server


def serve(config: Config, coordinator: Coordinator, watch: list[subprocess.Popen] = (),
          listening: Callable[[], object] | None = None) -> None:
    """Serve until interrupted, saying so when one of the watched processes (local nodes) exits.
    `listening` runs once the port takes connections (before that, "ready" would be a lie)."""
    app, server = make_server(config, coordinator)   # waitress listens from here on
    if listening:
        listening()
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    watch = list(watch)
    try:
        while thread.is_alive():
            thread.join(1.0)
            for process in [p for p in watch if p.poll() is not None]:
                log.warning("local node process %d exited with code %d", process.pid, process.returncode)
                watch.remove(process)
    finally:
        app.extensions["exo_events"].close_all()   # an open panel tab must not hold up the exit
        # The worker threads end their responses before the server closes: a thread that finished
        # one afterwards would wake a closed event loop (a traceback on the way out).
        server.task_dispatcher.shutdown(timeout=STOP_WAIT_S)
        server.close()
