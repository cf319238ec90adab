"""Training checkpoints: everything needed to continue a run to the same final weights.

`checkpoint/model.safetensors` holds the (parametrized) model state, tied weights once (safetensors' `save_model`);
`checkpoint/state.pt` holds optimizer,
scheduler, frozen masks, RNG states, the step and a fingerprint of the run. It is loaded with
`torch.load(weights_only=True)`: only tensors and plain containers, never code.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from nmcli.runtime.device import model_device
from nmcli.errors import NMSparseError
from nmcli.io.atomic import atomic_output, recover

CHECKPOINT_DIR = "checkpoint"
STATE_KEYS = frozenset(
    {"epoch", "step", "optimizer", "scheduler", "masks", "fingerprint", "torch_rng", "python_rng"}
)  # what the engine saves (plus the RNG states added here); a state.pt without them is not ours


def rng_states() -> dict[str, Any]:
    """Every random state a run draws from: torch's CPU generator, Python's, and each CUDA device's when CUDA is
    in use (dropout and sampling on the GPU draw from those)."""
    states = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_initialized():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def save_training_checkpoint(out: Path, model: torch.nn.Module | dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Replace `out`'s checkpoint with `model`'s weights (or a gathered state dict of them, a sharded run's) and
    `state`. A failed write (torch's zip writer reports a full disk as a RuntimeError, "unexpected pos ...") names
    the folder and the free space; the previous checkpoint stays."""
    state = {**state, **rng_states()}
    try:
        with atomic_output(out / CHECKPOINT_DIR, force=True, directory=True) as tmp:
            if isinstance(model, dict):
                save_file(_unshared(model), str(tmp / "model.safetensors"))
            else:
                save_model(model, str(tmp / "model.safetensors"))
            torch.save(state, tmp / "state.pt")
    except (OSError, RuntimeError, SafetensorError) as exc:
        free = shutil.disk_usage(out).free / 2**30
        raise NMSparseError(
            f"{out / CHECKPOINT_DIR}: writing the training checkpoint failed ({_first_line(exc)}); {free:.1f} GiB free on "
            "that disk: a full disk is the usual cause; free space or choose another --out"
        ) from None


def read_training_state(run: Path, fingerprint: dict[str, Any]) -> dict:
    """`run`'s training state, refusing a run of another model, recipe or setting. Read before any model or data
    is loaded, so a wrong `--resume` fails at once."""
    folder = run / CHECKPOINT_DIR
    recover(folder)  # a run killed while replacing its checkpoint resumes from the previous complete one
    if not (folder / "state.pt").is_file():
        raise NMSparseError(f"--resume {run}: no training checkpoint in {folder}; is this a finetune --out folder?")
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise NMSparseError(f"{folder / 'state.pt'}: cannot read the training state ({_first_line(exc)}); start a new --out") from None
    missing = sorted(STATE_KEYS - set(state)) if isinstance(state, dict) else ["(not a dict)"]
    if missing:
        raise NMSparseError(f"{folder / 'state.pt'}: not an nmsparse training state (missing {', '.join(missing)})")
    saved = json.loads(state["fingerprint"])
    for key in sorted(set(saved) | set(fingerprint)):
        if saved.get(key) != fingerprint.get(key):
            raise NMSparseError(
                f"--resume {run}: it was a run with {key}={saved.get(key)!r}, this one has {fingerprint.get(key)!r}; "
                "resume with the same settings or start a new --out"
            )
    return state


def load_checkpoint_weights(run: Path, model: torch.nn.Module) -> None:
    """`run`'s checkpointed weights into `model`, on the model's device."""
    path = run / CHECKPOINT_DIR / "model.safetensors"
    try:
        load_model(model, str(path), device=str(model_device(model)))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise NMSparseError(f"{path}: does not fit this run's model ({str(exc).splitlines()[0]})") from None


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores no tensor twice: a tied weight's second name gets its own copy."""
    seen, out = set(), {}
    for name, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def checkpoint_tensors(run: Path) -> dict[str, torch.Tensor]:
    """`run`'s checkpointed weights as a state dict (a sharded run scatters them from rank 0)."""
    path = run / CHECKPOINT_DIR / "model.safetensors"
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise NMSparseError(f"{path}: cannot read the checkpointed weights ({_first_line(exc)})") from None


def restore_rng(state: dict) -> None:
    """Undo `rng_states`; a CPU checkpoint resumed on a GPU keeps the GPU's seeded state, and vice versa."""
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
