"""Teacher-text sampling (nmcli/data/sampling.py) against transformers' own top-p and temperature warpers, and the
generation batch size against hand-computed key/value cache sizes."""

import pytest
import torch
import transformers
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from nmcli.data.sampling import NucleusSampler, in_nucleus, sample_nucleus
from nmcli.data.teacher import generation_batch
from nmcli.errors import NMSparseError


def _reference_kept(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    return TopPLogitsWarper(top_p)(None, logits.clone()) > -float("inf")


@pytest.mark.parametrize("scale", [4.0, 1.0, 0.01])  # peaked, ordinary, nearly flat (a nucleus of ~950 of 1,000)
def test_the_nucleus_is_transformers_top_p_set(scale):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 1000, generator=gen) * scale
    probs = torch.softmax(logits, -1)
    ours = torch.stack([in_nucleus(probs, torch.full((16, 1), j), 0.95) for j in range(1000)], dim=1)
    assert torch.equal(ours, _reference_kept(logits, 0.95))


def test_sampled_tokens_follow_the_tempered_nucleus_distribution():
    """40,000 draws from one row: frequencies within 0.01 of softmax after transformers' temperature and top-p
    warpers; every row's scores have exactly one finite entry, the drawn token, at 0."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -4.0]])
    expected = torch.softmax(TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.7)(None, logits.clone())), -1)[0]
    torch.manual_seed(0)
    scores = NucleusSampler(top_p=0.9, temperature=0.7)(None, logits.repeat(40_000, 1))
    assert torch.equal((scores > -float("inf")).sum(1), torch.ones(40_000, dtype=torch.long))
    assert torch.equal(scores.max(1).values, torch.zeros(40_000))
    frequencies = torch.bincount(scores.argmax(1), minlength=8).double() / 40_000
    outside = expected == 0  # tokens 4-7 at top-p 0.9: never drawn
    assert outside.sum() == 4 and not frequencies[outside].any()
    assert torch.allclose(frequencies, expected.double(), atol=0.01)


def test_generation_batch_keeps_the_key_value_cache_within_its_budget():
    smollm2 = transformers.LlamaConfig(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576
    )
    assert generation_batch(smollm2, 256, 2) == 128  # 2 x 30 x 3 x 64 x 256 x 2 B = 5.6 MiB a sequence: 182, capped
    assert generation_batch(smollm2, 2048, 4) == 11  # 90 MiB a sequence
    llama7b = transformers.LlamaConfig(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096)
    assert generation_batch(llama7b, 512, 4) == 2  # 2 x 32 x 32 x 128 x 512 x 4 B = 512 MiB
    assert generation_batch(llama7b, 4096, 4) == 1  # over budget alone: still one at a time
    gpt2 = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768)
    assert generation_batch(gpt2, 1024, 4) == 14  # 72 MiB a sequence


def test_zero_probability_tokens_are_never_drawn_and_nan_is_a_clear_error():
    probs = torch.softmax(torch.tensor([[0.0, -float("inf"), 0.0, -float("inf")]]).repeat(1000, 1), -1)
    torch.manual_seed(0)
    assert set(sample_nucleus(probs, 0.95).tolist()) == {0, 2}
    with pytest.raises(NMSparseError, match="not usable in 1 of 2 sequences"):
        sample_nucleus(torch.tensor([[0.5, 0.5], [float("nan"), 0.5]]), 0.95)
