"""Channel permutation (methods.md §9, prune --permute): the search's exact gain and monotonicity, and the reordered
dense model computing what it computed before on Llama-like (GQA, and Qwen2 with biases) and BERT-like models."""

import itertools
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nmcli.models.channels import RESIDUAL, apply_order, channel_plan
from nmcli.models.resolve import resolve
from nmcli.nm import NMPattern
from nmcli.oneshot.permutation import BLOCK_ROWS, _gains, kept_importance, search_order
from nmcli.oneshot.permute import input_column_norms, permute_channels
from nmcli.oneshot.plan import plan_prune
from tests.conftest import save_tiny_hf, timm_state


def _structured(rows: int, k: int, seed: int) -> torch.Tensor:
    """Importance with column structure (as activation norms give it): heavy channels worth separating."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, k, generator=g) * torch.rand(k, generator=g).pow(3) * 10


@pytest.mark.parametrize(("n", "m", "rows"), [(2, 4, 7), (1, 4, 7), (4, 8, 7), (1, 8, 7), (2, 4, BLOCK_ROWS + 70)])
def test_the_gain_matrix_is_the_exact_change_of_kept_importance(n, m, rows):
    """Whatever one-per-group reassignment of the channels in one slot: kept importance = the rest's own top-N plus
    the gains of the pairs, computed here by brute force on the reassigned order (BLOCK_ROWS + 70 rows: the last
    block of rows is a partial one, also of float32 partial sums)."""
    pattern, s = NMPattern(n, m), _structured(rows, 8 * m, 1)
    assign = torch.randperm(8 * m, generator=torch.Generator().manual_seed(2)).reshape(8, m)
    slot = 1
    gain = _gains(s, assign, slot, pattern)
    rest = torch.cat([assign[:, :slot], assign[:, slot + 1 :]], 1)
    rest_alone = sum(float(s[:, rest[g]].topk(n, dim=1).values.sum()) for g in range(8))
    for sigma in (torch.arange(8), torch.randperm(8, generator=torch.Generator().manual_seed(3)), torch.arange(8).flip(0)):
        moved = assign.clone()
        moved[sigma, slot] = assign[:, slot]  # channel of group c goes to group sigma[c]
        direct = kept_importance([s], moved.reshape(-1), pattern)
        assert direct == pytest.approx(rest_alone + float(gain[torch.arange(8), sigma].sum()), rel=1e-6)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 8), (2, 8)])
def test_search_keeps_at_least_what_the_original_order_keeps(n, m):
    pattern = NMPattern(n, m)
    for seed in range(3):
        scores = [_structured(32, 16 * m, seed), _structured(8, 16 * m, seed + 10)]
        result = search_order(scores, pattern)
        assert sorted(result.order.tolist()) == list(range(16 * m))
        assert result.kept_before == pytest.approx(kept_importance(scores, torch.arange(16 * m), pattern))
        assert result.kept_after == pytest.approx(kept_importance(scores, result.order, pattern))
        assert result.kept_after > result.kept_before  # structured importance: there is something to gain


def test_search_comes_close_to_the_best_order_found_by_brute_force():
    pattern, s = NMPattern(2, 4), _structured(6, 8, 4)
    best = max(kept_importance([s], torch.tensor(p), pattern) for p in itertools.permutations(range(8)))
    found = search_order([s], pattern).kept_after
    assert best * 0.995 <= found <= best + 1e-9


def test_two_heavy_channels_of_one_group_are_separated():
    """1:4: a group holding both heavy channels keeps one of them; the search puts them in different groups."""
    s = torch.full((4, 8), 0.1)
    s[:, 0] = s[:, 1] = 5.0
    result = search_order([s], NMPattern(1, 4))
    groups = result.order.reshape(2, 4)
    assert sum(int(0 in g) + int(1 in g) == 1 for g in groups.tolist()) == 2
    assert result.kept_after == pytest.approx(4 * (5.0 + 5.0))


def _model(tmp_path, kind, **overrides):
    folder = save_tiny_hf(tmp_path / kind, kind, **overrides)
    resolved = resolve(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder) if kind != "bert" else transformers.AutoModel.from_pretrained(folder)
    targets = {layer.module: layer for layer in plan_prune(resolved, NMPattern(2, 4), (), ()).targets.values()}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # norms start at 1 and biases at 0, where a missing reorder would not show
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval(), targets


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


FAMILIES = [
    ("llama", {"initializer_range": 0.3}, True),  # grouped-query attention: 4 heads, 2 key/value heads
    ("llama", {"tie_word_embeddings": False, "initializer_range": 0.3}, True),
    ("qwen2", {"initializer_range": 0.3}, True),
    ("bert", {}, False),
]


@pytest.mark.parametrize(("kind", "overrides", "causal"), FAMILIES)
def test_the_permuted_dense_model_computes_what_it_computed_before(tmp_path, kind, overrides, causal):
    model, targets = _model(tmp_path, kind, **overrides)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _outputs(model, ids)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    norms = input_column_norms(model, set(targets), [{"input_ids": ids}])
    report = permute_channels(model, channel_plan(model, targets, causal), targets, NMPattern(2, 4), norms)
    assert report.groups > 0 and report.kept_after > report.kept_before
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert any("down_proj" in k or "output.dense" in k for k in moved)  # a real reorder, not the identity
    assert (report.residual_order is not None) == causal
    torch.testing.assert_close(_outputs(model, ids), before, rtol=1e-4, atol=1e-5)
    if not causal:  # the encoder's output is its residual stream: q/k/v and intermediate keep their order
        assert any("attention.self.query" in name for name in report.unpermuted)


@pytest.mark.parametrize("dropped", ["up_proj", "v_proj", "input_layernorm", "model.norm", "embed_tokens"])
def test_reordering_without_one_producer_changes_the_output(tmp_path, dropped):
    """The check above can fail: leave one producer out of its group and the outputs move."""
    model, targets = _model(tmp_path, "llama", initializer_range=0.3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _outputs(model, ids)
    plan = channel_plan(model, targets, causal=True)
    for group in plan.groups:
        producers = tuple(a for a in group.producers if dropped not in a.key)
        reordered = type(group)(group.name, group.size, group.consumers, producers)
        apply_order(model, reordered, torch.arange(group.size).roll(1))
    assert not torch.allclose(_outputs(model, ids), before, rtol=1e-4, atol=1e-5)


def test_the_residual_group_holds_every_residual_tensor_once(tmp_path):
    model, targets = _model(tmp_path, "llama")
    residual = next(g for g in channel_plan(model, targets, causal=True).groups if g.name == RESIDUAL)
    keys = [a.key for a in (*residual.consumers, *residual.producers)]
    assert len(keys) == len(set(keys))
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert "lm_head.weight" not in keys  # tied to the embedding: reordered once, through it


def _kept_magnitude(folder, names):
    weights = load_file(str(folder / "model.safetensors"))
    return sum(float(weights[n].abs().sum()) for n in names)


def test_prune_permute_magnitude_keeps_more_weight_and_writes_the_reordered_model(cli, tmp_path, tiny_llama):
    """Magnitude's objective is Σ|W| kept: the permuted prune keeps more of it, exactly N:M, and every reordered
    tensor (embedding columns, norms) is in the file in the recorded residual order."""
    args = ("prune", tiny_llama, "--pattern", "2:4", "--json")
    plain = cli(*args, "--out", tmp_path / "plain")
    permuted = cli(*args, "--permute", "--out", tmp_path / "permuted")
    assert plain.exit_code == 0 and permuted.exit_code == 0, permuted.output
    payload = json.loads(permuted.stdout)
    assert _kept_magnitude(tmp_path / "permuted", payload["pruned_layers"]) > _kept_magnitude(tmp_path / "plain", payload["pruned_layers"])
    assert cli("report", tmp_path / "permuted", "--check", "2:4", "--quiet", "--no-flops").exit_code == 0
    order = payload["calibration"]["permutation"]["residual_order"]
    dense, out = load_file(str(tiny_llama / "model.safetensors")), load_file(str(tmp_path / "permuted" / "model.safetensors"))
    assert sorted(order) == list(range(32)) and order != list(range(32))
    assert torch.equal(out["model.embed_tokens.weight"], dense["model.embed_tokens.weight"][:, order])
    assert torch.equal(out["model.norm.weight"], dense["model.norm.weight"][order])
    with safe_open(str(tmp_path / "permuted" / "model.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["nmsparse.oneshot"])
    assert recorded["method"] == "magnitude" and recorded["permutation"]["residual_order"] == order
    assert "samples" not in recorded and "seq_len" not in recorded  # magnitude calibrates on nothing


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_permute_with_calibration_is_deterministic_and_keeps_more_importance(cli, tmp_path, tiny_llama, method):
    args = ("prune", tiny_llama, "--pattern", "2:4", "--method", method, "--permute", "--calib-samples", "8",
            "--seq-len", "32", "--json")
    a, b = cli(*args, "--out", tmp_path / "a"), cli(*args, "--out", tmp_path / "b")
    assert a.exit_code == 0 and b.exit_code == 0, a.output
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    permutation = json.loads(a.stdout)["calibration"]["permutation"]
    assert permutation["importance"] == "wanda" and permutation["kept_gain"] > 0 and permutation["groups"] > 0


def test_permute_without_known_wiring_keeps_the_order_says_which_layers_and_exits_0(cli, tmp_path):
    source = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state("test_vit").items()}, str(source))
    r = cli("prune", "test_vit", "--checkpoint", source, "--pattern", "2:4", "--permute", "--out", tmp_path / "v.safetensors")
    assert r.exit_code == 0, r.output
    assert "channels permuted in 0 groups" in r.output and "no known producer wiring for" in r.output
    plain = tmp_path / "plain.safetensors"
    save_file({"fc.weight": torch.randn(8, 16)}, str(plain))
    r = cli("prune", plain, "--permute", "--out", tmp_path / "y.safetensors")
    assert r.exit_code == 2 and "--permute reorders the channels" in r.output and "--model" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "y.safetensors").exists()


def test_finetune_gives_the_teacher_the_residual_order_of_a_permuted_start(cli, tmp_path, tiny_llama):
    """Hidden-state terms compare the student's residual stream with the teacher's: after align_teacher the dense
    teacher's hidden states are the original ones in the start's recorded order, and its logits are unchanged."""
    from nmcli.train.tasks import align_teacher

    r = cli("prune", tiny_llama, "--pattern", "2:4", "--permute", "--out", tmp_path / "start", "--json")
    assert r.exit_code == 0, r.output
    order = json.loads(r.stdout)["calibration"]["permutation"]["residual_order"]
    teacher = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = teacher(input_ids=ids, output_hidden_states=True)
        align_teacher(teacher, str(tmp_path / "start"))
        after = teacher(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-4, atol=1e-4)
    for h_after, h_before in zip(after.hidden_states, before.hidden_states):
        torch.testing.assert_close(h_after, h_before[..., order], rtol=1e-4, atol=1e-5)
    squarehead = tmp_path / "sq.yaml"
    squarehead.write_text("name: sq\nmethod: fixed-mask\ndistill: {kl: 1.0, squarehead: 1.0}\n")
    r = cli("finetune", "--model", tiny_llama, "--start", tmp_path / "start", "--recipe", squarehead, "--data",
            "python-help", "--seq-len", "32", "--limit", "16", "--batch-size", "4", "--epochs", "1", "--out",
            tmp_path / "ft", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["all_layers_compliant"], r.output


def test_a_variant_the_rules_do_not_know_fully_is_refused_not_written(cli, tmp_path, monkeypatch):
    """A family variant with a parameter on a reordered axis that the rules miss (here: the value biases of Qwen2)
    would be written out broken; the probe after reordering catches it: one line, exit 2, nothing written."""
    import nmcli.models.channels as channels

    folder = save_tiny_hf(tmp_path / "qwen2", "qwen2", initializer_range=0.3)
    weights = load_file(str(folder / "model.safetensors"))
    for name in weights:
        if name.endswith("v_proj.bias"):
            weights[name] = torch.rand(weights[name].shape, generator=torch.Generator().manual_seed(1)) + 0.5
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert cli("prune", folder, "--permute", "--out", tmp_path / "fine").exit_code == 0
    monkeypatch.setattr(channels, "_rows", lambda model, module, offsets=(0,): (channels._weight(module, 0, offsets),))
    r = cli("prune", folder, "--permute", "--out", tmp_path / "broken")
    assert r.exit_code == 2 and "--permute: the reordered qwen2 model computes other outputs" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "broken").exists()


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_prune_permute_an_encoder_with_dropout(cli, tmp_path, tiny_bert, method):
    """BERT's dropout is on after loading: the probe, the norms and the calibration run the model in eval mode."""
    r = cli("prune", tiny_bert, "--permute", "--method", method, "--calib-samples", "8", "--seq-len", "32",
            "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["calibration"]["permutation"]["groups"] > 0
