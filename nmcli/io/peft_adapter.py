"""Low-rank adapters in peft's on-disk layout: `adapter_config.json` and `adapter_model.safetensors` whose keys are
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (peft's saved names, the adapter's own name left out),
so that `peft.PeftModel.from_pretrained(base, folder)` loads them. Written by hand: peft itself is not a dependency.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nmcli.io.atomic import atomic_output

ADAPTER_DIR = "adapter"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_state(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """module -> (A [r, K], B [out, r]) as peft names them."""
    out = {}
    for module, (lora_a, lora_b) in factors.items():
        out[f"{PREFIX}{module}.lora_A.weight"] = lora_a.detach().contiguous().cpu()
        out[f"{PREFIX}{module}.lora_B.weight"] = lora_b.detach().contiguous().cpu()
    return out


def lora_config(*, rank: int, alpha: float, dropout: float, modules: list[str], fan_in_fan_out: bool, task_type: str,
                base: str) -> dict[str, Any]:
    """The fields of peft's LoraConfig that describe these factors (full module names: peft matches a target
    exactly or as a dotted suffix)."""
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base, "r": rank, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": sorted(modules), "fan_in_fan_out": fan_in_fan_out, "bias": "none",
        "inference_mode": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }


def write_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: dict[str, Any]) -> None:
    """The adapter folder, complete or not at all."""
    with atomic_output(folder, force=True, directory=True) as tmp:
        save_file(adapter_state(factors), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
