"""Quality measured where users use the model (issue 26): every evaluation scores the training text's own held-out
part and the built-in general-domain `news` set (plus any --eval-data), embedders add nearest-neighbour agreement,
causal LMs their perplexity ratio to dense, and every line names the domain of its figures."""

import json

import pytest
import torch

from nmcli.data.text import NEWS, PYTHON_HELP, load_eval_texts, load_texts
from nmcli.errors import NMSparseError
from nmcli.quality.agreement import neighbour_agreement


def _brute_force_neighbours(student_sim, teacher_sim, k):
    """A second implementation: sort each row in plain Python, the item itself left out."""
    n = len(student_sim)
    top1, recall = 0, 0.0
    for i in range(n):
        def order(sim):
            return sorted((j for j in range(n) if j != i), key=lambda j: (-float(sim[i, j]), j))
        s, t = order(student_sim), order(teacher_sim)
        top1 += s[0] == t[0]
        recall += len(set(s[:k]) & set(t[:k])) / k
    return top1 / n, recall / n


def test_neighbour_agreement_by_hand_and_against_a_second_implementation():
    teacher = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    student = torch.tensor([[1.0, 0.3, 0.4], [0.3, 1.0, 0.2], [0.4, 0.2, 1.0]])
    # teacher's nearest: 0->1, 1->0, 2->1; student's: 0->2, 1->0, 2->0: one of three agrees
    got = neighbour_agreement(student, teacher, k=1)
    assert got == {"top1_agreement": pytest.approx(1 / 3), "recall_at_1": pytest.approx(1 / 3)}
    g = torch.Generator().manual_seed(0)
    for n, k in ((12, 10), (40, 10), (25, 3)):
        a, b = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
        s_sim, t_sim = a @ a.T, (a + 0.7 * b) @ (a + 0.7 * b).T
        top1, recall = _brute_force_neighbours(s_sim, t_sim, k)
        assert neighbour_agreement(s_sim, t_sim, k) == {"top1_agreement": pytest.approx(top1), f"recall_at_{k}": pytest.approx(recall)}
    same = torch.randn(20, 4, generator=g)
    assert neighbour_agreement(same @ same.T, same @ same.T) == {"top1_agreement": 1.0, "recall_at_10": 1.0}
    assert neighbour_agreement(torch.eye(10), torch.eye(10)) == {}  # no 10 neighbours among 10 items


def test_the_built_in_news_set_is_real_general_text_disjoint_from_the_training_text():
    news = load_eval_texts(NEWS)
    assert len(news.heldout) == 350 and news.train == []
    assert any("£" in d for d in news.heldout)  # lee.cor's Latin-1 pound sign read as such
    help_text = load_texts(PYTHON_HELP)
    assert not set(news.heldout) & set(help_text.train + help_text.heldout)
    assert all(len(d.split()) > 20 for d in news.heldout)  # paragraphs of news, not fragments


