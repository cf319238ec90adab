"""`nmsparse finetune` on Hugging Face models: distillation from the dense teacher, every recipe, outputs that
transformers loads, resume, and the masks really applied while distilling."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.nn.utils import parametrize

import nmcli.train.engine
from nmcli.methods.sparsifier import Sparsifier
from nmcli.methods.recipes import builtin_names
from tests.conftest import save_tiny_hf
from tests.reference import brute_force_mask

COMMON = ("--pattern", "2:4", "--batch-size", "4", "--seq-len", "32", "--limit", "16", "--lr", "3e-3", "--data", "python-help")


def _max_nonzeros(weight, m=4):
    return int((weight != 0).reshape(weight.shape[0], -1, m).sum(-1).max())


def test_causal_lm_distillation_recovers_perplexity_and_writes_a_loadable_tied_folder(cli, tmp_path, tiny_llama):
    out = tmp_path / "out"
    r = cli("finetune", "--model", tiny_llama, "--recipe", "fixed-mask", "--epochs", "3", *COMMON, "--json")
    assert r.exit_code == 2 and "--out is required" in r.output
    r = cli("finetune", "--model", tiny_llama, "--recipe", "fixed-mask", "--epochs", "3", *COMMON, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["kind"] == "causal LM" and summary["all_layers_compliant"]
    assert {"start_perplexity", "one_shot_perplexity", "final_perplexity"} <= summary.keys()
    assert summary["one_shot_perplexity"] != summary["start_perplexity"]  # a dense start: measured again at 2:4
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    saved = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in saved and _max_nonzeros(saved["model.layers.0.mlp.down_proj.weight"]) == 2
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    kl = [s["terms"]["kl"] for s in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "terms" in s]
    assert len(kl) == 12 and sum(kl[-3:]) < 0.8 * sum(kl[:3])  # the student moves toward the teacher (1.9 -> 1.3)


def test_every_recipe_distills_an_encoder_to_exact_nm(cli, tmp_path, tiny_bert):
    for recipe in builtin_names():
        out = tmp_path / recipe
        r = cli("finetune", "--model", tiny_bert, "--recipe", recipe, "--epochs", "2", *COMMON, "--out", out, "--json")
        assert r.exit_code == 0, (recipe, r.output)
        summary = json.loads(r.stdout)
        weight = load_file(str(out / "model.safetensors"))["encoder.layer.1.intermediate.dense.weight"]
        if recipe == "dense":
            assert summary["all_layers_compliant"] is None and _max_nonzeros(weight) == 4
        else:
            assert summary["all_layers_compliant"] and _max_nonzeros(weight) == 2, recipe
        assert {"final_cosine", "final_sentence_cosine", "final_spearman"} <= summary.keys()


def test_hf_resume_is_bit_identical(cli, tmp_path, tiny_bert):
    args = ("finetune", "--model", tiny_bert, "--recipe", "sr-ste", "--epochs", "2", *COMMON)
    assert cli(*args, "--out", tmp_path / "full", "--quiet").exit_code == 0
    stopped = cli(*args, "--out", tmp_path / "cut", "--stop-after", "1")
    resumed = cli(*args, "--resume", tmp_path / "cut")
    assert stopped.exit_code == 0 and resumed.exit_code == 0

    def squeezed(text):  # rich wraps long lines on the runner's narrow terminal
        return "".join(text.split())

    assert squeezed(f"stopped after epoch 1; continue with --resume {tmp_path / 'cut'}") in squeezed(stopped.stdout)
    assert squeezed("| compliant: True |") in squeezed(resumed.stdout)
    assert squeezed(f"-> {tmp_path / 'cut'}") in squeezed(resumed.stdout) and "sr-ste 2:4:" in resumed.stdout
    full, cut = load_file(str(tmp_path / "full/model.safetensors")), load_file(str(tmp_path / "cut/model.safetensors"))
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)


def test_distillation_steps_use_the_exact_mask_of_the_current_weights(cli, tmp_path, tiny_llama, monkeypatch):
    """The recipe is applied while distilling: at every step each target layer's weight is the exact 2:4 of its
    master weight (STE), checked against a brute-force mask."""
    seen = []
    real = nmcli.train.engine.train_step

    def spy(model, batch, optimizer, **kwargs):
        for module in model.modules():
            if parametrize.is_parametrized(module, "weight"):
                original = module.parametrizations.weight.original.detach()
                seen.append(torch.equal(module.weight.detach(), original * brute_force_mask(original, 2, 4, 1)))
        return real(model, batch, optimizer, **kwargs)

    monkeypatch.setattr(nmcli.train.engine, "train_step", spy)
    r = cli("finetune", "--model", tiny_llama, "--recipe", "ste", "--epochs", "1", *COMMON, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    assert len(seen) == 4 * 14 and all(seen)  # 4 steps x 14 target layers


def test_start_from_a_pruned_checkpoint_and_bad_hf_options(cli, tmp_path, tiny_llama, tiny_bert, monkeypatch):
    pruned = tmp_path / "pruned"
    assert cli("prune", tiny_llama, "--pattern", "2:4", "--out", pruned, "--quiet").exit_code == 0
    starts, evaluations = {}, []
    measured = nmcli.train.engine._Run.evaluate
    monkeypatch.setattr(nmcli.train.engine._Run, "evaluate", lambda run: evaluations.append(1) or measured(run))
    for start in ("magnitude", "sparsegpt", str(pruned)):  # each 2:4 already: its one-shot quality is its start's
        def finetune(out):  # noqa: ANN202
            evaluations.clear()
            r = cli("finetune", "--model", tiny_llama, "--start", start, "--recipe", "fixed-mask", "--epochs", "1",
                    *COMMON, "--out", out, "--json")
            assert r.exit_code == 0, r.output
            return json.loads(r.stdout), len(evaluations)

        summary, count = finetune(tmp_path / f"{len(starts)}")
        assert summary["one_shot_perplexity"] == summary["start_perplexity"] and count == 2, start  # start, final
        starts[start] = summary["start_perplexity"]
        with monkeypatch.context() as forced:  # measured after all: the start's masks at 2:4 change nothing
            forced.setattr(Sparsifier, "masks_keep_every_weight", lambda sparsifier: False)
            again, count = finetune(tmp_path / f"{len(starts)}-measured")
        assert again["one_shot_perplexity"] == pytest.approx(starts[start]) and count == 3, start
    assert starts["sparsegpt"] != starts["magnitude"]  # SparseGPT's updated weights, not the magnitude mask
    assert starts[str(pruned)] == pytest.approx(starts["magnitude"])  # prune's magnitude 2:4, the same weights
    r = cli("finetune", "--model", tiny_llama, "--start", tiny_bert, "--epochs", "1", *COMMON, "--out", tmp_path / "p")
    assert r.exit_code == 2 and "a checkpoint of LlamaForCausalLM is needed" in r.output
    other = save_tiny_hf(tmp_path / "other", "llama")  # the same class, a smaller vocabulary
    r = cli("finetune", "--model", tiny_llama, "--start", other, "--epochs", "1", *COMMON, "--out", tmp_path / "p2")
    assert r.exit_code == 2 and "model.embed_tokens.weight is of shape [128, 32], the model's is [30522, 32]" in r.output
    r = cli("finetune", "--model", tiny_llama, "--num-classes", "3", *COMMON, "--out", tmp_path / "q")
    assert r.exit_code == 2 and "--num-classes goes with timm models" in r.output
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = cli("finetune", "--model", tiny_llama, *COMMON, "--data", empty, "--out", tmp_path / "r")
    assert r.exit_code == 2 and "empty.txt: 0 non-empty document(s)" in r.output
    assert not (tmp_path / "r").exists()
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\nmethod: ste\ndistill:\n  kl: yes\n")
    r = cli("finetune", "--model", tiny_llama, "--recipe", recipe, *COMMON, "--out", tmp_path / "s")
    assert r.exit_code == 2 and "bad.yaml: distill.kl: expected a number, got True" in r.output


def test_teacher_written_data_is_seeded_cached_and_only_for_causal_lms(cli, tmp_path, tiny_llama, tiny_bert):
    from safetensors.torch import load_file as read

    args = ("finetune", "--model", tiny_llama, "--data", "teacher:6", "--recipe", "fixed-mask", "--epochs", "1",
            "--pattern", "2:4", "--batch-size", "3", "--seq-len", "16", "--lr", "1e-3", "--json")
    first = cli(*args, "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    assert "teacher-written: 6 sequences of 16 tokens (generated in" in json.loads(first.stdout)["data"]
    ids = read(str(tmp_path / "a" / "teacher-data.safetensors"))["ids"]
    assert ids.shape == (6, 16)
    again = cli(*args, "--out", tmp_path / "a", "--force")
    assert "(read from the cache" in json.loads(again.stdout)["data"]
    assert cli(*args, "--out", tmp_path / "b", "--seed", "1").exit_code == 0
    other_seed = read(str(tmp_path / "b" / "teacher-data.safetensors"))["ids"]
    assert other_seed.shape == ids.shape and not torch.equal(other_seed, ids)
    assert cli(*args, "--out", tmp_path / "c").exit_code == 0
    assert torch.equal(read(str(tmp_path / "c" / "teacher-data.safetensors"))["ids"], ids)  # same seed, same text
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\nthe end\n")
    assert cli(*args, "--out", tmp_path / "d", "--prompts", prompts).exit_code == 0
    from nmcli.data.tokens import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama)
    starts = {tuple(row[:2].tolist()) for row in read(str(tmp_path / "d" / "teacher-data.safetensors"))["ids"]}
    assert starts == {tuple(tokenizer("hello world", add_special_tokens=False)["input_ids"]),
                      tuple(tokenizer("the end", add_special_tokens=False)["input_ids"])}
    r = cli("finetune", "--model", tiny_bert, "--data", "teacher:4", "--seq-len", "16", "--out", tmp_path / "e")
    assert r.exit_code == 2 and "only a causal LM can write its own training text" in r.output
    r = cli("finetune", "--model", tiny_llama, "--data", "teacher:x", "--out", tmp_path / "f")
    assert r.exit_code == 2 and "teacher:N with N a whole number" in r.output


def test_eval_command(cli, tmp_path, tiny_llama, tiny_bert):
    r = cli("eval", tiny_llama, "--seq-len", "32", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["kind"] == "causal LM" and data["metrics"]["perplexity"] > 1 and data["teacher"] is None
    r = cli("eval", tiny_bert, "--seq-len", "32")
    assert r.exit_code == 2 and "pass --teacher DENSE" in r.output
    r = cli("eval", tiny_bert, "--teacher", tiny_bert, "--seq-len", "32", "--json")
    metrics = json.loads(r.stdout)["metrics"]
    assert metrics["cosine"] == pytest.approx(1.0) and metrics["sentence_spearman"] == pytest.approx(1.0)
    pruned = tmp_path / "p"
    assert cli("prune", tiny_bert, "--pattern", "1:4", "--out", pruned, "--quiet").exit_code == 0
    metrics = json.loads(cli("eval", pruned, "--teacher", tiny_bert, "--seq-len", "32", "--json").stdout)["metrics"]
    assert metrics["cosine"] < 1 - 1e-6  # a tiny random BERT barely notices (MiniLM: test_text_eval)
    r = cli("eval", pruned, "--teacher", tiny_llama)
    assert r.exit_code == 2 and "not the same architecture" in r.output


def test_hf_bad_input_is_one_line_and_writes_nothing(cli, tmp_path, tiny_llama):
    bare = save_tiny_hf(tmp_path / "bare", "llama")  # no tokenizer files
    r = cli("finetune", "--model", bare, "--seq-len", "16", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "no tokenizer files" in r.output and "Traceback" not in r.output
    short = tmp_path / "short.txt"
    short.write_text("just a few words.\n\nand a few more.")
    r = cli("finetune", "--model", tiny_llama, "--data", short, "--seq-len", "64", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "shorter than one chunk of --seq-len 64" in r.output
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02")
    r = cli("finetune", "--model", tiny_llama, "--data", binary, "--seq-len", "16", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "binary data" in r.output
    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({"model_type": "not-a-real-architecture", "architectures": ["Nope"]}))
    (alien / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes())
    for command in (("report", alien), ("prune", alien, "--out", tmp_path / "d"), ("eval", alien)):
        r = cli(*command)
        assert r.exit_code == 2 and "cannot build a config" in r.output and "Traceback" not in r.output, command
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_two_process_ddp_distillation_on_cpu(tmp_path, tiny_bert):
    """torchrun, 2 processes, gloo, an HF encoder (its pooler gets no gradient from the distillation loss)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nmcli",
           "finetune", "--model", str(tiny_bert), "--recipe", "sr-ste", "--epochs", "2", *COMMON, "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["all_layers_compliant"] is True
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"event": "epoch"' in line]
    assert [e["masks_identical_across_ranks"] for e in events] == [True, True]
    assert transformers.AutoModel.from_pretrained(out) is not None


