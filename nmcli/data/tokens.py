"""Text -> token-id samples with the model's own tokenizer, and batches padded with an attention mask.

Causal LMs train on fixed-length chunks of the concatenated documents (`seq_len` tokens, EOS between documents,
no special tokens added: perplexities stay comparable across tokenizer versions). Encoders train on a mix of whole
paragraphs (truncated to `seq_len`) and single sentences, because sentence embedders are used on both and a
paragraph-only distillation leaves short inputs far behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from nmcli.data.text import paragraphs, sentences
from nmcli.errors import NMSparseError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")


def check_tokenizer_files(folder: Path | None) -> None:
    if folder is None or not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise NMSparseError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); text data needs the model's own "
            "tokenizer: copy it into the model folder"
        )


def load_tokenizer(folder: Path | None):  # noqa: ANN201 (a transformers tokenizer)
    """The folder's own tokenizer, offline; a folder without one is a clear error."""
    check_tokenizer_files(folder)
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise NMSparseError(f"{folder}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = 1 << 62  # whole documents are tokenized, then cut to --seq-len by nmsparse itself
    return tokenizer


@dataclass
class TokenSamples(Dataset):
    """1-D token-id tensors of varying length (at most the sequence length)."""

    ids: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.ids[index]


class PadCollate:
    """A list of samples -> {"input_ids", "attention_mask"}, right-padded to the longest sample."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        longest = max(len(s) for s in samples)
        ids = torch.full((len(samples), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            ids[row, : len(sample)] = sample
            mask[row, : len(sample)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def lm_chunks(tokenizer, documents: list[str], seq_len: int, where: str) -> TokenSamples:  # noqa: ANN001
    """Documents joined with EOS and cut into chunks of exactly `seq_len` tokens (the remainder is dropped)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + eos
    count = len(stream) // seq_len
    if count == 0:
        raise NMSparseError(f"{where}: {len(stream)} tokens, shorter than one chunk of --seq-len {seq_len}")
    flat = torch.tensor(stream[: count * seq_len], dtype=torch.long)
    return TokenSamples(list(flat.view(count, seq_len)))


def encoder_texts(documents: list[str]) -> tuple[list[str], list[str]]:
    """(paragraphs, sentences) of the documents, in document order."""
    paras = [p for d in documents for p in paragraphs(d)]
    return paras, [s for p in paras for s in sentences(p)]


def encoder_samples(tokenizer, texts: list[str], seq_len: int, where: str) -> TokenSamples:  # noqa: ANN001
    """Each text tokenized with the model's special tokens, truncated to `seq_len`."""
    if not texts:
        raise NMSparseError(f"{where}: no text to tokenize")
    encoded = tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
    return TokenSamples([torch.tensor(ids, dtype=torch.long) for ids in encoded])
