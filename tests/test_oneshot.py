"""Wanda and SparseGPT (methods.md §7) against independent references, and the sequential calibration order."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from nmcli.models import LayerInfo
from nmcli.nm import LINEAR, apply_nm, parse_pattern
from nmcli.oneshot.calibrate import OneShotMethod, SolverSettings, calibrate_and_prune
from nmcli.oneshot.solvers import reconstruction_error, sparsegpt, wanda
from tests.conftest import save_tiny_hf
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


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("hf") / "llama", "llama", tokenizer=True, initializer_range=0.3)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_with_calibration_is_deterministic_exact_and_recorded(cli, tmp_path, llama, method):
    args = ("prune", llama, "--pattern", "2:4", "--method", method, "--calib-samples", "8", "--seq-len", "32")
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


def test_calibrated_prune_bad_input(cli, tmp_path, llama, resnet_file):
    r = cli("prune", llama, "--method", "obs", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--method 'obs': choose one of magnitude, wanda, sparsegpt" in r.output
    r = cli("prune", "resnet18", "--checkpoint", resnet_file, "--method", "wanda", "--out", tmp_path / "y.safetensors")
    assert r.exit_code == 2 and "use --method magnitude" in r.output
    r = cli("prune", llama, "--method", "sparsegpt", "--calib", tmp_path / "missing.txt", "--out", tmp_path / "z")
    assert r.exit_code == 2 and "missing.txt: no such file or folder" in r.output
    assert not (tmp_path / "z").exists()
