"""Nucleus (top-p) sampling without sorting the vocabulary, for the teacher writing its own training text.

transformers samples by sorting every row of the vocabulary (top-p) and calling `multinomial` over all of it: on
SmolLM2-135M (49,152 tokens) at batch 96 on 2 CPU cores that is 60 % of generation time, more than the model
itself; at temperature 1 its nucleus often holds thousands of tokens, so a `topk` search for it is no faster. Here
a token is drawn from the whole distribution by its cumulative sum (one pass) and drawn again while it falls outside
the nucleus: the nucleus holds at least top_p of the mass, so a row is redrawn with probability at most 1 - top_p,
and what is kept is exactly the nucleus distribution renormalised. `NucleusSampler` plugs this into `generate` as
the last logits processor: it draws the token and leaves only that one finite, so greedy decoding takes it
(transformers' cache, padding and stopping rules are kept as they are).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from nmcli.errors import NMSparseError

MAX_DRAWS = 100  # at top_p 0.95 a row is still outside the nucleus after 100 draws with probability 0.05**100


def in_nucleus(probs: torch.Tensor, tokens: torch.Tensor, top_p: float) -> torch.Tensor:
    """[B] bool: is `tokens` [B, 1] in its row's top-p nucleus, i.e. is the mass of the more likely tokens below
    top_p (as in transformers' TopPLogitsWarper; tokens tied with the boundary's probability are all in)? Tokens of
    probability 0 never are."""
    p = probs.gather(1, tokens)
    above = (probs * (probs > p)).sum(-1, keepdim=True)
    return ((above < top_p) & (p > 0)).squeeze(1)


def sample_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """One token per row of `probs` [B, V], from the row's nucleus in proportion to its probabilities, drawing with
    the global torch generator (so `torch.manual_seed` fixes the result)."""
    cdf = probs.cumsum(-1)
    tokens = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)
    todo = torch.arange(probs.shape[0], device=probs.device)
    for _ in range(MAX_DRAWS):
        u = torch.rand(len(todo), 1, dtype=cdf.dtype, device=cdf.device) * cdf[todo, -1:]
        drawn = torch.searchsorted(cdf[todo], u, right=True).clamp_max(probs.shape[-1] - 1)
        kept = in_nucleus(probs[todo], drawn, top_p)
        tokens[todo[kept]] = drawn[kept, 0]
        todo = todo[~kept]
        if not len(todo):
            return tokens
    raise NMSparseError(
        f"the teacher's next-token probabilities are not usable in {len(todo)} of {probs.shape[0]} sequences "
        "(NaN or Inf logits): check the checkpoint with `nmsparse report`"
    )


class NucleusSampler(LogitsProcessor):
    """Draws each row's next token from softmax(scores / temperature) restricted to its top-p nucleus and returns
    scores that are 0 for that token and -inf elsewhere. Processors before it (end-of-text suppressed until
    min_new_tokens) have already set their -inf, which softmax turns into probability 0."""

    def __init__(self, top_p: float, temperature: float = 1.0):
        self.top_p, self.temperature = top_p, temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = sample_nucleus(torch.softmax(scores.float() / self.temperature, dim=-1), self.top_p)
        return torch.full_like(scores, -float("inf")).scatter_(1, tokens[:, None], 0.0)

    def __repr__(self) -> str:  # part of the teacher-text cache key
        return f"NucleusSampler(top_p={self.top_p}, temperature={self.temperature})"
