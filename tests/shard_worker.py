"""Run under torchrun by tests/test_sharding.py (2 CPU processes, gloo) and tests/test_cuda.py (1 GPU process,
nccl): the same fine-tuning runs unsharded (DistributedDataParallel) and with --shard (FSDP2), and a sharded run
stopped after one epoch and resumed, each into OUT/<name>.

    shard_worker.py MODEL OUT LORA_RECIPE [DEVICE]

One GPU can hold only one nccl rank, so on CUDA the worker runs --shard in a single process (which the command
line refuses: it shards nothing there, but it runs every FSDP2 code path on CUDA tensors and nccl)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import nmcli.train.engine
from nmcli.methods.recipes import load_recipe
from nmcli.train.engine import FinetuneConfig, run_finetune

# one process group for all the runs: env:// rendezvous does not take a second init after a destroy
nmcli.train.engine.shutdown = lambda env: dist.barrier()


def run(model: str, out: Path, recipe: str, shard: bool, device: str, **extra) -> None:
    chosen = load_recipe(recipe).with_overrides(pattern="2:4", epochs=2, batch_size=4, lr=3e-3)
    config = FinetuneConfig(model=model, recipe=chosen, out=out, data="python-help", seq_len=32, limit=16, shard=shard,
                            device=device, force=True, **extra)
    run_finetune(config)


def main() -> None:
    model, root, lora = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    if device == "cuda":  # one process: finetune makes no process group for it, fully_shard needs one
        nmcli.train.engine.check_shard = lambda world, grad_log_every: None
        dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    for recipe in ("fixed-mask", "sr-ste", "mdgf-linear", lora):
        for shard in (False, True):  # the start's evaluations (sharded too) once: they do not depend on the recipe
            run(model, root / f"{Path(recipe).stem}-{'shard' if shard else 'ddp'}", recipe, shard, device,
                measure_start=recipe == "fixed-mask")
    run(model, root / "cut", "sr-ste", True, device, stop_after=1)
    run(model, root / "cut", "sr-ste", True, device, resume=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
