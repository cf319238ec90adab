"""The distillation terms of methods.md §6 against hand-written formulas, and the Distiller's contract."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from nmcli.models.architecture import ModelKind
from nmcli.methods.recipes import DistillSpec
from nmcli.train.distill import Distiller, logit_kl, mean_pool, next_token_ce, resolve_spec, squarehead


def _np_kl(p_logits, q_logits):
    p = np.exp(p_logits - p_logits.max()) / np.exp(p_logits - p_logits.max()).sum()
    q = np.exp(q_logits - q_logits.max()) / np.exp(q_logits - q_logits.max()).sum()
    return float((p * np.log(p / q)).sum())


def test_logit_kl_is_teacher_to_student_kl_over_real_tokens_with_temperature_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for tau in (1.0, 2.0):
        real = [(0, 0), (0, 1), (1, 0)]
        expected = tau**2 * np.mean([_np_kl(teacher[b, t].double().numpy() / tau, student[b, t].double().numpy() / tau) for b, t in real])
        assert logit_kl(student, teacher, mask, tau).item() == pytest.approx(expected, rel=1e-5)
    garbage = student.clone()
    garbage[1, 2] += 100  # a padded position
    assert logit_kl(garbage, teacher, mask).item() == pytest.approx(logit_kl(student, teacher, mask).item())


def _autodiff_kl(student, teacher, mask, tau):
    """The same loss written as plain autodiff sees it (the second implementation)."""
    log_s, log_t = F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher / tau, dim=-1)
    per_position = (log_t.exp() * (log_t - log_s)).sum(-1)
    if per_position.dim() == 1:
        return tau**2 * per_position.mean()
    return tau**2 * (per_position * mask).sum() / mask.sum()


def test_chunked_kl_value_and_gradient_equal_autodiff_across_chunk_boundaries():
    torch.manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    for shape, tau, rows in (((3, 5, 11), 1.0, 2), ((3, 5, 11), 2.0, 4), ((3, 5, 11), 1.0, None), ((3, 11), 2.0, 2)):
        student, teacher = torch.randn(*shape, requires_grad=True), torch.randn(*shape)
        reference = student.detach().clone().requires_grad_(True)
        loss = logit_kl(student, teacher, mask, tau, rows=rows)
        expected = _autodiff_kl(reference, teacher, mask, tau)
        (3.0 * loss).backward()
        (3.0 * expected).backward()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert torch.allclose(student.grad, reference.grad, atol=1e-6), (shape, tau, rows)


def test_chunked_kl_keeps_bf16_logits_in_bf16_for_the_gradient():
    torch.manual_seed(4)
    student = torch.randn(2, 3, 7).to(torch.bfloat16).requires_grad_(True)
    teacher = torch.randn(2, 3, 7).to(torch.bfloat16)
    mask = torch.ones(2, 3)
    logit_kl(student, teacher, mask, rows=2).backward()
    reference = student.detach().float().requires_grad_(True)
    _autodiff_kl(reference, teacher.float(), mask, 1.0).backward()
    assert student.grad.dtype == torch.bfloat16
    assert torch.allclose(student.grad.float(), reference.grad, atol=2e-3)


def test_next_token_ce_matches_cross_entropy_on_the_unpadded_tokens():
    torch.manual_seed(1)
    logits, ids = torch.randn(2, 4, 7), torch.tensor([[3, 1, 4, 1], [5, 0, 2, 6]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    # the predictions of tokens 1 and 2 of the first row, 1 to 3 of the second: 5 in all
    expected = torch.cat([F.cross_entropy(logits[0, :2], ids[0, 1:3], reduction="none"),
                          F.cross_entropy(logits[1, :3], ids[1, 1:], reduction="none")]).mean()
    assert next_token_ce(logits, ids, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_squarehead_is_the_sum_of_normalised_mse_per_layer():
    h_t = [torch.tensor([[[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])]
    h_s = [torch.tensor([[[2.0, 1.0], [2.0, 2.0], [0.0, 0.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]]])]
    mask = torch.tensor([[1, 1, 0]])
    # layer 0: errors (1+0)/2 and 0 -> 0.25; teacher power (1+1)/2, (4+4)/2 -> 2.5; ratio 0.1
    # layer 1: errors 0 and (0+4)/2 -> 1.0; teacher power 2, 2 -> 2.0; ratio 0.5
    assert squarehead(h_s, h_t, mask).item() == pytest.approx(0.6)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_recipe_values_override_the_defaults_of_the_model_kind():
    spec = resolve_spec(DistillSpec(ce=0.5, temperature=2.0), ModelKind.CAUSAL_LM)
    assert (spec.kl, spec.ce, spec.squarehead, spec.temperature) == (1.0, 0.5, 0.0, 2.0)
    encoder = resolve_spec(None, ModelKind.ENCODER)
    assert (encoder.kl, encoder.squarehead, encoder.embedding, encoder.embedding_loss) == (0.0, 1.0, 1.0, "cosine")


def _tiny_llama(seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def test_distiller_sums_weighted_terms_trains_only_the_student_and_is_zero_for_a_copy():
    teacher, student = _tiny_llama(0), _tiny_llama(1)
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    distiller = Distiller(teacher, ModelKind.CAUSAL_LM, DistillSpec(kl=2.0, ce=0.5, squarehead=0.25, embedding=0.0,
                                                                   temperature=1.0, embedding_loss="cosine"))
    loss, terms = distiller(student, batch)
    assert set(terms) == {"kl", "ce", "squarehead"}
    assert loss.item() == pytest.approx(2.0 * terms["kl"] + 0.5 * terms["ce"] + 0.25 * terms["squarehead"], rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    copy = _tiny_llama(0)
    loss, terms = Distiller(teacher, ModelKind.CAUSAL_LM, resolve_spec(DistillSpec(squarehead=1.0), ModelKind.CAUSAL_LM))(copy, batch)
    assert terms["kl"] == pytest.approx(0.0, abs=1e-6) and terms["squarehead"] == pytest.approx(0.0, abs=1e-10)
    assert math.isfinite(loss.item())
