"""The trainer: the SIREN-RoPE generative ranker, its Petastorm input, DeepSpeed training, metrics,
checkpoints, export and the warm-start rank. Imports ``common`` and ``features`` (the feature spec)."""
