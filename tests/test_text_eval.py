"""Text data (files, folders, jsonl, Python's help texts) and the quality metrics of nmcli/quality."""

import json

import pytest
import scipy.stats
import torch
import transformers

from nmcli.data.text import PYTHON_HELP, load_texts, paragraphs, sentences
from nmcli.data.tokens import PadCollate, encoder_texts, lm_chunks, load_tokenizer
from nmcli.errors import NMSparseError
from nmcli.quality.agreement import embedding_agreement, spearman
from nmcli.quality.measures import perplexity
from nmcli.quality.suite import TextQuality
from nmcli.models.architecture import ModelKind
from tests.conftest import minilm_folder, save_tiny_hf


def test_python_help_is_split_deterministically_into_disjoint_parts():
    first, second = load_texts(PYTHON_HELP), load_texts(PYTHON_HELP)
    assert first.train == second.train and first.heldout == second.heldout
    assert first.heldout and first.train and not set(first.train) & set(first.heldout)
    assert len(first.heldout) == len(first.train + first.heldout) // 4


def test_paragraphs_and_sentences():
    text = "First line\nwrapped here.  Second sentence is here.\n\n\nNext para has four words. ok."
    assert paragraphs(text) == ["First line wrapped here. Second sentence is here.", "Next para has four words. ok."]
    assert sentences(paragraphs(text)[0]) == ["First line wrapped here.", "Second sentence is here."]


def test_files_folders_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one two three four.\n\nfive six seven eight.\n\nnine ten eleven twelve.\n\nz z z z.")
    assert len(load_texts(str(tmp_path / "a.txt")).heldout) == 1
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.md").write_text(f"document {i}")
    (folder / "skip.bin").write_bytes(b"\x00")
    corpus = load_texts(str(folder))
    assert corpus.heldout == ["document 0"] and corpus.train == ["document 1", "document 2"]
    lines = tmp_path / "d.jsonl"
    lines.write_text("\n".join(json.dumps({"text": f"t{i}"}) for i in range(8)) + "\n")
    assert load_texts(str(lines)).heldout == ["t3", "t7"]


@pytest.mark.parametrize("content,message", [
    (b"", "0 non-empty document"),
    (b"\x00\x01binary", "binary data"),
    (b"\xff\xfe bad", "not UTF-8"),
])
def test_bad_text_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "x.txt"
    path.write_bytes(content)
    with pytest.raises(NMSparseError, match=message):
        load_texts(str(path))


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(NMSparseError, match='line 2 has no string "text" field'):
        load_texts(str(path))


def test_text_shorter_than_one_chunk_and_folder_without_tokenizer(tmp_path):
    tokenizer = load_tokenizer(minilm_folder())
    with pytest.raises(NMSparseError, match="shorter than one chunk of --seq-len 64"):
        lm_chunks(tokenizer, ["a few words"], 64, "x.txt")
    with pytest.raises(NMSparseError, match="no tokenizer files"):
        load_tokenizer(save_tiny_hf(tmp_path / "bare", "llama"))


def test_lm_chunks_are_the_token_stream_cut_into_equal_pieces():
    tokenizer = load_tokenizer(minilm_folder())
    docs = ["the quick brown fox jumps over the lazy dog " * 5, "another document here " * 4]
    chunks = lm_chunks(tokenizer, docs, 8, "docs")
    stream = sum((tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs), [])  # BERT has no EOS
    assert torch.equal(torch.cat(chunks.ids), torch.tensor(stream[: len(chunks) * 8]))
    assert len(chunks) == len(stream) // 8


def test_spearman_matches_scipy_with_ties():
    torch.manual_seed(0)
    a = torch.randint(0, 5, (40,)).double()
    b = a + torch.randn(40)
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a.numpy(), b.numpy()).statistic, rel=1e-12)


def test_embedding_agreement():
    torch.manual_seed(0)
    teacher = torch.randn(10, 6)
    same = embedding_agreement(teacher * 3, teacher)  # scale does not change a cosine or a ranking
    assert same["cosine"] == pytest.approx(1.0) and same["cosine_min"] == pytest.approx(1.0)
    assert same["spearman"] == pytest.approx(1.0)
    flipped = teacher.clone()
    flipped[0] = -flipped[0]
    result = embedding_agreement(flipped, teacher)
    assert result["cosine_min"] == pytest.approx(-1.0) and result["cosine"] == pytest.approx(0.8)


def test_perplexity_matches_the_models_own_loss(tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(save_tiny_hf(tmp_path / "m", "llama"))
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (3, 12))
    expected = torch.exp(model(input_ids=ids, labels=ids).loss).item()  # transformers' own shifted CE
    from nmcli.data.tokens import TokenSamples

    assert perplexity(model, TokenSamples(list(ids)), pad_id=0) == pytest.approx(expected, rel=1e-5)


def test_encoder_quality_against_the_teacher():
    model = transformers.AutoModel.from_pretrained(minilm_folder())
    tokenizer = load_tokenizer(minilm_folder())
    paras, sents = encoder_texts(load_texts(PYTHON_HELP).heldout[:2])
    from nmcli.data.tokens import encoder_samples

    sets = {"paragraphs": encoder_samples(tokenizer, paras[:6], 64, "p"), "sentences": encoder_samples(tokenizer, sents[:6], 64, "s")}
    quality = TextQuality(ModelKind.ENCODER, sets, 0, "test", teacher=model)
    same = quality(model)
    assert same["cosine"] == pytest.approx(1.0) and same["sentence_cosine_min"] == pytest.approx(1.0)
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.mul_(0.0)
    worse = quality(model)
    assert worse["cosine"] < 0.99 and worse["sentence_cosine"] < 0.99
    assert PadCollate(0)([torch.tensor([5, 6]), torch.tensor([7])])["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_embeddings_come_back_in_the_samples_order_each_as_if_run_alone(tmp_path):
    import nmcli.quality.measures as evaluation
    from nmcli.data.tokens import TokenSamples

    model = transformers.AutoModel.from_pretrained(save_tiny_hf(tmp_path / "b", "bert"))
    torch.manual_seed(0)
    lengths = [9, 2, 14, 5, 2, 11, 7]  # not sorted: the batches go shortest first, the rows must not
    samples = TokenSamples([torch.randint(1, 128, (n,)) for n in lengths])
    with torch.no_grad():  # one sample alone: no padding, no batch order, the expectation
        alone = torch.stack([model(input_ids=ids[None]).last_hidden_state[0].mean(0) for ids in samples.ids])
    batched = []
    for batch in evaluation._batches(model, samples, 0, 3):  # like lengths together: each batch pads little
        lengths_in = batch["attention_mask"].sum(1)
        batched.append(int(lengths_in.max() - lengths_in.min()))
    assert batched == [3, 4, 0]  # lengths (2, 2, 5), (7, 9, 11), (14,)
    assert torch.allclose(evaluation.embed(model, samples, 0), alone, atol=1e-5)
