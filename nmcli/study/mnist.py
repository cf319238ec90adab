"""The recipe study: every built-in recipe at every sparsity level, several seeds, the same budget per run.

Per seed one dense model is trained; every recipe then fine-tunes from it for the same number of epochs (the
`dense` recipe continues dense training, so it is the equal-budget reference). Collected per run: final
validation accuracy, training FLOPs relative to dense (methods.md §5), and gradient-variance / mask-flip curves
(§5). The page `README.md` beside the PNG plots states the outcome with the criteria it uses.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nmcli.io.atomic import write_text_atomic
from nmcli.methods.recipes import load_recipe
from nmcli.study.mnist_page import write_page
from nmcli.study.pool import map_runs, terminated_cleanly
from nmcli.train.engine import MODEL_FILE, FinetuneConfig

RECIPES = ("dense", "ste", "sr-ste", "fixed-mask", "mdgf-linear", "mdgf-exponential", "sdgf-stepwise",
           "sdgf-geometric", "mdgf-sdgf")
PATTERNS = ("2:4", "1:4", "1:8", "1:16", "1:32")
MODEL = "vit_tiny_patch16_224"


@dataclass
class StudySettings:
    out: Path
    seeds: int = 3
    patterns: tuple[str, ...] = PATTERNS
    recipes: tuple[str, ...] = RECIPES
    dense_epochs: int = 15
    epochs: int = 6
    model_kwargs: dict[str, Any] = field(default_factory=lambda: {
        "img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 64, "depth": 4, "num_heads": 2,
    })
    limit: int | None = None
    grad_log_every: int = 10
    jobs: int = 2
    curve_pattern: str = "1:8"


def run_study(settings: StudySettings, say: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.perf_counter()
    settings.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with terminated_cleanly(), tempfile.TemporaryDirectory(prefix="nmsparse-study-") as tmp:
        work = Path(tmp)
        common = dict(model=MODEL, model_kwargs=settings.model_kwargs, limit=settings.limit, force=True)
        dense = [
            FinetuneConfig(
                recipe=load_recipe("dense").with_overrides(epochs=settings.dense_epochs, lr=3e-3),
                out=work / f"pretrain-{seed}", seed=seed, **common,
            )
            for seed in range(settings.seeds)
        ]
        say(f"pretraining {settings.seeds} dense models ({settings.dense_epochs} epochs each)")
        pretrained = map_runs(settings.jobs, dense, lambda c, r: say(f"  seed {c.seed}: dense {r['final_val_accuracy']:.4f}"))
        configs = []
        for seed in range(settings.seeds):
            for recipe in settings.recipes:
                for pattern in (settings.patterns if recipe != "dense" else (settings.curve_pattern,)):
                    configs.append(FinetuneConfig(
                        recipe=load_recipe(recipe).with_overrides(pattern=pattern, epochs=settings.epochs, lr=1e-3),
                        out=work / f"{recipe}-{pattern.replace(':', 'of')}-{seed}",
                        checkpoint=work / f"pretrain-{seed}" / MODEL_FILE, seed=seed,
                        grad_log_every=settings.grad_log_every, **common,
                    ))
        say(f"{len(configs)} fine-tuning runs, {settings.epochs} epochs each, {settings.jobs} at a time")
        count = [0]

        def done(config: FinetuneConfig, result: dict) -> None:
            count[0] += 1
            say(f"  [{count[0]}/{len(configs)}] {config.recipe.name} {config.recipe.pattern} seed {config.seed}: "
                f"{result['final_val_accuracy']:.4f}")

        for config, result in zip(configs, map_runs(settings.jobs, configs, done)):
            runs.append({"recipe": config.recipe.name, "pattern": config.recipe.pattern if config.recipe.name != "dense" else None,
                         "seed": config.seed, **{k: result[k] for k in (
                             "start_val_accuracy", "final_val_accuracy", "training_flops_relative_to_dense", "wall_seconds",
                             "grad_var_curve", "mask_flip_curve", "steps")}})
    data = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "pretrained_val_accuracy": [r["final_val_accuracy"] for r in pretrained],
        "runs": runs,
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
    }
    write_text_atomic(settings.out / "results.json", json.dumps(data, indent=1) + "\n")
    write_page(data, settings.out)
    return data
