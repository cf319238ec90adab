"""prune --refine (issue 27 §3): the kept weights re-fitted to the dense outputs with the mask fixed."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nmcli.nm import NMPattern
from nmcli.oneshot.solvers import reconstruction_error, refine_kept, sparsegpt, wanda

P24 = NMPattern(2, 4)


def _problem(seed=0, rows=6, k=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    return torch.randn(rows, k, generator=g, dtype=torch.float64), 2 * x.T @ x / 200


def _least_squares(weight, pruned, hessian, damp):
    """Row by row, the exact minimiser on the kept entries: x_S = (W H)_S (H_SS)^-1 (the second implementation)."""
    h = hessian + damp * hessian.diagonal().mean() * torch.eye(len(hessian), dtype=hessian.dtype)
    out = torch.zeros_like(weight)
    for r in range(len(weight)):
        kept = (pruned[r] != 0).nonzero().flatten()
        out[r, kept] = torch.linalg.solve(h[kept][:, kept], (weight[r] @ h)[kept])
    return out


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_refinement_reaches_the_exact_least_squares_fit_of_the_kept_weights(damp):
    weight, hessian = _problem()
    pruned = weight * wanda(weight, hessian.diagonal(), P24)
    refined = refine_kept(weight, pruned, hessian, 60, damp=damp)
    torch.testing.assert_close(refined, _least_squares(weight, pruned, hessian, damp), rtol=1e-6, atol=1e-8)
    assert torch.equal(refined == 0, pruned == 0)  # the mask is fixed: pruned entries stay exact zeros


def test_each_step_lowers_the_error_from_wanda_and_from_sparsegpt():
    weight, hessian = _problem(seed=1)
    for pruned in (weight * wanda(weight, hessian.diagonal(), P24), sparsegpt(weight, hessian, P24)):
        errors = [reconstruction_error(weight, refine_kept(weight, pruned, hessian, n, damp=0.0), hessian)
                  for n in range(6)]
        assert errors[0] == pytest.approx(reconstruction_error(weight, pruned, hessian))
        assert all(b < a for a, b in zip(errors, errors[1:])), errors


def test_prune_refine_keeps_the_mask_lowers_the_error_and_is_recorded(cli, tmp_path, tiny_llama):
    args = ("prune", tiny_llama, "--pattern", "2:4", "--method", "wanda", "--calib-samples", "8", "--seq-len", "32",
            "--json")
    plain, refined = cli(*args, "--out", tmp_path / "plain"), cli(*args, "--refine", "10", "--out", tmp_path / "refined")
    assert plain.exit_code == 0 and refined.exit_code == 0, refined.output
    error = {name: json.loads(r.stdout)["calibration"]["mean_reconstruction_error"] for name, r in
             (("plain", plain), ("refined", refined))}
    assert error["refined"] < 0.9 * error["plain"]
    a, b = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "refined" / "model.safetensors"))
    first = [n for n in json.loads(plain.stdout)["pruned_layers"] if n.startswith("model.layers.0.")]
    # block 0 sees the same inputs in both runs, so the same Wanda mask: the refined weights sit inside it
    assert first and all(torch.equal(b[n] != 0, (a[n] != 0) & (b[n] != 0)) and not torch.equal(a[n], b[n]) for n in first)
    assert cli("report", tmp_path / "refined", "--check", "2:4", "--quiet", "--no-flops").exit_code == 0
    with safe_open(str(tmp_path / "refined" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["nmsparse.oneshot"])["refine"] == 10
    bad = cli("prune", tiny_llama, "--refine", "5", "--out", tmp_path / "never")
    assert bad.exit_code == 2 and "--method wanda, sparsegpt or alps" in bad.output and not (tmp_path / "never").exists()
