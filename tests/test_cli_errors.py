"""Bad input: one clear line on stderr naming the file/layer/value, a non-zero exit, no traceback, no output."""

import math

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import run_subprocess, timm_state


def _assert_clean_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.mark.parametrize("pattern", ["4:4", "0:4", "2-4", "3:2", "a:b"])
def test_bad_pattern(cli, tmp_path, resnet_file, pattern):
    out = tmp_path / "o.safetensors"
    _assert_clean_error(cli("prune", resnet_file, "--pattern", pattern, "--out", out), repr(pattern))
    assert not out.exists()
    _assert_clean_error(cli("report", resnet_file, "--check", pattern), repr(pattern))


def test_missing_file(cli, tmp_path):
    _assert_clean_error(cli("report", tmp_path / "nope.safetensors"), "nope.safetensors")


def test_truncated_file(cli, tmp_path, resnet_file):
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(resnet_file.read_bytes()[: resnet_file.stat().st_size // 2])
    out = tmp_path / "o.safetensors"
    _assert_clean_error(cli("prune", bad, "--out", out), "trunc.safetensors")
    assert not out.exists()


def test_corrupt_file(cli, tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\xff" * 100)
    _assert_clean_error(cli("report", bad), "junk.safetensors", "not a readable safetensors file")


def test_unknown_timm_name(cli):
    _assert_clean_error(cli("report", "timm:resnet_does_not_exist"), "unknown timm model 'resnet_does_not_exist'")
    _assert_clean_error(cli("report", "no_such_thing_anywhere"), "neither an existing file/folder nor a timm")


def test_checkpoint_that_does_not_match_the_model(cli, resnet_file):
    _assert_clean_error(
        cli("report", resnet_file, "--model", "vit_tiny_patch16_224"), "is not part of the model", "--model"
    )


def test_pth_checkpoint_for_timm_name(cli, tmp_path):
    state = timm_state("resnet18", seed=1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "r.pth.tar")
    r = cli("prune", "resnet18", "--checkpoint", tmp_path / "r.pth.tar", "--out", tmp_path / "o.safetensors", "-q")
    assert r.exit_code == 0, r.output
    wrong = {k: v for k, v in state.items() if k != "fc.weight"}
    torch.save(wrong, tmp_path / "w.pth")
    _assert_clean_error(
        cli("report", "resnet18", "--checkpoint", tmp_path / "w.pth"), "fc.weight", "missing from the checkpoint"
    )


def test_nan_weights_are_reported_and_refused_by_prune(cli, tmp_path):
    state = {"a.weight": torch.randn(8, 16), "b.weight": torch.randn(8, 16)}
    state["b.weight"][3, 5] = math.nan
    state["b.weight"][0, 0] = math.inf
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    rep = cli("report", path)
    assert rep.exit_code == 0, rep.output
    assert "2 NaN/Inf" in rep.stdout and "non-finite" in rep.stdout
    out = tmp_path / "o.safetensors"
    _assert_clean_error(cli("prune", path, "--out", out), "b.weight", "2 NaN/Inf")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["nan.safetensors"]  # no temporary left behind


def test_existing_output_needs_force(cli, tmp_path, resnet_file):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    _assert_clean_error(cli("prune", resnet_file, "--out", out), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    assert cli("prune", resnet_file, "--out", out, "--force", "-q").exit_code == 0
    assert out.stat().st_size > 1000


def test_failed_folder_prune_keeps_the_old_output(cli, tmp_path, hf_bert_folder):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_bert_folder, src)
    out = tmp_path / "out"
    assert cli("prune", src, "--out", out, "-q").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    _assert_clean_error(cli("prune", src, "--out", out, "--force"), shard.name)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_full_disk_is_named_as_such(cli, tmp_path, resnet_file, monkeypatch):
    import errno

    import nmcli.io.rewrite

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(nmcli.io.rewrite, "write_streaming", full)
    _assert_clean_error(cli("prune", resnet_file, "--out", tmp_path / "o.safetensors"), "the disk is full while writing", "o.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_training_checkpoint_names_the_folder_and_the_free_space(cli, tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError ("unexpected pos"), not as an OSError."""
    import nmcli.train.checkpointing

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 739154112 vs 739154004")

    monkeypatch.setattr(nmcli.train.checkpointing.torch, "save", full)
    tiny = '{"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 1, "num_heads": 2}'
    r = cli("finetune", "--model", "vit_tiny_patch16_224", "--model-kwargs", tiny, "--limit", "64", "--batch-size", "32",
            "--epochs", "1", "--out", tmp_path / "run", "--quiet")
    _assert_clean_error(r, "checkpoint: writing the training checkpoint failed (", "unexpected pos", "GiB free on that disk")
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "model.safetensors").exists()


def test_debug_shows_the_traceback(tmp_path):
    r = run_subprocess("--debug", "report", tmp_path / "nope.safetensors")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_real_subprocess_round_trip(tmp_path):
    out = tmp_path / "r.safetensors"
    r = run_subprocess("prune", "resnet18", "--pattern", "1:4", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "pruned 19 layers to 1:4" in r.stdout
    ok = run_subprocess("report", out, "--check", "1:4")
    assert ok.returncode == 0, ok.stderr
    assert "check 1:4: all 19 target layers comply" in ok.stdout
    assert "keep-N" in ok.stdout
    bad = run_subprocess("report", out, "--check", "2:-4")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "invalid N:M pattern" in bad.stderr


def test_help_states_the_convention(cli):
    r = cli("prune", "--help")
    assert "keep-N" in r.stdout
