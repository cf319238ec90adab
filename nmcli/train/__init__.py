"""The fine-tuning engine: data, loop, checkpoints, distributed, metrics."""
