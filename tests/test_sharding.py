"""finetune --shard: FSDP2 under torchrun (2 CPU processes, gloo) computes what DistributedDataParallel computes,
for full fine-tuning (fixed mask, SR-STE, MDGF) and LoRA, and resumes bit-identically."""

from tests.conftest import check_sharded_runs


def test_sharded_runs_equal_ddp_runs_and_resume_bit_identically(tmp_path, tiny_llama):
    check_sharded_runs(tmp_path, tiny_llama, nproc=2, device="cpu")


def test_shard_outside_torchrun_is_one_line_and_writes_nothing(cli, tmp_path, tiny_llama):
    r = cli("finetune", "--model", tiny_llama, "--shard", "--data", "python-help", "--seq-len", "32", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--shard splits the model over torchrun's processes" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