def _eval(cli, *args):
    r = cli("eval", *map(str, args), "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_eval_scores_every_domain_and_names_each(cli, tmp_path, tiny_llama, tiny_bert):
    extra = tmp_path / "recipes-en.txt"
    extra.write_text("\n\n".join(f"Step {i}: stir the sauce slowly and add a pinch of salt to the pot." * 8 for i in range(12)))
    llama = _eval(cli, tiny_llama, "--teacher", tiny_llama, "--eval-data", extra)
    metrics = llama["metrics"]
    assert set(metrics) == {"perplexity", "perplexity_ratio", "news/perplexity", "news/perplexity_ratio",
                            "recipes-en/perplexity", "recipes-en/perplexity_ratio"}
    assert len({metrics["perplexity"], metrics["news/perplexity"], metrics["recipes-en/perplexity"]}) == 3
    assert all(metrics[k] == 1.0 for k in metrics if k.endswith("ratio"))  # the dense model against itself
    assert "python-help: " in llama["data"] and "news: " in llama["data"] and "recipes-en: " in llama["data"]
    bert = _eval(cli, tiny_bert, "--teacher", tiny_bert)["metrics"]  # --seq-len: 128 capped at its 64 positions
    for prefix in ("", "news/"):
        assert bert[f"{prefix}cosine"] == pytest.approx(1.0) and bert[f"{prefix}top1_agreement"] == 1.0
        assert bert[f"{prefix}recall_at_10"] == 1.0 and bert[f"{prefix}sentence_recall_at_10"] == 1.0
    text = cli("eval", tiny_llama).stdout
    assert "news/perplexity " in text and "\nperplexity " in text


def test_a_pruned_models_ratio_is_its_perplexity_over_the_dense_ones(cli, tmp_path, tiny_llama):
    pruned = tmp_path / "p"
    assert cli("prune", tiny_llama, "-p", "1:4", "-o", pruned, "-q").exit_code == 0
    dense = _eval(cli, tiny_llama)["metrics"]
    sparse = _eval(cli, pruned, "--teacher", tiny_llama)["metrics"]
    for prefix in ("", "news/"):
        assert sparse[f"{prefix}perplexity_ratio"] == pytest.approx(sparse[f"{prefix}perplexity"] / dense[f"{prefix}perplexity"])
        assert sparse[f"{prefix}perplexity_ratio"] > 1


def test_finetune_reports_every_domain_at_start_one_shot_and_end(cli, tmp_path, tiny_llama):
    out = tmp_path / "run"
    r = cli("finetune", "--model", tiny_llama, "--recipe", "fixed-mask", "--pattern", "2:4", "--epochs", "1",
            "--limit", "8", "--batch-size", "4", "--seq-len", "32", "--start", "magnitude", "--out", out)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out"] == "python-help"
    for stage in ("start", "one_shot", "final"):
        assert summary[f"{stage}_perplexity"] > 0 and summary[f"{stage}_news/perplexity"] > 0
    assert summary["final_news/perplexity"] != summary["final_perplexity"]
    final_line = r.stdout.strip().splitlines()[-1]
    assert final_line.index("python-help (held out): perplexity ") < final_line.index("| news: perplexity ")
    assert "| news: perplexity " in r.stderr  # the start, one-shot and step lines too


@pytest.mark.parametrize("content,message", [
    (b"", "no text in it"),
    (b"\x00\x01binary", "binary data"),
    (b"\xff\xfe bad", "not UTF-8"),
    (b"too short.", "shorter than one chunk"),
])
def test_bad_eval_data_is_one_line_and_nothing_is_written(cli, tmp_path, tiny_llama, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    r = cli("eval", tiny_llama, "--eval-data", bad)
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    out = tmp_path / "run"
    r = cli("finetune", "--model", tiny_llama, "--recipe", "fixed-mask", "--epochs", "1", "--limit", "4",
            "--seq-len", "32", "--eval-data", bad, "--out", out)
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_eval_data_that_is_missing_or_goes_with_an_image_model_is_refused(cli, tmp_path, tiny_llama, tiny_bert):
    r = cli("eval", tiny_bert, "--teacher", tiny_bert, "--seq-len", 128)  # beyond its 64 positions: said, not crashed
    assert r.exit_code == 2 and "--seq-len 128: BertModel takes at most 64 tokens per sample" in r.stderr
    r = cli("eval", tiny_llama, "--eval-data", tmp_path / "missing.txt")
    assert r.exit_code == 2 and "missing.txt: no such file or folder" in r.stderr
    r = cli("finetune", "--model", "vit_tiny_patch16_224", "--eval-data", tmp_path / "x.txt", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--eval-data goes with Hugging Face models" in r.stderr


def test_load_eval_texts_refuses_an_all_blank_folder(tmp_path):
    (tmp_path / "a.txt").write_text("   \n\n  ")
    with pytest.raises(NMSparseError, match="no text in it"):
        load_eval_texts(str(tmp_path))


def _parts(*sizes):
    """Token samples whose first id says which part they come from."""
    from nmcli.data.tokens import TokenSamples

    return [TokenSamples([torch.tensor([part, i]) for i in range(size)]) for part, size in enumerate(sizes)]


def test_a_mixture_draws_each_source_in_proportion_seeded_and_without_repeats():
    from nmcli.data.mixture import Share, mix, parse_mixture

    shares = parse_mixture("a:0.3, b:0.7")
    assert shares == [Share("a", 0.3), Share("b", 0.7)]
    mixed, counts = mix(_parts(300, 1000), shares, seed=0)
    # a runs out first at its share: 300 / 0.3 = 1000 in all (b alone would allow 1000 / 0.7 = 1429): 300 + 700
    assert counts == [300, 700]
    sources = [int(sample[0]) for sample in mixed.ids]
    assert sources.count(0) == 300 and sources.count(1) == 700  # fails when a mixture ignores its proportions
    assert len({tuple(s.tolist()) for s in mixed.ids}) == len(mixed.ids)  # no sample twice
    again, _ = mix(_parts(300, 1000), shares, seed=0)
    other, _ = mix(_parts(300, 1000), shares, seed=1)
    assert [s.tolist() for s in again.ids] == [s.tolist() for s in mixed.ids]
    assert {tuple(s.tolist()) for s in other.ids} != {tuple(s.tolist()) for s in mixed.ids}
    assert mix(_parts(300, 1000), [Share("a", 1), Share("b", 0)], seed=0)[1] == [300, 0]
    assert mix(_parts(300, 1000), [Share("a", 2), Share("b", 2)], seed=0)[1] == [300, 300]
    assert parse_mixture("python-help") is None and parse_mixture("teacher:512") is None


@pytest.mark.parametrize("spec,message", [
    ("python-help:0.3,wiki:-0.7", "proportions are numbers >= 0"),
    ("python-help:0,wiki:0", "the proportions add up to 0"),
    ("python-help:a lot,wiki:1", "the proportion 'a lot' of python-help is not a number"),
    ("python-help,wiki:1", "'python-help' has no proportion"),
    ("wiki:1,wiki:2", "wiki is listed twice"),
    ("wiki:1,teacher:64:1", "teacher:64 (text a model writes) cannot be mixed"),
    ("wiki:1,{short}:1", "shorter than one chunk"),
    ("wiki:1,news:1", "'news' is the built-in general-domain evaluation set"),
    ("news", "'news' is the built-in general-domain evaluation set"),
])
def test_bad_mixtures_are_one_line_and_nothing_is_written(cli, tmp_path, tiny_llama, spec, message):
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill a chunk.\n\nStill too short.")
    out = tmp_path / "run"
    r = cli("finetune", "--model", tiny_llama, "--recipe", "fixed-mask", "--epochs", "1", "--seq-len", "32",
            "--data", spec.format(short=short), "--out", out)
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_finetune_on_a_mixture_states_it_and_scores_each_sources_held_out_part(cli, tmp_path, tiny_bert):
    out = tmp_path / "run"
    r = cli("finetune", "--model", tiny_bert, "--recipe", "fixed-mask", "--epochs", "1", "--limit", "8", "--seq-len", "32",
            "--batch-size", "4", "--data", "python-help:0.5,wiki:0.5", "--start", "sparsegpt", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["data"].startswith("mixture of ") and "python-help 50% (" in summary["data"] and "wiki 50% (" in summary["data"]
    assert {"final_cosine", "final_wiki/cosine", "final_news/cosine", "final_news/recall_at_10"} <= set(summary)
    assert summary["held_out"] == "python-help"


def test_calibration_draws_a_mixture_in_proportion_and_the_study_refuses_one(cli, tmp_path, tiny_llama):
    out = tmp_path / "p"
    r = cli("prune", tiny_llama, "--method", "wanda", "--calib", "python-help:0.5,wiki:0.5", "--calib-samples", "4",
            "--seq-len", "32", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert cli("report", out, "--check", "2:4", "-q").exit_code == 0
    r = cli("study", "--model", tiny_llama, "--data", "python-help:0.5,wiki:0.5", "--out", tmp_path / "s")
    assert r.exit_code == 2 and "mixtures go with nmsparse finetune" in r.stderr


def _cached_ids(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "teacher-data.safetensors"))["ids"]


def test_a_causal_lm_writes_an_encoders_training_text_seeded(cli, tmp_path, tiny_llama, tiny_bert):
    def run(out, seed):
        r = cli("finetune", "--model", tiny_bert, "--recipe", "fixed-mask", "--epochs", "1", "--seq-len", "32",
                "--batch-size", "4", "--data", f"writer:{tiny_llama}:6", "--seed", seed, "--out", out, "--json")
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    first = run(tmp_path / "a", 0)
    assert first["data"].startswith(f"written by {tiny_llama}: 6 texts of 32 of its tokens (generated in ")
    assert "quality on python-help: " in first["data"] and "news: " in first["data"] and "final_news/cosine" in first
    ids = _cached_ids(tmp_path / "a")
    assert ids.shape == (6, 32)
    run(tmp_path / "b", 0)
    run(tmp_path / "c", 1)
    assert torch.equal(_cached_ids(tmp_path / "b"), ids) and not torch.equal(_cached_ids(tmp_path / "c"), ids)


@pytest.mark.parametrize("spec,message", [
    ("writer:{bert}:8", "the writer (encoder) is not a causal LM"),
    ("writer:{missing}:8", "is not a folder; the writer is a causal LM's Hugging Face folder"),
    ("writer:{llama}:many", "write writer:FOLDER:N"),
    ("writer:{llama}", "write writer:FOLDER:N"),
    ("python-help:1,writer:{llama}:8:1", "(text a model writes) cannot be mixed yet"),
])
def test_bad_writers_are_one_line_and_nothing_is_written(cli, tmp_path, tiny_llama, tiny_bert, spec, message):
    out = tmp_path / "run"
    data = spec.format(bert=tiny_bert, llama=tiny_llama, missing=tmp_path / "nothing-here")
    r = cli("finetune", "--model", tiny_bert, "--recipe", "fixed-mask", "--epochs", "1", "--seq-len", "32",
            "--data", data, "--out", out)
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not out.exists()
