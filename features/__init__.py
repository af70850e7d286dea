"""The data contract (raw event schema, feature spec, validation) and the Spark jobs that turn raw
events into training sequences (docs/design.md, "Layout" and "Data contract"). Imports only ``common``."""
