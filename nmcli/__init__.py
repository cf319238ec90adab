"""nmsparse: make pretrained models N:M sparse (2:4 for sparse tensor cores, 1:8 ... 1:32 for size)."""

__version__ = "0.1.0"
