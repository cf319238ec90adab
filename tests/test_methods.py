"""Each backward formula of methods.md §3 against hand-computed values, and the recipe rules per step."""

import json

import pytest
import torch
from torch import nn

from nmcli.methods.effective import effective_weight
from nmcli.methods.plan import plan_step, relative_training_flops, structure_stages, training_density
from nmcli.methods.sparsifier import Sparsifier
from nmcli.models.targets import LayerInfo
from nmcli.nm import LINEAR, NMPattern, compliance
from nmcli.methods.recipes import builtin_names, from_dict, load_recipe, to_dict
from nmcli.methods.schedules import Phases

W = torch.tensor([[4.0, -3.0, 2.0, 1.0, 0.5, -8.0, 0.25, 6.0]])
KEEP = torch.tensor([[True, True, False, False, False, True, False, True]])  # 2:4 of W
G = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])  # upstream dL/dW_eff


def _grad(**kwargs):
    w = W.clone().requires_grad_(True)
    out = effective_weight(w, KEEP, **kwargs)
    out.backward(G)
    return out.detach(), w.grad


def test_ste_forward_masks_backward_passes_everything():
    out, grad = _grad()
    assert out.tolist() == [[4.0, -3.0, 0.0, 0.0, 0.0, -8.0, 0.0, 6.0]]
    assert grad.tolist() == G.tolist()


def test_sr_ste_adds_lambda_times_pruned_weights():
    _, grad = _grad(sr_lambda=0.5)
    # g + 0.5 * (1 - E) * W: pruned entries 2.0, 1.0, 0.5, 0.25 get +1.0, +0.5, +0.25, +0.125
    assert grad.tolist() == [[1.0, 2.0, 4.0, 4.5, 5.25, 6.0, 7.125, 8.0]]


def test_mdgf_ste_and_scaled_backward():
    out, grad = _grad(alpha=0.25)
    assert out.tolist() == [[4.0, -3.0, 0.5, 0.25, 0.125, -8.0, 0.0625, 6.0]]
    assert grad.tolist() == G.tolist()
    _, scaled = _grad(alpha=0.25, backward="scaled")
    assert scaled.tolist() == [[1.0, 2.0, 0.75, 1.0, 1.25, 6.0, 1.75, 8.0]]


def test_fixed_mask_zeroes_pruned_gradients():
    _, grad = _grad(backward="scaled")
    assert grad.tolist() == [[1.0, 2.0, 0.0, 0.0, 0.0, 6.0, 0.0, 8.0]]


def test_scaled_backward_equals_plain_autodiff():
    w = torch.randn(4, 8, requires_grad=True)
    keep = torch.rand(4, 8) > 0.5
    effective_weight(w, keep, alpha=0.3, backward="scaled").pow(2).sum().backward()
    w2 = w.detach().clone().requires_grad_(True)
    (w2 * (keep.float() + 0.3 * (~keep).float())).pow(2).sum().backward()
    assert torch.allclose(w.grad, w2.grad)


def _plans(name, target="1:8", total=100, **overrides):
    recipe = load_recipe(name).with_overrides(pattern=target, **overrides)
    phases = Phases.from_fractions(total, recipe.dense_fraction, recipe.finetune_fraction)
    return [plan_step(recipe, recipe.target, phases, s) for s in range(total)]


def test_recipe_rules():
    assert all(p.dense for p in _plans("dense"))
    ste = _plans("ste")
    assert all(p.pattern == NMPattern(1, 8) and p.alpha == 0 and p.backward == "ste" for p in ste)
    assert all(p.sr_lambda == 2e-4 for p in _plans("sr-ste"))
    fixed = _plans("fixed-mask")
    assert all(p.freeze and p.backward == "scaled" for p in fixed)
    mdgf = _plans("mdgf-linear")  # finetune 0.2 -> decay steps 0..79, alpha 0 at 80% of 80 = step 64
    assert mdgf[0].alpha == 1.0 and mdgf[32].alpha == pytest.approx(0.5) and mdgf[64].alpha == pytest.approx(0.0)
    assert mdgf[80].phase == "finetune" and mdgf[80].alpha == 0.0
    sdgf = _plans("sdgf-stepwise")
    assert [str(sdgf[s].pattern) for s in (0, 19, 20, 40, 60, 79, 99)] == ["7:8", "7:8", "4:8", "2:8", "1:8", "1:8", "1:8"]
    geo = _plans("sdgf-geometric")
    assert [str(geo[s].pattern) for s in (0, 20, 40, 60, 99)] == ["8:64", "4:32", "2:16", "1:8", "1:8"]
    combo = _plans("mdgf-sdgf")  # alpha restarts at 1 at every structure stage
    assert combo[0].alpha == 1.0 and combo[20].alpha == 1.0 and combo[19].alpha < 0.05
    assert training_density(sdgf[0]) == 7 / 8 and training_density(mdgf[0]) == 1.0 and training_density(ste[0]) == 1 / 8


