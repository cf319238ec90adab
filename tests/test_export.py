"""Exports round-trip through real readers: our nm loader, compressed-tensors 0.14.0.1, onnx and onnxruntime."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nmcli import load_nm
from nmcli.models.resolve import resolve
from nmcli.models.architecture import build_model
from nmcli.nm import LINEAR, NMPattern, apply_nm
from tests.conftest import save_tiny_hf
from tests.reference import brute_force_mask


def _sparse_file(tmp_path, pattern: str, dtype=torch.float32, name="sparse.safetensors"):
    """Hand-built N:M layers (brute-force masks) plus a bias and a dense non-target layer."""
    n, m = map(int, pattern.split(":"))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (rows, cols) in enumerate([(16, 64), (8, 128), (24, 32)]):
        w = torch.randn(rows, cols, generator=g).to(dtype)
        tensors[f"blocks.{i}.fc.weight"] = w * brute_force_mask(w, n, m, 1)
        tensors[f"blocks.{i}.fc.bias"] = torch.randn(rows, generator=g).to(dtype)
    path = tmp_path / name
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("pattern", ["2:4", "1:8", "1:32", "3:8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nm_round_trip_is_exact_and_small(cli, tmp_path, pattern, dtype):
    path, tensors = _sparse_file(tmp_path, pattern, dtype)
    out = tmp_path / "nm.safetensors"
    r = cli("export", path, "--format", "nm", "--pattern", pattern, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    restored = load_nm(out)
    assert restored.keys() == tensors.keys()
    assert all(torch.equal(restored[k], v) and restored[k].dtype == dtype for k, v in tensors.items())
    # size of the N:M tensors within 1 % of (N b + N ceil(log2 M)) / (M b)
    n, m = map(int, pattern.split(":"))
    bits = dtype.itemsize * 8
    ideal = (n * bits + n * int(np.ceil(np.log2(m)))) / (m * bits)
    raw = load_file(str(out))
    for name in (k for k in tensors if k.endswith("weight")):
        stored = raw[name + ".nm_values"].numel() * dtype.itemsize + raw[name + ".nm_positions"].numel()
        assert stored / (tensors[name].numel() * dtype.itemsize) == pytest.approx(ideal, rel=0.01)
    # back to dense: the same tensors, readable by plain safetensors, reported compliant
    dense = tmp_path / "dense.safetensors"
    assert cli("export", out, "--format", "dense", "--out", dense, "-q").exit_code == 0
    back = load_file(str(dense))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert cli("report", out, "--check", pattern, "-q").exit_code == 0


def test_nm_of_a_pruned_conv_net_and_sharded_folder(cli, tmp_path, hf_bert_folder, resnet_file):
    pruned = tmp_path / "r.safetensors"
    cli("prune", resnet_file, "--model", "resnet18", "-p", "1:4", "-o", pruned, "-q")
    out = tmp_path / "r-nm.safetensors"
    r = cli("export", pruned, "--format", "nm", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["bytes"] < 0.45 * pruned.stat().st_size
    original, restored = load_file(str(pruned)), load_nm(out)
    assert all(torch.equal(restored[k], v) for k, v in original.items())
    with safe_open(str(out), "pt") as f:
        table = json.loads(f.metadata()["nmsparse.nm_tensors"])
    assert table["layer1.0.conv1.weight"]["layout"] == "conv" and table["layer1.0.conv1.weight"]["index_bits"] == 2
    # sharded in, sharded out
    bert = tmp_path / "bert"
    cli("prune", hf_bert_folder, "-p", "2:4", "-o", bert, "-q")
    bert_nm = tmp_path / "bert-nm"
    assert cli("export", bert, "--format", "nm", "--out", bert_nm, "-q").exit_code == 0
    assert (bert_nm / "model.safetensors.index.json").is_file() and (bert_nm / "config.json").is_file()
    assert cli("report", bert_nm, "--check", "2:4", "-q").exit_code == 0


def test_non_compliant_export_lists_offenders_and_prune_fixes_it(cli, tmp_path):
    path = tmp_path / "dense.safetensors"
    save_file({"a.weight": torch.randn(8, 16), "b.weight": torch.randn(8, 16)}, str(path))
    r = cli("export", path, "--format", "nm", "--pattern", "2:4", "--out", tmp_path / "o.safetensors")
    assert r.exit_code == 2 and "2 layer(s) do not comply with their N:M pattern: a.weight (2:4), b.weight (2:4)" in r.stderr and "--prune" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()
    ok = cli("export", path, "--format", "nm", "--pattern", "2:4", "--prune", "--out", tmp_path / "o.safetensors", "-q")
    assert ok.exit_code == 0
    w = load_file(str(path))["a.weight"]
    assert torch.equal(load_nm(tmp_path / "o.safetensors")["a.weight"], w * brute_force_mask(w, 2, 4, 1))
    nothing = cli("export", path, "--format", "nm", "--out", tmp_path / "x.safetensors")
    assert nothing.exit_code == 2 and "declares no N:M pattern" in nothing.stderr


def _ct_decompress(folder):
    from compressed_tensors.compressors import ModelCompressor

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(config)
    return dict(compressor.sparsity_compressor.decompress(str(folder)))


@pytest.mark.parametrize("pattern", ["2:4", "1:8"])
def test_compressed_tensors_reader_restores_our_weights(cli, tmp_path, pattern):
    path, tensors = _sparse_file(tmp_path, pattern, torch.float16)
    out = tmp_path / "ct"
    r = cli("export", path, "--format", "compressed-tensors", "--pattern", pattern, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    raw = load_file(str(out / "model.safetensors"))
    assert raw["blocks.0.fc.shape"].tolist() == [[16], [64]] and raw["blocks.0.fc.compressed"].shape == (16, 32)
    restored = _ct_decompress(out)
    assert set(restored) == set(tensors)
    assert all(torch.equal(restored[k], v) for k, v in tensors.items())


def test_compressed_tensors_keeps_convs_dense_and_refuses_wider_patterns(cli, tmp_path, resnet_file):
    pruned = tmp_path / "r.safetensors"
    cli("prune", resnet_file, "--model", "resnet18", "-p", "2:4", "-o", pruned, "-q")
    out = tmp_path / "ct"
    r = cli("export", pruned, "--format", "compressed-tensors", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]["ignore"]
    assert "layer1.0.conv1" in ignore and "fc" in ignore
    assert torch.equal(_ct_decompress(out)["layer1.0.conv1.weight"], load_file(str(pruned))["layer1.0.conv1.weight"])
    path, _ = _sparse_file(tmp_path, "4:8", name="w.safetensors")
    bad = cli("export", path, "--format", "compressed-tensors", "--pattern", "4:8", "--out", tmp_path / "ct2")
    assert bad.exit_code == 2 and "use --format nm" in bad.stderr


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "bert"])
def test_compressed_tensors_export_loads_in_transformers_and_computes_the_same(cli, tmp_path, kind, tied):
    """transformers (with compressed-tensors 0.14.0.1) loads the export and computes exactly what the pruned source
    computes; a tied LM head (no tensor of its own) stays tied and is never a compression target (issue 29)."""
    import transformers

    source = save_tiny_hf(tmp_path / "src", kind, tie_word_embeddings=tied)
    pruned, out = tmp_path / "pruned", tmp_path / "ct"
    assert cli("prune", source, "-p", "2:4", "-o", pruned, "-q").exit_code == 0
    r = cli("export", pruned, "--format", "compressed-tensors", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    packed = json.loads(r.stdout)["nm_layers"]
    raw = load_file(str(out / "model.safetensors"))
    assert all(name.removesuffix(".weight") + ".compressed" in raw and name not in raw for name in packed)
    assert bool(packed) == (kind != "gpt2")  # GPT-2's blocks are Conv1D: compressed-tensors packs Linear only
    auto = transformers.AutoModel if kind == "bert" else transformers.AutoModelForCausalLM
    loaded = auto.from_pretrained(out, dtype=torch.float32).eval()
    reference = auto.from_pretrained(pruned, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded(ids), reference(ids)
    first = "last_hidden_state" if kind == "bert" else "logits"
    assert torch.equal(got[first], want[first])
    if kind != "bert":
        head, embeddings = loaded.get_output_embeddings().weight, loaded.get_input_embeddings().weight
        assert (head.data_ptr() == embeddings.data_ptr()) == tied


def _onnx_vs_torch(onnx_path, checkpoint, batch):
    resolved = resolve(str(checkpoint))
    model = build_model(resolved.model, device="cpu").eval()
    model.load_state_dict({n: resolved.checkpoint.read(n) for n in resolved.checkpoint.infos})
    from nmcli.report.flops import example_inputs

    inputs = example_inputs(model, resolved.model, 16, device="cpu", batch=batch)
    with torch.no_grad():
        expected = model(**inputs)
    expected = (expected.logits if hasattr(expected, "logits") else expected).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    return got, expected


@pytest.mark.parametrize("model,pattern", [("vit_tiny_patch16_224", "2:4"), ("resnet18", "1:8")])
def test_onnx_runs_in_onnxruntime_and_reports_compliant(cli, tmp_path, model, pattern):
    pruned = tmp_path / "p.safetensors"
    cli("prune", model, "-p", pattern, "-o", pruned, "-q")
    out = tmp_path / "m.onnx"
    r = cli("export", pruned, "--format", "onnx", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(str(out))
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["nmsparse.pattern"] == pattern and "keep-N" in meta["nmsparse.convention"]
    tagged = {i.name: {p.key: p.value for p in i.metadata_props} for i in proto.graph.initializer if len(i.metadata_props)}
    assert len(tagged) == len(json.loads(meta["nmsparse.layers"])) > 0
    assert all(v["nmsparse.pattern"] == pattern for v in tagged.values())
    got, expected = _onnx_vs_torch(out, pruned, batch=3)  # dynamic batch axis
    assert np.allclose(got, expected, atol=1e-4, rtol=1e-4)
    rep = cli("report", out, "--check", pattern, "--json")
    assert rep.exit_code == 0, rep.output
    assert json.loads(rep.stdout)["check"]["passed"] is True


def test_onnx_k_axis_comes_from_the_graph(cli, tmp_path):
    from onnx import helper, numpy_helper

    w = apply_nm(torch.randn(8, 16), NMPattern(2, 4), LINEAR)  # [out, in], 2:4 along in
    inits = [numpy_helper.from_array(w.numpy(), "gemm_w"), numpy_helper.from_array(w.T.contiguous().numpy(), "matmul_w")]
    nodes = [helper.make_node("Gemm", ["x", "gemm_w"], ["y1"], transB=1), helper.make_node("MatMul", ["x", "matmul_w"], ["y2"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 8]) for n in ("y1", "y2")], inits,
    )
    path = tmp_path / "hand.onnx"
    onnx.save(helper.make_model(graph), str(path))
    rows = {row["name"]: row for row in json.loads(cli("report", path, "--check", "2:4", "--json").stdout)["layers"]}
    assert rows["gemm_w"]["k_axis"] == 1 and rows["matmul_w"]["k_axis"] == 0
    assert rows["gemm_w"]["compliance"] == 1.0 and rows["matmul_w"]["compliance"] == 1.0


def test_onnx_external_data(cli, tmp_path):
    pruned = tmp_path / "p.safetensors"
    cli("prune", "resnet18", "-p", "2:4", "-o", pruned, "-q")
    out = tmp_path / "m.onnx"
    assert cli("export", pruned, "--format", "onnx", "--external-data", "--out", out, "-q").exit_code == 0
    import onnx

    locations = {e.value for i in onnx.load(str(out), load_external_data=False).graph.initializer
                 for e in i.external_data if e.key == "location"}
    assert len(locations) == 1 and (tmp_path / locations.pop()).stat().st_size > out.stat().st_size
    got, expected = _onnx_vs_torch(out, pruned, batch=1)
    assert np.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_hf_bert_onnx(cli, tmp_path, hf_bert_folder):
    pruned = tmp_path / "bert"
    cli("prune", hf_bert_folder, "-p", "2:4", "-o", pruned, "-q")
    out = tmp_path / "bert.onnx"
    r = cli("export", pruned, "--format", "onnx", "--out", out)
    assert r.exit_code == 0, r.output
    got, expected = _onnx_vs_torch(out, pruned, batch=2)
    assert np.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert cli("report", out, "--check", "2:4", "-q").exit_code == 0


def test_export_refuses_to_overwrite(cli, tmp_path):
    path, _ = _sparse_file(tmp_path, "2:4")
    out = tmp_path / "o.safetensors"
    out.write_text("keep")
    r = cli("export", path, "--pattern", "2:4", "--out", out)
    assert r.exit_code == 2 and "--force" in r.stderr and out.read_text() == "keep"


def test_prune_on_the_way_prunes_every_target_like_prune_does(cli, tmp_path, resnet_file):
    """--prune goes through prune's own per-tensor step: convs kept dense by compressed-tensors are pruned too."""
    out = tmp_path / "ct"
    r = cli("export", resnet_file, "--model", "resnet18", "--format", "compressed-tensors", "--pattern", "2:4",
            "--prune", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    pruned = tmp_path / "p.safetensors"
    cli("prune", resnet_file, "--model", "resnet18", "-p", "2:4", "-o", pruned, "-q")
    expected, restored = load_file(str(pruned)), _ct_decompress(out)
    assert torch.equal(restored["layer1.0.conv1.weight"], expected["layer1.0.conv1.weight"])
    assert all(torch.equal(restored[k], v) for k, v in expected.items())


def test_an_nm_file_prunes_like_its_dense_tensors(cli, tmp_path):
    """Pruning an `nm` file further (2:4 -> 1:8) reads its compressed tensors as their dense selves: the result
    must match pruning the dense file, and the brute-force mask."""
    path, tensors = _sparse_file(tmp_path, "2:4")
    packed = tmp_path / "nm.safetensors"
    assert cli("export", path, "--format", "nm", "--pattern", "2:4", "--out", packed, "-q").exit_code == 0
    from_packed, from_dense = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for source, out in ((packed, from_packed), (path, from_dense)):
        r = cli("prune", source, "--pattern", "1:8", "--out", out, "-q")
        assert r.exit_code == 0, r.output
    a, b = load_file(str(from_packed)), load_file(str(from_dense))
    assert a.keys() == b.keys() == tensors.keys()
    for name, tensor in tensors.items():
        expected = tensor * brute_force_mask(tensor, 1, 8, 1) if name.endswith("weight") else tensor
        assert torch.equal(a[name], expected) and torch.equal(b[name], expected), name
