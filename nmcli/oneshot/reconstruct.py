"""`prune --reconstruct E`: local reconstruction of each block after its layers are pruned (Wagner et al. 2025,
"A Free Lunch in LLM Compression: Revisiting Retraining after Pruning"; EBFT does the same per block).

The block's kept weights are trained, every mask fixed, for E passes over the calibration batches so that the block
maps the inputs it receives (the outputs of the blocks before it, already pruned and reconstructed) to the dense
model's own activations at that depth: a block also corrects the drift of the blocks before it. A block spans
nonlinearities (attention's softmax, the MLP's gate): the per-matrix fits (SparseGPT's update, ALPS, `--refine`)
each fit one layer's own outputs and cannot trade one layer's error against another's, so their errors add up
through the block. Only the target layers' weights move; norms, biases and everything outside the block stay as
they are. The loss is the mean squared error over real tokens (padding left out), although on a Llama-family model
one token's "massive activation" (SmolLM2's first token: ~100x the others' norm after block 20) dominates it: each
token's error relative to its own norm measured slightly worse on SmolLM2 (README's benchmarks). Adam, each
matrix's learning rate a fixed fraction (`--reconstruct-lr`) of the RMS of its kept weights, as Adafactor scales its
relative step: Adam moves every weight by about the learning rate a step whatever its gradient's scale, so a rate
fixed in absolute terms suits one model's weight scale only (SmolLM2's kept weights have 3x MiniLM's RMS and their
best fixed rates differ about as much: README's benchmarks). One step per calibration sample
(`one_sample_batches`), the samples in their order: no randomness. A step per sample rather than per batch of 8 is
128 steps a pass over the default calibration instead of 16, for about the same arithmetic; one pass fits closer.
More calibration samples help far more than more passes over the same ones (README's benchmarks): the fit
generalizes from the samples it sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_RELATIVE_RATE = 3.5e-3  # Adam learning rate / the RMS of a matrix's kept weights (README's benchmarks)


@dataclass(frozen=True)
class BlockFit:
    """A block's output error ‖y − y_dense‖² / ‖y_dense‖² over the calibration tokens, before and after."""

    before: float
    after: float


def one_sample_batches(batches: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Each tokenized batch ({"input_ids": [b, seq], "attention_mask": [b, seq], ...}, right-padded) split into
    batches of one sample, its padding cut off."""
    single = []
    for batch in batches:
        mask = batch.get("attention_mask")
        for row in range(len(batch["input_ids"])):
            length = int(mask[row].sum()) if mask is not None else batch["input_ids"].shape[1]
            single.append({key: value[row : row + 1, :length] for key, value in batch.items()})
    return single


def block_output(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _squared_error(output: torch.Tensor, target: torch.Tensor,
                   tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(Σ (y − t)², Σ t², tokens counted) over the real tokens of a [batch, seq, hidden] output (`tokens`: the
    attention mask)."""
    diff = (output - target).pow(2).sum(-1)
    power = target.pow(2).sum(-1)
    if tokens is None or tokens.shape != diff.shape:
        return diff.sum(), power.sum(), diff.numel()
    real = tokens.to(diff.device, diff.dtype)
    return (diff * real).sum(), (power * real).sum(), int(tokens.sum())


def _errors(block: nn.Module, inputs: Sequence[tuple[tuple, dict]], targets: Sequence[torch.Tensor],
            tokens: Sequence[torch.Tensor | None]) -> tuple[float, list[torch.Tensor]]:
    """(‖block(x) − target‖² / ‖target‖² summed over the batches, the block's outputs)."""
    error = power = 0.0
    outputs = []
    with torch.no_grad():
        for (args, kwargs), target, real in zip(inputs, targets, tokens):
            outputs.append(block_output(block, args, kwargs))
            diff, total, _ = _squared_error(outputs[-1], target, real)
            error, power = error + float(diff), power + float(total)
    return (error / power if power > 0 else 0.0), outputs


def _relative_rates(weights: Sequence[nn.Parameter], masks: Sequence[torch.Tensor], rate: float) -> list[dict]:
    """Adam's parameter groups: each weight's learning rate `rate` x the RMS of its kept (unmasked) entries."""
    groups = []
    for weight, keep in zip(weights, masks):
        kept = weight.detach()[keep]
        groups.append({"params": [weight], "lr": rate * float(kept.pow(2).mean().sqrt()) if kept.numel() else 0.0})
    return groups


def reconstruct_block(block: nn.Module, weights: Sequence[nn.Parameter], inputs: Sequence[tuple[tuple, dict]],
                      targets: Sequence[torch.Tensor], tokens: Sequence[torch.Tensor | None],
                      epochs: int, relative_rate: float = DEFAULT_RELATIVE_RATE) -> tuple[BlockFit, list[torch.Tensor]]:
    """Train `weights` (the block's pruned target weights; their zeros stay exact zeros) for `epochs` passes so that
    `block(inputs)` approaches `targets`, the other parameters of the block held fixed; returns the errors before and
    after, and the trained block's outputs (what the next block receives)."""
    masks = [w.detach() != 0 for w in weights]
    before, _ = _errors(block, inputs, targets, tokens)
    trainable = {id(w) for w in weights}
    was = {p: p.requires_grad for p in block.parameters()}
    for p in was:
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.Adam(_relative_rates(weights, masks, relative_rate))
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for (args, kwargs), target, real in zip(inputs, targets, tokens):
                    diff, _, count = _squared_error(block_output(block, args, kwargs), target, real)
                    (diff / max(count, 1)).backward()
                    for w, keep in zip(weights, masks):
                        w.grad.mul_(keep)  # Adam's moments stay 0 there, so a pruned weight stays an exact 0
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)
    after, outputs = _errors(block, inputs, targets, tokens)
    return BlockFit(before, after), outputs
