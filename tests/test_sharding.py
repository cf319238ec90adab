"""finetune --shard: FSDP2 under torchrun (2 CPU processes, gloo) computes what DistributedDataParallel computes,
for full fine-tuning (fixed mask, SR-STE, MDGF) and LoRA, and resumes bit-identically."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.conftest import ROOT

LORA = "name: lora-test\nmethod: fixed-mask\nlora: {rank: 4, alpha: 8, dropout: 0.1}\n"


def test_sharded_runs_equal_ddp_runs_and_resume_bit_identically(tmp_path, tiny_llama):
    lora = tmp_path / "lora-test.yaml"
    lora.write_text(LORA)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "shard_worker.py"), str(tiny_llama), str(tmp_path), str(lora)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    dense = load_file(str(tiny_llama / "model.safetensors"))
    for recipe in ("fixed-mask", "sr-ste", "mdgf-linear", "lora-test"):
        ddp = load_file(str(tmp_path / f"{recipe}-ddp" / "model.safetensors"))
        sharded = load_file(str(tmp_path / f"{recipe}-shard" / "model.safetensors"))
        assert ddp.keys() == sharded.keys() == dense.keys(), recipe
        for name in ddp:
            assert torch.allclose(ddp[name], sharded[name], rtol=1e-4, atol=1e-6), (recipe, name)
        moved = ddp["model.layers.1.mlp.up_proj.weight"] != dense["model.layers.1.mlp.up_proj.weight"]
        assert moved.sum() > 0.4 * moved.numel(), recipe  # trained (and pruned), not copied through
        summary = json.loads((tmp_path / f"{recipe}-shard" / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["all_layers_compliant"], recipe
        ddp_summary = json.loads((tmp_path / f"{recipe}-ddp" / "summary.json").read_text())
        assert abs(summary["final_perplexity"] - ddp_summary["final_perplexity"]) < 1e-3 * ddp_summary["final_perplexity"]
    full, cut = load_file(str(tmp_path / "sr-ste-shard" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_shard_outside_torchrun_is_one_line_and_writes_nothing(cli, tmp_path, tiny_llama):
    r = cli("finetune", "--model", tiny_llama, "--shard", "--data", "python-help", "--seq-len", "32", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--shard splits the model over torchrun's processes" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
