"""prune --budget (issue 27 §2): per-layer patterns under an overall sparsity, and every reader of a mixed file."""

import itertools
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nmcli.errors import NMSparseError
from nmcli.io.opener import load_nm
from nmcli.models.resolve import load_model, resolve
from nmcli.models.targets import select_targets
from nmcli.nm import NMPattern
from nmcli.oneshot.allocation import DENSE, allocate, parse_candidates
from nmcli.oneshot.sensitivity import layer_candidates, measure_sensitivity
from tests.conftest import timm_state

P24, P14, P48 = NMPattern(2, 4), NMPattern(1, 4), NMPattern(4, 8)


def _brute_force(costs, sizes, sparsity):
    """The least summed cost over every combination that reaches `sparsity` (the second implementation)."""
    names, best = list(costs), None
    total = sum(sizes.values())
    for combo in itertools.product(*(list(costs[n]) for n in names)):
        zeros = sum(sizes[n] * (1 - p.density) for n, p in zip(names, combo))
        cost = sum(costs[n][p] for n, p in zip(names, combo))
        if zeros / total >= sparsity - 1e-12 and (best is None or cost < best):
            best = cost
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_least_cost_choice_that_meets_the_budget(seed):
    """Against exhaustive search: sizes that the grid counts exactly (they sum to the grid), random costs."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(4096 // 8 - 1, generator=g)[:4].add(1).mul(8).tolist())
    sizes = {f"l{i}": b - a for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, 4096]))}
    costs = {n: {DENSE: 0.0, P24: float(torch.rand(1, generator=g)), P14: float(torch.rand(1, generator=g)) * 4}
             for n in sizes}
    for sparsity in (0.3, 0.5, 0.6, 0.7):
        chosen = allocate(costs, sizes, sparsity)
        assert chosen.sparsity >= sparsity
        assert chosen.cost == pytest.approx(_brute_force(costs, sizes, sparsity))


def test_allocation_by_hand():
    """Two layers of 100 weights: at 0.375 the sensitive layer stays dense and the other goes to 1:4 (cost 2.5)
    rather than both at 2:4 (cost 3); at 0.5 both at 2:4 is the only choice under 3.5."""
    sizes = {"a": 100, "b": 100}
    costs = {"a": {DENSE: 0.0, P24: 1.0, P14: 5.0}, "b": {DENSE: 0.0, P24: 2.0, P14: 2.5}}
    assert allocate(costs, sizes, 0.375).patterns == {"a": DENSE, "b": P14}
    assert allocate(costs, sizes, 0.5).patterns == {"a": P24, "b": P24}
    assert allocate(costs, sizes, 0.75).patterns == {"a": P14, "b": P14}
    with pytest.raises(NMSparseError, match="reaches 0.7500"):
        allocate(costs, sizes, 0.8)


def test_candidates_parse_and_refuse():
    assert parse_candidates("2:4, 1:4,dense") == [P24, P14, DENSE]
    for bad, says in (("2:4,2:4", "twice"), ("dense", "at least one"), ("2:4,5:3", "invalid N:M"), ("2:4,x", "invalid")):
        with pytest.raises(NMSparseError, match=says):
            parse_candidates(bad)


def _batch(vocab=128):
    ids = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_sensitivity_is_zero_for_a_layer_the_output_never_sees_and_restores_every_weight(tiny_llama):
    """Block 0's MLP output projection set to zero: its up/gate layers cannot move the output (cost exactly 0),
    every other layer does; after the probe the weights are bit-identical to before."""
    resolved = resolve(str(tiny_llama))
    model = load_model(resolved).eval()
    model.model.layers[0].mlp.down_proj.weight.data.zero_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {layer.module: layer for layer in select_targets(resolved.layers).values()}
    shapes = {name: model.get_submodule(name).weight.shape for name in layers}
    measured = measure_sensitivity(model, layers, layer_candidates(shapes, layers, [P24, P14, DENSE]), _batch(), None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    silent = {"model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"}
    for name, costs in measured.costs.items():
        assert costs[DENSE] == 0.0
        if name in silent:
            assert costs[P24] == 0.0 and costs[P14] == 0.0, name
        elif not name.startswith("lm_head"):
            assert costs[P14] > 0 and costs[P24] > 0, name


def _groups_nonzero(weight, m):
    """Non-zeros per group of m consecutive weights along the last axis (K of a Linear), computed by reshaping."""
    return (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)


def _budget_prune(cli, source, out, *extra):
    r = cli("prune", source, "--budget", "0.6", "--method", "wanda", "--calib-samples", "8", "--seq-len", "32",
            "--out", out, "--json", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("candidates", ["2:4,1:4", "2:4,1:4,dense"])
def test_budget_prune_writes_each_layer_at_its_own_pattern_and_meets_the_budget(cli, tmp_path, tiny_llama, candidates):
    """0.6 lies between uniform 2:4 (0.5) and 1:4 (0.75), so the result mixes: every layer holds the pattern its
    metadata declares, the layers together are at least 0.6 sparse, the dense ones are the source's bytes."""
    payload = _budget_prune(cli, tiny_llama, tmp_path / "b", "--candidates", candidates)
    again = _budget_prune(cli, tiny_llama, tmp_path / "again", "--candidates", candidates)
    assert payload["calibration"]["budget"]["patterns"] == again["calibration"]["budget"]["patterns"]
    chosen = payload["calibration"]["budget"]["patterns"]
    assert len(set(chosen.values())) >= 2 and "1:4" in chosen.values()
    out, source = load_file(str(tmp_path / "b" / "model.safetensors")), load_file(str(tiny_llama / "model.safetensors"))
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        declared = json.loads(f.metadata()["nmsparse.layers"])
    zeros = total = 0
    for name, pattern in chosen.items():
        total += out[name].numel()
        if pattern == "dense":
            assert name not in declared and torch.equal(out[name], source[name])
            continue
        n, m = map(int, pattern.split(":"))
        assert declared[name]["pattern"] == pattern
        assert int(_groups_nonzero(out[name], m).max()) <= n, name
        zeros += int((out[name] == 0).sum())
    assert zeros / total >= 0.6
    assert payload["patterns"] == {name: p for name, p in chosen.items() if p != "dense"}
    assert cli("report", tmp_path / "b", "--quiet", "--no-flops").exit_code == 0


