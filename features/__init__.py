"""The data contract (raw event schema, feature spec) and the Spark jobs that turn raw events into
training sequences. Imports nothing else of the project."""
