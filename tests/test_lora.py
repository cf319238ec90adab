"""Mask-preserving LoRA (methods.md §10): the effective weight, its gradients, the merge, the recipe section, and
finetune with adapters on real Hugging Face folders (the adapter read back by peft)."""

import json
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from nmcli.errors import NMSparseError
from nmcli.methods.lora import lora_weight
from nmcli.methods.plan import StepPlan
from nmcli.methods.sparsifier import Sparsifier
from nmcli.models.targets import LayerInfo
from nmcli.nm import HF_CONV1D, LINEAR, NMPattern, compliance
from nmcli.methods.recipes import LoraSpec, from_dict, to_dict
from nmcli.methods.schedules import Phase
from tests.reference import brute_force_mask

TWO_FOUR = NMPattern(2, 4)
FIXED = StepPlan(Phase.FINETUNE, (TWO_FOUR,), 0, backward="scaled", freeze=True)


def _adapted(lora=None, layout=LINEAR, shape=(8, 16)):
    """One Linear (or GPT-2 Conv1D-like layer) with adapters (rank 2, scale 1.5 unless `lora`), B filled with random
    values so the update is not 0."""
    lora = lora or LoraSpec(rank=2, alpha=3.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(shape[1], shape[0]))
    if layout is HF_CONV1D:  # the same layer stored [K, out]
        model[0].weight = nn.Parameter(torch.randn(shape[1], shape[0]))
        model[0].forward = lambda x: x @ model[0].weight + model[0].bias
    sparsifier = Sparsifier(model, {"0.weight": LayerInfo("0.weight", "0", layout)}).attach(lora)
    factors = sparsifier.adapters()["0"]
    with torch.no_grad():
        factors.lora_B.normal_()
    sparsifier.set_plan(FIXED)
    return model, sparsifier, factors


def _expected(base, factors, scale, layout=LINEAR):
    """E * (W + scale B A), E the brute-force 2:4 mask of the frozen base, written out independently."""
    delta = torch.einsum("or,rk->ok", factors.lora_B.detach(), factors.lora_A.detach())
    if layout is HF_CONV1D:
        delta = delta.T
    return brute_force_mask(base, 2, 4, layout.k_axis) * (base + scale * delta)


def test_effective_weight_is_the_masked_sum_and_stays_nm():
    model, sparsifier, factors = _adapted()
    base = sparsifier.original("0").detach()
    weight = model[0].weight
    assert torch.allclose(weight, _expected(base, factors, 1.5), atol=1e-6)
    assert compliance(weight.detach(), TWO_FOUR, LINEAR).compliant
    assert not compliance((base + 1.5 * factors.delta()).detach(), TWO_FOUR, LINEAR).compliant  # plain LoRA: dense


def test_gradients_reach_only_the_factors_and_equal_those_of_the_masked_product():
    model, sparsifier, factors = _adapted()
    base = sparsifier.original("0").detach()
    x, probe = torch.randn(5, 16), torch.randn(5, 8)
    (model(x) * probe).sum().backward()
    assert sparsifier.original("0").grad is None and model[0].bias.grad is None
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.parametrizations.weight.0.lora.lora_A", "0.parametrizations.weight.0.lora.lora_B"}
    # dL/dW_eff = probe^T x; only the kept positions reach B A: dB = s (G * E) A^T, dA = s B^T (G * E)
    masked = (probe.T @ x) * brute_force_mask(base, 2, 4, 1)
    assert torch.allclose(factors.lora_B.grad, 1.5 * masked @ factors.lora_A.detach().T, atol=1e-5)
    assert torch.allclose(factors.lora_A.grad, 1.5 * factors.lora_B.detach().T @ masked, atol=1e-5)


def test_merge_leaves_the_masked_sum_as_a_plain_exactly_nm_weight():
    for layout, shape in ((LINEAR, (8, 16)), (HF_CONV1D, (8, 16))):
        model, sparsifier, factors = _adapted(layout=layout, shape=shape)
        base = sparsifier.original("0").detach().clone()
        expected = _expected(base, factors, 1.5, layout)
        sparsifier.finalize(TWO_FOUR)
        assert isinstance(model[0].weight, nn.Parameter) and not hasattr(model[0], "parametrizations")
        assert torch.allclose(model[0].weight, expected, atol=1e-6)
        assert compliance(model[0].weight.detach(), TWO_FOUR, layout).compliant
        x = torch.randn(3, 16)
        with torch.enable_grad():  # the merged layer computes with its weight alone, training step or not
            assert torch.allclose(model(x), x @ expected.T + model[0].bias if layout is LINEAR else x @ expected + model[0].bias)