def test_check_export_and_reports_of_a_mixed_file(cli, tmp_path, tiny_llama):
    """Candidates 4:8 and 1:4: `report --check 2:4` names the 4:8 layers; the nm export packs each layer at its
    own pattern and opens as the same tensors; compressed-tensors packs the 1:4 layers and ignores the 4:8 ones."""
    mixed = tmp_path / "m"
    payload = _budget_prune(cli, tiny_llama, mixed, "--candidates", "4:8,1:4")
    chosen = payload["calibration"]["budget"]["patterns"]
    wide = sorted(n for n, p in chosen.items() if p == "4:8")
    assert wide and any(p == "1:4" for p in chosen.values())
    check = cli("report", mixed, "--check", "2:4", "--json", "--no-flops")
    assert check.exit_code == 1
    failing = {row["name"] for row in json.loads(check.stdout)["layers"] if row.get("compliance", 1.0) < 1.0}
    assert failing == set(wide)
    assert cli("report", mixed, "--quiet", "--no-flops").exit_code == 0  # each against its own pattern
    nm = tmp_path / "nm"
    assert cli("export", mixed, "--format", "nm", "--out", nm, "-q").exit_code == 0
    dense = load_file(str(mixed / "model.safetensors"))
    restored = load_nm(nm / "model.safetensors")
    assert all(torch.equal(restored[k], v) for k, v in dense.items())
    ct = tmp_path / "ct"
    r = cli("export", mixed, "--format", "compressed-tensors", "--out", ct, "--json")
    assert r.exit_code == 0, r.output
    ignore = json.loads((ct / "config.json").read_text())["quantization_config"]["sparsity_config"]["ignore"]
    assert {n.removesuffix(".weight") for n in wide} <= set(ignore)
    assert set(json.loads(r.stdout)["nm_layers"]) == {n for n, p in chosen.items() if p == "1:4"}


