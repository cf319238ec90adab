"""Wanda and SparseGPT (methods.md §7) against independent references, and the sequential calibration order."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from safetensors.torch import save_file

from nmcli.models.targets import LayerInfo
from nmcli.nm import CONV, LINEAR, apply_nm, parse_pattern
from nmcli.nm.layout import to_groups
from nmcli.oneshot.calibrate import (
    OneShotMethod,
    SolverSettings,
    calibrate_and_prune,
    from_weight_rows,
    input_rows,
    weight_rows,
)
from nmcli.oneshot.onepass import calibrate_in_one_pass
from nmcli.oneshot.solvers import reconstruction_error, sparsegpt, wanda
from tests.conftest import timm_state
from tests.reference import brute_force_mask

PATTERNS = ["2:4", "1:4", "4:8", "1:8", "2:16"]


def _layer(seed=0, rows=8, k=32, samples=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, k, generator=g) @ torch.randn(k, k, generator=g)  # correlated inputs
    return torch.randn(rows, k, generator=g), x, 2 * x.T @ x / samples


def test_wanda_matches_a_direct_reference_including_ties():
    weight, x, hessian = _layer()
    weight[0, :4] = torch.tensor([1.0, -1.0, 1.0, 1.0])  # equal scores when the columns have equal norms
    x[:, :4] = 1.0
    hessian = 2 * x.T @ x / len(x)
    pattern = parse_pattern("2:4")
    scores = weight.abs() * x.norm(dim=0)  # |W_ij| * ||X_:,j||
    assert torch.equal(wanda(weight, hessian.diagonal(), pattern), brute_force_mask(scores, 2, 4, 1))
    assert wanda(weight, hessian.diagonal(), pattern)[0, :4].tolist() == [True, True, False, False]


def _naive_sparsegpt(weight, hessian, n, m, damp=0.01):
    """Column by column, no lazy blocks, written from the paper's equations."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(len(h), dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    keep = torch.zeros_like(w, dtype=torch.bool)
    for j in range(w.shape[1]):
        if j % m == 0:
            scores = w[:, j : j + m] ** 2 / u.diagonal()[j : j + m] ** 2
            for row in range(w.shape[0]):
                order = sorted(range(m), key=lambda i: (-scores[row, i].item(), i))[:n]
                for i in order:
                    keep[row, j + i] = True
        q = w[:, j] * keep[:, j]
        err = (w[:, j] - q) / u[j, j]
        w[:, j:] -= err.unsqueeze(1) * u[j, j:].unsqueeze(0)
        w[:, j] = q
    return w


@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparsegpt_is_exact_nm_beats_magnitude_and_wanda_and_matches_the_naive_version(pattern):
    pat = parse_pattern(pattern)
    weight, x, hessian = _layer(seed=1, k=32)
    pruned = sparsegpt(weight, hessian, pat, block=8)
    assert int((pruned != 0).reshape(8, -1, pat.m).sum(-1).max()) <= pat.n
    assert torch.allclose(pruned.double(), _naive_sparsegpt(weight, hessian, pat.n, pat.m), atol=1e-5)
    assert torch.allclose(pruned, sparsegpt(weight, hessian, pat, block=128), atol=1e-5)  # lazy blocks are exact
    error = reconstruction_error(weight, pruned, hessian)
    assert error < reconstruction_error(weight, apply_nm(weight, pat, LINEAR), hessian)
    assert error < reconstruction_error(weight, weight * wanda(weight, hessian.diagonal(), pat), hessian)
    direct = float(((x @ weight.T - x @ pruned.T) ** 2).sum() / ((x @ weight.T) ** 2).sum())
    assert error == pytest.approx(direct, rel=1e-4)  # the H-based error is the one on the activations