def test_custom_stages_end_at_the_target():
    recipe = load_recipe("sdgf-stepwise").with_overrides(
        pattern="1:8", structure_decay={"schedule": "custom", "stages": ["8:8", "4:8"]}
    )
    assert [str(s) for s in structure_stages(recipe, recipe.target)] == ["8:8", "4:8", "1:8"]


def test_sparsifier_finalize_leaves_exact_zeros_and_plain_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    targets = {"0.weight": LayerInfo("0.weight", "0", LINEAR)}
    sparsifier = Sparsifier(model, targets).attach()
    plans = _plans("mdgf-linear", target="2:4", total=10)
    sparsifier.set_plan(plans[0])
    assert torch.equal(model[0].weight, sparsifier.original("0"))  # alpha = 1: W_eff = W
    sparsifier.set_plan(plans[9])
    assert compliance(model[0].weight, NMPattern(2, 4), LINEAR).compliant
    sparsifier.finalize(NMPattern(2, 4))
    assert isinstance(model[0].weight, nn.Parameter) and not hasattr(model[0], "parametrizations")
    assert compliance(model[0].weight, NMPattern(2, 4), LINEAR).compliant
    assert int((model[0].weight != 0).sum()) == 8 * 16 // 2


def _per_step_reference(recipe, target, phases, layers, total):
    """The definition of methods.md §5, step by step (what relative_training_flops computed before spans): per step
    3 passes (forward, input gradient, weight gradient), 2 under LoRA (no weight gradient of the frozen base)."""
    spent = 0.0
    passes = 2 if recipe.lora is not None else 3
    for step in range(phases.total):
        plan = plan_step(recipe, target, phases, step)
        spent += passes * (total - sum(f * (1 - training_density(plan, k)) for f, k in layers.values()))
    return spent / (3 * phases.total * total)


@pytest.mark.parametrize("steps", [1, 7, 97, 1000])
@pytest.mark.parametrize("pattern", ["2:4", "1:8", "1:16"])
def test_training_flops_over_spans_equal_the_per_step_sum(steps, pattern):
    layers = {"a": (300, 64), "b": (500, 12), "c": (200, None)}  # b: K=12 holds at a later SDGF stage
    extra = {"mdgf-stepped": {"method": "mdgf", "mask_decay": {"schedule": "stepped", "step_size": 0.3, "interval": 3}}}
    recipes = [load_recipe(n) for n in builtin_names()]
    recipes += [from_dict({**to_dict(recipes[0]), "name": k, **v}, k) for k, v in extra.items()]
    for recipe in recipes:
        recipe = recipe.with_overrides(pattern=pattern)
        phases = Phases.from_fractions(steps, recipe.dense_fraction or 0.1, recipe.finetune_fraction)
        expected = _per_step_reference(recipe, recipe.target, phases, layers, 1000)
        got = relative_training_flops(recipe, recipe.target, phases, layers, 1000)
        assert got == pytest.approx(expected, rel=1e-12), (recipe.name, steps, pattern)


def test_recipe_show_describes_a_very_long_run_without_a_plan_per_step(cli):
    r = cli("recipe", "show", "mdgf-sdgf", "--pattern", "1:16", "--steps", "30000000", "--json")
    assert r.exit_code == 0, r.output
    described = json.loads(r.stdout)
    assert [s["pattern"] for s in described["segments"]] == ["15:16", "8:16", "4:16", "2:16", "1:16", "1:16"]
    assert described["segments"][-1]["end"] == 30_000_000
