"""The trainer: the SIREN-RoPE generative ranker, its Petastorm input, DeepSpeed training, metrics,
checkpoints and export."""