class _TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8, bias=False)) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_the_second_block_is_calibrated_on_the_pruned_first_blocks_outputs():
    torch.manual_seed(0)
    model = _TwoBlocks()
    x = torch.randn(64, 8) * torch.tensor([5.0, 1, 1, 1, 1, 1, 1, 1])
    dense_first, second = model.blocks[0][0].weight.detach().clone(), model.blocks[1][0].weight.detach().clone()
    layers = {f"blocks.{i}.0": LayerInfo(f"blocks.{i}.0.weight", f"blocks.{i}.0", LINEAR) for i in range(2)}
    pattern = parse_pattern("1:4")
    result = calibrate_and_prune(model, layers, [{"x": x}], SolverSettings(OneShotMethod.WANDA, pattern))
    first = dense_first * wanda(dense_first, (2 * x.T @ x / 64).diagonal(), pattern)
    assert torch.equal(result.weights["blocks.0.0"], first)
    pruned_inputs, dense_inputs = x @ first.T, x @ dense_first.T
    expected = second * wanda(second, (2 * pruned_inputs.T @ pruned_inputs / 64).diagonal(), pattern)
    wrong = second * wanda(second, (2 * dense_inputs.T @ dense_inputs / 64).diagonal(), pattern)
    assert not torch.equal(expected, wrong), "the test needs inputs where the order matters"
    assert torch.equal(result.weights["blocks.1.0"], expected)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "alps"])