def test_mixed_length_prompts_in_one_batch_continue_as_each_would_alone(tiny_llama, caplog):
    """Left padding must not change what the teacher writes: greedy decoding through the batched path equals a
    hand-written loop over each prompt alone (argmax of the last position, end-of-text masked as min_new_tokens
    does), and every row holds its prompt, then exactly seq_len - len(prompt) new tokens. The model's own sampling
    settings (as Llama-3's generation_config has them) change nothing and draw no warning."""
    import logging

    from nmcli.data.teacher import continue_prompts

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9, top_k=3)
    eos = model.generation_config.eos_token_id
    prompts = [[5], [7, 8, 9], [11, 12, 13, 14, 15]]
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process
    transformers.utils.logging.enable_propagation()
    try:
        with torch.no_grad(), caplog.at_level(logging.WARNING):
            rows = continue_prompts(model, prompts, 12, pad_id=0)  # no sampler: greedy
    finally:
        transformers.utils.logging.disable_propagation()
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("transformers")]
    with torch.no_grad():
        assert rows.shape == (3, 12)
        for prompt, row in zip(prompts, rows):
            ids = torch.tensor([prompt])
            while ids.shape[1] < 12:
                logits = model(input_ids=ids).logits[0, -1]
                if eos is not None:
                    logits[eos] = -float("inf")
                ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
            assert row.tolist() == ids[0].tolist()


