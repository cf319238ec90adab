"""Each recipe is observed *during* a real fine-tuning run, not only in its final checkpoint.

A final checkpoint is pruned exactly at the end whatever happened before, so it cannot tell whether a recipe ran
at all (issue 10: with `Sparsifier.set_plan` ignoring every sparse plan the whole suite stayed green). Here a spy
wraps the engine's own `train_step` and records, at every step, the weight each target layer really uses in its
forward pass and the dense master weight behind it. Expectations come from the recipe's definition (methods.md
§2-3) worked out by hand for this run, and from the brute-force reference mask, not from the code under test.

The run: tiny ViT, 128 samples, batch 32 -> 4 steps per epoch; 5 epochs = 20 steps. Recipes with a 0.2 fine-tune
phase decay over steps 0-15 and fine-tune over 16-19.
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import nmcli.train.engine
from tests.reference import brute_force_mask
from tests.test_finetune import _finetune

STEPS, DECAY = 20, 16


@dataclasses.dataclass
class Seen:
    effective: dict[str, torch.Tensor]  # the weight used in the forward pass (module.weight through the mask)
    original: dict[str, torch.Tensor]  # the dense master weight the optimizer updates


def _targets(model):
    return {name: m for name, m in model.named_modules() if parametrize.is_parametrized(m, "weight")}


class Spy:
    """Wraps the engine's `train_step`: records every step, and runs `probe(step, model, images, labels)` first."""

    def __init__(self, real):
        self.real = real
        self.seen: list[Seen] = []
        self.probe = None

    def __call__(self, model, batch, optimizer, **kwargs):
        targets = _targets(model)
        self.seen.append(Seen(
            {n: m.weight.detach().clone() for n, m in targets.items()},
            {n: m.parametrizations.weight.original.detach().clone() for n, m in targets.items()},
        ))
        if self.probe is not None:
            self.probe(len(self.seen) - 1, model, *batch)
        return self.real(model, batch, optimizer, **kwargs)


@pytest.fixture
def spy(monkeypatch):
    spy = Spy(nmcli.train.engine.train_step)
    monkeypatch.setattr(nmcli.train.engine, "train_step", spy)
    return spy


def _run(cli, tmp_path, spy, recipe, pattern, *extra):
    r = _finetune(cli, tmp_path / "out", "--recipe", recipe, "--pattern", pattern, "--epochs", "5", *extra)
    assert r.exit_code == 0, r.output
    seen = spy.seen
    assert len(seen) == STEPS and seen[0].effective, "the spy must see every step and every target layer"
    return seen


def _masked(original, n, m):
    return original * brute_force_mask(original, n, m, k_axis=1)


def test_ste_trains_with_the_exact_mask_of_the_current_weights_at_every_step(cli, tmp_path, spy):
    for step in _run(cli, tmp_path, spy, "ste", "2:4"):
        for name, w in step.effective.items():
            assert torch.equal(w, _masked(step.original[name], 2, 4)), name
            assert not torch.equal(w, step.original[name])  # the master weight itself stays dense


def test_mdgf_scales_pruned_weights_by_the_linear_alpha_of_each_step(cli, tmp_path, spy):
    # mdgf-linear: alpha_t = max(0, 1 - t / (0.8 * 16)) over the 16 decay steps, 0 in fine-tuning
    for t, step in enumerate(_run(cli, tmp_path, spy, "mdgf-linear", "2:4")):
        alpha = max(0.0, 1 - t / (0.8 * DECAY)) if t < DECAY else 0.0
        for name, w in step.effective.items():
            original = step.original[name]
            keep = brute_force_mask(original, 2, 4, k_axis=1)
            assert torch.equal(w[keep], original[keep]), (t, name)
            assert torch.allclose(w[~keep], alpha * original[~keep], rtol=1e-6, atol=1e-9), (t, name, alpha)


