"""Models and their checkpoints: architectures (architecture.py), which layers are N:M targets (targets.py), how a
checkpoint's names map onto a model's state (state_match.py), and a command line's SOURCE resolved into tensors,
layers and a loaded model (resolve.py)."""
