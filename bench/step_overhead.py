"""Training-step time of every recipe against the dense recipe, same model and batch, in one run.

Each recipe trains the small ViT of the built-in example (mnist5k size, 28x28, embed 96, depth 4) on one fixed
batch, with its step plan taken at points spread over a 1,000-step schedule (so MDGF runs with alpha > 0 and
SDGF at every stage). Recipes are timed round-robin and each one's fastest round is compared with dense's.
Both conditions: idle, and with a competing busy process per core minus one (bench/contention.py).
Target (issues 3, 12): at most 1.10x for every recipe at 2:4 and at 1:16, in both conditions.
    python bench/step_overhead.py [--rounds 5] [--steps 10] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import timm.optim
import torch

from contention import CONDITIONS, describe
from nmcli.methods.plan import plan_step
from nmcli.methods.sparsifier import Sparsifier
from nmcli.models import ModelRef, build_model, layers_of_model, select_targets
from nmcli.recipes import builtin_names, load_recipe
from nmcli.schedules import Phases
from nmcli.train.engine import train_step
from nmcli.train.tasks import ImageTask
from nmcli.train.example import EXAMPLE_KWARGS, EXAMPLE_MODEL

SCHEDULE_STEPS = 1000
PATTERNS = ("2:4", "1:16")


PLAIN = "(plain model)"
TASK = ImageTask(train=None, val=None, description="one fixed batch")  # the loss fine-tuning uses: cross-entropy


def make_runner(name: str, pattern: str, batch: tuple[torch.Tensor, torch.Tensor]):
    """`PLAIN` trains the model with no parametrization at all, to show what attaching masks costs by itself."""
    recipe = load_recipe("dense" if name == PLAIN else name).with_overrides(pattern=pattern)
    ref = ModelRef("timm", EXAMPLE_MODEL, EXAMPLE_KWARGS)
    torch.manual_seed(0)
    model = build_model(ref, device="cpu")
    sparsifier = Sparsifier(model, select_targets(layers_of_model(model, ref)))
    if name != PLAIN:
        sparsifier.attach()
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    phases = Phases.from_fractions(SCHEDULE_STEPS, recipe.dense_fraction, recipe.finetune_fraction)
    position = [0]

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step = (position[0] * 97) % SCHEDULE_STEPS  # visit the whole schedule
            sparsifier.set_plan(plan_step(recipe, recipe.target, phases, step))
            train_step(model, batch, optimizer, loss_fn=TASK.loss)
            position[0] += 1
        return (time.perf_counter() - start) / steps

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen))
    print(f"{EXAMPLE_MODEL} {EXAMPLE_KWARGS}, batch {args.batch}, {torch.get_num_threads()} torch threads")
    runners = {pattern: {name: make_runner(name, pattern, batch) for name in [PLAIN, *builtin_names()]} for pattern in PATTERNS}
    for by_name in runners.values():
        for run in by_name.values():
            run(2)  # warm-up (and the mask kernel's compilation)
    for label, condition in CONDITIONS:
        with condition() as busy:
            print(f"\n{describe(label, busy)}")
            for pattern, by_name in runners.items():
                report(pattern, time_round_robin(by_name, args.rounds, args.steps))


def time_round_robin(runners: dict, rounds: int, steps: int) -> dict[str, float]:
    """Each runner's fastest round: other processes and the OS only ever add time, so the minimum is the
    figure closest to the runner's own cost (medians here drift by +-10-20 % between identical runners)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name].append(run(steps))
    return {name: min(values) for name, values in times.items()}


def report(pattern: str, medians: dict[str, float]) -> None:
    dense = medians["dense"]
    print(f"pattern {pattern}: dense step {dense * 1e3:.1f} ms (fastest round)")
    for name, median in medians.items():
        ratio = median / dense
        verdict = "reference" if name in (PLAIN, "dense") else ("met" if ratio <= 1.10 else "MISSED")
        print(f"  {name:<18} {median * 1e3:7.1f} ms  {ratio:5.3f}x  ({verdict})")

if __name__ == "__main__":
    main()
