"""The retraining lifecycle: the cycle with its lock and journal, the continuous poller, the
warm-start view of feature batches, the evaluation gate, the registry of published models and the
freshness telemetry (docs/design.md, "Layout"; docs/retrain.md)."""
