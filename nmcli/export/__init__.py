"""Exports: nmsparse's compressed `nm` layout, dense, compressed-tensors `sparse-24-bitmask`, and ONNX."""