def test_budget_bad_input_is_one_line_and_writes_nothing(cli, tmp_path, tiny_llama):
    cases = [
        (("--budget", "0.9", "--candidates", "2:4,dense"), "add a sparser candidate"),
        (("--budget", "0.5", "--candidates", "2:4,7:3"), "invalid N:M pattern"),
        (("--budget", "0.5", "--pattern", "2:4"), "choose one"),
        (("--budget", "1.5"), "between 0 and 1"),
    ]
    for args, says in cases:
        out = tmp_path / "never"
        r = cli("prune", tiny_llama, *args, "--calib-samples", "4", "--seq-len", "16", "--out", out)
        assert r.exit_code == 2 and says in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    source = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state("test_vit").items()}, str(source))
    r = cli("prune", "test_vit", "--checkpoint", source, "--budget", "0.5", "--out", tmp_path / "v.safetensors")
    assert r.exit_code == 2 and "Hugging Face transformer" in r.output and not (tmp_path / "v.safetensors").exists()


def test_finetune_from_a_budget_start_keeps_each_layer_at_its_own_pattern(cli, tmp_path, tiny_llama):
    """A fixed-mask run from a mixed start: every layer leaves at the pattern the start gave it (a 1:4 layer is
    not re-masked at the recipe's 2:4), the layers it left dense stay dense."""
    start = tmp_path / "start"
    chosen = _budget_prune(cli, tiny_llama, start, "--candidates", "2:4,1:4,dense")["calibration"]["budget"]["patterns"]
    args = ("finetune", "--model", tiny_llama, "--start", start, "--recipe", "fixed-mask", "--data", "python-help",
            "--seq-len", "32", "--limit", "16", "--batch-size", "4", "--epochs", "1")
    r = cli(*args, "--out", tmp_path / "ft", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["all_layers_compliant"]
    out, begun = load_file(str(tmp_path / "ft" / "model.safetensors")), load_file(str(start / "model.safetensors"))
    with safe_open(str(tmp_path / "ft" / "model.safetensors"), "pt") as f:
        declared = json.loads(f.metadata()["nmsparse.layers"])
    for name, pattern in chosen.items():
        if pattern == "dense":
            assert name not in declared and int((out[name] == 0).sum()) == int((begun[name] == 0).sum()), name
            continue
        n, m = map(int, pattern.split(":"))
        assert declared[name]["pattern"] == pattern and int(_groups_nonzero(out[name], m).max()) <= n, name
    assert not torch.equal(out[name], begun[name])  # it trained


def test_training_flops_count_each_layer_at_its_own_pattern():
    """fixed-mask, no dense phase: two layers of 100 FLOPs in a model of 300, one at the recipe's 2:4 and one at
    its own 1:4: (300 - 100 x 1/2 - 100 x 3/4) / 300, by hand."""
    from nmcli.methods.plan import relative_training_flops
    from nmcli.methods.recipes import load_recipe
    from nmcli.methods.schedules import Phases

    recipe = load_recipe("fixed-mask")
    phases = Phases.from_fractions(10, 0.0, recipe.finetune_fraction)
    layers = {"a": (100, 16), "b": (100, 16)}
    assert relative_training_flops(recipe, P24, phases, layers, 300) == pytest.approx(200 / 300)
    assert relative_training_flops(recipe, P24, phases, layers, 300, {"b": P14}) == pytest.approx(175 / 300)


def test_replaying_the_blocks_before_a_layer_gives_the_full_forward_pass_costs(tiny_llama):
    """The second implementation: each cost recomputed with every block run (no replay) for one layer per block."""
    from nmcli.nm import nm_mask
    from nmcli.oneshot.sensitivity import base_output

    resolved = resolve(str(tiny_llama))
    model = load_model(resolved).eval()
    layers = {layer.module: layer for layer in select_targets(resolved.layers).values()}
    shapes = {name: model.get_submodule(name).weight.shape for name in layers}
    measured = measure_sensitivity(model, layers, layer_candidates(shapes, layers, [P24, P14]), _batch(), None)
    dense = base_output(model, _batch())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        weight = model.get_submodule(name).weight
        original = weight.detach().clone()
        with torch.no_grad():
            weight.mul_(nm_mask(original.abs(), P14, layers[name].layout))
        full = float((base_output(model, _batch()) - dense).pow(2).sum() / dense.pow(2).sum())
        with torch.no_grad():
            weight.copy_(original)
        assert measured.costs[name][P14] == pytest.approx(full, rel=1e-5), name
