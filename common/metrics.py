"""The ``/metrics`` HTTP endpoint the long-running components serve their Prometheus registry on.

Every component owns its own ``CollectorRegistry`` (never the process-global one), so several in
one process never collide on metric names.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint; :meth:`close` stops it and frees the port."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def start_metrics_server(port: int, host: str = "127.0.0.1", *,
                         registry: CollectorRegistry) -> MetricsServer | None:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread.

    ``port == 0`` means telemetry is off: nothing starts and the result is ``None``. The default
    host is loopback; a Prometheus scraping from another machine needs ``host="0.0.0.0"``.
    """
    if port == 0:
        return None
    if not 0 < port < 65536:
        raise ValueError(f"metrics port must be in [1, 65535] (or 0 for off), got {port}")
    server, thread = start_http_server(port, addr=host, registry=registry)
    logger.info("serving metrics on http://%s:%d/metrics", host, port)
    return MetricsServer(server, thread)
