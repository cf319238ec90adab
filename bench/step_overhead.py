"""Training-step time of every recipe against the dense recipe, same model and batch, in one run.

`timm` (default): the small ViT of the built-in MNIST example (mnist5k size, 28x28, embed 96, depth 4), cross-entropy.
`minilm`: the real pretrained all-MiniLM-L6-v2 (BertModel, 22.7 M parameters) distilled as `finetune` distils it
(SquareHead + embedding cosine), on a fixed batch of the built-in Python help text. Its dense teacher's outputs are
computed once and replayed, so the figures compare the student's step alone; the teacher's forward is timed
apart and printed (it is the same for every recipe).
Each recipe trains on one fixed batch, with its step plan taken at points spread over a 1,000-step schedule (so
MDGF runs with alpha > 0 and SDGF at every stage). Recipes are timed round-robin; each round's time is divided by
dense's in the same round, and the median of those ratios is reported with its 95 % interval. The verdict is
"met" or "MISSED" only when the whole interval is on one side of 1.10x. A second, identical dense runner (`dense
again`) checks the method: its interval should hold 1.0. Both conditions: idle, and with a competing busy process
per core minus one (bench/contention.py). Target (issues 3, 8, 12): at most 1.10x for every recipe at 2:4 and at
1:16, in both conditions.
    python bench/step_overhead.py [--model timm|minilm] [--rounds 5] [--steps 10] [--batch 64]
                                  [--patterns 2:4,1:16] [--conditions idle,busy]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nmcli.runtime.openmp import setting, spin_briefly

spin_briefly()  # as the nmsparse command does, before torch loads OpenMP

import torch  # noqa: E402
from torch import nn  # noqa: E402

from contention import CONDITIONS, describe  # noqa: E402
from nmcli.methods.plan import plan_step  # noqa: E402
from nmcli.methods.sparsifier import Sparsifier  # noqa: E402
from nmcli.models.targets import LayerInfo  # noqa: E402
from nmcli.methods.recipes import builtin_names, load_recipe  # noqa: E402
from nmcli.methods.schedules import Phases  # noqa: E402
from nmcli.train.engine import recipe_optimizer, train_step  # noqa: E402

SCHEDULE_STEPS = 1000
PATTERNS = ("2:4", "1:16")


PLAIN = "(plain model)"


@dataclass
class Subject:
    """What every recipe's step trains: a fresh model and its target layers, one fixed batch, the loss."""

    description: str
    build: Callable[[str], tuple[nn.Module, dict[str, LayerInfo]]]  # pattern -> model, targets
    batch: Any
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
    teacher_forward: Callable[[], Any] | None = None  # distillation: the dense teacher's forward on the batch
    autocast: Callable = contextlib.nullcontext


TEACHER = "(teacher forward)"
CONTROL = "dense again"  # a second dense runner: how far two identical runners differ in this run


def timm_subject(batch_size: int) -> Subject:
    from nmcli.models.architecture import ModelRef, build_model
    from nmcli.models.targets import layers_of_model, select_targets
    from nmcli.train.example import EXAMPLE_KWARGS, EXAMPLE_MODEL
    from nmcli.train.tasks import ImageTask

    ref = ModelRef("timm", EXAMPLE_MODEL, EXAMPLE_KWARGS)

    def build(pattern: str) -> tuple[nn.Module, dict[str, LayerInfo]]:
        torch.manual_seed(0)
        model = build_model(ref, device="cpu")
        return model, select_targets(layers_of_model(model, ref))

    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(batch_size, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen))
    task = ImageTask(train=None, val=None, description="one fixed batch")  # the loss fine-tuning uses: cross-entropy
    return Subject(f"{EXAMPLE_MODEL} {EXAMPLE_KWARGS}, batch {batch_size}", build, batch, task.loss)


class Replay(nn.Module):
    """The teacher, answering the one fixed batch with the outputs it computed once."""

    def __init__(self, outputs: Any):
        super().__init__()
        self.outputs = outputs

    def forward(self, **inputs: Any) -> Any:
        return self.outputs


def hf_subject(folder: Path, batch_size: int, seq_len: int, replay: bool = True, bf16: bool = False) -> Subject:
    """A Hugging Face model distilled as `finetune` distils it (its kind's default loss) on a fixed batch of the
    built-in Python help text. `replay`: the teacher's outputs are computed once and replayed, so a step is the
    student's alone (the teacher's forward is timed apart). `bf16` as `finetune --bf16`: the teacher in bf16, the
    student's step under bf16 autocast."""
    from nmcli.models.resolve import load_model, resolve
    from nmcli.data.text import PYTHON_HELP, load_texts
    from nmcli.data.tokens import PadCollate, load_tokenizer
    from nmcli.quality.text_data import training_samples
    from nmcli.models.architecture import model_kind
    from nmcli.nm import parse_pattern
    from nmcli.oneshot.plan import plan_prune
    from nmcli.train.distill import Distiller, resolve_spec

    resolved = resolve(str(folder))
    kind, tokenizer = model_kind(resolved.model), load_tokenizer(resolved.checkpoint.folder)
    samples = training_samples(kind, tokenizer, load_texts(PYTHON_HELP).train, seq_len, PYTHON_HELP)
    picks = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0))[:batch_size]
    batch = PadCollate(int(tokenizer.pad_token_id))([samples[int(i)] for i in picks])
    teacher = load_model(resolved).eval().to(torch.bfloat16 if bf16 else torch.float32)
    spec = resolve_spec(None, kind)

    @torch.no_grad()
    def teacher_forward() -> Any:
        return teacher(**batch, output_hidden_states=bool(spec.squarehead or spec.embedding))

    distiller = Distiller(Replay(teacher_forward()) if replay else teacher, kind, spec)

    def build(pattern: str) -> tuple[nn.Module, dict[str, LayerInfo]]:
        return load_model(resolved), plan_prune(resolved, parse_pattern(pattern)).targets

    terms = " + ".join(k for k in ("kl", "ce", "squarehead", "embedding") if getattr(spec, k))
    tokens = int(batch["attention_mask"].sum())
    teacher_is = "replayed (timed apart)" if replay else "computed every step"
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    return Subject(f"{resolved.model.name} distilled ({terms}){' in bf16' if bf16 else ''}, batch {batch_size} x up to "
                   f"{seq_len} tokens ({tokens} real), the teacher's outputs {teacher_is}", build, batch, distiller,
                   teacher_forward, autocast)


