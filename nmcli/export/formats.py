"""Safetensors-based exports: `nm` (any N:M, compressed), `dense` (back to dense-shaped) and compressed-tensors'
`sparse-24-bitmask` (2:4 Linear weights, readable by compressed-tensors 0.9-0.14 and the HF loaders of that era).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nmcli.models.resolve import Resolved
from nmcli.errors import NMSparseError
from nmcli.io import nm_format
from nmcli.io.atomic import atomic_output
from nmcli.io.metadata import DENSE_MASKED
from nmcli.io.rewrite import Item, Progress, copy_item, copy_side_files, rewrite
from nmcli.io.sources import INDEX_NAME, Checkpoint
from nmcli.nm import LINEAR, NMPattern, compliance, group_mask, reduction_length
from nmcli.oneshot.plan import PrunePlan, declared_plan, plan_prune
from nmcli.oneshot.magnitude import prune_items

CT_FORMAT = "sparse-24-bitmask"
CT_VERSION = "0.14.0.1"  # the last compressed-tensors release with the 2:4 compressors


@dataclass
class ExportResult:
    out: Path
    format: str
    nm_layers: list[str]  # N:M layers in the output (compressed, or dense-shaped with exact zeros)
    dense_layers: list[str] = field(default_factory=list)  # N:M-capable layers the format keeps dense
    notes: list[str] = field(default_factory=list)
    extra_files: list[Path] = field(default_factory=list)  # written besides `out` (an ONNX model's external data)


def sparsity_plan(
    resolved: Resolved, pattern: NMPattern | None, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> PrunePlan:
    """The N:M tensors: what the file declares (prune/finetune output), or the targets of `--pattern`."""
    if pattern is None:
        declared = declared_plan(resolved)
        if declared is None:
            raise NMSparseError(
                f"{resolved.checkpoint.where}: declares no N:M pattern (not written by prune/finetune); "
                "pass --pattern N:M (and --prune if it is not sparse yet)"
            )
        return declared
    return plan_prune(resolved, pattern, include, exclude)


def check_compliance(resolved: Resolved, plan: PrunePlan, prune: bool) -> None:
    """A layer that breaks its pattern is an error listing every offender, unless --prune prunes on the way."""
    if prune:
        return
    offending = [
        f"{name} ({plan.pattern_of(name)})"
        for name, layer in plan.targets.items()
        if not compliance(resolved.checkpoint.read(name), plan.pattern_of(name), layer.layout).compliant
    ]
    if offending:
        shown = ", ".join(offending[:8]) + (f" and {len(offending) - 8} more" if len(offending) > 8 else "")
        raise NMSparseError(
            f"{resolved.checkpoint.where}: {len(offending)} layer(s) do not comply with their N:M pattern: {shown}; "
            "pass --prune to prune them on the way"
        )


def _source_items(ckpt: Checkpoint, plan: PrunePlan, names: list[str], prune: bool) -> list[Item]:
    """The tensors as they are, or (--prune) with the targets pruned exactly as `nmsparse prune` does."""
    return prune_items(ckpt, plan, names) if prune else [copy_item(ckpt, name) for name in names]


def _dense_of(item: Item, tensors: list[torch.Tensor]) -> torch.Tensor:
    """A source item's one tensor as `prune` writes it (with --prune: masked, NaN/Inf weights refused), before it
    is packed."""
    return item.made(tensors)[0]


def _base_metadata(resolved: Resolved, plan: PrunePlan, fmt: str) -> dict[str, str]:
    kept = {k: v for k, v in resolved.checkpoint.metadata.items() if not k.startswith("nmsparse.")}
    meta = plan.metadata(resolved.model)
    meta.format = fmt
    if resolved.declared is not None and resolved.declared.recipe is not None:
        meta.recipe = resolved.declared.recipe
    return {**kept, **meta.to_strings()}


def export_nm(resolved: Resolved, plan: PrunePlan, out: Path, *, prune: bool, force: bool, progress: Progress) -> ExportResult:
    ckpt = resolved.checkpoint
    table = {}

    def items_of(names: list[str]) -> list[Item]:
        items = _source_items(ckpt, plan, names, prune)
        for i, item in enumerate(items):
            layer = plan.targets.get(item.inputs[0])
            if layer is None:
                continue
            name, info = item.inputs[0], ckpt.infos[item.inputs[0]]
            pattern = plan.pattern_of(name)
            values_shape, positions_bytes = nm_format.packed_shapes(info.shape, pattern, layer.layout)

            def produce(tensors, source=item, layer=layer, pattern=pattern):
                return list(nm_format.compress(_dense_of(source, tensors), pattern, layer.layout))

            items[i] = Item(
                [name],
                [(name + nm_format.VALUES_SUFFIX, values_shape, info.dtype), (name + nm_format.POSITIONS_SUFFIX, (positions_bytes,), torch.uint8)],
                produce,
            )
        return items

    for name, layer in plan.targets.items():
        info = ckpt.infos[name]
        table[name] = nm_format.tensor_entry(name, info.shape, info.dtype, plan.pattern_of(name), layer.layout)
    meta = _base_metadata(resolved, plan, nm_format.FORMAT_NAME)
    meta[nm_format.VERSION_KEY] = nm_format.FORMAT_VERSION
    meta[nm_format.TENSORS_KEY] = json.dumps(table, sort_keys=True)
    notes = rewrite(ckpt, items_of, out, meta, force=force, progress=progress)
    return ExportResult(out, "nm", list(plan.targets), notes=notes)


def export_dense(resolved: Resolved, plan: PrunePlan, out: Path, *, prune: bool, force: bool, progress: Progress) -> ExportResult:
    """Dense-shaped tensors with exact zeros (what prune writes); from an `nm` file this decompresses."""
    ckpt = resolved.checkpoint
    meta = _base_metadata(resolved, plan, DENSE_MASKED)
    notes = rewrite(ckpt, lambda names: _source_items(ckpt, plan, names, prune), out, meta, force=force, progress=progress)
    return ExportResult(out, "dense", list(plan.targets), notes=notes)


def fits_two_four(pattern: NMPattern) -> bool:
    """sparse-24-bitmask packs at most 2 non-zeros in every group of 4: an N:M with N <= 2 and M a multiple of 4
    never puts more in one (1:4, 2:8 fit; 4:8 does not)."""
    return pattern.n <= 2 and pattern.m % 4 == 0


def _bitmask_tensors(weight: torch.Tensor) -> list[torch.Tensor]:
    """compressed-tensors' layout: P.shape [2, 1] int64, P.compressed [rows, cols/2], P.bitmask packbits(little)."""
    keep = group_mask(weight.reshape(-1, 4), 2).reshape(weight.shape)  # exactly 2 of every 4, covering the non-zeros
    rows, cols = weight.shape
    compressed = weight[keep].reshape(rows, cols // 2)
    bitmask = torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    return [torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1), compressed, bitmask]


