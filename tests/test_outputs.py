"""Outputs are exclusive, recoverable, clean and ordinary files (issue 10, section 3)."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from nmcli.errors import NMSparseError
from nmcli.io.atomic import atomic_output
from tests.test_cli_errors import _assert_clean_error
from tests.test_finetune import BASE, _finetune, _weights


@pytest.mark.parametrize("directory", [False, True])
def test_an_output_created_by_someone_else_meanwhile_is_not_replaced(tmp_path, directory):
    path = tmp_path / "out"
    with pytest.raises(NMSparseError, match="created while this run was writing"):
        with atomic_output(path, force=False, directory=directory) as tmp:
            (tmp / "mine").write_text("mine") if directory else tmp.write_text("mine")
            path.write_text("theirs")  # another run finished first
    assert path.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # our temporary is gone too


def test_a_file_output_is_published_whole_with_the_umask_mode(cli, tmp_path):
    src = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.randn(8, 16)}, str(src))
    old = os.umask(0o027)
    try:
        assert cli("prune", src, "--out", tmp_path / "p.safetensors").exit_code == 0
        assert cli("export", src, "--format", "compressed-tensors", "--pattern", "2:4", "--prune",
                   "--out", tmp_path / "ct").exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "ct").stat().st_mode) == 0o750


def test_a_long_legal_output_name_works(cli, tmp_path):
    src = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.randn(8, 16)}, str(src))
    out = tmp_path / ("x" * 240 + ".safetensors")  # 252 bytes: the file system's limit is 255
    assert cli("prune", src, "--out", out).exit_code == 0 and out.is_file()


def test_stale_temporaries_of_dead_writers_are_cleaned_and_live_ones_kept(cli, tmp_path):
    src = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.randn(8, 16)}, str(src))
    dead = tmp_path / ".p.safetensors.nmsparse-tmp999999999.abcd.tmp"  # no such process
    live = tmp_path / f".p.safetensors.nmsparse-tmp{os.getppid()}.abcd.tmp"  # a running writer's
    other = tmp_path / ".q.safetensors.nmsparse-tmp999999999.abcd.tmp"  # another output's: not ours to touch
    for path in (dead, live, other):
        path.write_bytes(b"half-written")
    assert cli("prune", src, "--out", tmp_path / "p.safetensors").exit_code == 0
    assert not dead.exists() and live.exists() and other.exists()


def test_recipe_show_does_not_replace_an_existing_plot_without_force(cli, tmp_path):
    plot = tmp_path / "s.png"
    plot.write_bytes(b"keep me")
    _assert_clean_error(cli("recipe", "show", "ste", "--plot", plot), "already exists")
    assert plot.read_bytes() == b"keep me"
    assert cli("recipe", "show", "ste", "--plot", plot, "--force").exit_code == 0
    assert plot.read_bytes().startswith(b"\x89PNG")


ARGS = ("--recipe", "ste", "--pattern", "2:4", "--epochs", "2", "--seed", "3")


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_kill_between_the_checkpoints_two_renames(cli, tmp_path):
    assert _finetune(cli, tmp_path / "straight", *ARGS).exit_code == 0
    run = tmp_path / "split"
    assert _finetune(cli, run, *ARGS, "--stop-after", "1").exit_code == 0
    (run / "checkpoint").rename(run / ".checkpoint.nmsparse-old")  # killed after moving the old one away
    r = cli(*BASE, "--resume", run, "--quiet", *ARGS)
    assert r.exit_code == 0, r.output
    straight, split = _weights(tmp_path / "straight"), _weights(run)
    assert all(torch.equal(straight[k], split[k]) for k in straight)


def test_metrics_hold_every_record_once_after_a_resume(cli, tmp_path):
    run = tmp_path / "run"
    assert _finetune(cli, run, *ARGS, "--stop-after", "1").exit_code == 0
    logged = _records(run)
    steps_per_epoch = max(r["step"] for r in logged if r.get("event") == "epoch")
    with open(run / "metrics.jsonl", "a") as f:  # a run killed after logging epoch 2, before checkpointing it
        f.write(json.dumps({"step": steps_per_epoch, "loss": 1.0, "epoch": 1}) + "\n")
        f.write(json.dumps({"event": "epoch", "epoch": 1, "step": 2 * steps_per_epoch}) + "\n")
    assert cli(*BASE, "--resume", run, "--quiet", *ARGS).exit_code == 0
    records = _records(run)
    steps = [r["step"] for r in records if "event" not in r]
    epochs = [r["epoch"] for r in records if r.get("event") == "epoch"]
    assert len(steps) == len(set(steps)) and epochs == [0, 1]
    assert [r["event"] for r in records if r.get("event") in ("start", "final")] == ["start", "final"]


def test_a_state_file_without_our_keys_is_named(cli, tmp_path):
    run = tmp_path / "run"
    assert _finetune(cli, run, *ARGS, "--stop-after", "1").exit_code == 0
    torch.save({"epoch": 1}, run / "checkpoint" / "state.pt")
    _assert_clean_error(cli(*BASE, "--resume", run, *ARGS), "state.pt", "not an nmsparse training state", "fingerprint")


def _onnx_export(cli, src, out, *extra):
    return cli("export", src, "--format", "onnx", "--out", out, "--model", "resnet18", "-q", *extra)


def test_onnx_model_and_external_data_are_one_output(cli, tmp_path, resnet_file):
    out = tmp_path / "m.onnx"
    unrelated = tmp_path / "m.onnx.data"  # someone else's file with the conventional name
    unrelated.write_bytes(b"not ours")
    args = ("--pattern", "2:4", "--prune", "--external-data")
    assert _onnx_export(cli, resnet_file, out, *args).exit_code == 0
    assert unrelated.read_bytes() == b"not ours"  # never overwritten
    first = sorted(p.name for p in tmp_path.glob("m.onnx.*.data"))
    assert len(first) == 1
    _assert_clean_error(_onnx_export(cli, resnet_file, out, *args), "already exists")
    assert _onnx_export(cli, resnet_file, out, *args, "--force").exit_code == 0
    second = sorted(p.name for p in tmp_path.glob("m.onnx.*.data"))
    assert len(second) == 1 and second != first  # the replaced export's data is gone, the new one is named anew
    assert _onnx_export(cli, resnet_file, out, "--pattern", "2:4", "--prune", "--force").exit_code == 0
    assert list(tmp_path.glob("m.onnx.*.data")) == []  # an inline export leaves no stale data behind


def test_onnx_data_left_by_killed_exports_is_removed_by_the_next_export(cli, tmp_path, resnet_file):
    """A kill after the data was written but before the model appeared leaves data no model names: the next export
    of the same output removes it. Data of a writer that still runs, and files not named by us, stay."""
    import os
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    out = tmp_path / "m.onnx"
    orphan = tmp_path / f"m.onnx.{dead}-0123abcd.data"
    live = tmp_path / f"m.onnx.{os.getppid()}-4567cdef.data"
    unrelated = tmp_path / "m.onnx.data"
    for path in (orphan, live, unrelated):
        path.write_bytes(b"x")
    assert _onnx_export(cli, resnet_file, out, "--pattern", "2:4", "--prune", "--external-data").exit_code == 0
    assert not orphan.exists() and live.exists() and unrelated.exists()
    names = {p.name for p in tmp_path.glob("m.onnx.*.data")} - {live.name}
    assert len(names) == 1 and names.pop().startswith(f"m.onnx.{os.getpid()}-")
