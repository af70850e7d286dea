"""The ``sirenfeed`` command line: the one place that wires features, ingest and trainer together."""
