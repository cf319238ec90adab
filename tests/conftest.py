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