def _ignored_modules(resolved: Resolved, dense: list[str]) -> list[str]:
    """compressed-tensors targets every `Linear` of the model: each one it must not decompress is named, the N:M
    layers kept dense and every layer whose weight is not stored under its own name (a tied LM head: the loader
    would look for `lm_head.compressed` and find no weight at all)."""
    kept = {resolved.layers[n].module if n in resolved.layers else n.removesuffix(".weight") for n in dense}
    return sorted(kept | {layer.module for layer in resolved.unstored.values()})


def export_compressed_tensors(
    resolved: Resolved, plan: PrunePlan, out: Path, *, prune: bool, force: bool, progress: Progress
) -> ExportResult:
    """A Hugging Face style folder: config.json with quantization_config.sparsity_config + model.safetensors. The
    layers whose pattern fits 2:4 are packed, every other Linear (another pattern, dense) is in `ignore`."""
    ckpt = resolved.checkpoint
    packable = {
        name: layer for name, layer in plan.targets.items()
        if layer.layout == LINEAR and len(ckpt.infos[name].shape) == 2 and reduction_length(ckpt.infos[name].shape, LINEAR) % 4 == 0
        and fits_two_four(plan.pattern_of(name))
    }
    dense = sorted(set(resolved.layers) - set(packable))

    def items_of(names: list[str]) -> list[Item]:
        items = _source_items(ckpt, plan, names, prune)  # --prune prunes every target, packed or kept dense
        for i, item in enumerate(items):
            name = item.inputs[0]
            if name not in packable:
                continue
            info = ckpt.infos[name]
            rows, cols = info.shape
            prefix = name.removesuffix(".weight")

            def produce(tensors, source=item):
                return _bitmask_tensors(_dense_of(source, tensors))

            items[i] = Item(
                [name],
                [(f"{prefix}.shape", (2, 1), torch.int64), (f"{prefix}.compressed", (rows, cols // 2), info.dtype),
                 (f"{prefix}.bitmask", (rows, (cols + 7) // 8), torch.uint8)],
                produce,
            )
        return items

    zeros = sum(round(ckpt.infos[n].numel * (1 - plan.pattern_of(n).density)) for n in plan.targets)
    total = sum(i.numel for i in ckpt.infos.values())
    config = dict(ckpt.hf_config or {"nmsparse_model": resolved.model.to_json() if resolved.model else None})
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": CT_VERSION,
        "sparsity_config": {
            "format": CT_FORMAT,
            "targets": ["Linear"],
            "ignore": _ignored_modules(resolved, dense),
            "global_sparsity": zeros / total if total else 0.0,
            "sparsity_structure": "2:4",
        },
    }
    meta = {k: v for k, v in _base_metadata(resolved, plan, CT_FORMAT).items()}
    meta["format"] = "pt"
    notes = []
    with atomic_output(out, force=force, directory=True) as tmp:
        if ckpt.folder is not None:
            notes = copy_side_files(ckpt.folder, tmp, {INDEX_NAME, "config.json"})
        rewrite(ckpt, items_of, tmp / "model.safetensors", meta, force=True, progress=progress, single_file=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    notes += [f"kept dense (not a 2:4-compatible Linear): {len(dense)} layer(s)"] if dense else []
    return ExportResult(out, "compressed-tensors", list(packable), dense, notes)
