"""prune --reconstruct: each pruned block trained, masks fixed, to the dense model's activations at its depth."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from nmcli.models.targets import LayerInfo
from nmcli.nm import LINEAR, parse_pattern
from nmcli.oneshot.calibrate import OneShotMethod, SolverSettings, calibrate_and_prune
from nmcli.oneshot.reconstruct import one_sample_batches, reconstruct_block


def _llama(layers=3):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.3)
    return transformers.LlamaForCausalLM(config).eval()


def _targets(model):
    return {name: LayerInfo(f"{name}.weight", name, LINEAR) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in name}


def _batches(count=3):
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        ids, mask = torch.randint(1, 128, (4, 16), generator=g), torch.ones(4, 16, dtype=torch.long)
        mask[0, 11:] = 0  # one row padded
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _hidden_error(model, dense, batches, depth):
    """‖h − h_dense‖² / ‖h_dense‖² over real tokens of the residual stream after block `depth` (a second
    implementation: the models' own forward passes)."""
    error = power = 0.0
    with torch.no_grad():
        for batch in batches:
            h = model(**batch, output_hidden_states=True).hidden_states[depth + 1]
            d = dense(**batch, output_hidden_states=True).hidden_states[depth + 1]
            real = batch["attention_mask"].bool()
            error += float((h - d)[real].pow(2).sum())
            power += float(d[real].pow(2).sum())
    return error / power


def test_blocks_are_trained_to_the_dense_models_own_activations():
    dense = _llama()
    batches = _batches()
    settings = SolverSettings(OneShotMethod.WANDA, parse_pattern("2:4"))
    plain = copy.deepcopy(dense)
    calibrate_and_prune(plain, _targets(plain), batches, settings)
    rebuilt = copy.deepcopy(dense)
    result = calibrate_and_prune(rebuilt, _targets(rebuilt), batches, SolverSettings(
        OneShotMethod.WANDA, parse_pattern("2:4"), reconstruct=20))
    fits = result.block_fits
    assert list(fits) == [f"model.layers.{i}" for i in range(3)]
    # block 0 sees the embeddings in both runs: before training, its error is plain Wanda's
    assert fits["model.layers.0"].before == pytest.approx(_hidden_error(plain, dense, batches, 0), rel=1e-4)
    for depth in (0, 1):  # the error after training is the whole model's drift at that depth, not one block's own
        assert fits[f"model.layers.{depth}"].after == pytest.approx(_hidden_error(rebuilt, dense, batches, depth), rel=1e-4)
    assert all(fit.after < fit.before for fit in fits.values()), fits
    for depth in range(2):
        assert _hidden_error(rebuilt, dense, batches, depth) < 0.85 * _hidden_error(plain, dense, batches, depth)
    for name, weight in result.weights.items():  # the masks are Wanda's: the same zeros in block 0, exactly 2:4
        assert int((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1).max()) <= 2, name
    first = "model.layers.0.mlp.up_proj"
    assert torch.equal(result.weights[first] == 0, plain.get_submodule(first).weight == 0)
    assert not torch.allclose(result.weights[first], plain.get_submodule(first).weight)
    for name, p in rebuilt.named_parameters():  # only the target weights moved
        if "norm" in name or "embed" in name:
            assert torch.equal(p, dense.get_parameter(name)), name


def test_one_sample_batches_cut_each_sample_out_without_its_padding():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    single = one_sample_batches([{"input_ids": ids, "attention_mask": mask}, {"input_ids": torch.tensor([[4, 3]])}])
    assert [b["input_ids"].tolist() for b in single] == [[[5, 6, 7]], [[8, 9]], [[4, 3]]]
    assert [b["attention_mask"].tolist() for b in single[:2]] == [[[1, 1, 1]], [[1, 1]]]
    assert "attention_mask" not in single[2]


def test_reconstruct_takes_one_adam_step_per_sample_however_the_samples_are_batched(monkeypatch):
    dense = _llama()
    fours = _batches()  # 3 batches of 4 samples
    twos = [{k: v[rows] for k, v in b.items()} for b in fours for rows in (slice(0, 2), slice(2, 4))]
    steps = []
    original = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    weights = []
    for batches in (fours, twos):
        model = copy.deepcopy(dense)
        settings = SolverSettings(OneShotMethod.WANDA, parse_pattern("2:4"), reconstruct=2)
        weights.append(calibrate_and_prune(model, _targets(model), batches, settings).weights)
    assert len(steps) == 2 * (3 * 2 * 12)  # two runs x 3 blocks x 2 passes x 12 samples
    for name, weight in weights[0].items():
        assert torch.allclose(weight, weights[1][name], atol=1e-6), name


def test_padding_is_left_out_of_the_fit_and_its_error():
    block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    with torch.no_grad():
        for layer in (block[0], block[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    target = torch.randn(2, 5, 8, generator=g)
    tokens = torch.ones(2, 5, dtype=torch.long)
    tokens[1, 3:] = 0
    noisy = target.clone()
    noisy[1, 3:] += 1000  # padding: whatever the target says there must not matter
    weights = [block[0].weight, block[2].weight]
    fits = []
    for t in (target, noisy):
        trial = copy.deepcopy(block)
        fit, _ = reconstruct_block(trial, [trial[0].weight, trial[2].weight], [((x,), {})], [t], [tokens], 5)
        fits.append((fit, [p.detach().clone() for p in trial.parameters()]))
    assert fits[0][0] == fits[1][0]
    assert all(torch.equal(a, b) for a, b in zip(fits[0][1], fits[1][1]))
    real = tokens.bool()
    with torch.no_grad():
        by_hand = float((block(x) - target)[real].pow(2).sum() / target[real].pow(2).sum())
    assert fits[0][0].before == pytest.approx(by_hand, rel=1e-5)
    assert torch.equal(block[0].weight, weights[0])  # the caller's block is untouched (each trial was a copy)


@pytest.mark.parametrize("rate", [3.5e-3, 1e-1])
def test_each_matrix_steps_by_the_rate_times_the_rms_of_its_kept_weights(rate):
    """Adam's first step moves every weight with a gradient by lr * g / (|g| + eps), i.e. by its learning rate: one
    pass over one sample moves each kept weight by `rate` x its matrix's kept-weight RMS (by hand below; the two
    matrices are scaled 1x and 10x, so their steps differ tenfold) and each pruned one not at all."""
    block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    with torch.no_grad():
        for layer in (block[0], block[2]):
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5)
        block[2].weight.mul_(10)
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    before = [block[0].weight.detach().clone(), block[2].weight.detach().clone()]
    reconstruct_block(block, [block[0].weight, block[2].weight], [((x,), {})], [target], [None], 1, rate)
    for old, new in zip(before, (block[0].weight, block[2].weight)):
        moved = (new.detach() - old).abs()
        kept = old[old != 0]
        step = rate * float(torch.sqrt((kept**2).sum() / kept.numel()))
        assert torch.equal(moved[old == 0], torch.zeros_like(moved[old == 0]))
        assert torch.allclose(moved[old != 0], torch.full_like(moved[old != 0], step), rtol=1e-3)


def test_prune_reconstruct_end_to_end_and_bad_input(cli, tmp_path, tiny_llama, resnet_file):
    args = ("prune", tiny_llama, "--pattern", "2:4", "--method", "sparsegpt", "--calib-samples", "8", "--seq-len", "32")
    r = cli(*args, "--reconstruct", "2", "--out", tmp_path / "a", "--json")
    assert r.exit_code == 0, r.output
    errors = json.loads(r.stdout)["calibration"]["block_output_error"]
    assert list(errors) == ["model.layers.0", "model.layers.1"]
    assert all(after < before for before, after in errors.values()), errors
    assert cli(*args, "--reconstruct", "2", "--out", tmp_path / "b", "--quiet").exit_code == 0
    with safe_open(str(tmp_path / "a/model.safetensors"), "pt") as a, safe_open(str(tmp_path / "b/model.safetensors"), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # reproducible
        assert json.loads(a.metadata()["nmsparse.oneshot"])["reconstruct"] == 2
    assert cli("report", tmp_path / "a", "--check", "2:4", "--quiet", "--no-flops").exit_code == 0
    assert cli(*args, "--reconstruct", "2", "--reconstruct-lr", "1e-3", "--out", tmp_path / "c", "--quiet").exit_code == 0
    with safe_open(str(tmp_path / "a/model.safetensors"), "pt") as a, safe_open(str(tmp_path / "c/model.safetensors"), "pt") as c:
        assert json.loads(a.metadata()["nmsparse.oneshot"])["reconstruct_lr"] == 3.5e-3
        assert json.loads(c.metadata()["nmsparse.oneshot"])["reconstruct_lr"] == 1e-3
        assert any(not torch.equal(a.get_tensor(k), c.get_tensor(k)) for k in a.keys())
    for rate, why in (("0", "give a learning rate above 0"), ("-1e-3", "give a learning rate above 0"),
                      ("nan", "give a learning rate above 0"), ("inf", "give a learning rate above 0")):
        r = cli(*args, "--reconstruct", "1", "--reconstruct-lr", rate, "--out", tmp_path / "bad")
        assert r.exit_code == 2 and why in r.output and "Traceback" not in r.output, (rate, r.output)
    r = cli(*args, "--reconstruct-lr", "1e-3", "--out", tmp_path / "bad")
    assert r.exit_code == 2 and "--reconstruct-lr 0.001 sets the learning rate of --reconstruct's passes" in r.output
    assert not (tmp_path / "bad").exists()
    r = cli("prune", tiny_llama, "--reconstruct", "1", "--out", tmp_path / "m")
    assert r.exit_code == 2 and "--reconstruct 1: fits the kept weights to calibration data" in r.output
    r = cli("prune", "resnet18", "--checkpoint", resnet_file, "--method", "wanda", "--calib", "mnist5k",
            "--reconstruct", "1", "--out", tmp_path / "r.safetensors")
    assert r.exit_code == 2 and "--reconstruct 1 trains a transformer's blocks" in r.output
    assert not any((tmp_path / name).exists() for name in ("m", "r.safetensors"))