def test_adapter_dropout_drops_the_adapter_input_only_in_training_steps():
    model, sparsifier, factors = _adapted(LoraSpec(rank=2, alpha=3.0, dropout=0.5))
    base = sparsifier.original("0").detach()
    keep = brute_force_mask(base, 2, 4, 1)
    x = torch.randn(6, 16)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    delta = keep * (1.5 * factors.lora_B.detach() @ factors.lora_A.detach())
    assert torch.allclose(out, x @ (keep * base).T + dropped @ delta.T + model[0].bias, atol=1e-5)
    with torch.no_grad():  # evaluation: the whole input, one weight
        assert torch.allclose(model(x), x @ _expected(base, factors, 1.5).T + model[0].bias, atol=1e-5)


def test_mdgf_decay_scales_the_pruned_part_of_base_plus_update():
    model, sparsifier, factors = _adapted()
    base = sparsifier.original("0").detach()
    sparsifier.set_plan(StepPlan(Phase.DECAY, (TWO_FOUR,), 0, alpha=0.25))
    keep = brute_force_mask(base, 2, 4, 1).float()
    scale = keep + 0.25 * (1 - keep)
    assert torch.allclose(model[0].weight, scale * (base + 1.5 * factors.lora_B.detach() @ factors.lora_A.detach()), atol=1e-6)
    assert torch.equal(lora_weight(base, keep.bool(), torch.zeros_like(base), 1.5), keep * base)


def test_hand_written_backward_equals_autodiff_of_the_masked_sum_for_both_layouts_and_mdgf():
    """LoraFactors.masked_weight keeps only the mask for backward; its gradients must be autodiff's of
    `lora_weight` (a second implementation) for A, B and (were it trained) W, under MDGF's scale too."""
    for layout, alpha in ((LINEAR, 0.0), (LINEAR, 0.25), (HF_CONV1D, 0.0), (HF_CONV1D, 0.25)):
        _, sparsifier, factors = _adapted(layout=layout)
        base = sparsifier.original("0").detach().clone()
        keep = brute_force_mask(base, 2, 4, layout.k_axis).bool()
        probe = torch.randn_like(base)
        grads = []
        for by_hand in (True, False):
            weight = base.clone().requires_grad_(True)
            factors.zero_grad()
            out = (factors.masked_weight(weight, keep, alpha) if by_hand
                   else lora_weight(weight, keep, factors.delta(), factors.scale, alpha))
            (out * probe).sum().backward()
            grads.append([weight.grad, factors.lora_A.grad.clone(), factors.lora_B.grad.clone()])
        for mine, autodiff in zip(*grads, strict=True):
            assert torch.allclose(mine, autodiff, atol=1e-5), (layout, alpha)


def test_recipe_lora_section_round_trips_and_bad_values_name_the_key():
    recipe = from_dict({"name": "l", "method": "fixed-mask", "lora": {"rank": 4, "targets": ["*.mlp.*"]}}, "r.yaml")
    assert recipe.lora == LoraSpec(rank=4, alpha=8.0, targets=("*.mlp.*",))  # alpha defaults to 2 x rank
    assert from_dict(to_dict(recipe), "r.yaml") == recipe
    bad = {
        "rank: 0": ({"rank": 0}, "fixed-mask", "lora.rank: 0 is outside"),
        "rank 1.5": ({"rank": 1.5}, "fixed-mask", "lora.rank: expected an integer"),
        "no targets": ({"targets": []}, "fixed-mask", "lora.targets: an empty list trains nothing"),
        "unknown": ({"ranks": 4}, "fixed-mask", "lora.ranks: unknown key"),
        "dense": ({}, "dense", "lora: method dense cannot train adapters"),
        "sr-ste": ({}, "sr-ste", "lora: method sr-ste cannot train adapters"),
        "base dtype": ({"base_dtype": "float16"}, "fixed-mask", "lora.base_dtype: 'float16' is not one of float32, bfloat16"),
    }
    for section, method, message in bad.values():
        with pytest.raises(NMSparseError, match=re.escape(f"r.yaml: {message}")):
            from_dict({"name": "l", "method": method, "lora": section}, "r.yaml")
    with pytest.raises(NMSparseError, match="the SR-STE term pulls pruned base weights"):
        from_dict({"name": "l", "method": "mdgf", "mask_decay": {"reach_at": 0.5}, "sr_ste": {}, "lora": {}}, "r.yaml")


