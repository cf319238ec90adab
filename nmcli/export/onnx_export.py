"""ONNX export: dense initializers with exact zeros, nmsparse metadata on the model and on each N:M initializer.

No standard N:M layout exists in ONNX (`sparse_initializer` is COO, larger than dense at 50 %, densified by
onnxruntime and ignored by TensorRT), so the faithful export keeps dense weights with exact zeros and says which
initializers are N:M, along which axis, in `metadata_props`. A Linear exports either as Gemm(transB=1) [out, in]
or as MatMul with a transposed [in, out] initializer; the metadata records the axis of the stored initializer.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import warnings
from pathlib import Path

import numpy as np
import torch

from nmcli.models.resolve import Resolved, load_model
from nmcli.errors import NMSparseError
from nmcli.export.formats import ExportResult
from nmcli.io.atomic import alive, atomic_output, check_writable, scratch_dir
from nmcli.io.metadata import SparsityMetadata
from nmcli.io.onnx_source import weight_layouts
from nmcli.oneshot.plan import PrunePlan, prune_model_
from nmcli.report.flops import example_inputs

EXTERNAL_DATA_BYTES = 2**31 - 2**20  # protobuf's 2 GB limit, with room for the graph
TENSOR_METADATA_IR = 10  # TensorProto.metadata_props exists from IR version 10


def _match_initializers(onnx_model, model: torch.nn.Module, plan: PrunePlan) -> dict[str, tuple[str, object]]:
    """initializer name -> (source layer, layout of the initializer), matched by value, not by name.

    The exporter may fold BatchNorm into a Conv's weight (a per-channel scale): zeros stay zeros, so a layer
    whose values differ is matched by its zero pattern instead, which N:M sparsity makes distinctive.
    """
    from onnx import numpy_helper

    layouts = weight_layouts(onnx_model.graph)
    arrays = {i.name: i for i in onnx_model.graph.initializer if i.name in layouts}
    modules = dict(model.named_modules())
    found: dict[str, tuple[str, object]] = {}
    for name, layer in plan.targets.items():
        if name in arrays:  # the exporter kept the parameter's name
            found[name] = (name, layouts[name])
            continue
        weight = modules[layer.module].weight.detach().numpy()
        for init_name, proto in arrays.items():
            if init_name in found or tuple(proto.dims) not in (weight.shape, weight.T.shape):
                continue
            stored = numpy_helper.to_array(proto)
            layout = layouts[init_name]
            candidate = weight.T if layout.k_axis != layer.layout.k_axis else weight
            if stored.shape == candidate.shape and (
                np.array_equal(stored, candidate) or np.array_equal(stored == 0, candidate == 0)
            ):
                found[init_name] = (name, layout)
                break
        else:
            raise NMSparseError(f"ONNX export: cannot find the initializer of layer {name} in the exported graph")
    return found


def export_onnx(
    resolved: Resolved, plan: PrunePlan, out: Path, *, prune: bool, force: bool, opset: int = 18,
    external_data: bool | None = None, seq_len: int = 128,
) -> ExportResult:
    import onnx

    check_writable(out, force)
    model = load_model(resolved).eval()
    if prune:
        prune_model_(model, plan)
    inputs = example_inputs(model, resolved.model, seq_len, device="cpu")
    names = list(inputs)
    dynamic = {n: {0: "batch"} for n in names} | {"output": {0: "batch"}}
    if resolved.model.source == "hf":
        dynamic = {n: {0: "batch", 1: "sequence"} for n in names} | {"output": {0: "batch"}}
    notes = []
    with scratch_dir(out) as tmp:
        raw = tmp / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow in model code
            torch.onnx.export(
                model, (), str(raw), kwargs=inputs, dynamo=False, input_names=names, output_names=["output"],
                dynamic_axes=dynamic, opset_version=opset,
                do_constant_folding=False,  # keep the checkpoint's weights as they are (no BatchNorm folding)
            )
        onnx_model = onnx.load(str(raw), load_external_data=True)
        matched = _match_initializers(onnx_model, model, plan)
        meta = SparsityMetadata(
            pattern=plan.pattern,
            layers={
                init: {"layout": layout.name, "k_axis": layout.k_axis, "pattern": str(plan.pattern_of(src)), "source": src}
                for init, (src, layout) in matched.items()
            },
            skipped=plan.skipped,
            model=resolved.model.to_json(),
        ).to_strings()
        del onnx_model.metadata_props[:]
        for key, value in meta.items():
            onnx_model.metadata_props.add(key=key, value=value)
        if onnx.IR_VERSION >= TENSOR_METADATA_IR and onnx_model.ir_version < TENSOR_METADATA_IR:
            onnx_model.ir_version = TENSOR_METADATA_IR
        for proto in onnx_model.graph.initializer:
            if proto.name in matched:
                src, layout = matched[proto.name]
                for key, value in (("nmsparse.pattern", str(plan.pattern_of(src))), ("nmsparse.k_axis", str(layout.k_axis)),
                                   ("nmsparse.layout", layout.name), ("nmsparse.source", src)):
                    proto.metadata_props.add(key=key, value=value)
        size = sum(int(np.prod(p.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(p.data_type)).itemsize
                   for p in onnx_model.graph.initializer)
        use_external = size > EXTERNAL_DATA_BYTES if external_data is None else external_data
    data = _publish(onnx_model, out, force, use_external)
    if data is not None:
        notes.append(f"weights in external data file {data.name}")
    return ExportResult(out, "onnx", sorted(matched), [], notes, extra_files=[data] if data else [])


_DATA_NAME = r"\.(?:(?P<pid>\d+)-)?[0-9a-f]{8}\.data|\.data"  # after the model's name: .<pid>-<token>.data now


def _data_files(out: Path) -> dict[Path, int | None]:
    """External data files of the export `out` and the pid of the export that wrote each: `<out>.<pid>-<token>.data`
    (and `<out>.<token>.data` / `<out>.data` of older versions, whose writer is unknown)."""
    found = {}
    for path in out.parent.glob(f"{glob.escape(out.name)}.*data"):
        match = re.fullmatch(_DATA_NAME, path.name[len(out.name):])
        if match:
            found[path] = int(match["pid"]) if match["pid"] else None
    return found


def _orphans(out: Path, keep: Path | None, replaced: list[Path]) -> list[Path]:
    """Data that no published model can name once `out` is published: the replaced export's, and the data of
    exports killed before their model appeared (a writer that no longer runs). A live writer's data is its own."""
    return [
        path for path, pid in _data_files(out).items()
        if path != keep and (path in replaced or (pid is not None and pid != os.getpid() and not alive(pid)))
    ]


def _publish(onnx_model, out: Path, force: bool, external: bool) -> Path | None:  # noqa: ANN001
    """Model and external data as one output. The data gets a name of its own, written first; then the model,
    which names it, appears atomically; then the data of the export it replaced is removed, with any left by an
    export killed earlier. So a model is never paired with another export's data, even if the run is killed in
    between, and a killed run's data does not stay behind for ever."""
    import onnx

    previous = list(_data_files(out)) if out.exists() else []  # data of an export that --force replaces
    data = out.with_name(f"{out.name}.{os.getpid()}-{secrets.token_hex(4)}.data") if external else None
    try:
        with atomic_output(out, force=force) as tmp:
            if data is None:
                onnx.save_model(onnx_model, str(tmp))
            else:  # the location is relative to the model file, and tmp sits beside `out`
                onnx.save_model(onnx_model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data.name, size_threshold=0)
    except BaseException:
        if data is not None:
            data.unlink(missing_ok=True)
        raise
    for stale in _orphans(out, data, previous):
        stale.unlink(missing_ok=True)
    return data
