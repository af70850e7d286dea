"""What every component shares: configuration loading, logging, durable file operations, locks and
process groups (docs/design.md, "Layout"). Imports nothing else of the project."""
