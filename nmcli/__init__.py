"""nmsparse: make pretrained models N:M sparse (2:4 for sparse tensor cores, 1:8 ... 1:32 for size)."""

__version__ = "0.1.0"


def load_nm(path):  # noqa: ANN001, ANN201 - re-exported, typed where defined
    """The exact dense tensors of an nmsparse safetensors file (an `nm`-compressed one is decompressed)."""
    from nmcli.io.opener import load_nm as _load

    return _load(path)