def test_the_student_learns_without_dropout_unless_the_recipe_keeps_it(cli, tmp_path, tiny_bert, monkeypatch):
    """tiny_bert has BERT's dropout of 0.1: at every training step, the student run twice on the step's batch gives
    the same hidden states by default, and different ones with `distill: {dropout: true}`."""
    repeatable = []
    real = nmcli.train.engine.train_step

    def spy(model, batch, optimizer, **kwargs):
        with torch.no_grad():
            first, second = (model(**batch, output_hidden_states=True).hidden_states[-1] for _ in range(2))
        repeatable.append(torch.equal(first, second))
        return real(model, batch, optimizer, **kwargs)

    monkeypatch.setattr(nmcli.train.engine, "train_step", spy)
    args = ("finetune", "--model", tiny_bert, "--epochs", "1", *COMMON, "--quiet")
    assert cli(*args, "--out", tmp_path / "a").exit_code == 0
    assert len(repeatable) == 4 and all(repeatable)
    recipe = tmp_path / "keep.yaml"
    recipe.write_text("name: keep\nmethod: fixed-mask\ndistill: {dropout: true}\n")
    repeatable.clear()
    assert cli(*args, "--recipe", recipe, "--out", tmp_path / "b").exit_code == 0
    assert len(repeatable) == 4 and not any(repeatable)
    recipe.write_text("name: keep\nmethod: fixed-mask\ndistill: {dropout: 0.1}\n")
    r = cli(*args, "--recipe", recipe, "--out", tmp_path / "c")
    assert r.exit_code == 2 and "keep.yaml: distill.dropout: expected true or false, got 0.1" in r.output
