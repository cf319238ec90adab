"""prune -> report round trips on timm and Hugging Face checkpoints, checked against independent masks."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nmcli.models.resolve import resolve
from nmcli.nm import CONV, LINEAR, NMPattern
from nmcli.report import build_report
from nmcli.report.flops import per_layer_flops
from tests.conftest import save_tiny_hf, timm_state
from tests.reference import brute_force_mask


def _assert_pruned(original: dict, pruned: dict, layers: dict, pattern: NMPattern):
    for name, tensor in original.items():
        if name in layers:
            k_axis = layers[name]["k_axis"]
            mask = brute_force_mask(tensor, pattern.n, pattern.m, k_axis) if tensor.numel() <= 4096 else None
            if mask is not None:
                assert torch.equal(pruned[name], tensor * mask), name
            nz = (pruned[name] != 0).movedim(k_axis, -1).reshape(-1, pattern.m).sum(1)
            assert int(nz.max()) <= pattern.n, name
        else:
            assert torch.equal(pruned[name], tensor), name


def test_prune_timm_vit_then_report_check(cli, tmp_path):
    out = tmp_path / "vit.safetensors"
    r = cli("prune", "vit_tiny_patch16_224", "--pattern", "2:4", "--out", out, "--seed", "3", "--quiet")
    assert r.exit_code == 0, r.output
    original = timm_state("vit_tiny_patch16_224", seed=3)
    pruned = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    layers = json.loads(meta["nmsparse.layers"])
    assert meta["nmsparse.pattern"] == "2:4" and meta["nmsparse.zeros_per_group"] == "2"
    assert "keep-N" in meta["nmsparse.convention"]
    # methods.md §4 defaults: patch embedding (stem) and head are not targets; every block Linear is
    assert "patch_embed.proj.weight" not in layers and "head.weight" not in layers
    assert len(layers) == 12 * 4
    assert all(v["layout"] == "linear" and v["k_axis"] == 1 for v in layers.values())
    _assert_pruned(original, pruned, layers, NMPattern(2, 4))

    ok = cli("report", out, "--check", "2:4", "--json")
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert data["check"] == {"pattern": "2:4", "passed": True}
    assert data["summary"]["target_sparsity"] == pytest.approx(0.5)
    # a 2:4 checkpoint is not 1:8 compliant: the gate must fail
    bad = cli("report", out, "--check", "1:8", "--quiet")
    assert bad.exit_code == 1 and "FAILED" in bad.stdout


def test_prune_timm_resnet_conv_layout(cli, tmp_path, resnet_file):
    out = tmp_path / "r.safetensors"
    r = cli("prune", resnet_file, "--model", "resnet18", "--pattern", "1:8", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert "conv1.weight" not in info["pruned_layers"] and "fc.weight" not in info["pruned_layers"]
    assert info["skipped_layers"] == {}
    original, pruned = load_file(str(resnet_file)), load_file(str(out))
    with safe_open(str(out), "pt") as f:
        layers = json.loads(f.metadata()["nmsparse.layers"])
    assert layers["layer1.0.conv1.weight"] == {"layout": "conv", "k_axis": 1, "pattern": "1:8"}
    _assert_pruned(original, pruned, layers, NMPattern(1, 8))
    # exact check of a conv layer with the brute-force reference (groups along input channels per tap)
    w = original["layer1.0.conv1.weight"][:2]
    assert torch.equal(pruned["layer1.0.conv1.weight"][:2], w * brute_force_mask(w, 1, 8, 1))
    assert cli("report", out, "--check", "1:8", "--quiet").exit_code == 0


def test_layers_whose_k_does_not_divide_are_skipped_and_reported(cli, tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"a.weight": torch.randn(8, 12), "b.weight": torch.randn(8, 32)}, str(path))
    r = cli("prune", path, "--pattern", "1:8", "--out", tmp_path / "o.safetensors", "--json")
    info = json.loads(r.stdout)
    assert info["pruned_layers"] == ["b.weight"]
    assert info["skipped_layers"] == {"a.weight": "K=12 not divisible by M=8"}
    rep = json.loads(cli("report", tmp_path / "o.safetensors", "--json").stdout)
    rows = {row["name"]: row for row in rep["layers"]}
    assert rows["a.weight"]["status"] == "skipped" and "K=12" in rows["a.weight"]["reason"]
    assert rows["b.weight"]["pattern"] == "1:8" and rows["b.weight"]["compliance"] == 1.0


def test_hf_bert_sharded_folder_round_trip(cli, tmp_path, hf_bert_folder, monkeypatch):
    """...and no tensor is read into memory whole: each is copied from its shard's file, the targets masked on the
    way."""
    from nmcli.io.sources import Checkpoint

    read, original_read = [], Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name, into=None: read.append(name) or original_read(self, name, into))
    out = tmp_path / "bert-2of4"
    r = cli("prune", hf_bert_folder, "--pattern", "2:4", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    shards = sorted(p.name for p in hf_bert_folder.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "config.json").read_text() == (hf_bert_folder / "config.json").read_text()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["nmsparse.pattern"] == "2:4"
    layers = json.loads(index["metadata"]["nmsparse.layers"])
    assert "classifier.weight" not in layers
    assert "bert.encoder.layer.0.intermediate.dense.weight" in layers
    assert not any("embeddings" in name for name in layers)
    assert read == []
    for shard in shards:
        original, pruned = load_file(str(hf_bert_folder / shard)), load_file(str(out / shard))
        assert original.keys() == pruned.keys()
        _assert_pruned(original, pruned, layers, NMPattern(2, 4))
    rep = cli("report", out, "--check", "2:4", "--json")
    assert rep.exit_code == 0, rep.output
    assert json.loads(rep.stdout)["flops"]["input_shape"] == [1, 64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_preserved(cli, tmp_path, dtype):
    path = tmp_path / "h.safetensors"
    save_file({"l.weight": torch.randn(16, 64).to(dtype), "l.bias": torch.randn(16).to(dtype)}, str(path))
    assert cli("prune", path, "-p", "1:4", "-o", tmp_path / "o.safetensors", "-q").exit_code == 0
    out = load_file(str(tmp_path / "o.safetensors"))
    assert out["l.weight"].dtype == dtype and out["l.bias"].dtype == dtype
    ref = load_file(str(path))["l.weight"]
    assert torch.equal(out["l.weight"], ref * brute_force_mask(ref, 1, 4, 1))


def test_flops_match_hand_computation():
    shape, total, layers = per_layer_flops(resolve("vit_tiny_patch16_224").model)
    tokens, dim = 197, 192
    assert shape == (1, 3, 224, 224)
    assert layers["blocks.0.mlp.fc1"] == 2 * tokens * dim * 4 * dim
    assert layers["blocks.0.attn.qkv"] == 2 * tokens * dim * 3 * dim
    assert layers["patch_embed.proj"] == 2 * 196 * dim * 3 * 16 * 16
    _, _, conv = per_layer_flops(resolve("resnet18").model)
    assert conv["layer1.0.conv1"] == 2 * 56 * 56 * 64 * 64 * 3 * 3


def test_report_flops_scale_by_density(tmp_path, cli):
    out = tmp_path / "v.safetensors"
    cli("prune", "vit_tiny_patch16_224", "-p", "2:4", "-o", out, "-q")
    rep = build_report(resolve(str(out)))
    _, total, layers = per_layer_flops(resolve("vit_tiny_patch16_224").model)
    target_flops = sum(layers[r.name.removesuffix(".weight")] for r in rep.targets)
    assert rep.flops.dense == total
    assert rep.flops.sparse == pytest.approx(total - target_flops / 2, rel=1e-6)
    # vit_tiny: dim 192 and 768 are multiples of 16, so every 2:4 layer is tensor-core eligible
    assert all(r.tc24 == "yes" for r in rep.targets)
    assert rep.flops.hw24 == pytest.approx(total - target_flops / 2, rel=1e-6)
    dense = build_report(resolve("vit_tiny_patch16_224"))
    assert dense.flops.sparse == dense.flops.hw24 == dense.flops.dense


def test_tensor_core_eligibility_rules():
    from nmcli.models.targets import LayerInfo
    from nmcli.report.layers import _tc24

    two_four = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(8, 4)  # [8, 16], exactly 2:4
    assert _tc24(two_four, LayerInfo("w", "m", LINEAR)) == "yes"
    assert _tc24(two_four[:4], LayerInfo("w", "m", LINEAR)).startswith("no: out=4")
    assert _tc24(torch.ones(8, 16), LayerInfo("w", "m", LINEAR)) == "no: not 2:4"
    assert _tc24(two_four.double(), LayerInfo("w", "m", LINEAR)).startswith("no: dtype")
    assert _tc24(two_four.reshape(8, 16, 1, 1), LayerInfo("w", "m", CONV)) == "yes"


def test_file_and_in_memory_sources_prune_alike(cli, tmp_path, resnet_file):
    """A file source is read into reused buffers, a timm name's tensors are in memory: same output."""
    from_file, from_name = tmp_path / "f.safetensors", tmp_path / "n.safetensors"
    assert cli("prune", resnet_file, "--model", "resnet18", "-p", "2:4", "-o", from_file, "-q").exit_code == 0
    assert cli("prune", "resnet18", "--seed", "0", "-p", "2:4", "-o", from_name, "-q").exit_code == 0
    a, b = load_file(str(from_file)), load_file(str(from_name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_targets_masked_in_chunks_of_rows_prune_exactly(cli, tmp_path, monkeypatch):
    """Tiny chunks (a few rows each) split every target: the output must equal the brute-force reference, Conv1D
    chunks (K on axis 0) must hold whole groups, and a NaN in a late chunk must stop the prune with nothing
    written."""
    import nmcli.io.safetensors_stream as stream

    folder = save_tiny_hf(tmp_path / "gpt2", "gpt2")
    monkeypatch.setattr(stream, "CHUNK_BYTES", 256)  # under one row: one group of 4 rows per chunk
    out = tmp_path / "gpt2-2of4"
    assert cli("prune", folder, "--pattern", "2:4", "--out", out, "--quiet").exit_code == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        layers = json.loads(f.metadata()["nmsparse.layers"])
    assert {v["k_axis"] for v in layers.values()} == {0}  # GPT-2's Conv1D: the reduction axis is axis 0
    _assert_pruned(load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors")), layers,
                   NMPattern(2, 4))

    state = load_file(str(folder / "model.safetensors"))
    state["transformer.h.1.mlp.c_fc.weight"][-1, 0] = math.nan  # the last piece of a late tensor
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    bad = cli("prune", folder, "--pattern", "2:4", "--out", tmp_path / "nan-out")
    assert bad.exit_code == 2 and "transformer.h.1.mlp.c_fc.weight has 1 NaN/Inf weights in rows 28-31 (of 32)" in bad.output
    assert not (tmp_path / "nan-out").exists()
