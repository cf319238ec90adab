"""The CUDA paths on a real GPU, each checked against the same run on the CPU: the N:M mask, Hugging Face
distillation (fp32 and bf16, teacher-written data, resume), one-shot Wanda / SparseGPT calibration, `--start
sparsegpt`, eval, a timm model's fine-tuning, mask-preserving LoRA, and `--shard` (FSDP2) on nccl.

Skipped where no GPU is visible (CI has none): run `pytest tests/test_cuda.py` on a machine with one. The figures
of the last run are in the README's benchmark section."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nmcli.nm import CONV, LINEAR, NMPattern, nm_mask
from tests.conftest import SHARD_LORA, check_sharded_runs
from tests.reference import brute_force_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HF = ("--data", "python-help", "--pattern", "2:4", "--batch-size", "4", "--seq-len", "32", "--limit", "16", "--lr", "3e-3")
TIMM = ("finetune", "--model", "vit_tiny_patch16_224", "--limit", "128", "--batch-size", "32", "--model-kwargs",
        json.dumps({"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 1,
                    "num_heads": 2}))


def _terms(out, name):
    return [s["terms"][name] for s in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "terms" in s]


def _weights(out):
    return load_file(str(out / "model.safetensors"))


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mask_on_cuda_is_the_cpu_mask_ties_included(dtype):
    g = torch.Generator().manual_seed(0)
    for n, m in ((2, 4), (1, 8), (4, 8), (1, 32)):
        weight = torch.randint(-3, 4, (64, 256), generator=g).to(dtype)  # small integers: ties in most groups
        weight[5, 17] = float("nan")
        on_gpu = nm_mask(weight.cuda(), NMPattern(n, m), LINEAR)
        assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), nm_mask(weight, NMPattern(n, m), LINEAR)), (dtype, n, m)
        clean = weight.nan_to_num(0.5)
        assert torch.equal(nm_mask(clean.cuda(), NMPattern(n, m), LINEAR).cpu(), brute_force_mask(clean, n, m, 1))
    conv = torch.randn(16, 32, 3, 3, generator=g).to(dtype)
    assert torch.equal(nm_mask(conv.cuda(), NMPattern(2, 4), CONV).cpu(), nm_mask(conv, NMPattern(2, 4), CONV))


def test_hf_distillation_on_cuda_follows_the_cpu_run(cli, tmp_path, tiny_llama):
    """fp32, fixed mask: the same losses step by step and the same weights as on the CPU, up to float rounding."""
    args = ("finetune", "--model", tiny_llama, "--recipe", "fixed-mask", "--epochs", "2", *HF, "--json")
    cpu = cli(*args, "--out", tmp_path / "cpu")
    gpu = cli(*args, "--out", tmp_path / "gpu", "--device", "cuda")
    assert cpu.exit_code == 0 and gpu.exit_code == 0, gpu.output
    on_cpu, on_gpu = _terms(tmp_path / "cpu", "kl"), _terms(tmp_path / "gpu", "kl")
    assert len(on_gpu) == len(on_cpu) == 8
    assert on_gpu == pytest.approx(on_cpu, rel=1e-3)
    assert json.loads(gpu.stdout)["all_layers_compliant"] is True
    a, b = _weights(tmp_path / "cpu"), _weights(tmp_path / "gpu")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name] == 0, b[name] == 0), name  # the same mask
        assert _relative(b[name], a[name]) < 1e-3, name


def test_bf16_distillation_on_teacher_text_on_cuda_is_seeded_and_resumes_bit_identically(cli, tmp_path, tiny_llama):
    args = ("finetune", "--model", tiny_llama, "--recipe", "sr-ste", "--epochs", "2", "--data", "teacher:8", "--bf16",
            "--device", "cuda", "--pattern", "2:4", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--quiet")
    assert cli(*args, "--out", tmp_path / "full").exit_code == 0
    assert cli(*args, "--out", tmp_path / "again").exit_code == 0
    assert cli(*args, "--out", tmp_path / "cut", "--stop-after", "1").exit_code == 0
    resumed = cli(*args, "--resume", tmp_path / "cut")
    assert resumed.exit_code == 0, resumed.output
    texts = [load_file(str(tmp_path / run / "teacher-data.safetensors"))["ids"] for run in ("full", "again", "cut")]
    assert texts[0].shape == (8, 32) and all(torch.equal(texts[0], t) for t in texts[1:])
    full = _weights(tmp_path / "full")
    for run in ("again", "cut"):
        other = _weights(tmp_path / run)
        assert all(torch.equal(full[k], other[k]) for k in full), run
    assert max(int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) for k, w in full.items()
               if k.endswith("proj.weight")) == 2


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_oneshot_calibration_on_cuda_matches_the_cpu(cli, tmp_path, tiny_llama, method):
    args = ("prune", tiny_llama, "--method", method, "--pattern", "2:4", "--calib", "python-help", "--calib-samples", "16",
            "--seq-len", "32", "--json")
    cpu = cli(*args, "--out", tmp_path / "cpu")
    gpu = cli(*args, "--out", tmp_path / "gpu", "--device", "cuda")
    assert cpu.exit_code == 0 and gpu.exit_code == 0, gpu.output
    errors_cpu = json.loads(cpu.stdout)["calibration"]["reconstruction_error"]
    errors_gpu = json.loads(gpu.stdout)["calibration"]["reconstruction_error"]
    assert errors_gpu.keys() == errors_cpu.keys() and len(errors_gpu) == 14
    for name in errors_cpu:
        assert errors_gpu[name] == pytest.approx(errors_cpu[name], rel=1e-2, abs=1e-6), name
    a, b = _weights(tmp_path / "cpu"), _weights(tmp_path / "gpu")
    for name in a:
        if name.endswith("proj.weight"):
            assert float(((a[name] == 0) == (b[name] == 0)).double().mean()) > 0.999, name
            assert _relative(b[name], a[name]) < 1e-2, name


def test_budget_on_cuda_measures_what_the_cpu_measures(cli, tmp_path, tiny_llama):
    """prune --budget's sensitivity probe on CUDA tensors: the same costs as on the CPU (float tolerance), a mixed
    output at least as sparse as asked that complies layer by layer, and a fixed-mask run from it on CUDA."""
    args = ("prune", tiny_llama, "--method", "sparsegpt", "--budget", "0.6", "--calib", "python-help", "--calib-samples",
            "16", "--seq-len", "32", "--json")
    cpu = cli(*args, "--out", tmp_path / "cpu")
    gpu = cli(*args, "--out", tmp_path / "gpu", "--device", "cuda")
    assert cpu.exit_code == 0 and gpu.exit_code == 0, gpu.output
    on_cpu, on_gpu = (json.loads(r.stdout)["calibration"]["budget"] for r in (cpu, gpu))
    assert on_gpu["reached"] >= 0.6 and len(set(on_gpu["patterns"].values())) >= 2
    for name, cost in on_cpu["costs"].items():
        if on_cpu["patterns"][name] == on_gpu["patterns"][name]:
            assert on_gpu["costs"][name] == pytest.approx(cost, rel=1e-2, abs=1e-6), name
    assert cli("report", tmp_path / "gpu", "--quiet", "--no-flops").exit_code == 0
    r = cli("finetune", "--model", tiny_llama, "--start", tmp_path / "gpu", "--recipe", "fixed-mask", "--data",
            "python-help", "--seq-len", "32", "--limit", "16", "--batch-size", "4", "--epochs", "1", "--device", "cuda",
            "--out", tmp_path / "ft", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["all_layers_compliant"], r.output


def test_finetune_starts_from_sparsegpt_on_cuda(cli, tmp_path, tiny_llama):
    args = ("finetune", "--model", tiny_llama, "--start", "sparsegpt", "--recipe", "fixed-mask", "--epochs", "1", *HF, "--json")
    cpu = cli(*args, "--out", tmp_path / "cpu")
    gpu = cli(*args, "--out", tmp_path / "gpu", "--device", "cuda")
    assert cpu.exit_code == 0 and gpu.exit_code == 0, gpu.output
    start_cpu, start_gpu = json.loads(cpu.stdout)["start_perplexity"], json.loads(gpu.stdout)["start_perplexity"]
    assert start_gpu == pytest.approx(start_cpu, rel=1e-2)


def test_eval_on_cuda_matches_the_cpu(cli, tmp_path, tiny_llama, tiny_bert):
    for args in (("eval", tiny_llama, "--seq-len", "32"), ("eval", tiny_bert, "--teacher", tiny_bert, "--seq-len", "32")):
        cpu, gpu = cli(*args, "--json"), cli(*args, "--json", "--device", "cuda")
        assert cpu.exit_code == 0 and gpu.exit_code == 0, gpu.output
        m_cpu, m_gpu = json.loads(cpu.stdout)["metrics"], json.loads(gpu.stdout)["metrics"]
        assert m_gpu.keys() == m_cpu.keys()
        assert m_gpu == pytest.approx(m_cpu, rel=1e-4), args


def test_timm_finetune_on_cuda_with_bf16_and_resume(cli, tmp_path):
    args = (*TIMM, "--recipe", "mdgf-sdgf", "--pattern", "2:4", "--epochs", "3", "--seed", "5", "--device", "cuda", "--quiet")
    assert cli(*args, "--out", tmp_path / "straight").exit_code == 0
    assert cli(*args, "--out", tmp_path / "split", "--stop-after", "1").exit_code == 0
    assert cli(*args, "--resume", tmp_path / "split").exit_code == 0
    straight, split = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    r = cli(*TIMM, "--recipe", "sr-ste", "--pattern", "1:8", "--epochs", "1", "--bf16", "--device", "cuda",
            "--out", tmp_path / "bf16", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["all_layers_compliant"] is True


def test_sharded_finetune_on_cuda_with_nccl_equals_the_unsharded_run(tmp_path, tiny_llama):
    """FSDP2 on CUDA tensors and nccl, one process (one GPU holds one nccl rank): every recipe, LoRA, resume."""
    check_sharded_runs(tmp_path, tiny_llama, nproc=1, device="cuda")


def test_lora_on_cuda_follows_the_cpu_run_and_merges_exactly_nm(cli, tmp_path, tiny_llama):
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(SHARD_LORA.replace("dropout: 0.1", "dropout: 0.0"))
    args = ("finetune", "--model", tiny_llama, "--recipe", recipe, "--epochs", "2", *HF, "--json")
    cpu = cli(*args, "--out", tmp_path / "cpu")
    gpu = cli(*args, "--out", tmp_path / "gpu", "--device", "cuda")
    assert cpu.exit_code == 0 and gpu.exit_code == 0, gpu.output
    assert _terms(tmp_path / "gpu", "kl") == pytest.approx(_terms(tmp_path / "cpu", "kl"), rel=1e-3)
    a, b = _weights(tmp_path / "cpu"), _weights(tmp_path / "gpu")
    for name in a:
        assert _relative(b[name], a[name]) < 1e-3, name
    assert json.loads(gpu.stdout)["all_layers_compliant"] is True
    bf16 = cli(*args, "--out", tmp_path / "bf16", "--device", "cuda", "--bf16")
    assert bf16.exit_code == 0 and json.loads(bf16.stdout)["all_layers_compliant"] is True, bf16.output