def test_sdgf_stepwise_moves_through_its_stages_on_schedule(cli, tmp_path, spy):
    # 1:8 stepwise: 7:8, 4:8, 2:8, 1:8 in four equal frames of the 16 decay steps, then 1:8 in fine-tuning
    for t, step in enumerate(_run(cli, tmp_path, spy, "sdgf-stepwise", "1:8")):
        n = (7, 4, 2, 1)[min(t // 4, 3)]
        for name, w in step.effective.items():
            assert torch.equal(w, _masked(step.original[name], n, 8)), (t, name, n)


def test_fixed_mask_never_changes_while_the_weights_do(cli, tmp_path, spy):
    seen = _run(cli, tmp_path, spy, "fixed-mask", "2:4", "--lr", "0.05")
    first = seen[0]
    for name, w in first.effective.items():
        assert torch.equal(w, _masked(first.original[name], 2, 4))
    for step in seen[1:]:
        for name, w in step.effective.items():
            assert torch.equal(w != 0, first.effective[name] != 0), name
            # pruned entries get no gradient: only AdamW's decoupled weight decay, the same factor for all of them
            before, after = first.original[name][w == 0], step.original[name][w == 0]
            ratio = after[before != 0] / before[before != 0]
            assert float(ratio.max() - ratio.min()) < 1e-5 and float(ratio.max()) <= 1.0, name
    assert any(not torch.equal(seen[-1].original[n], first.original[n]) for n in first.original)


def test_ste_masks_flip_during_training(cli, tmp_path, spy):
    seen = _run(cli, tmp_path, spy, "ste", "2:4", "--lr", "0.05")
    flips = sum(int(((seen[-1].effective[n] != 0) != (seen[0].effective[n] != 0)).sum()) for n in seen[0].effective)
    assert flips > 0


def test_sr_ste_term_reaches_the_optimizer(cli, tmp_path, spy):
    """At step 1, the gradient the optimizer sees differs from plain STE's by exactly lambda * (1 - E) * W."""
    lam = 2.0e-4  # the sr-ste recipe's lambda
    grads = {}

    def probe(step, model, images, labels):
        if step != 1:
            return
        targets = _targets(model)
        plans = {n: m.parametrizations.weight[0].plan for n, m in targets.items()}
        for key, sr in (("sr", None), ("plain", 0.0)):
            for n, m in targets.items():
                if sr is not None:
                    m.parametrizations.weight[0].plan = dataclasses.replace(plans[n], sr_lambda=sr)
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            grads[key] = {n: m.parametrizations.weight.original.grad.clone() for n, m in targets.items()}
        for n, m in targets.items():
            m.parametrizations.weight[0].plan = plans[n]
        model.zero_grad(set_to_none=True)

    spy.probe = probe
    seen = _run(cli, tmp_path, spy, "sr-ste", "2:4")
    assert grads, "the probe must have run"
    for name, original in seen[1].original.items():
        pruned = ~brute_force_mask(original, 2, 4, k_axis=1)
        expected = lam * original * pruned
        # two backward passes round differently: allow float32 rounding of the gradients themselves
        tolerance = 1e-6 * float(grads["plain"][name].abs().max())
        assert float(expected.abs().max()) > 20 * tolerance, name  # the term is far above that noise
        assert torch.allclose(grads["sr"][name] - grads["plain"][name], expected, rtol=1e-3, atol=tolerance), name


@pytest.mark.parametrize("finetune_mask", ["frozen", "recomputed"])
def test_the_fine_tune_mask_is_frozen_only_when_the_recipe_says_so(cli, tmp_path, spy, finetune_mask):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: ft\nmethod: mdgf\npattern: '2:4'\n"
        f"phases: {{dense: 0.0, finetune: 0.2, finetune_mask: {finetune_mask}}}\n"
        "mask_decay: {schedule: linear, reach_at: 0.8}\n"
    )
    seen = _run(cli, tmp_path, spy, str(recipe), "2:4", "--lr", "0.05")
    finetune = seen[DECAY:]  # steps 16-19
    first = finetune[0]
    for name, w in first.effective.items():
        assert torch.equal(w, _masked(first.original[name], 2, 4))  # the mask taken when fine-tuning begins
    same = all(torch.equal(s.effective[n] != 0, first.effective[n] != 0) for s in finetune for n in first.effective)
    recomputed = all(torch.equal(s.effective[n], _masked(s.original[n], 2, 4)) for s in finetune for n in s.effective)
    if finetune_mask == "frozen":
        assert same
    else:
        assert recomputed and not same  # the magnitude mask follows the weights


@pytest.mark.parametrize("optimizer", [{"name": "adamw", "lr": 1e-2, "weight_decay": 0.05, "betas": [0.8, 0.9]},
                                       {"name": "sgd", "lr": 1e-2, "momentum": 0.5}, {"name": "lamb", "lr": 1e-2}])
def test_the_recipes_optimizer_is_fused_where_torch_has_it_and_steps_as_the_unfused_one(optimizer):
    from nmcli.methods.recipes import from_dict
    from nmcli.train.engine import _optimizer_and_scheduler

    recipe = from_dict({"name": "t", "method": "fixed-mask", "pattern": "2:4", "optimizer": optimizer}, "t.yaml")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    built, _ = _optimizer_and_scheduler(recipe, model, epochs=1, steps_per_epoch=4)
    assert bool(built.defaults.get("fused")) is (optimizer["name"] != "lamb")  # timm's Lamb has no fused kernel
    # the unfused reference, by hand from the recipe: weight decay on matrices only, as timm groups the parameters
    groups = [{"params": [p for p in twin.parameters() if p.ndim > 1], "weight_decay": recipe.optimizer["weight_decay"]},
              {"params": [p for p in twin.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    options = {"lr": built.param_groups[0]["lr"], **{k: v for k, v in optimizer.items() if k in ("betas", "momentum")}}
    reference = type(built)(groups, **options, **({"nesterov": True} if optimizer["name"] == "sgd" else {}))
    x = torch.randn(16, 8)
    for net, opt in ((model, built), (twin, reference)):
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters()))  # it stepped
