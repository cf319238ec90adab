"""Run under torchrun by tests/test_sharding.py: the same fine-tuning runs with DistributedDataParallel and with
--shard (FSDP2), and a sharded run stopped after one epoch and resumed, each into OUT/<name>."""

import sys
from pathlib import Path

import torch.distributed as dist

import nmcli.train.engine
from nmcli.recipes import load_recipe
from nmcli.train.engine import FinetuneConfig, run_finetune

# one process group for all the runs: env:// rendezvous does not take a second init after a destroy
nmcli.train.engine.shutdown = lambda env: dist.barrier()


def run(model: str, out: Path, recipe: str, shard: bool, **extra) -> None:
    chosen = load_recipe(recipe).with_overrides(pattern="2:4", epochs=2, batch_size=4, lr=3e-3)
    config = FinetuneConfig(model=model, recipe=chosen, out=out, data="python-help", seq_len=32, limit=16, shard=shard,
                            force=True, **extra)
    run_finetune(config)


def main() -> None:
    model, root, lora = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    for recipe in ("fixed-mask", "sr-ste", "mdgf-linear", lora):
        for shard in (False, True):
            run(model, root / f"{Path(recipe).stem}-{'shard' if shard else 'ddp'}", recipe, shard)
    run(model, root / "cut", "sr-ste", True, stop_after=1)
    run(model, root / "cut", "sr-ste", True, resume=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