COMMON = ("--pattern", "2:4", "--batch-size", "4", "--seq-len", "32", "--limit", "16", "--data", "python-help")


def _recipe(tmp_path, name="lora", **lora):
    path = tmp_path / f"{name}.yaml"
    section = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in {"rank": 4, **lora}.items())
    path.write_text(f"name: {name}\nmethod: fixed-mask\noptimizer: {{name: adamw, lr: 0.01, weight_decay: 0.0}}\nlora:\n{section}")
    return path


def test_lora_from_sparsegpt_improves_quality_and_trains_only_adapters(cli, tmp_path, tiny_llama):
    r = cli("finetune", "--model", tiny_llama, "--start", "sparsegpt", "--recipe", _recipe(tmp_path), "--epochs", "3",
            *COMMON, "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["all_layers_compliant"] and summary["final_perplexity"] < 0.95 * summary["start_perplexity"]
    assert summary["final_news/perplexity"] < summary["start_news/perplexity"]  # off the training text too
    assert not (tmp_path / "o" / "adapter").exists()
    merged = load_file(str(tmp_path / "o" / "model.safetensors"))
    dense = load_file(str(tiny_llama / "model.safetensors"))
    assert torch.equal(merged["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])  # frozen
    assert torch.equal(merged["model.norm.weight"], dense["model.norm.weight"])


def test_kept_adapter_loads_in_peft_and_rebuilds_the_merged_model(cli, tmp_path, tiny_llama):
    import peft

    base = tmp_path / "base"
    assert cli("prune", tiny_llama, "--method", "sparsegpt", "--pattern", "2:4", "--out", base, "--quiet").exit_code == 0
    out = tmp_path / "o"
    r = cli("finetune", "--model", tiny_llama, "--start", base, "--recipe", _recipe(tmp_path, targets=["*.mlp.*"]),
            "--epochs", "2", *COMMON, "--keep-adapter", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(base.resolve())
    assert len(config["target_modules"]) == 6  # gate, up, down of 2 blocks
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), out / "adapter")
    rebuilt = model.merge_and_unload().state_dict()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    start = load_file(str(base / "model.safetensors"))
    for name, weight in merged.items():
        if name == "lm_head.weight":
            continue
        expected = rebuilt[name] * (start[name] != 0) if ".mlp." in name else rebuilt[name]  # the base's zeros again
        assert torch.allclose(weight, expected, atol=1e-6), name
        if ".mlp." in name and name.endswith("weight"):
            assert not torch.equal(weight, start[name]) and compliance(weight, TWO_FOUR, LINEAR).compliant, name


def test_bf16_base_halves_the_frozen_weights_keeps_ties_and_merges_exactly_nm(cli, tmp_path, tiny_llama):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    targets = {f"{n}.weight": LayerInfo(f"{n}.weight", n, LINEAR) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.startswith("model.layers")}
    Sparsifier(model, targets).attach(LoraSpec(rank=2, alpha=4.0, base_dtype="bfloat16"))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith(".original")} == {torch.bfloat16}  # the frozen targets
    assert {d for n, d in dtypes.items() if not n.endswith(".original")} == {torch.float32}  # factors, embeddings, norms
    recipe = _recipe(tmp_path, base_dtype="bfloat16")
    args = ("finetune", "--model", tiny_llama, "--start", "magnitude", "--epochs", "2", *COMMON)
    r = cli(*args, "--recipe", recipe, "--out", tmp_path / "no-autocast")
    assert r.exit_code == 2 and "lora.base_dtype: bfloat16" in r.output and "pass --bf16" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "no-autocast").exists()
    r = cli(*args, "--recipe", recipe, "--bf16", "--out", tmp_path / "bf16-base", "--json")
    assert r.exit_code == 0, r.output
    assert cli(*args, "--recipe", _recipe(tmp_path), "--bf16", "--out", tmp_path / "fp32-base", "--quiet").exit_code == 0

    def losses(run):
        return [e["loss"] for e in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in e]

    assert losses("bf16-base") and losses("bf16-base") == pytest.approx(losses("fp32-base"), rel=1e-6)  # autocast rounds alike
    merged = load_file(str(tmp_path / "bf16-base" / "model.safetensors"))
    weight = merged["model.layers.0.mlp.up_proj.weight"]
    assert {t.dtype for t in merged.values()} == {torch.float32}  # merged in the adapters' precision, as the source
    assert compliance(weight, TWO_FOUR, LINEAR).compliant
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16-base")


