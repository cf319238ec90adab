"""Read an ONNX model as a checkpoint: its initializers, and which axis of each weight is K, from the graph.

The K axis comes from how the graph uses an initializer, not from names: `Gemm` with transB=1 stores [out, in]
(K = axis 1), `Gemm` with transB=0 and `MatMul` store [in, out] (K = axis 0), a `Transpose` in between swaps
them, and `Conv` stores [O, I/groups, *k] (K = axis 1). nmsparse's metadata_props give the pattern; the layout in them is replaced by the graph's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nmcli.errors import NMSparseError
from nmcli.io.metadata import LAYERS
from nmcli.io.sources import Checkpoint, in_memory
from nmcli.nm import CONV, LINEAR, LINEAR_T, Layout


def weight_layouts(graph) -> dict[str, Layout]:
    """initializer name -> layout, for the weights of Gemm / MatMul / Conv nodes (through Transpose nodes)."""
    initializers = {i.name for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    out: dict[str, Layout] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1]
        if node.op_type == "Conv":
            if name in initializers:
                out[name] = CONV
            continue
        # K axis of the matrix as the op uses it: MatMul multiplies by B [K, N]; Gemm by B^T when transB=1
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
        k = 1 if trans_b else 0
        while name not in initializers and name in producer and producer[name].op_type == "Transpose":
            transpose = producer[name]
            perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
            k, name = perm[k], transpose.input[0]
        if name in initializers:
            out[name] = LINEAR if k == 1 else LINEAR_T
    return out


def open_onnx(path: Path) -> Checkpoint:
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # noqa: BLE001 - protobuf and I/O errors alike mean an unreadable file
        raise NMSparseError(f"{path}: not a readable ONNX model ({exc})") from None
    if not model.graph.node:  # an empty file parses as an empty model
        raise NMSparseError(f"{path}: an ONNX model with no graph (the file is empty or not ONNX)")
    tensors = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    metadata = {p.key: p.value for p in model.metadata_props}
    layouts = weight_layouts(model.graph)
    if LAYERS in metadata:
        declared = json.loads(metadata[LAYERS])
        for name, entry in declared.items():
            if name not in layouts:
                raise NMSparseError(f"{path}: metadata names initializer {name}, which no Gemm/MatMul/Conv uses")
            entry.update(layout=layouts[name].name, k_axis=layouts[name].k_axis)
        metadata[LAYERS] = json.dumps(declared, sort_keys=True)
    ckpt = in_memory(str(path), tensors, metadata)
    ckpt.graph_layouts = {name: layout.name for name, layout in layouts.items()}
    return ckpt
