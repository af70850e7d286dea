"""Kafka ingest: the embedded broker for local use, the replay producer, and the consumer that lands
events exactly once in the raw Parquet landing zone (docs/ingest.md). Imports ``common`` and
``features`` (the event contract)."""
