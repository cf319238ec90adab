"""The LoRA side of a run (a recipe's `lora:` section): its settings checked before anything is loaded, and the
adapter written in peft's layout beside the merged model with `--keep-adapter`.

The adapter describes `merged = E * (base + alpha / rank * B A)` with E the base's own N:M mask (methods.md §10):
peft applies `base + alpha / rank * B A` without the mask, so a model rebuilt from the base and the adapter is the
merged one once the base's zeros are applied again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nmcli.errors import NMSparseError
from nmcli.io.peft_adapter import lora_config
from nmcli.methods.sparsifier import Sparsifier
from nmcli.models.architecture import ModelKind
from nmcli.oneshot.calibrate import one_shot_start
from nmcli.methods.recipes import LoraSpec

TASK_TYPES = {ModelKind.CAUSAL_LM: "CAUSAL_LM", ModelKind.ENCODER: "FEATURE_EXTRACTION",
              ModelKind.SEQUENCE_CLASSIFIER: "SEQ_CLS"}


def check_lora_settings(recipe_name: str, lora: LoraSpec | None, *, keep_adapter: bool, grad_log_every: int,
                        start: str | None, autocast: bool, shard: bool) -> None:
    """Combinations that cannot work, refused before any model or data is loaded."""
    if lora is None:
        if keep_adapter:
            raise NMSparseError(f"--keep-adapter writes a LoRA adapter; recipe {recipe_name} has no lora: section "
                                "(add one, or drop --keep-adapter)")
        return
    if grad_log_every:
        raise NMSparseError("--grad-log-every measures the weights' gradients; a LoRA recipe freezes the weights "
                            "(drop --grad-log-every)")
    if lora.base_dtype != "float32" and not autocast:
        raise NMSparseError(f"lora.base_dtype: {lora.base_dtype} keeps the frozen weights in {lora.base_dtype}, which "
                            "compute under bf16 autocast only: pass --bf16 (or set training.bf16), or drop base_dtype")
    if lora.base_dtype != "float32" and shard:
        raise NMSparseError(f"lora.base_dtype: {lora.base_dtype} with --shard: FSDP2 shards one dtype per block and the "
                            "adapters train in float32; drop one of the two")
    if not keep_adapter:
        return
    if lora.train_norms:
        raise NMSparseError("--keep-adapter: lora.train_norms also trains norms and biases, which a LoRA adapter "
                            "cannot hold (the merged model has them); drop one of the two")
    if one_shot_start(start) is not None:
        raise NMSparseError(f"--keep-adapter: the adapter's base must be on disk, and --start {start} prunes in "
                            f"memory; prune first (nmsparse prune MODEL --method {start} --out BASE) and pass --start BASE")


def kept_adapter(sparsifier: Sparsifier, lora: LoraSpec, kind: ModelKind, base: str,
                 state: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict[str, Any]]:
    """A copy of every adapted layer's (A, B), taken before the merge folds them into the weights (from the model,
    or from its gathered `state` in a sharded run), and peft's adapter_config.json for them over `base` (a folder,
    by its absolute path, or a model name)."""
    adapters = sparsifier.adapters()
    if state is None:
        factors = {name: (f.lora_A.detach().clone(), f.lora_B.detach().clone()) for name, f in adapters.items()}
    else:
        prefix = "{}.parametrizations.weight.0.lora.lora_"
        factors = {name: (state[prefix.format(name) + "A"], state[prefix.format(name) + "B"]) for name in adapters}
    base_path = Path(base)
    config = lora_config(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, modules=list(factors),
                         fan_in_fan_out=any(f.fan_in_fan_out for f in adapters.values()), task_type=TASK_TYPES.get(kind),
                         base=str(base_path.resolve()) if base_path.exists() else base)
    return factors, config