def make_runner(name: str, pattern: str, subject: Subject):
    """`PLAIN` trains the model with no parametrization at all, to show what attaching masks costs by itself;
    `TEACHER` times the teacher's forward alone (what distillation adds to every recipe's step)."""
    if name == TEACHER:
        def forward(steps: int) -> float:
            start = time.perf_counter()
            for _ in range(steps):
                subject.teacher_forward()
            return (time.perf_counter() - start) / steps

        return forward
    recipe = load_recipe("dense" if name in (PLAIN, CONTROL) else name).with_overrides(pattern=pattern)
    model, targets = subject.build(pattern)
    sparsifier = Sparsifier(model, targets)
    if name != PLAIN:
        sparsifier.attach()
    optimizer = recipe_optimizer(recipe.with_overrides(lr=1e-4), model)  # finetune's optimizer (the recipe's AdamW)
    phases = Phases.from_fractions(SCHEDULE_STEPS, recipe.dense_fraction, recipe.finetune_fraction)
    position = [0]

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step = (position[0] * 97) % SCHEDULE_STEPS  # visit the whole schedule
            sparsifier.set_plan(plan_step(recipe, recipe.target, phases, step))
            train_step(model, subject.batch, optimizer, loss_fn=subject.loss, autocast=subject.autocast)
            position[0] += 1
        return (time.perf_counter() - start) / steps

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("timm", "minilm"), default="timm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default: 64 timm, 16 minilm)")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--conditions", default=",".join(label for label, _ in CONDITIONS),
                        help="comma-separated, of idle and busy (default: %(default)s)")
    args = parser.parse_args()
    wanted = args.conditions.split(",")
    if unknown := set(wanted) - {label for label, _ in CONDITIONS}:
        parser.error(f"--conditions: unknown {', '.join(sorted(unknown))}; choose from idle, busy")
    conditions = [(label, condition) for label, condition in CONDITIONS if label in wanted]
    if args.model == "timm":
        subject = timm_subject(args.batch or 64)
    else:
        from nmcli.train.example import minilm_folder

        subject = hf_subject(minilm_folder(), args.batch or 16, seq_len=128)
    print(f"{subject.description}; {torch.get_num_threads()} torch threads, {setting()}")
    names = [PLAIN, *builtin_names(), CONTROL, *([TEACHER] if subject.teacher_forward else [])]
    for pattern in args.patterns.split(","):  # one pattern's models at a time: a MiniLM with its optimizer state is ~0.4 GB
        runners = {name: make_runner(name, pattern, subject) for name in names}
        for run in runners.values():
            run(2)  # warm-up (and the mask kernel's compilation)
        for label, condition in conditions:
            with condition() as busy:
                print(f"\n{describe(label, busy)}")
                report(pattern, time_round_robin(runners, args.rounds, args.steps))


def time_round_robin(runners: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Each runner's time per step in every round; the runners take turns within a round, so a round's times
    share the machine's state (the pairing that `report` relies on), in a new seeded order each round: with a fixed
    order every runner had the same place in each round and position effects did not average out (`dense again`,
    always last, came out at 0.948x [0.903, 0.993] of dense idle at 2:4)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    order = torch.Generator().manual_seed(0)
    for _ in range(rounds):
        for index in torch.randperm(len(names), generator=order).tolist():
            times[names[index]].append(runners[names[index]](steps))
    return times


def paired_ratio(times: list[float], dense: list[float]) -> tuple[float, float, float]:
    """Median of the per-round ratios to dense, with the 95 % interval of that median (the boxplot notch,
    median +- 1.58 IQR / sqrt(n)): the spread of the same run, not a guess."""
    ratios = torch.tensor(times) / torch.tensor(dense)
    median = float(ratios.median())
    half = 1.58 * float(ratios.quantile(0.75) - ratios.quantile(0.25)) / len(ratios) ** 0.5
    return median, median - half, median + half


def verdict(low: float, high: float) -> str:
    """Against the 1.10x target: met if the whole interval is at or under it, missed if all of it is above."""
    return "met" if high <= 1.10 else "MISSED" if low > 1.10 else "not resolved: the interval straddles 1.10x"


def report(pattern: str, times: dict[str, list[float]]) -> None:
    dense = times["dense"]
    print(f"pattern {pattern}: dense step {min(dense) * 1e3:.1f} ms (fastest round); ratios are medians of per-round "
          f"ratios to dense, [95 % interval]; `{CONTROL}` is dense against itself")
    for name, runs in times.items():
        if name == "dense":
            continue
        median, low, high = paired_ratio(runs, dense)
        said = {PLAIN: "reference", CONTROL: "noise check: should hold 1.0",
                TEACHER: "apart: added to every recipe's step"}.get(name) or verdict(low, high)
        print(f"  {name:<18} {min(runs) * 1e3:7.1f} ms  {median:5.3f}x [{low:5.3f}, {high:5.3f}]  ({said})")


if __name__ == "__main__":
    main()
