"""Real Hugging Face folders go through resolve / prune / report as they are (issue: real pretrained models)."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nmcli.models.resolve import load_model, resolve
from nmcli.report.flops import per_layer_flops
from tests.conftest import minilm_folder, save_tiny_hf


def _group_max_nonzeros(weight: torch.Tensor, m: int) -> int:
    """Linear weights [out, in]: groups of m along `in` (an independent count, not nmsparse's)."""
    return int((weight != 0).reshape(weight.shape[0], -1, m).sum(-1).max())


def test_real_minilm_prunes_as_is_and_transformers_loads_the_result(cli, tmp_path):
    source = minilm_folder()
    out = tmp_path / "minilm-24"
    r = cli("prune", source, "--pattern", "2:4", "--out", out)
    assert r.exit_code == 0, r.output
    assert "embeddings.position_ids" in r.output  # listed, not refused
    original, pruned = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert torch.equal(pruned["embeddings.position_ids"], original["embeddings.position_ids"])
    ffn = "encoder.layer.3.intermediate.dense.weight"
    assert _group_max_nonzeros(pruned[ffn], 4) == 2 and not torch.equal(pruned[ffn], original[ffn])
    assert torch.equal(pruned["embeddings.word_embeddings.weight"], original["embeddings.word_embeddings.weight"])
    assert (out / "1_Pooling" / "config.json").read_text() == (source / "1_Pooling" / "config.json").read_text()
    model = transformers.AutoModel.from_pretrained(out)
    assert torch.equal(model.state_dict()[ffn], pruned[ffn])


def test_tied_lm_head_stays_one_tensor(cli, tmp_path):
    folder = save_tiny_hf(tmp_path / "llama", "llama")
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    resolved = resolve(str(folder))
    model = load_model(resolved)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in resolved.layers and resolved.match.missing == ()
    out = tmp_path / "out"
    assert cli("prune", folder, "--pattern", "2:4", "--out", out, "--quiet").exit_code == 0
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_task_checkpoint_read_as_base_model_matches_from_pretrained(tmp_path):
    """A folder saved from BertForMaskedLM (`bert.` names, a `cls.` head) whose config names BertModel."""
    folder = tmp_path / "mlm"
    torch.manual_seed(1)
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertModel"]}))
    resolved = resolve(str(folder))
    assert "bert.encoder.layer.0.attention.self.query.weight" in resolved.layers
    assert all(not name.startswith("cls.") for name in resolved.layers)
    assert any(name.startswith("cls.") for name in resolved.match.carried)
    ours = load_model(resolved).state_dict()
    theirs = transformers.BertModel.from_pretrained(folder).state_dict()
    for key in ("encoder.layer.1.output.dense.weight", "embeddings.word_embeddings.weight"):
        assert torch.equal(ours[key], theirs[key])


def test_base_checkpoint_read_as_task_model(tmp_path):
    folder = save_tiny_hf(tmp_path / "bert", "bert")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForSequenceClassification"]}))
    resolved = resolve(str(folder))
    assert resolved.match.to_model["encoder.layer.0.output.dense.weight"] == "bert.encoder.layer.0.output.dense.weight"
    assert set(resolved.match.missing) == {"classifier.weight", "classifier.bias"}
    model = load_model(resolved)
    saved = load_file(str(folder / "model.safetensors"))
    assert torch.equal(model.bert.encoder.layer[0].output.dense.weight, saved["encoder.layer.0.output.dense.weight"])


def test_checkpoint_that_does_not_fit_its_config_names_the_tensor(cli, tmp_path):
    folder = save_tiny_hf(tmp_path / "bert", "bert")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    r = cli("report", folder)
    assert r.exit_code == 2 and "tensor encoder.layer.0.intermediate.dense.bias has shape [64] but the model expects [96]" in r.output
    other = save_tiny_hf(tmp_path / "gpt2", "gpt2")
    save_file(load_file(str(other / "model.safetensors")), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    r = cli("report", folder)
    assert r.exit_code == 2 and "does not fit BertModel" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_flops_of_transformers_match_a_hand_count(tmp_path, kind):
    resolved = resolve(str(save_tiny_hf(tmp_path / kind, kind)))
    seq = 16
    shape, total, per_module = per_layer_flops(resolved.model, seq)
    assert shape == (1, seq)
    module = {"llama": "model.layers.1.mlp.gate_proj", "gpt2": "transformer.h.1.mlp.c_fc",
              "bert": "encoder.layer.1.intermediate.dense"}[kind]
    assert per_module[module] == 2 * seq * 32 * 64  # 2 x tokens x in x out
    linear = sum(per_module[layer.module] for layer in resolved.layers.values() if layer.module in per_module)
    assert linear > 0 and total >= linear


def test_report_of_real_minilm_counts_flops_and_lists_carried_tensors(cli):
    r = cli("report", minilm_folder(), "--json", "--seq-len", "64")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    # BERT encoder, per token: 6 layers x (4 x 384^2 attention projections + 2 x 384 x 1536 FFN) MACs, + pooler
    linear_macs = 64 * 6 * (4 * 384 * 384 + 2 * 384 * 1536) + 384 * 384
    attention_macs = 6 * 2 * 64 * 64 * 384  # QK^T and AV
    assert data["flops"]["dense"] == 2 * (linear_macs + attention_macs)
    assert any("embeddings.position_ids" in note for note in data["notes"])


def test_report_says_why_flops_are_missing_and_still_reports(cli, tmp_path, monkeypatch):
    import nmcli.report.flops as flops

    folder = save_tiny_hf(tmp_path / "bert", "bert")

    class Untraceable(torch.nn.Module):
        config = transformers.BertConfig(max_position_embeddings=64)

        def forward(self, **inputs):
            raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(flops, "build_model", lambda ref, device: Untraceable())
    r = cli("report", folder, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["flops"] is None and data["summary"]["target_layers"] == 13
    assert any("FLOPs not counted" in n and "data-dependent control flow" in n for n in data["notes"])


@pytest.mark.parametrize("kind, pattern", [("gpt2", "1:8"), ("llama", "1:8"), ("bert", "2:4")])
def test_streaming_prune_equals_the_mask_of_each_whole_tensor(cli, tmp_path, kind, pattern):
    """prune masks the first rows of a tensor on the reading thread and the rest on the writing thread; the result
    must be the whole tensor's mask, also for GPT-2's Conv1D, whose axis 0 is K (24 rows, 1:8: the split must not
    fall inside a group)."""
    from nmcli.nm import apply_nm_, parse_pattern
    from nmcli.oneshot.plan import plan_prune

    folder = save_tiny_hf(tmp_path / kind, kind, n_embd=24, n_head=4) if kind == "gpt2" else save_tiny_hf(tmp_path / kind, kind)
    out = tmp_path / "pruned"
    assert cli("prune", folder, "--pattern", pattern, "--out", out, "--quiet").exit_code == 0
    resolved = resolve(str(folder))
    plan = plan_prune(resolved, parse_pattern(pattern))
    ours = load_file(str(out / "model.safetensors"))
    assert plan.targets
    for name, layer in plan.targets.items():
        expected = resolved.checkpoint.read(name).clone()
        apply_nm_(expected, plan.pattern, layer.layout)
        assert torch.equal(ours[name], expected), name
