"""Prometheus metrics of one ingest consumer, in a registry of its own.

Served on ``metrics.host:metrics.port`` (loopback by default; port 0 serves nothing). Freshness is
``now − the newest event time landed``, computed at scrape time so it keeps growing while nothing
lands. Lag is exported only when ``metrics.report_lag`` is on: the embedded broker's end offsets
are wrong, and a wrong lag is worse than none (docs/ingest.md).
"""

from __future__ import annotations

import math
import time
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "sirenfeed_ingest"


class IngestMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.consumed = Counter(f"{PREFIX}_events_consumed", "Messages read from Kafka", registry=registry)
        self.landed = Counter(f"{PREFIX}_events_landed", "Valid events landed in Parquet", registry=registry)
        self.dead_lettered = Counter(f"{PREFIX}_events_dead_lettered",
                                     "Messages dead-lettered, by reason", ["reason"], registry=registry)
        self.files = Counter(f"{PREFIX}_files_written", "Parquet files made visible, by kind",
                             ["kind"], registry=registry)
        self.batches = Counter(f"{PREFIX}_batches",
                               "Batches by outcome: published, dropped_overlap, dropped_topic_recreated",
                               ["outcome"], registry=registry)
        self.flush_seconds = Histogram(f"{PREFIX}_batch_flush_seconds",
                                       "Time to publish one batch (dead letters sent, files visible)",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                       registry=registry)
        self.consumed_offset = Gauge(f"{PREFIX}_consumed_offset", "Next offset to consume, per partition",
                                     ["partition"], registry=registry)
        self.assigned_partitions = Gauge(f"{PREFIX}_assigned_partitions",
                                         "Partitions this consumer owns now", registry=registry)
        self.lag = Gauge(f"{PREFIX}_lag", "End offset minus consumed offset, per partition "
                         "(only with metrics.report_lag)", ["partition"], registry=registry)
        self.offset_resets = Counter(f"{PREFIX}_offset_resets",
                                     "Partitions restarted from the log start, by cause", ["cause"],
                                     registry=registry)
        self.freshness = Gauge(f"{PREFIX}_freshness_seconds",
                               "Now minus the newest event time landed (NaN before the first)",
                               registry=registry)
        self.max_landed_event_ms: int | None = None
        self.freshness.set_function(self.freshness_seconds)
        self._server: WSGIServer | None = None

    def freshness_seconds(self) -> float:
        if self.max_landed_event_ms is None:
            return math.nan
        return time.time() - self.max_landed_event_ms / 1000

    def record_landed(self, max_event_ts_ms: int | None) -> None:
        if max_event_ts_ms is not None and (self.max_landed_event_ms is None
                                            or max_event_ts_ms > self.max_landed_event_ms):
            self.max_landed_event_ms = max_event_ts_ms

    def serve(self, host: str, port: int) -> None:
        if port:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
