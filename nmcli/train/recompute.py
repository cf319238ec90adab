"""`finetune --gradient-checkpointing`: keep only each block's input for the backward pass and run the block again
there (activation checkpointing), trading about one more forward pass for the activations of every layer inside.

Hugging Face models: torch's composable `checkpoint` on every transformer block (`transformer_blocks`). It hooks the
block in place, so module and parameter names stay as they are (the masks, the checkpoints and the output are keyed
by them) and FSDP2's `fully_shard` composes with it; and it does not depend on train mode, which the student leaves
off when it learns without dropout (transformers' own gradient checkpointing runs only in train mode). timm models:
their own `set_grad_checkpointing`.
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint

from nmcli.errors import NMSparseError
from nmcli.models.architecture import transformer_blocks


def recompute_activations(model: nn.Module, name: str) -> None:
    """Checkpoint `model`'s blocks in place; an error naming the model when it has none."""
    if hasattr(model, "set_grad_checkpointing"):  # timm
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError) as exc:
            raise NMSparseError(f"--gradient-checkpointing: timm's {name} cannot checkpoint its blocks ({exc or type(exc).__name__}); "
                                "drop --gradient-checkpointing") from None
        return
    blocks = transformer_blocks(model)
    if not blocks:
        raise NMSparseError(f"--gradient-checkpointing: {name} names no transformer blocks (_no_split_modules) to "
                            "recompute; drop --gradient-checkpointing")
    for block in blocks:
        checkpoint(block)
