"""`nmsparse study`: the MNIST recipe study, or with --model the recovery study of a pretrained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nmcli.commands.common import QuietOpt, err, out, user_errors
from nmcli.errors import NMSparseError

RecipesOpt = Annotated[Optional[str], typer.Option(
    "--recipes", help="--model: comma-separated recipe names [ste,sr-ste,fixed-mask,mdgf-exponential,sdgf-geometric,mdgf-sdgf]"
)]
BudgetOpt = Annotated[Optional[str], typer.Option(
    "--budget", help="--model: training steps per run [100] or minutes of SR-STE training per run (20min)"
)]


def study(
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="folder for README.md, plots and results.json (default docs/results, "
                                     "or docs/results/<model> with --model)")
    ] = None,
    model: Annotated[
        Optional[str], typer.Option("--model", help="a pretrained Hugging Face folder: study recovery of it (default: the MNIST study)")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="MNIST study: the whole pipeline on a tiny model and data, in about a minute")] = False,
    seeds: Annotated[int, typer.Option("--seeds", min=1)] = 3,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="MNIST study: fine-tuning epochs per run")] = None,
    patterns: Annotated[Optional[str], typer.Option("--patterns", help="--model: comma-separated N:M patterns [2:4,1:4,1:8]")] = None,
    recipes: RecipesOpt = None,
    budget: BudgetOpt = None,
    data: Annotated[Optional[str], typer.Option("--data", help="--model: training/held-out text, as finetune takes it (default python-help)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="--model: samples per step")] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="--model: tokens per sample")] = 128,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="--model: learning rate of every arm")] = 3e-4,
    sparsegpt_start: Annotated[bool, typer.Option("--sparsegpt-start/--no-sparsegpt-start",
                                                  help="--model: fixed-mask also from a SparseGPT start")] = True,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="runs at a time (one thread each)")] = 2,
    quiet: QuietOpt = False,
) -> None:
    """Compare the recipes over seeds: the MNIST study (2:4 ... 1:32 on a small ViT), or with --model the recovery of
    a pretrained Hugging Face model at equal steps and equal FLOPs; writes a results page with tables and plots."""
    say = (lambda text: None) if quiet else (lambda text: err.print(text, highlight=False))
    with user_errors():
        if model is not None:
            data_out = _pretrained_study(model, out_dir, quick, epochs, seeds, patterns, recipes, budget, data, batch_size,
                                         seq_len, lr, sparsegpt_start, jobs, say)
        elif any(v is not None for v in (patterns, recipes, budget, data)):
            raise NMSparseError("--patterns, --recipes, --budget and --data go with --model HF_FOLDER (the MNIST study has fixed ones)")
        else:
            data_out = _mnist_study(out_dir or Path("docs/results"), quick, seeds, epochs, jobs, say)
    out.print(f"{len(data_out['runs'])} runs in {data_out['wall_minutes']} min -> {data_out['page']}")


def _mnist_study(out_dir: Path, quick: bool, seeds: int, epochs: int | None, jobs: int, say) -> dict:  # noqa: ANN001
    from nmcli.study.mnist import StudySettings, run_study

    settings = StudySettings(out=out_dir, seeds=seeds, jobs=jobs)
    if quick:
        settings = StudySettings(
            out=out_dir, seeds=min(seeds, 2), jobs=jobs, patterns=("2:4", "1:8"), dense_epochs=2, epochs=1, limit=192,
            grad_log_every=2, curve_pattern="1:8",
            model_kwargs={"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 1, "num_heads": 2},
        )
    if epochs:
        settings.epochs = epochs
    return {**run_study(settings, say=say), "page": out_dir / "README.md"}


def _pretrained_study(model, out_dir, quick, epochs, seeds, patterns, recipes, budget, data, batch_size, seq_len, lr,  # noqa: ANN001, ANN202, PLR0913
                      sparsegpt_start, jobs, say):
    from nmcli.study.pretrained import PATTERNS, RECIPES, PretrainedStudySettings, StudyBudget, run_pretrained_study
    from nmcli.study.pretrained_page import display_name

    if quick or epochs:
        raise NMSparseError("--quick and --epochs belong to the MNIST study; with --model the budget is --budget STEPS|MINUTESmin")
    out_dir = out_dir or Path("docs/results") / display_name(model)
    settings = PretrainedStudySettings(
        model=model, out=out_dir, budget=StudyBudget.parse(budget or "100"), data=data,
        patterns=tuple(patterns.split(",")) if patterns else PATTERNS, recipes=tuple(recipes.split(",")) if recipes else RECIPES,
        seeds=seeds, batch_size=batch_size, seq_len=seq_len, lr=lr, sparsegpt_start=sparsegpt_start, jobs=jobs,
    )
    return {**run_pretrained_study(settings, say=say), "page": out_dir / "README.md"}
