"""The consumer's Prometheus endpoint: its own registry, loopback, freshness computed at scrape time."""

from __future__ import annotations

import math
import time

from ingest_support import metric_values

from ingest.broker import free_port
from ingest.metrics import IngestMetrics


def test_endpoint_serves_counters_and_a_live_freshness():
    metrics = IngestMetrics()
    port = free_port()
    metrics.serve("127.0.0.1", port)
    try:
        assert math.isnan(metric_values(port)["sirenfeed_ingest_freshness_seconds"])
        metrics.consumed.inc(5)
        metrics.dead_lettered.labels("missing:event_id").inc(2)
        metrics.consumed_offset.labels("3").set(42)
        metrics.record_landed(int(time.time() * 1000) - 90_000)
        metrics.record_landed(int(time.time() * 1000) - 500_000)  # older: freshness keeps the newest
        values = metric_values(port)
        assert values["sirenfeed_ingest_events_consumed_total"] == 5
        assert values['sirenfeed_ingest_events_dead_lettered_total{reason="missing:event_id"}'] == 2
        assert values['sirenfeed_ingest_consumed_offset{partition="3"}'] == 42
        assert 89 < values["sirenfeed_ingest_freshness_seconds"] < 120
        assert "python_gc_objects_collected_total" not in str(values)  # a dedicated registry
    finally:
        metrics.close()