def test_lora_resume_is_bit_identical(cli, tmp_path, tiny_bert):
    recipe = _recipe(tmp_path, dropout=0.1)
    args = ("finetune", "--model", tiny_bert, "--recipe", recipe, "--epochs", "2", *COMMON)
    assert cli(*args, "--out", tmp_path / "full", "--quiet").exit_code == 0
    assert cli(*args, "--out", tmp_path / "cut", "--stop-after", "1", "--quiet").exit_code == 0
    assert cli(*args, "--resume", tmp_path / "cut", "--quiet").exit_code == 0
    full, cut = load_file(str(tmp_path / "full/model.safetensors")), load_file(str(tmp_path / "cut/model.safetensors"))
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)
    dense = load_file(str(tiny_bert / "model.safetensors"))
    assert not torch.equal(full["encoder.layer.0.attention.self.query.weight"], dense["encoder.layer.0.attention.self.query.weight"])
    r = cli("finetune", "--model", tiny_bert, "--recipe", "fixed-mask", "--epochs", "2", *COMMON, "--resume", tmp_path / "cut")
    assert r.exit_code == 2 and "it was a run with lora=" in r.output and "this one has None" in r.output


def test_lora_bad_input_is_one_line_and_writes_nothing(cli, tmp_path, tiny_llama):
    cases = {
        "a": (("--recipe", "fixed-mask", "--keep-adapter"), "--keep-adapter writes a LoRA adapter; recipe fixed-mask has no lora: section"),
        "b": (("--recipe", _recipe(tmp_path), "--keep-adapter", "--start", "sparsegpt"), "the adapter's base must be on disk"),
        "c": (("--recipe", _recipe(tmp_path, "nomatch", targets=["*.conv.*"])), "lora.targets: '*.conv.*' matches none of the 14 target layers"),
        "d": (("--recipe", _recipe(tmp_path, "wide", rank=40)), "lora.rank: 40 is larger than layer model.layers.0.self_attn.q_proj (32 x 32)"),
        "e": (("--recipe", _recipe(tmp_path), "--grad-log-every", "1"), "--grad-log-every measures the weights' gradients"),
        "f": (("--recipe", _recipe(tmp_path, "norms", train_norms=True), "--keep-adapter"), "lora.train_norms also trains norms"),
    }
    for folder, (options, message) in cases.items():
        r = cli("finetune", "--model", tiny_llama, "--epochs", "1", *COMMON, *options, "--out", tmp_path / folder)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (folder, r.output)
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / folder).exists(), folder


def test_lora_training_flops_skip_the_weight_gradient_pass():
    from nmcli.methods.plan import relative_training_flops
    from nmcli.methods.schedules import Phases

    full = from_dict({"name": "f", "method": "fixed-mask"}, "r.yaml")
    lora = from_dict({"name": "l", "method": "fixed-mask", "lora": {}}, "r.yaml")
    layers = {"a": (600, None)}  # 600 of 1000 forward FLOPs in a 2:4 target layer: 0.7 of dense per pass
    phases = Phases.from_fractions(10, 0.0, 0.0)
    assert relative_training_flops(full, TWO_FOUR, phases, layers, 1000) == pytest.approx(0.7)
    assert relative_training_flops(lora, TWO_FOUR, phases, layers, 1000) == pytest.approx(0.7 * 2 / 3)