def test_prune_with_calibration_is_deterministic_exact_and_recorded(cli, tmp_path, tiny_llama, method):
    args = ("prune", tiny_llama, "--pattern", "2:4", "--method", method, "--calib-samples", "8", "--seq-len", "32")
    r = cli(*args, "--out", tmp_path / "a", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["calibration"]["mean_reconstruction_error"] > 0 and payload["method"] == method
    assert cli(*args, "--out", tmp_path / "b", "--quiet").exit_code == 0
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert int((a["model.layers.1.mlp.up_proj.weight"] != 0).reshape(64, -1, 4).sum(-1).max()) == 2
    with safe_open(str(tmp_path / "a/model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["nmsparse.oneshot"])
    assert meta["method"] == method and meta["samples"] == 8 and meta["seq_len"] == 32
    assert cli("report", tmp_path / "a", "--check", "2:4", "--quiet", "--no-flops").exit_code == 0


def test_calibration_smaller_than_asked_is_stated_and_recorded(cli, tmp_path, tiny_bert):
    """8 paragraphs, every 4th (the 4th, the 8th) held out: an encoder calibrates on the other 6, one sample each."""
    text = tmp_path / "eight.txt"
    text.write_text("\n\n".join(f"Paragraph {i} says the weather was fine on day {i} of the trip." for i in range(8)))
    args = ("prune", tiny_bert, "--method", "sparsegpt", "--calib", text, "--seq-len", "32", "--json")
    r = cli(*args, "--calib-samples", "16", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["calibration"]["samples"] == 6
    assert f"--calib {text} gives 6 calibration samples, fewer than --calib-samples 16 asks for" in " ".join(payload["notes"])
    with safe_open(str(tmp_path / "a/model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["nmsparse.oneshot"])["samples"] == 6
    r = cli(*args, "--calib-samples", "4", "--out", tmp_path / "b")
    payload = json.loads(r.stdout)
    assert payload["calibration"]["samples"] == 4 and not any("fewer than" in note for note in payload["notes"])


def test_calibrated_prune_bad_input(cli, tmp_path, tiny_llama, resnet_file):
    r = cli("prune", tiny_llama, "--method", "obs", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--method 'obs': choose one of magnitude, wanda, sparsegpt, alps" in r.output
    r = cli("prune", "resnet18", "--checkpoint", resnet_file, "--method", "wanda", "--out", tmp_path / "y.safetensors")
    assert r.exit_code == 2 and "--calib IMAGE_FOLDER" in r.output
    plain = tmp_path / "plain.safetensors"
    save_file({"fc.weight": torch.randn(8, 16)}, str(plain))
    r = cli("prune", plain, "--method", "sparsegpt", "--out", tmp_path / "y.safetensors")
    assert r.exit_code == 2 and "architecture" in r.output and "--method magnitude" in r.output
    r = cli("prune", tiny_llama, "--method", "sparsegpt", "--calib", tmp_path / "missing.txt", "--out", tmp_path / "z")
    assert r.exit_code == 2 and "missing.txt: no such file or folder" in r.output
    assert not (tmp_path / "z").exists()


def test_conv_rows_reproduce_the_convolution():
    """The channels-last row views of a Conv2d's inputs and weight multiply to exactly what F.conv2d computes, so
    H = XᵀX is the Hessian of the layer's real outputs and N:M groups (M channels at a tap) stay consecutive."""
    conv = torch.nn.Conv2d(8, 6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False).double()
    layer = LayerInfo("c.weight", "c", CONV)
    x = torch.randn(3, 8, 9, 7, dtype=torch.float64)
    out = conv(x)
    rows = input_rows(conv, x, layer) @ weight_rows(conv.weight, layer).T  # [N·L, O]
    assert torch.allclose(rows.reshape(3, -1, 6).permute(0, 2, 1).reshape(out.shape), out)
    assert torch.equal(from_weight_rows(weight_rows(conv.weight, layer), conv.weight, layer), conv.weight)
    groups = weight_rows(conv.weight, layer).reshape(-1, 4)
    assert torch.equal(groups, to_groups(conv.weight, layer.layout, 4))  # the K order of every other N:M path


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.second = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.grouped = torch.nn.Conv2d(8, 8, 1, groups=2, bias=False)

    def forward(self, x):
        return self.grouped(self.second(torch.relu(self.first(x))))


def test_one_pass_calibrates_each_layer_on_its_pruned_predecessors():
    torch.manual_seed(0)
    model = _ConvNet()
    x = torch.randn(6, 4, 5, 5)
    dense_first, dense_second = model.first.weight.detach().clone(), model.second.weight.detach().clone()
    layers = {name: LayerInfo(f"{name}.weight", name, CONV) for name in ("first", "second", "grouped")}
    pattern = parse_pattern("2:4")
    result = calibrate_in_one_pass(model, layers, x, SolverSettings(OneShotMethod.SPARSEGPT, pattern))
    assert result.by_magnitude == ["grouped"]  # grouped convolutions are pruned by magnitude, and listed
    for name in ("first", "second"):
        assert torch.equal(getattr(model, name).weight, result.weights[name])
        assert int((to_groups(result.weights[name], CONV, 4) != 0).sum(1).max()) == 2

    def solved(inputs):
        rows = input_rows(model.second, inputs, layers["second"]).double()
        return sparsegpt(weight_rows(dense_second, layers["second"]), 2 * rows.T @ rows / rows.shape[0], pattern)

    expected = solved(torch.relu(torch.nn.functional.conv2d(x, result.weights["first"], padding=1)))
    wrong = solved(torch.relu(torch.nn.functional.conv2d(x, dense_first, padding=1)))
    assert not torch.allclose(expected, wrong), "the test needs inputs where the order matters"
    assert torch.allclose(weight_rows(result.weights["second"], layers["second"]), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_prune_calibrates_timm_models_on_images(cli, tmp_path, name):
    """timm's small test models (a ResNet: 3x3 and 1x1 convolutions; a ViT: Linear layers), calibrated on digits."""
    source = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state(name).items()}, str(source))
    args = ("prune", name, "--checkpoint", source, "--pattern", "2:4", "--method", "sparsegpt",
            "--calib", "mnist5k", "--calib-samples", "8")
    r = cli(*args, "--out", tmp_path / "a.safetensors", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    solved = set(payload["calibration"]["reconstruction_error"])
    assert solved | set(payload["calibration"]["by_magnitude"]) == {n.removesuffix(".weight") for n in payload["pruned_layers"]}
    assert len(solved) >= 0.8 * len(payload["pruned_layers"])  # grouped (depthwise) convolutions fall back, listed
    assert cli(*args, "--out", tmp_path / "b.safetensors", "--quiet").exit_code == 0
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    dense = load_file(str(source))
    some = sorted(solved)[len(solved) // 2] + ".weight"
    assert ((a[some] != dense[some]) & (a[some] != 0)).any(), "SparseGPT updates the weights it keeps"
    assert cli("report", name, "--checkpoint", tmp_path / "a.safetensors", "--check", "2:4", "--quiet").exit_code == 0


class _SharedInputBlock(nn.Module):
    """q and k read the same tensor, o reads another of the same shape: q and k may share a Hessian, o may not."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)

    def forward(self, x):
        h = torch.tanh(x)
        return x + self.o(torch.relu(self.q(h) * self.k(h)))


def test_layers_reading_the_same_input_share_its_hessian_and_others_do_not():
    torch.manual_seed(1)
    model = nn.Module()
    model.blocks = nn.ModuleList([_SharedInputBlock()])
    model.forward = lambda x: model.blocks[0](x)
    batches = [{"x": torch.randn(16, 8) * 3}, {"x": torch.randn(16, 8)}]
    q, k, o = (getattr(model.blocks[0], n).weight.detach().clone() for n in "qko")
    layers = {f"blocks.0.{n}": LayerInfo(f"blocks.0.{n}.weight", f"blocks.0.{n}", LINEAR) for n in "qko"}
    pattern = parse_pattern("2:4")
    result = calibrate_and_prune(model, layers, batches, SolverSettings(OneShotMethod.SPARSEGPT, pattern))
    x = torch.cat([b["x"] for b in batches])
    h = torch.tanh(x).double()
    inner = torch.relu((h.float() @ q.T) * (h.float() @ k.T)).double()
    for name, weight, inputs in (("q", q, h), ("k", k, h), ("o", o, inner)):
        expected = sparsegpt(weight, 2 * inputs.T @ inputs / len(inputs), pattern)
        assert torch.allclose(result.weights[f"blocks.0.{name}"], expected, atol=1e-5), name


def test_a_singular_hessian_gets_more_damping_and_says_so_and_nan_activations_are_named():
    from nmcli.errors import NMSparseError
    from nmcli.oneshot.calibrate import OneShotResult, solve_layer

    layer = LayerInfo("fc.weight", "fc", LINEAR)
    module = nn.Linear(8, 4, bias=False)
    rows = torch.randn(3, 8, dtype=torch.float64)  # 3 samples for K = 8: H has rank 3
    hessian = 2 * rows.T @ rows / 3
    result = OneShotResult({}, {})
    solve_layer(module, "fc", layer, hessian, SolverSettings(OneShotMethod.SPARSEGPT, parse_pattern("2:4"), damp=0.0), result)
    assert result.damped == {"fc": 0.01}  # undamped Cholesky fails; 0.01 x mean(diag H) is enough
    assert int((module.weight != 0).reshape(4, 2, 4).sum(-1).max()) == 2
    hessian[2, 3] = float("nan")
    with pytest.raises(NMSparseError, match="fc: the calibration activations reaching this layer hold NaN/Inf"):
        solve_layer(module, "fc", layer, hessian, SolverSettings(OneShotMethod.WANDA, parse_pattern("2:4")), result)


def test_hessians_are_accumulated_on_the_device_of_their_inputs():
    """A model on a GPU feeds GPU rows: the Hessian must live there too (it was allocated on the CPU once, which
    broke calibration on CUDA). The meta device stands in for the GPU here; tests/test_cuda.py runs the real one."""
    from nmcli.oneshot.calibrate import _BlockHessians
    from nmcli.oneshot.onepass import _hessian_of

    layer = LayerInfo("fc.weight", "fc", LINEAR)
    module = nn.Linear(8, 4, device="meta")
    hessians = _BlockHessians({"fc": layer})
    hessians.new_call()
    hessians.hook("fc", module, torch.randn(2, 5, 8, device="meta"))
    assert hessians.of["fc"].h.is_meta and hessians.of["fc"].n == 10
    assert _hessian_of(module, layer, torch.randn(3, 8, device="meta")).is_meta


def test_padding_tokens_stay_out_of_the_calibration():
    """A padded batch calibrates exactly as its samples do unpadded, one per batch: the rows of padding tokens are
    left out of every Hessian and input norm (they were counted once, which tilted encoders' masks towards
    padding)."""
    import copy

    import transformers

    from nmcli.oneshot.permute import input_column_norms

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    layers = {name: LayerInfo(f"{name}.weight", name, LINEAR) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.startswith("encoder.")}
    short, long = torch.randint(1, 128, (5,)), torch.randint(1, 128, (9,))
    padded = {"input_ids": torch.zeros(2, 9, dtype=torch.long), "attention_mask": torch.zeros(2, 9, dtype=torch.long)}
    for row, ids in enumerate((short, long)):
        padded["input_ids"][row, : len(ids)], padded["attention_mask"][row, : len(ids)] = ids, 1
    alone = [{"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long)} for ids in (short, long)]
    settings = SolverSettings(OneShotMethod.SPARSEGPT, parse_pattern("2:4"))
    norms = [input_column_norms(model, set(layers), batches) for batches in ([padded], alone)]
    assert set(norms[0]) == set(layers)
    for name in layers:  # Wanda's, --permute's and --budget's ‖X_:,j‖ too
        torch.testing.assert_close(norms[0][name], norms[1][name], rtol=1e-4, atol=1e-5)
    a = calibrate_and_prune(copy.deepcopy(model), layers, [padded], settings)
    b = calibrate_and_prune(copy.deepcopy(model), layers, alone, settings)
    assert len(a.weights) == len(layers) == 12
    for name in layers:
        torch.testing.assert_close(a.weights[name], b.weights[name], rtol=1e-4, atol=1e-5)
